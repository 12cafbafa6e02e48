"""benchmarks/gpu_train.py is run on a lent GPU only once in a while; its --dry-run runs the same code
(distributed runtime, FSDP2 with bf16 compute, per-block torch.compile, the loop's loss, clipping, AdamW)
on the CPU with a tiny shape, so the script is known to work before GPU time is spent on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_gpu_benchmark_dry_run(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_train.py"), "--dry-run", "--steps", "2",
                           "--warmup", "1", "--json", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["compile"] is True and result["layers"] == 2 and result["seq"] == 64
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] and result["peak_tflops"] > 0
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| CPU (dry run)"))
    assert "on / none" in row and "%" in row


def test_gpu_benchmark_refuses_without_cuda_unless_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_train.py"), "--layers", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_layers_that_fit_the_gpu():
    """The layer count the GPU run picks from free memory (only the dry run exercises the rest)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_train import layers_that_fit
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from llama3.config import preset

    shape = preset("llama3-8b", vocab_size=128256, max_seq_len=8192)
    h100, h200 = (layers_that_fit(shape, gib * 2**30, 8192) for gib in (79, 139))
    assert 4 <= h100 < h200 <= 32
    assert layers_that_fit(shape, 2000 * 2**30, 8192) == 32  # never more than the model has
    assert layers_that_fit(shape, 30 * 2**30, 8192) == 1  # at least one block; OOM retries handle the rest
