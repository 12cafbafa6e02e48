"""The serving soak (`benchmarks/serve.py --load`) in brief: 64 concurrent clients (48 of them streaming,
16 of those dropping their stream after the first chunk) for two rounds against a tiny model, on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.timeout(300)
def test_soak_has_no_5xx_flat_memory_and_exact_metrics(tmp_path):
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "serve.py"), "--load", "--preset", "debug", "--clients", "64",
           "--rounds", "2", "--max-tokens", "4", "--num-slots", "8", "--threads", "1", "--json", str(out)]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280, check=False,
                          env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["requests"] == 64 * 2 and report["server_errors"] == 0
    assert report["disconnected"] == 16 * 2  # every round, a quarter of the clients hang up mid-stream
    assert all(report["checks"].values()), report["checks"]
    assert report["engine_requests"] == report["accepted"] == report["engine_finished"] == 64 * 2
    kinds = report["kinds"]
    assert kinds["stream"] + kinds["chat"] + kinds["drop"] == 48 * 2 and kinds["plain"] == 16 * 2
