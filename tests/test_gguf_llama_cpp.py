"""Quantized GGUF files against llama.cpp (llama-cpp-python), each call in a subprocess so that a crash
in native code fails one test, not the suite:
- the files we write (q4_0, q4_k_m, q5_k_m, q6_k, q8_0) load in llama.cpp with the same tokenizer, and its
  logits on them are close to our own forward on the same file;
- llama.cpp's own quantizer, run on our f32 export, picks the same type for every tensor as our presets.

The model has Llama 3's real 128,256-token vocabulary (llama.cpp's "llama-bpe" tokenizer expects it), dim
256 (rows of whole 256-value K-blocks) and 8 layers (so the _m presets' layer rule has layers to pick)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llama3
from llama3.checkpoint.gguf import _GGUFFile
from tests.conftest import random_model, tiny_args

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
CLI_PRESETS = ("q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0")
# llama.cpp's file types for `llama_model_quantize`
FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}

# Runs in a fresh interpreter: argv[1] is a JSON job, the answer is one JSON line on stdout.
_LLAMA_CPP_SCRIPT = r"""
import json, sys
import numpy as np
job = json.loads(sys.argv[1])
import llama_cpp
if job["kind"] == "logits":
    out = {}
    for path in job["files"]:
        llm = llama_cpp.Llama(model_path=path, n_ctx=128, logits_all=True, verbose=False, n_threads=1, seed=0)
        ids = llm.tokenize(job["prompt"].encode(), add_bos=True, special=True)
        llm.eval(ids)
        np.save(path + ".logits.npy", np.array(llm.scores[: llm.n_tokens], dtype=np.float32))
        out[path] = ids
        del llm
    print(json.dumps(out))
else:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = job["ftype"]
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), params)
    print(json.dumps({"rc": rc}))
"""


def run_llama_cpp(job: dict, timeout: float = 300) -> dict:
    """One llama.cpp job in a subprocess (a crash or hang fails the caller's test with llama.cpp's stderr)."""
    result = subprocess.run([sys.executable, "-c", _LLAMA_CPP_SCRIPT, json.dumps(job)], capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"llama.cpp exited with {result.returncode}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_and_tokenizer(llama3_tokenizer):
    args = tiny_args("gqa", dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=256)
    model = random_model(args, seed=31)
    with torch.no_grad():  # sharper attention, so positions matter
        for layer in model.layers:
            layer.attention.wq.weight.mul_(4)
            layer.attention.wk.weight.mul_(4)
    return model, llama3_tokenizer


@pytest.fixture(scope="module")
def preset_files(model_and_tokenizer, tmp_path_factory):
    model, tokenizer = model_and_tokenizer
    folder = tmp_path_factory.mktemp("quantized")
    return {preset: llama3.save(model, tokenizer, folder / f"m-{preset}.gguf", format="gguf", dtype=preset)
            for preset in CLI_PRESETS}


def _kl(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    p = F.log_softmax(torch.from_numpy(reference).double(), -1)
    q = F.log_softmax(torch.from_numpy(logits).double(), -1)
    return (p.exp() * (p - q)).sum(-1).numpy()


@pytest.mark.timeout(600)
def test_llama_cpp_runs_our_quantized_files_with_logits_close_to_ours(model_and_tokenizer, preset_files):
    model, tokenizer = model_and_tokenizer
    answer = run_llama_cpp({"kind": "logits", "files": [str(p) for p in preset_files.values()], "prompt": PROMPT})
    ids = tokenizer.encode(PROMPT, bos=True)
    stats = {}
    for preset, path in preset_files.items():
        assert answer[str(path)] == ids, preset  # llama.cpp's tokenizer on our metadata = ours
        cpp = np.load(str(path) + ".logits.npy")
        ours, _ = llama3.load(path)
        with torch.no_grad():
            mine = ours(torch.tensor([ids]))[0].numpy()
            plain = model(torch.tensor([ids]))[0].numpy()
        kl, kl_plain = _kl(cpp, mine), _kl(cpp, plain)
        stats[preset] = (kl.mean(), kl.max(), kl_plain.mean(), (cpp.argmax(-1) == mine.argmax(-1)).mean())
    for preset, (kl_mean, kl_max, kl_plain, same_top) in stats.items():
        # both run the same quantized weights; only the rounding of activations differs (llama.cpp: per 32
        # or 256 values, ours: per 32), far less than what the quantization of the weights moves
        # (measured: KL ~3e-5 mean, 6e-5 max; the quantization itself 4e-5 (q8_0) to 4e-3 (q4_0))
        assert kl_mean < 2e-4 and kl_max < 5e-4, (preset, stats)
        assert kl_mean < kl_plain / 5, (preset, stats)
        assert same_top >= 0.8, (preset, stats)  # random logits have near-ties; greedy may flip on some


@pytest.mark.timeout(600)
def test_presets_pick_the_tensor_types_llama_cpp_picks(model_and_tokenizer, preset_files, tmp_path):
    model, tokenizer = model_and_tokenizer
    source = llama3.save(model, tokenizer, tmp_path / "m-f32.gguf", format="gguf", dtype="f32")
    for preset, path in preset_files.items():
        theirs_path = tmp_path / f"llama-cpp-{preset}.gguf"
        assert run_llama_cpp({"kind": "quantize", "src": str(source), "dst": str(theirs_path),
                              "ftype": FTYPES[preset]})["rc"] == 0
        ours = {t.name: t.tensor_type.name for t in _GGUFFile(path).tensors}
        theirs = {t.name: t.tensor_type.name for t in _GGUFFile(theirs_path).tensors}
        assert ours == theirs, (preset, {k: (v, theirs.get(k)) for k, v in ours.items() if theirs.get(k) != v})
        if preset == "q4_k_m":
            assert ours["blk.0.attn_v.weight"] == "Q6_K" and ours["blk.1.attn_v.weight"] == "Q4_K"
        assert ours["output.weight"] == ("Q8_0" if preset == "q8_0" else "Q6_K")
