"""Distributed training and inference on CPU with gloo, through torchrun, against one plain process.

Three torchrun launches (starting processes is the slow part, so each runs several checks):
- 2 ranks: `llama3 pretrain` with FSDP (dp_shard=2), then with TP (tp=2); TP inference logits and greedy
  tokens; `llama3 generate` under torchrun.
- 4 ranks: `llama3 pretrain` with FSDP×TP (2×2), a resume of the 2-rank FSDP run's step-3 checkpoint on
  that 2×2 mesh, and HSDP (2 replicas × 2 shards) with op-level selective activation checkpointing.
- 1 plain process (in this test process): the reference run, and a resume of the same checkpoint.
Every run sees the same global batch (4 rows of 32 tokens) in the same order, so fp32 losses must agree to
1e-5 and the exported weights must agree too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama3.cli import main as cli_main

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
AUSTEN = REPO / "data" / "austen" / "persuasion.txt"
STEPS = 5
PRETRAIN = ["pretrain", "--recipe", "debug", f"--train.steps={STEPS}", "--data.seq_len=32",
            "--train.val_interval=0", "--train.val_batches=2", "--checkpoint.interval=3", "--checkpoint.keep=3",
            "--optim.lr=1e-3", "--schedule.warmup_steps=2", "--logging.peak_flops=1e12", "--train.device=cpu"]
LOSS_TOL = 1e-5
# AdamW divides each gradient by its own running RMS, so last-ulp differences in the gradients of
# near-zero entries (reduction order across ranks) show up in the weights (seen: up to 1.4e-6 here).
WEIGHT_TOL = 2e-5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A 300-merge BPE tokenizer and token shards from 60 KB of Persuasion."""
    from llama3.bpe import train_tokenizer
    from llama3.data.pretrain import prepare_dataset

    root = tmp_path_factory.mktemp("dist-data")
    text = root / "persuasion-60k.txt"
    text.write_text(AUSTEN.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    train_tokenizer([text], 300, root / "tokenizer.model", num_workers=1, progress=False)
    prepare_dataset([text], root / "ds", root / "tokenizer.model", num_workers=1, progress=False, val_fraction=0.1)
    return root / "ds"


def _pretrain_argv(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [*PRETRAIN, "--data", str(dataset), "--out", str(out), *extra]


def _torchrun(nproc: int, plan: list[dict], workdir: Path, timeout: int = 240) -> None:
    plan_file = workdir / f"plan-{nproc}.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(HERE / "worker.py"), str(plan_file)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


def _records(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r for r in records}


def _losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in _records(run_dir).items()}


def _max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def _interrupted_copy(src: Path, dst: Path) -> None:
    """`src` run as if it was killed while saving step 5: the last complete checkpoint is step 3."""
    shutil.copytree(src, dst)
    # The save's own temp folder (every shard written, no marker yet) ...
    (dst / "step-00000005").rename(dst / ".tmp-step-00000005")
    (dst / ".tmp-step-00000005" / "COMPLETE").unlink()
    # ... and a torn folder under a final name (a shard and the marker missing).
    torn = dst / "step-00000004"
    shutil.copytree(dst / ".tmp-step-00000005", torn)
    next(torn.glob("__1_*.distcp")).unlink()
    shutil.rmtree(dst / "hf", ignore_errors=True)


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory) -> dict[str, Path]:
    """All the runs, once: single process, 2-rank launch, 4-rank launch, 1-process resume."""
    from llama3.config import ModelArgs
    from llama3.model import Transformer
    from llama3.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("dist-runs")
    r = {name: root / name for name in ("single", "fsdp2", "tp2", "fsdp2x2", "hsdp2x2", "resume4", "resume1")}
    assert cli_main(_pretrain_argv(dataset, r["single"], "--data.batch_size=4")) == 0

    # A random model (norm weights perturbed so they matter) for tensor-parallel inference.
    tokenizer = Tokenizer.from_file(dataset / "tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                                  multiple_of=16, max_seq_len=64))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif "output" in name:
                p.mul_(8.0)  # peaked logits: greedy choices far from ties
    import llama3

    llama3.save(model, tokenizer, root / "random-hf", format="hf")
    prompt = "Anne Elliot was"
    r["tp_logits"], r["generate_tp"], r["random_hf"] = root / "tp_logits.json", root / "generate_tp.json", root / "random-hf"
    r["prompt_ids"] = tokenizer.encode(prompt, bos=True)  # type: ignore[assignment]
    _torchrun(2, [
        {"kind": "cli", "argv": _pretrain_argv(dataset, r["fsdp2"], "--data.batch_size=2", "--parallel.dp_shard=2")},
        {"kind": "cli", "argv": _pretrain_argv(dataset, r["tp2"], "--data.batch_size=4", "--parallel.dp_shard=1",
                                               "--parallel.tp=2")},
        {"kind": "tp_logits", "model": str(r["random_hf"]), "prompt_ids": r["prompt_ids"], "max_new_tokens": 16,
         "out": str(r["tp_logits"])},
        {"kind": "cli", "argv": ["generate", "--model", str(r["random_hf"]), "--prompt", prompt, "--temperature", "0",
                                 "--max-new-tokens", "16", "--json", "--no-compile"],
         "stdout": str(r["generate_tp"])},
    ], root)

    _interrupted_copy(r["fsdp2"], r["resume4"])
    _torchrun(4, [
        {"kind": "cli", "argv": _pretrain_argv(dataset, r["fsdp2x2"], "--data.batch_size=2", "--parallel.dp_shard=2",
                                               "--parallel.tp=2")},
        {"kind": "cli", "argv": _pretrain_argv(dataset, r["resume4"], "--data.batch_size=2", "--parallel.dp_shard=2",
                                               "--parallel.tp=2", "--resume")},
        # HSDP: shard within pairs, replicate across them; with op-level selective activation checkpointing.
        {"kind": "cli", "argv": _pretrain_argv(dataset, r["hsdp2x2"], "--data.batch_size=1",
                                               "--parallel.dp_replicate=2", "--parallel.dp_shard=2",
                                               "--parallel.activation_checkpoint=selective",
                                               "--parallel.selective_ac_option=op")},
    ], root)

    _interrupted_copy(r["fsdp2"], r["resume1"])
    assert cli_main(_pretrain_argv(dataset, r["resume1"], "--data.batch_size=4", "--resume")) == 0
    return r


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", ["fsdp2", "tp2", "fsdp2x2", "hsdp2x2"])
def test_distributed_training_equals_one_process(runs, name):
    single, dist_losses = _losses(runs["single"]), _losses(runs[name])
    assert sorted(dist_losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(dist_losses[step] - single[step]) < LOSS_TOL, (name, step, dist_losses[step], single[step])
    assert single[1] != single[STEPS]  # the runs actually trained
    # Clipping and the non-finite check see the norm of the whole gradient, as one process computes it.
    single_norms, dist_norms = _records(runs["single"]), _records(runs[name])
    for step in range(1, STEPS + 1):
        assert dist_norms[step]["grad_norm"] == pytest.approx(single_norms[step]["grad_norm"], rel=5e-5)
    # The HF export gathered from the shards by rank 0 holds the single-process run's weights.
    assert _max_weight_diff(runs["single"] / "hf", runs[name] / "hf") < WEIGHT_TOL
    # The sharded checkpoint holds them too (loaded in one process, as `llama3.load` does).
    import llama3

    sharded, _ = llama3.load(runs[name] / "step-00000005")
    plain, _ = llama3.load(runs["single"] / "step-00000005")
    for key, value in plain.state_dict().items():
        assert torch.allclose(sharded.state_dict()[key], value, rtol=0, atol=WEIGHT_TOL), key


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", ["resume1", "resume4"])
def test_resume_on_another_mesh_ignores_interrupted_save(runs, name):
    uninterrupted, resumed = _losses(runs["fsdp2"]), _losses(runs[name])
    for step in (4, 5):
        assert abs(resumed[step] - uninterrupted[step]) < LOSS_TOL, (name, step)
    assert (runs[name] / "step-00000005" / "COMPLETE").is_file()
    step_dir = runs[name] / "step-00000005"
    if name == "resume1":  # one plain process writes the single-file checkpoint format
        state = torch.load(step_dir / "train_state.pt", weights_only=True)
    else:  # torchrun writes a sharded one
        state = json.loads((step_dir / "train_state.json").read_text())
    assert state["step"] == 5 and state["data"]["cursor"] == 5
    assert not (runs[name] / ".tmp-step-00000005").exists()  # the next save cleared the torn temp folder


@pytest.mark.timeout(420)
def test_tensor_parallel_inference_matches_one_process(runs):
    result = json.loads(runs["tp_logits"].read_text())
    assert result["world_size"] == 2 and result["kv_heads_local"] == 1  # 2 kv heads split over 2 ranks
    assert result["full_logits_max_diff"] < 1e-4
    assert result["decode_logits_max_diff"] < 1e-4
    assert result["tp_tokens"] == result["ref_tokens"] and len(set(result["ref_tokens"])) > 3
    cli = json.loads(runs["generate_tp"].read_text())
    assert cli["token_ids"] == result["ref_tokens"]


@pytest.mark.timeout(420)
def test_resume_with_another_global_batch_is_a_clear_error(runs, dataset, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["fsdp2"], run)
    # The 2-rank run used 2 rows per rank (global 4); one process with 3 rows would read other windows.
    code = cli_main(_pretrain_argv(dataset, run, "--data.batch_size=3", "--resume"))
    assert code == 2
    assert "global batch" in capsys.readouterr().err
