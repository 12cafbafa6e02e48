"""Derivatives in GGUF: the files llama3.save writes load in transformers' own GGUF loader and in llama.cpp
with equal logits and ids, and read back here; bad vocabulary metadata is refused naming the file."""

from __future__ import annotations

import json

import pytest
import torch

import llama3
from llama3.chat_template import chat_format_for
from llama3.hf_tokenizer import HFTokenizer
from tests.family_fixtures import (  # noqa: F401 (a fixture)
    DIALOG,
    SAMPLE_TEXTS,
    family_dirs_fixture,
    random_ids,
    special_ids,
    vocab_size_of,
    write_hf_model,
)


# ----- GGUF -----

@pytest.fixture(scope="module")
def gguf_files(family_dirs, tmp_path_factory):
    """Each tokenizer kind in a derivative with plain RoPE (what transformers' GGUF loader reads), written
    to GGUF (f32) by llama3.save from its HF folder; with that HF reference."""
    out = {}
    for variant, kind in (("gpt2-llama3rope", "gpt2"), ("spm-tied-dynamic", "spm")):
        source = family_dirs[variant][0]
        folder = tmp_path_factory.mktemp(f"plain-{kind}")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((source / name).read_bytes())
        data = json.loads((folder / "tokenizer.json").read_text())
        hf = write_hf_model(folder, vocab_size_of(data), seed=5, tie_word_embeddings=kind == "spm",
                            **special_ids(data, kind))
        model, tokenizer = llama3.load(folder)
        target = tmp_path_factory.mktemp(f"gguf-{kind}") / "model.gguf"
        llama3.save(model, tokenizer, target, format="gguf", dtype="f32")
        out[kind] = (target, hf, folder)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["gpt2", "spm"])
def test_gguf_derivative_equals_transformers_gguf_loader(gguf_files, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, hf, folder = gguf_files[kind]
    model, tokenizer = llama3.load(path)
    assert isinstance(tokenizer, HFTokenizer)
    ref_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokens = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        ours = model(tokens)
        torch.testing.assert_close(ours, ref_model(tokens).logits, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours, hf(tokens).logits, atol=2e-5, rtol=1e-4)
    original = llama3.load(folder)[1]
    for text in SAMPLE_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == ref_tok(text, add_special_tokens=False)["input_ids"], text
        assert tokenizer.encode(text, bos=True) == ref_tok(text)["input_ids"], text
        assert tokenizer.decode(ids) == ref_tok.decode(ids), text
        if not text[:1].isspace():  # the vocabulary survives the trip through GGUF metadata (see below)
            assert ids == original.encode(text), text
    chat = chat_format_for(tokenizer)
    expected = ref_tok.apply_chat_template(DIALOG, add_generation_prompt=True, tokenize=False)
    assert chat.render(DIALOG) == expected
    assert chat.encode_dialog_prompt(DIALOG) == ref_tok(expected, add_special_tokens=False)["input_ids"]
    assert chat.stop_tokens == chat_format_for(original).stop_tokens
    if kind == "gpt2":
        assert chat.encode_dialog_prompt(DIALOG) == chat_format_for(original).encode_dialog_prompt(DIALOG)
    # A SentencePiece GGUF reads as transformers reads it: one `▁` prepended to the whole text unless it
    # starts with a space (the "first" scheme), where Llama 2's legacy tokenizer.json prepends to every
    # stretch between special tokens; so text after a special token or a leading space may split differently.


def _gguf_fields(path):
    from llama3.checkpoint.gguf import _GGUFFile

    return dict(_GGUFFile(path).fields)


def test_bad_gguf_vocabularies_are_refused(gguf_files):
    from llama3.checkpoint.gguf_family import hf_tokenizer_from_gguf

    path = gguf_files["gpt2"][0]
    fields = _gguf_fields(path)
    with pytest.raises(ValueError, match=rf"{path}.*pre-tokenizer 'qwen2'"):
        hf_tokenizer_from_gguf({**fields, "tokenizer.ggml.pre": "qwen2"}, path)
    with pytest.raises(ValueError, match=rf"{path}.*tokenizer model 'bert'"):
        hf_tokenizer_from_gguf({**fields, "tokenizer.ggml.model": "bert"}, path)
    merges = [*fields["tokenizer.ggml.merges"], "zz qq"]
    with pytest.raises(ValueError, match=rf"{path}.*merges\[\d+\] = 'zz qq' refers to 'zz'"):
        hf_tokenizer_from_gguf({**fields, "tokenizer.ggml.merges": merges}, path)
    spm = _gguf_fields(gguf_files["spm"][0])
    no_scores = {k: v for k, v in spm.items() if k not in ("tokenizer.ggml.scores", "tokenizer.ggml.merges")}
    with pytest.raises(ValueError, match="needs tokenizer.ggml.scores"):
        hf_tokenizer_from_gguf(no_scores, path)
    # without merges the SentencePiece merge order comes from the scores, and gives the same ids
    from_scores = hf_tokenizer_from_gguf({k: v for k, v in spm.items() if k != "tokenizer.ggml.merges"}, path)
    with_merges = hf_tokenizer_from_gguf(spm, path)
    for text in SAMPLE_TEXTS:
        assert from_scores.encode(text) == with_merges.encode(text), text


_LLAMA_CPP_SCRIPT = """
import json, sys
from llama_cpp import Llama
path, texts, ids = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
llm = Llama(model_path=path, n_ctx=128, logits_all=True, verbose=False, n_threads=1, seed=0)
tokens = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]
llm.eval(ids)
print(json.dumps({"tokens": tokens, "logits": [list(map(float, row)) for row in llm.scores[: len(ids)]],
                  "bos": llm.token_bos(), "eos": llm.token_eos()}))
"""


def _run_llama_cpp(path, texts: list[str], ids: list[int]) -> dict:
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _LLAMA_CPP_SCRIPT, str(path), json.dumps(texts), json.dumps(ids)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["gpt2", "spm"])
def test_llama_cpp_runs_a_derivative_gguf(gguf_files, kind):
    """llama.cpp (in a subprocess: a native crash fails this test only) loads the derivative GGUF we write:
    equal logits, and for the byte-level vocabulary the same ids for every sample text."""
    path, hf, _ = gguf_files[kind]
    model, tokenizer = llama3.load(path)
    texts = [t for t in SAMPLE_TEXTS if t]
    ids = random_ids(hf.config.vocab_size)[0].tolist()
    result = _run_llama_cpp(path, texts, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    assert (torch.tensor(result["logits"]) - ours).abs().max() < 1e-3
    assert result["eos"] == tokenizer.eos_id
    if kind == "gpt2":
        assert result["tokens"] == [tokenizer.encode(t) for t in texts]
    else:  # llama.cpp's SentencePiece prepends a space to every text, as SentencePiece itself does
        assert result["bos"] == tokenizer.bos_id
        assert result["tokens"][0] == tokenizer.encode(texts[0])


@pytest.mark.timeout(300)
def test_gguf_round_trip_keeps_head_dim_biases_and_linear_rope(family_dirs, tmp_path):
    """A derivative with head_dim != dim / n_heads, attention and MLP biases and linear RoPE scaling survives
    GGUF (llama.attention.key_length, llama.rope.scaling.*, blk.N.*.bias): logits still equal transformers'."""
    folder, hf, _ = family_dirs["gpt2-headdim-bias-linear"]
    model, tokenizer = llama3.load(folder)
    path = llama3.save(model, tokenizer, tmp_path / "m.gguf", format="gguf", dtype="f32")
    loaded, loaded_tokenizer = llama3.load(path)
    assert loaded.args.head_dim == 32 and loaded.args.rope_scaling_type == "linear"
    assert loaded.args.attention_bias and loaded.args.mlp_bias
    tokens = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)
    assert loaded_tokenizer.encode(SAMPLE_TEXTS[1]) == tokenizer.encode(SAMPLE_TEXTS[1])
    ids = tokens[0].tolist()
    cpp = _run_llama_cpp(path, [SAMPLE_TEXTS[1]], ids)  # llama.cpp reads the same keys and tensors
    with torch.no_grad():
        assert (torch.tensor(cpp["logits"]) - loaded(tokens[:1])[0]).abs().max() < 1e-3
    dynamic = llama3.load(family_dirs["spm-tied-dynamic"][0])
    with pytest.raises(ValueError, match="no 'dynamic' RoPE scaling"):
        llama3.save(*dynamic, tmp_path / "d.gguf", format="gguf")
