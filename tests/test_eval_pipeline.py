"""Evaluation end to end: `llama3 eval` on a freshly trained model reproduces the training loop's
validation loss, and lm-evaluation-harness driving our adapter agrees with `llama3 eval` on local tasks."""

from __future__ import annotations

import json
import math

import pytest
from conftest import AUSTEN, REPO, random_model, tiny_args

from llama3.cli import main as cli_main
from llama3.tokenizer import Tokenizer


@pytest.mark.timeout(300)
def test_perplexity_matches_training_validation_loss(tmp_path):
    from llama3.data.pretrain import prepare_dataset

    Tokenizer({bytes([i]): i for i in range(256)}).save_tiktoken(tmp_path / "tokenizer.model")
    corpus = tmp_path / "austen.txt"
    corpus.write_text((AUSTEN / "persuasion.txt").read_text(encoding="utf-8")[:60000], encoding="utf-8")
    data = tmp_path / "data"
    prepare_dataset(
        [corpus], data, tmp_path / "tokenizer.model", val_fraction=0.25, num_workers=1, progress=False
    )
    run = tmp_path / "run"
    assert (
        cli_main(
            [
                "pretrain",
                "--recipe",
                "debug",
                "--data",
                str(data),
                "--out",
                str(run),
                "--train.steps=4",
                "--train.val_interval=0",
                "--train.val_batches=3",
                "--checkpoint.interval=0",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_loss" in r][-1]
    assert final["step"] == 4

    # The debug recipe validates on the first val_batches × batch_size windows of seq_len tokens (8 × 128).
    packed = tmp_path / "packed.json"
    assert (
        cli_main(
            [
                "eval",
                "--model",
                str(run / "hf"),
                "--task",
                str(data),
                "--packed",
                "--window",
                "128",
                "--limit",
                "24",
                "--quiet",
                "--output",
                str(packed),
            ]
        )
        == 0
    )
    metrics = json.loads(packed.read_text())["results"][str(data)]["metrics"]
    assert metrics["num_tokens"] == 24 * 128
    assert metrics["token_nll"] == pytest.approx(final["val_loss"], rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(final["val_loss"]), rel=1e-4)
    # The command is the library function with the flags as arguments: the same numbers.
    from llama3.eval import run as evaluate

    document = evaluate(run / "hf", [str(data)], packed=True, window=128, limit=24, progress=False)
    assert document["results"][str(data)]["metrics"] == metrics
    assert document["config"]["limit"] == 24 and document["model"] == str(run / "hf")

    # Per-document scoring of the whole split (each document from its own BOS, sliding windows) measures
    # the same model on more text with more context: close to, not equal to, the validation loss.
    whole = tmp_path / "whole.json"
    assert (
        cli_main(
            [
                "eval",
                "--model",
                str(run / "hf"),
                "--task",
                str(data),
                "--window",
                "128",
                "--stride",
                "64",
                "--quiet",
                "--output",
                str(whole),
            ]
        )
        == 0
    )
    per_document = json.loads(whole.read_text())["results"][str(data)]["metrics"]
    index = json.loads((data / "index.json").read_text())
    assert (
        per_document["num_tokens"]
        == index["splits"]["val"]["num_tokens"] - index["splits"]["val"]["num_documents"]
    )
    assert per_document["token_nll"] == pytest.approx(final["val_loss"], rel=0.05)


@pytest.fixture()
def offline_datasets(tmp_path, monkeypatch):
    """HF datasets offline with a private cache, and the repository as working directory (the task YAMLs
    name their JSONL files relative to it)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.chdir(REPO)


@pytest.mark.timeout(300)
def test_lm_eval_adapter_agrees_with_llama3_eval(tmp_path, offline_datasets, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import llama3
    import llama3.eval.lm_eval  # registers the model name "llama3" with lm-evaluation-harness

    model_dir = tmp_path / "model"
    tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    llama3.save(
        random_model(tiny_args("gqa", vocab_size=512, max_seq_len=1024), seed=5), tokenizer, model_dir
    )

    tasks = {
        "arc_easy": "llama3_sample_arc_easy",
        "mmlu": "llama3_sample_mmlu",
        "hellaswag": "llama3_sample_hellaswag",
        "gsm8k": "llama3_sample_gsm8k",
    }
    harness = lm_eval.simple_evaluate(
        model="llama3",
        model_args=f"model={model_dir},max_gen_toks=32",
        tasks=list(tasks.values()),
        num_fewshot=2,
        limit=5,
        batch_size=4,
        log_samples=True,
        task_manager=TaskManager(
            include_path=str(REPO / "data" / "tasks" / "lm_eval"), include_defaults=False
        ),
    )

    output = tmp_path / "ours.json"
    assert (
        cli_main(
            [
                "eval",
                "--model",
                str(model_dir),
                "--task",
                ",".join(tasks),
                "--num-fewshot",
                "2",
                "--limit",
                "5",
                "--max-gen-toks",
                "32",
                "--batch-size",
                "4",
                "--log-samples",
                "--quiet",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    ours = json.loads(output.read_text())

    for name, harness_name in tasks.items():
        their_metrics = harness["results"][harness_name]
        our_metrics = ours["results"][name]["metrics"]
        their_samples = {s["doc_id"]: s for s in harness["samples"][harness_name]}
        our_samples = ours["samples"][name]
        assert len(our_samples) == len(their_samples) == 5
        if name == "gsm8k":
            for metric in ("exact_match,strict-match", "exact_match,flexible-extract"):
                assert our_metrics[metric] == their_metrics[metric]
            by_filter = {(s["doc_id"], s["filter"]): s for s in harness["samples"][harness_name]}
            for sample in our_samples:
                strict = by_filter[(sample["index"], "strict-match")]
                assert sample["generation"] == strict["resps"][0][0]  # the raw text, cut at "Question:"
                assert sample["strict-match"] == strict["filtered_resps"][0]
                assert (
                    sample["flexible-extract"]
                    == by_filter[(sample["index"], "flexible-extract")]["filtered_resps"][0]
                )
            continue
        assert our_metrics["acc"] == their_metrics["acc,none"]
        assert our_metrics["acc_norm"] == their_metrics["acc_norm,none"]
        for sample in our_samples:
            theirs = [resp[0][0] for resp in their_samples[sample["index"]]["resps"]]
            assert sample["logprobs"] == pytest.approx(theirs, abs=1e-4)

    # Bad input names what was wrong.
    capsys.readouterr()
    assert cli_main(["eval", "--model", str(model_dir), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert (
        cli_main(["eval", "--model", str(model_dir), "--task", "mmlu", "--num-fewshot", "9", "--quiet"]) == 2
    )
    assert (
        "9 few-shot examples requested but only 5 are available with group 'astronomy'"
        in capsys.readouterr().err
    )
    assert cli_main(["eval", "--model", str(model_dir), "--task", str(REPO / "README.md")]) == 2
    assert "README.md:1: not valid JSON" in capsys.readouterr().err
