"""Small command-line contracts: the model id `serve` picks, the sampling defaults it reads, `convert`'s
format inference and early destination check, and a one-line message for a missing optional package."""

from __future__ import annotations

import json

import pytest
from conftest import random_model, tiny_args


def test_serve_model_id_and_generation_defaults(tmp_path, capsys):
    from llama3.cli.serve import default_model_name, generation_defaults

    run = tmp_path / "runs" / "chat" / "hf"
    run.mkdir(parents=True)
    assert default_model_name(run) == "chat"  # an export folder named `hf` takes its run's name
    assert default_model_name(tmp_path / "runs" / "chat") == "chat"
    assert default_model_name(tmp_path / "austen.Q8_0.gguf") == "austen.Q8_0"
    assert generation_defaults(run) is None
    (run / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "do_sample": True,
                                                            "eos_token_id": [1, 2]}))
    assert generation_defaults(run) == {"temperature": 0.6, "top_p": 0.9}
    (run / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "do_sample": False}))
    assert generation_defaults(run) == {"temperature": 0.0}  # greedy, as transformers decodes it
    (run / "generation_config.json").write_text("{not json")
    assert generation_defaults(run) is None and "unreadable" in capsys.readouterr().err


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, llama3_tokenizer):
    import llama3

    path = tmp_path_factory.mktemp("convert") / "model"
    llama3.save(random_model(tiny_args("gqa", vocab_size=llama3_tokenizer.n_words)), llama3_tokenizer, path)
    return path


def test_convert_infers_gguf_and_checks_the_destination_first(saved_model, tmp_path, capsys, monkeypatch):
    import llama3
    from llama3.checkpoint import load as load_module
    from llama3.cli.convert import main

    assert main([str(saved_model), str(tmp_path / "out.gguf")]) == 0  # --to gguf from the name
    model, _ = llama3.load(tmp_path / "out.gguf")
    assert model.args.dim == 64

    def no_load(*args, **kwargs):
        raise AssertionError("the destination must be checked before the model loads")

    monkeypatch.setattr(load_module, "load", no_load)
    capsys.readouterr()
    assert main([str(saved_model), str(tmp_path / "out.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([str(saved_model), str(tmp_path / "folder")]) == 2
    assert "pass --to hf, meta or gguf" in capsys.readouterr().err
    assert main([str(saved_model), str(tmp_path / "x.gguf"), "--to", "hf"]) == 2
    assert "ends in .gguf but --to is hf" in capsys.readouterr().err


def test_missing_optional_package_is_one_line(monkeypatch, capsys):
    import llama3.cli
    import llama3.cli.convert

    def needs_gguf(argv):
        raise ModuleNotFoundError("No module named 'gguf'", name="gguf")

    monkeypatch.setattr(llama3.cli.convert, "main", needs_gguf)
    assert llama3.cli.main(["convert", "a", "b.gguf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[gguf]'" in err and "Traceback" not in err
