"""Lean start: loading a bf16 Hugging Face folder for inference keeps peak memory near the weights' size
(zero-copy mapping; q/k/v and gate/up grouped over the mapped weights, nothing copied but the permuted q/k
rows; where a copy is made, fused or quantized, the mapped pages are dropped once copied), `--quantize`
streams block by block, and the logits stay those of the plain model. Peak RSS is measured in a child
process (its VmHWM against the resident size just before the load)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama3.checkpoint.safety import open_safetensors
from llama3.inference.mapped import populate_file_pages, release_file_pages
from tests.conftest import REPO

# ~180 MB of bf16 weights: big enough that a second copy of them would stand out of the runtime's noise.
BIG = dict(dim=1024, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=256, max_seq_len=64)
TOKENS = [[256, 5, 17, 99, 3, 250, 42, 7]]

CHILD = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from llama3 import kernels
from llama3.checkpoint.hf import load_tokenizer
from llama3.inference.loading import load_for_inference

path, quantize, out = sys.argv[1], sys.argv[2] or None, sys.argv[3]
load_tokenizer(Path(path)); kernels.available()  # the runtime's own fixed cost, before the baseline
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024
base = status("VmRSS:")
model, _ = load_for_inference(path, quantize=quantize)
# VmHWM, not ru_maxrss: the latter keeps the high-water mark of the forked parent (pytest) across exec
peak = status("VmHWM:")
storages = {}
for t in [*model.parameters(), *model.buffers()]:
    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
with torch.inference_mode():
    logits = model(torch.tensor(json.loads(sys.argv[4]))).float()
save_file({"logits": logits.contiguous()}, out)
print(json.dumps({"base": base, "peak": peak, "model_bytes": sum(storages.values())}))
"""


WRITER = r"""
import json, sys
import torch
from safetensors.torch import save_file
import llama3
from tests.conftest import random_model, tiny_args
from tests.test_checkpoint_hf import byte_tokenizer
from tests.test_lean_load import BIG, TOKENS

model = random_model(tiny_args("gqa", **BIG), seed=5, dtype=torch.bfloat16)
with torch.inference_mode():
    save_file({"logits": model(torch.tensor(TOKENS)).float().contiguous()}, sys.argv[2])
llama3.save(model, byte_tokenizer(), sys.argv[1], max_shard_size="64MB")
print(sum(p.numel() * p.element_size() for p in model.parameters()))
"""


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """A random ~180 MB bf16 model written as a sharded HF folder, with its plain eager logits. Written by a
    child process: measured here, a loader run while the writer still held the model and its freshly
    written pages used ~150 MB more, a condition of the test's making, not of a user's download."""
    root = tmp_path_factory.mktemp("lean")
    done = subprocess.run([sys.executable, "-c", WRITER, str(root / "hf"), str(root / "reference.safetensors")],
                          capture_output=True, text=True, env=_child_env(), timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "hf", load_file(root / "reference.safetensors")["logits"], int(done.stdout.split()[-1])


def _child_env() -> dict:
    return {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}


def _load_in_child(path, quantize: str, tmp_path) -> tuple[dict, torch.Tensor]:
    out = tmp_path / f"logits-{quantize or 'bf16'}.safetensors"
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), quantize, str(out), json.dumps(TOKENS)],
                          capture_output=True, text=True, env=_child_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), load_file(out)["logits"]


def test_bf16_folder_loads_within_its_weights_size(big_folder, tmp_path):
    path, reference, weights = big_folder
    report, logits = _load_in_child(path, "", tmp_path)
    grown = report["peak"] - report["base"]
    # A second copy anywhere (fusion beside the originals, huge pages beside mapped pages) would be ~2x;
    # 64 MB is the runtime's own growth during a first load (allocator arenas, first torch ops).
    assert grown <= 1.1 * weights + 64e6, f"peak grew {grown / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"
    assert report["model_bytes"] >= weights  # the weights are all there (views of the shards' mappings)
    # Same model: the project's bf16 kernels accumulate in fp32, the reference in torch's bf16 linear.
    torch.testing.assert_close(logits, reference, atol=0.05, rtol=0.02)
    assert logits.argmax(-1).eq(reference.argmax(-1)).float().mean() > 0.85


def test_int4_quantize_at_load_streams_block_by_block(big_folder, tmp_path):
    path, reference, weights = big_folder
    report, logits = _load_in_child(path, "int4", tmp_path)
    grown = report["peak"] - report["base"]
    # The quantized model plus a block in float at a time and the runtime's ~40 MB (see above): the old
    # path held every fused float block and every mapped page at once (over twice this).
    assert report["model_bytes"] < 0.5 * weights  # storages counted whole: huge-page areas round up to 2 MiB
    assert grown <= report["model_bytes"] + 0.5 * weights, \
        f"peak grew {grown / 1e6:.0f} MB for a {report['model_bytes'] / 1e6:.0f} MB quantized model"
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.98


def test_released_pages_read_back_and_written_pages_are_kept(tmp_path):
    """Dropping a mapped tensor's pages loses nothing: untouched ones read back from the file, and a tensor
    written since it was mapped (a private copy) is left alone."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(1 << 21, dtype=torch.float32), "b": torch.ones(1 << 21)}, str(path))
    with open_safetensors(path, low_memory=False) as handle:
        a, b = handle.get_tensor("a"), handle.get_tensor("b")
        assert a.sum() > 0 and b.sum() > 0  # make every page resident
        assert release_file_pages(a) > 0
        assert torch.equal(a, torch.arange(1 << 21, dtype=torch.float32))
        b[1 << 20] = 7.0
        assert release_file_pages(b) == 0
        assert b[1 << 20] == 7.0
        assert release_file_pages(torch.ones(1 << 21)) == 0  # anonymous memory: never touched


def _resident_pages(t: torch.Tensor) -> int:
    """How many of the pages under `t` are mapped into this process (/proc/self/pagemap, bit 63)."""
    import mmap

    page = mmap.PAGESIZE
    first, last = t.data_ptr() // page, (t.data_ptr() + t.numel() * t.element_size() - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = torch.frombuffer(bytearray(f.read((last - first + 1) * 8)), dtype=torch.int64)
    return int((entries < 0).sum())


def test_populated_pages_are_mapped_in_and_unchanged(tmp_path):
    """populate_file_pages maps a mapped tensor's pages in ahead of use (one madvise per run of memory),
    leaves its values as stored, and leaves memory that is not a file mapping alone."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(1 << 21, dtype=torch.float32), "b": torch.ones(1 << 20)}, str(path))
    with open_safetensors(path, low_memory=False) as handle:
        a, b = handle.get_tensor("a"), handle.get_tensor("b")
        pages = -(-a.numel() * 4 // 4096)
        release_file_pages(a)  # start from an unmapped state whatever the loader touched
        assert _resident_pages(a) < pages
        assert populate_file_pages([a, b, torch.zeros(1 << 20)]) >= (a.numel() + b.numel()) * 4
        assert _resident_pages(a) >= pages
        assert torch.equal(a, torch.arange(1 << 21, dtype=torch.float32)) and torch.equal(b, torch.ones(1 << 20))
    assert populate_file_pages([torch.zeros(1 << 20)]) == 0  # anonymous memory: nothing to populate

