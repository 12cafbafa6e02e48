"""GGUF export runs in llama.cpp (llama-cpp-python) with the same greedy tokens and close logits as our
model, and loads back into our model. The model has Llama 3's real 128,256-token vocabulary (llama.cpp's
"llama-bpe" tokenizer expects it) with tiny layers (dim 64, 2 layers). llama.cpp runs in a child process
(tests/peer), so a crash in it fails one test and names the signal, the command and the file."""

import numpy as np
import pytest
import torch

import llama3
from tests.conftest import random_model, tiny_args
from tests.peer import llama_cpp

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
NUM_NEW_TOKENS = 8
# Logit tolerances against our fp32 model (logits here span about ±5): f32 differs only by summation order;
# f16 rounds weights and llama.cpp's activations for the f16 matmuls to 11 bits.
TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "q8_0": 0.15}


def _sharp_attention_model(args):
    """Random weights with q/k scaled up, so attention is far from uniform and positions (RoPE) matter."""
    model = random_model(args, seed=11)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(8)
            layer.attention.wk.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def model_and_tokenizer(llama3_tokenizer):
    return _sharp_attention_model(tiny_args("rope31", vocab_size=128256, max_seq_len=512)), llama3_tokenizer


@pytest.fixture(scope="module")
def gguf_files(model_and_tokenizer, tmp_path_factory):
    """One export per dtype, shared by the tests (writing 128K tokens and 280K merges takes seconds)."""
    model, tokenizer = model_and_tokenizer
    folder = tmp_path_factory.mktemp("gguf")
    return {dtype: llama3.save(model, tokenizer, folder / f"model-{dtype}.gguf", format="gguf", dtype=dtype)
            for dtype in ("f32", "f16", "q8_0")}


def _ours_greedy(model, ids, num_new):
    """Greedy continuation and the logits of every position, by full forward passes."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(num_new):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        logits = model(torch.tensor([ids]))[0].numpy()
    return ids, logits


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_runs_in_llama_cpp_with_equal_greedy_tokens(model_and_tokenizer, gguf_files, dtype):
    model, tokenizer = model_and_tokenizer
    path = gguf_files[dtype]
    prompt = tokenizer.encode(PROMPT, bos=True)
    cpp = llama_cpp.evaluate(path, prompt, num_new=NUM_NEW_TOKENS, text=PROMPT)
    assert cpp["tokens"] == prompt  # llama-bpe = our tokenizer
    assert cpp["eos"] == tokenizer.eos_id and cpp["bos"] == tokenizer.bos_id
    cpp_ids, cpp_logits = cpp["ids"], cpp["logits"]
    our_ids, _ = _ours_greedy(model, prompt, NUM_NEW_TOKENS)
    # logits on llama.cpp's own continuation; the full sequence is compared (prompt + generated)
    with torch.no_grad():
        our_logits_on_cpp = model(torch.tensor([cpp_ids[:-1]]))[0].numpy()
    assert np.abs(cpp_logits[: len(cpp_ids) - 1] - our_logits_on_cpp).max() <= TOLERANCE[dtype]
    if dtype != "q8_0":  # 8-bit weights may legitimately flip a near-tie; their logits are checked above
        assert cpp_ids == our_ids
    else:
        assert cpp_ids[: len(prompt) + 1] == our_ids[: len(prompt) + 1]


@pytest.mark.timeout(300)
def test_gguf_rope_scaling_reaches_llama_cpp(model_and_tokenizer, gguf_files):
    """rope_freqs carries Llama 3.1 scaling: llama.cpp matches the scaled model, not the unscaled one."""
    model, tokenizer = model_and_tokenizer
    path = gguf_files["f32"]
    ids = tokenizer.encode(PROMPT * 3, bos=True)[:100]
    cpp = llama_cpp.evaluate(path, ids)["logits"]
    unscaled = _sharp_attention_model(model.args.replace(use_scaled_rope=False))
    with torch.no_grad():
        ours, plain = model(torch.tensor([ids]))[0].numpy(), unscaled(torch.tensor([ids]))[0].numpy()
    assert np.abs(cpp - ours).max() <= 1e-4
    assert np.abs(cpp - plain).max() > 100 * np.abs(cpp - ours).max()


@pytest.mark.timeout(300)
def test_gguf_loads_back(tmp_path):
    """GGUF -> our model: f32 exactly, f16 as rounded, q8_0 within its error bound."""
    from tests.test_checkpoint_hf import byte_tokenizer

    model = random_model(tiny_args("rope31", vocab_size=512, multiple_of=32), seed=12)
    tokenizer = byte_tokenizer()
    files = {dtype: llama3.save(model, tokenizer, tmp_path / f"m-{dtype}.gguf", format="gguf", dtype=dtype)
             for dtype in ("f32", "f16", "q8_0")}
    loaded, loaded_tok = llama3.load(files["f32"])
    assert loaded.args.use_scaled_rope and loaded.args.rope_original_max_seq_len == model.args.rope_original_max_seq_len
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded_tok.special_tokens == tokenizer.special_tokens
    assert loaded_tok.encode(PROMPT) == tokenizer.encode(PROMPT)
    half, _ = llama3.load(files["f16"])
    assert half.tok_embeddings.weight.dtype == torch.float16
    assert torch.equal(half.tok_embeddings.weight, model.tok_embeddings.weight.half())
    q8, _ = llama3.load(files["q8_0"], dtype="float32")  # runs quantized: the weights stay Q8_0 blocks
    assert q8.layers[0].feed_forward.w2.kind == "Q8_0"
    weight = model.layers[0].feed_forward.w2.weight
    error = (q8.layers[0].feed_forward.w2.dequantize() - weight).abs().max()
    assert 0 < error <= weight.abs().max() / 127  # Q8_0: int8 with one scale per 32 values


@pytest.mark.timeout(300)
def test_gguf_reader_equals_the_gguf_package_with_llama3_vocabulary(model_and_tokenizer, gguf_files):
    """Our GGUF reader against llama.cpp's `gguf.GGUFReader` on a file with Llama 3's 128K tokens and 280K
    merges: every metadata value and every tensor view equal; the model and tokenizer load back."""
    import gguf

    from llama3.checkpoint.gguf import _GGUFFile

    path = gguf_files["q8_0"]
    reference, ours = gguf.GGUFReader(path), _GGUFFile(path)
    expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.fields) == set(expected)
    for key, value in expected.items():
        assert ours.fields[key] == pytest.approx(value) if isinstance(value, float) else ours.fields[key] == value, key
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 128256 and len(ours.fields["tokenizer.ggml.merges"]) > 200_000
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors):
        assert mine.shape == [int(n) for n in theirs.shape] and mine.tensor_type == theirs.tensor_type
        assert mine.data.shape == theirs.data.shape and np.array_equal(mine.data, theirs.data), mine.name
    model, tokenizer = model_and_tokenizer
    loaded, loaded_tok = llama3.load(gguf_files["f32"])
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    text = PROMPT + " <|eot_id|> 東京 🙂"
    assert loaded_tok.encode(text, allowed_special="all") == tokenizer.encode(text, allowed_special="all")


def test_gguf_with_a_cut_data_section_is_refused(gguf_files, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_files["f16"].read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut\.gguf: not a readable GGUF file \(tensor .* runs past the end"):
        llama3.load(cut)


@pytest.mark.timeout(300)
def test_gguf_export_keeps_the_ids_the_model_has_rows_for(model_and_tokenizer, tmp_path, capsys):
    """Llama 3.2's tokenizer.json lists <|image|> at 128256, one past the 128256 embedding rows: the export
    keeps the first vocab_size ids with a one-line notice, and llama.cpp runs the file."""
    import json

    model, _ = model_and_tokenizer
    hf_dir = llama3.save(model, model_and_tokenizer[1], tmp_path / "hf", format="hf")
    tokenizer_json = json.loads((hf_dir / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"].append({"id": 128256, "content": "<|image|>", "single_word": False,
                                           "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (hf_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (hf_dir / "tokenizer.model").unlink()  # as in an HF-only download: the tokenizer comes from tokenizer.json
    loaded, tokenizer = llama3.load(hf_dir)
    assert tokenizer.n_words == 128257 and loaded.args.vocab_size == 128256
    capsys.readouterr()
    path = llama3.save(loaded, tokenizer, tmp_path / "trimmed.gguf", format="gguf", dtype="f32")
    notice = capsys.readouterr().err.strip().splitlines()
    assert notice == ["llama3: the tokenizer has 128257 ids but the model 128256 embeddings; "
                      "writing the first 128256 to the GGUF vocabulary"]
    prompt = tokenizer.encode(PROMPT, bos=True)
    cpp = llama_cpp.evaluate(path, prompt, text=PROMPT + "<|eot_id|>")
    assert cpp["n_vocab"] == 128256
    assert cpp["tokens"] == prompt + [tokenizer.eot_id]
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    assert np.abs(cpp["logits"] - ours).max() <= TOLERANCE["f32"]


def test_gguf_export_refuses_a_stop_token_past_the_embeddings(llama3_tokenizer, tmp_path):
    model = random_model(tiny_args(vocab_size=128000 + 5), seed=3)  # rows for <|end_of_text|>, not <|eot_id|>
    with pytest.raises(ValueError, match=r"eot token is id 128009 but the model has only 128005 embeddings"):
        llama3.save(model, llama3_tokenizer, tmp_path / "m.gguf", format="gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_load_reads_the_file_ahead_only_when_it_fits(tmp_path, monkeypatch):
    """Opening a GGUF file asks the kernel (from a background thread) to read it whole into the page cache,
    unless it is larger than half the available memory; the loaded model is the same either way."""
    import os
    import threading

    from llama3.checkpoint import gguf as gguf_module
    from tests.test_checkpoint_hf import byte_tokenizer

    model = random_model(tiny_args("gqa", vocab_size=512, multiple_of=32), seed=2)
    path = llama3.save(model, byte_tokenizer(), tmp_path / "m.gguf", format="gguf")
    advised = []
    real_fadvise = gguf_module.os.posix_fadvise

    def spy(fd, offset, length, advice):
        advised.append((os.fstat(fd).st_size, advice, threading.current_thread().name))
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(gguf_module.os, "posix_fadvise", spy)
    first, _ = llama3.load(path)
    for thread in threading.enumerate():
        if thread.name == "gguf-read-ahead":
            thread.join(10)
    assert advised == [(path.stat().st_size, os.POSIX_FADV_WILLNEED, "gguf-read-ahead")]
    monkeypatch.setattr(gguf_module, "_memory_available", lambda: path.stat().st_size)  # twice the file: no
    second, _ = llama3.load(path)
    assert len(advised) == 1
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(first(tokens), second(tokens), rtol=0, atol=0)
