"""`llama3 demo` end to end on one Austen novel with a tiny time budget (the pipeline, not the quality)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import AUSTEN, REPO


@pytest.mark.timeout(300)
def test_demo_smoke(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(AUSTEN / "persuasion.txt", corpus)
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "llama3", "demo", "--minutes", "0.1", "--out", str(out),
                           "--corpus", str(corpus), "--vocab-size", "512"],
                          cwd=REPO, capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] >= 1 and report["val_loss_after"] < report["val_loss_before"]
    assert len(report["samples"]) == 4 and all(text for _, text in report["samples"])
    assert "validation perplexity" in (out / "report.md").read_text()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"llama3 chat --model {out / 'run' / 'hf'}" in proc.stdout
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, report["steps"] + 1))
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in records)

    import llama3

    model, tokenizer = llama3.load(out / "run" / "hf")  # the exported Hugging Face folder
    assert model.args.vocab_size == tokenizer.n_words == 512 + 256
