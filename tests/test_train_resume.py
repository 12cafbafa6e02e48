"""Crash and resume: a SIGKILLed run resumed with --resume equals an uninterrupted one bit for bit."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import AUSTEN, REPO
from safetensors.torch import load_file

from llama3.checkpoint.native import (
    MARKER,
    complete_checkpoints,
    is_training_checkpoint,
    load_training_checkpoint,
)

STEPS = 16
ARGS = ["--recipe", "debug", f"--train.steps={STEPS}", "--data.batch_size=4", "--data.seq_len=64",
        "--checkpoint.interval=4", "--checkpoint.keep=2", "--checkpoint.export_hf=false", "--train.val_interval=0",
        "--train.val_batches=1", "--logging.peak_flops=1e11", "--train.device=cpu"]

# Runs `llama3 pretrain` in this process after arming a SIGKILL: `metrics <step>` kills right after the
# metrics record of that step is written; `save <n>` kills inside the n-th checkpoint save, after the
# weights are in the temp folder and before the completion marker.
KILLER = """
import os, signal, sys
mode, at = sys.argv[1], int(sys.argv[2])
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "metrics":
    from llama3.train import metrics
    write = metrics.MetricsWriter.write
    def write_then_die(self, record):
        write(self, record)
        if record["step"] == at:
            die()
    metrics.MetricsWriter.write = write_then_die
else:
    from llama3.checkpoint import native
    fsync, calls = native._fsync_dir_files, [0]
    def fsync_then_die(folder):
        calls[0] += 1
        if calls[0] == at:
            die()
        fsync(folder)
    native._fsync_dir_files = fsync_then_die
from llama3.cli import main
sys.exit(main(["pretrain"] + sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from llama3.bpe import train_tokenizer
    from llama3.data.pretrain import prepare_dataset

    root = tmp_path_factory.mktemp("resume-data")
    corpus = [AUSTEN / "persuasion.txt"]
    train_tokenizer(corpus, 512, root / "tok", num_workers=1, progress=False)
    prepare_dataset(corpus, root / "data", root / "tok" / "tokenizer.model", num_workers=1, progress=False)
    return root / "data"


def _pretrain(dataset: Path, out: Path, *extra: str, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    args = ["--data", str(dataset), "--out", str(out), *ARGS, *extra]
    if kill is None:
        cmd = [sys.executable, "-m", "llama3", "pretrain", *args]
    else:
        cmd = [sys.executable, "-c", KILLER, kill[0], str(kill[1]), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = _pretrain(dataset, out)
    assert proc.returncode == 0, proc.stderr
    return out


def _assert_same_run(run: Path, reference: Path) -> None:
    ours, ref = _records(run), _records(reference)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))  # each step once, none lost
    assert [(r["loss"], r["data_checksum"]) for r in ours] == [(r["loss"], r["data_checksum"]) for r in ref]
    final = f"step-{STEPS:08d}"
    ours_w, ref_w = load_file(str(run / final / "model.safetensors")), load_file(str(reference / final / "model.safetensors"))
    assert ours_w.keys() == ref_w.keys()
    for key in ref_w:
        assert torch.equal(ours_w[key], ref_w[key]), key


@pytest.mark.timeout(300)
def test_sigkill_mid_run_then_resume_is_bitwise_identical(dataset, reference, tmp_path):
    out = tmp_path / "run"
    killed = _pretrain(dataset, out, kill=("metrics", 10))
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000004", "step-00000008"]
    assert len(_records(out)) == 10  # steps 9 and 10 ran after the last checkpoint
    resumed = _pretrain(dataset, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step-00000008" in resumed.stdout
    _assert_same_run(out, reference)
    # keep=2: only the newest two complete checkpoints remain
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000012", f"step-{STEPS:08d}"]


@pytest.mark.timeout(300)
def test_kill_during_checkpoint_save_resumes_from_previous_complete_one(dataset, reference, tmp_path):
    out = tmp_path / "run"
    killed = _pretrain(dataset, out, kill=("save", 2))  # dies while writing step-8
    assert killed.returncode == -signal.SIGKILL
    partial = out / ".tmp-step-00000008"
    assert (partial / "model.safetensors").is_file() and not (partial / MARKER).exists()
    assert not (out / "step-00000008").exists()
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000004"]
    resumed = _pretrain(dataset, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "step-00000004" in resumed.stdout
    assert not partial.exists()  # the next save cleared the crash's temp folder
    _assert_same_run(out, reference)


def test_training_checkpoint_loads_as_a_model(reference):
    assert is_training_checkpoint(reference) and is_training_checkpoint(reference / f"step-{STEPS:08d}")
    assert not is_training_checkpoint(reference / "nope")
    model, tokenizer = load_training_checkpoint(reference)
    assert model.args.vocab_size == tokenizer.n_words == 512 + 256
    ids = torch.tensor([tokenizer.encode("It was a truth", bos=True)])
    assert torch.isfinite(model(ids)).all()
    import llama3

    same, _ = llama3.load(reference / f"step-{STEPS:08d}")  # the package's loader detects the format
    torch.testing.assert_close(same(ids), model(ids), rtol=0, atol=0)


@pytest.mark.timeout(300)
def test_resume_takes_the_runs_saved_config_and_reports_flags_that_change_it(dataset, reference, tmp_path,
                                                                              capsys):
    """A SIGKILLed run resumed with only --out and --resume goes on with its own config (16 steps, batch 4 of
    64 tokens, its checkpoint interval... not the recipe's 50 steps of 8 x 128): bit-identical to the
    uninterrupted run. A flag given on resume is applied with one notice line; a different --recipe is
    refused."""
    from llama3.cli.pretrain import main as pretrain_main
    from llama3.train.config import ScheduleSection
    from llama3.train.schedule import lr_at

    out, changed = tmp_path / "run", tmp_path / "changed"
    assert _pretrain(dataset, out, kill=("metrics", 10)).returncode == -signal.SIGKILL
    shutil.copytree(out, changed)
    resumed = subprocess.run([sys.executable, "-m", "llama3", "pretrain", "--out", str(out), "--resume"], cwd=REPO,
                             capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming with" not in resumed.stderr
    _assert_same_run(out, reference)

    capsys.readouterr()
    assert pretrain_main(["--out", str(changed), "--resume", "--optim.lr=6e-3", "--data.batch_size=4"]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "resuming with" in line]
    assert notices == ["llama3 pretrain: resuming with optim.lr=0.006 (the run was saved with 0.003)"]
    records = _records(changed)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    schedule = ScheduleSection(name="cosine", warmup_steps=10)  # the debug recipe's, saved with the run
    assert [r["lr"] for r in records[8:]] == [lr_at(s, lr=6e-3, total_steps=STEPS, schedule=schedule)
                                              for s in range(8, STEPS)]
    assert json.loads((changed / "config.json").read_text())["optim"]["lr"] == 6e-3

    with pytest.raises(SystemExit):
        pretrain_main(["--out", str(changed), "--resume", "--recipe", "demo"])
    err = capsys.readouterr().err
    assert f"--recipe demo: the run in {changed} was started from recipe 'debug'" in err
