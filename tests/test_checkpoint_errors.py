"""Bad checkpoints get a ValueError that names the file (and tensor) and says what is wrong; failed saves
leave nothing that looks complete; training checkpoints load through the same entry point."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama3
from llama3.cli.convert import main as convert_main
from tests.conftest import random_model, tiny_args
from tests.test_checkpoint_hf import byte_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One small model saved as a sharded HF folder and as a 2-shard Meta folder; tests copy them."""
    root = tmp_path_factory.mktemp("saved")
    model = random_model(tiny_args("gqa", vocab_size=512), seed=13)
    tok = byte_tokenizer()
    return {"model": model,
            "hf": llama3.save(model, tok, root / "hf", format="hf", max_shard_size="100KB"),
            "meta": llama3.save(model, tok, root / "meta", format="meta", num_shards=2)}


def _copy(saved, kind, tmp_path):
    return shutil.copytree(saved[kind], tmp_path / kind)


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_shard_names_outside_the_folder_are_refused(saved, tmp_path, name):
    folder = _copy(saved, "hf", tmp_path)
    index = folder / "model.safetensors.index.json"
    _edit_json(index, lambda d: d["weight_map"].update({"model.norm.weight": name}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: refusing file name"):
        llama3.load(folder)


def test_truncated_safetensors(saved, tmp_path):
    folder = _copy(saved, "hf", tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{shard.name}.*(not a valid safetensors|truncated)"):
        llama3.load(folder)


def test_corrupt_safetensors_header(saved, tmp_path):
    folder = _copy(saved, "hf", tmp_path)
    shard = min(folder.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[8:16] = b"garbage!"  # inside the JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{shard.name}: not a valid safetensors file"):
        llama3.load(folder)


def test_corrupt_config_json(saved, tmp_path):
    folder = _copy(saved, "hf", tmp_path)
    (folder / "config.json").write_text('{"hidden_size": 64, ')
    with pytest.raises(ValueError, match=r"config\.json: config\.json is not valid JSON"):
        llama3.load(folder)


def test_missing_tensor_is_named(saved, tmp_path):
    folder = _copy(saved, "hf", tmp_path)
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    victim = "model.layers.1.mlp.down_proj.weight"
    shard = folder / weight_map[victim]
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{victim}' is listed in {shard.name} but that file does not"):
        llama3.load(folder)
    _edit_json(index, lambda d: d["weight_map"].pop(victim))  # a consistent index, still a missing tensor
    with pytest.raises(ValueError, match=rf"missing tensor '{victim}'"):
        llama3.load(folder)


def test_shape_mismatch_against_config(saved, tmp_path):
    folder = _copy(saved, "hf", tmp_path)
    _edit_json(folder / "config.json", lambda d: (d.update(intermediate_size=192), d.pop("multiple_of")))
    with pytest.raises(ValueError, match=r"model-\d+-of-\d+\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj"
                                         r"\.weight' has shape \[\d+, \d+\] but the config implies"):
        llama3.load(folder)


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_unknown_rope_type(saved, tmp_path, spelling):
    folder = _copy(saved, "hf", tmp_path)
    _edit_json(folder / "config.json", lambda d: d.update({spelling: {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ValueError, match=r"config\.json: .*unknown rope type 'yarn'"):
        llama3.load(folder)


def test_truncated_pth(saved, tmp_path):
    folder = _copy(saved, "meta", tmp_path)
    shard = folder / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: cannot read this PyTorch checkpoint"):
        llama3.load(folder)


def test_pth_with_code_is_not_unpickled(saved, tmp_path):
    folder = _copy(saved, "meta", tmp_path)
    torch.save({"tok_embeddings.weight": torch.zeros(2), "payload": shutil.rmtree}, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: cannot read this PyTorch checkpoint.*weights-only"):
        llama3.load(folder)


def test_missing_meta_shard(saved, tmp_path):
    folder = _copy(saved, "meta", tmp_path)
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(ValueError, match=r"numbered \[0, 2\].*a shard is missing"):
        llama3.load(folder)


def test_meta_shard_missing_a_tensor(saved, tmp_path):
    folder = _copy(saved, "meta", tmp_path)
    shard = folder / "consolidated.01.pth"
    state = torch.load(shard, weights_only=True)
    del state["layers.1.attention.wo.weight"]
    torch.save(state, shard)
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: missing tensor 'layers\.1\.attention\.wo\.weight'"):
        llama3.load(folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match="no config.json .* params.json"):
        llama3.load(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        llama3.load(tmp_path / "nowhere")


def test_truncated_gguf(saved, tmp_path):
    path = llama3.save(saved["model"], byte_tokenizer(), tmp_path / "m.gguf", format="gguf", dtype="f16")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"m\.gguf: not a readable GGUF file"):
        llama3.load(path)


@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
def test_failed_save_leaves_nothing(saved, tmp_path, fmt):
    """The tokenizer is written after the weights: a failure there must not leave a folder that looks done."""
    target = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    with pytest.raises(AttributeError):
        llama3.save(saved["model"], None, target, format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_overwrite_and_bad_options(saved, tmp_path):
    model, tok = saved["model"], byte_tokenizer()
    out = llama3.save(model, tok, tmp_path / "hf")
    with pytest.raises(ValueError, match="already exists"):
        llama3.save(model, tok, out)
    llama3.save(model, tok, out, overwrite=True, dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp or old folders left
    with pytest.raises(ValueError, match="unknown checkpoint format 'onnx'"):
        llama3.save(model, tok, tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match="unknown GGUF dtype 'q4_k'"):
        llama3.save(model, tok, tmp_path / "x.gguf", format="gguf", dtype="q4_k")
    with pytest.raises(ValueError, match="n_kv_heads = 2 is not divisible by 4"):
        llama3.save(model, tok, tmp_path / "m", format="meta", num_shards=4)


def test_convert_reports_errors(saved, tmp_path, capsys):
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert convert_main([str(saved["hf"]), str(tmp_path / "m"), "--to", "meta", "--shards", "2"]) == 0
    assert (tmp_path / "m" / "consolidated.01.pth").is_file()


def test_training_checkpoint_loads_and_converts(saved, tmp_path):
    from llama3.checkpoint.native import save_training_checkpoint

    model, tok = saved["model"], byte_tokenizer()
    step = save_training_checkpoint(tmp_path / "run", 5, model=model, optimizer=None, train_state={"step": 5},
                                    config_json="{}", tokenizer=tok)
    loaded, _ = llama3.load(tmp_path / "run")
    tokens = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert convert_main([str(step), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf_model, _ = llama3.load(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(hf_model(tokens), model(tokens))
