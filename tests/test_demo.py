"""`llama3 demo` end to end on one Austen novel with a tiny budget (the pipeline, not the quality), and the
commands it prints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import AUSTEN, REPO


@pytest.mark.timeout(600)
def test_demo_smoke(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(AUSTEN / "persuasion.txt", corpus)
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "llama3", "demo", "--minutes", "0.1", "--sft-steps", "3",
                           "--out", str(out), "--corpus", str(corpus), "--vocab-size", "512"],
                          cwd=REPO, capture_output=True, text=True, timeout=580, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] >= 1 and report["val_loss_after"] < report["val_loss_before"]
    assert report["sft_steps"] == 3 and report["sft_val_loss_after"] < report["sft_val_loss_before"]
    assert len(report["samples"]) == 4 and all(text for _, text in report["samples"])
    for name in ("base", "chat"):  # both models answered the 20 held-out questions and were scored
        evaluation = report["evaluation"][name]
        assert len(evaluation["answers"]) == 20 and evaluation["val_ppl"] > 1
        assert 0 <= evaluation["ended_fraction"] <= 1
    text = (out / "report.md").read_text()
    assert "validation perplexity" in text and "## Sample conversations" in text and "**user:**" in text
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"chat --model {out / 'chat'}" in proc.stdout and f"serve --model {out / 'chat'}" in proc.stdout
    records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, report["steps"] + 1))
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in records)
    bundled = (REPO / "data" / "chat" / "austen_chat.jsonl").read_text().splitlines()
    trained = (out / "chat_data" / "train.jsonl").read_text().splitlines()
    assert len(trained) == len(bundled) - 20 and set(trained) < set(bundled)  # 20 dialogs held out

    import llama3

    for name in ("base", "chat"):  # the exported Hugging Face folders
        model, tokenizer = llama3.load(out / name)
        assert model.args.vocab_size == tokenizer.n_words == 512 + 256 and model.args.max_seq_len == 256


def test_printed_commands_run_from_the_starting_folder(tmp_path, monkeypatch):
    """With the venv's own `llama3` script, the commands name it relative to where the demo started."""
    from llama3.cli import demo

    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "llama3").write_text("#!/bin/sh\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    lines = demo.next_steps(Path("runs/demo"), chat=True)
    assert lines[0] == ".venv/bin/llama3 chat --model runs/demo/chat"
    assert lines[2].startswith(".venv/bin/llama3 serve --model runs/demo/chat")
    (venv_bin / "llama3").unlink()  # no script: the interpreter runs the package
    assert demo.next_steps(tmp_path / "out", chat=False)[0] == ".venv/bin/python -m llama3 chat --model out/base"
