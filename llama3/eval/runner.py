"""`llama3.eval.run`: load a model and evaluate it on tasks, text files or prepared shards, from explicit
arguments. `llama3 eval` parses its flags into these arguments, calls `run` and prints the table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MAX_WINDOW", "is_perplexity_source", "run"]

# Llama 3.1's 128K context would make one perplexity window a 128K-token forward; longer windows are an
# explicit choice (`window`).
DEFAULT_MAX_WINDOW = 8192


def is_perplexity_source(spec: str) -> bool:
    """A text file, a JSONL of `{"text": ...}` documents or a prepared shard folder (not a task file)."""
    path = Path(spec)
    if path.is_dir() or path.suffix == ".txt":
        return True
    if path.suffix == ".jsonl" and path.is_file():
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            record = json.loads(first)
        except json.JSONDecodeError:
            return False
        return isinstance(record, dict) and set(record) <= {"text", "id", "meta", "source", "title"} \
            and "text" in record
    return False


def _perplexity(spec: str, model, tokenizer, *, window: int | None, stride: int | None, batch_size: int,
                split: str, packed: bool, document_mask: bool, limit: int | None,
                progress: bool) -> dict[str, Any]:
    from .perplexity import perplexity_of_shards, perplexity_of_text, read_text_documents
    from .scoring import LogLikelihoodScorer

    window = window or min(model.args.max_seq_len, DEFAULT_MAX_WINDOW)
    scorer = LogLikelihoodScorer(model, batch_size=batch_size, max_length=window)
    if Path(spec).is_dir():
        result = perplexity_of_shards(scorer, tokenizer, spec, split=split, stride=stride, packed=packed,
                                      document_mask=document_mask, limit=limit, progress=progress)
    else:
        if packed:
            raise ValueError("--packed applies to a prepared shard folder, not to a text file")
        texts = read_text_documents(spec)[:limit]
        result = perplexity_of_text(scorer, tokenizer, texts, stride=stride, progress=progress)
    return {"metrics": result.to_dict(), "window": scorer.max_length, "stride": stride or scorer.max_length,
            "packed": bool(packed)}


def _task(spec: str, model, tokenizer, *, fmt: str | None, fewshot_file: str | None, data_dir: str | None,
          max_gen_toks: int | None, num_fewshot: int, limit: int | None, batch_size: int,
          progress: bool) -> dict[str, Any]:
    from .tasks import evaluate_task, resolve_task

    task = resolve_task(spec, fmt=fmt, fewshot_file=fewshot_file, data_dir=data_dir)
    # The default leaves half of a short context (the demo model's 256 tokens) for the prompt.
    task.max_gen_toks = max_gen_toks or min(256, model.args.max_seq_len // 2)
    return evaluate_task(model, tokenizer, task, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                         progress=progress)


def run(model: str | Path, tasks: str | list[str], *, num_fewshot: int = 0, limit: int | None = None,
        fmt: str | None = None, fewshot_file: str | None = None, data_dir: str | None = None,
        batch_size: int = 8, max_gen_toks: int | None = None, window: int | None = None,
        stride: int | None = None, split: str = "val", packed: bool = False, document_mask: bool = True,
        device: str = "cpu", dtype: str | None = None, log_samples: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Load `model` (a model folder, training checkpoint or GGUF file) and evaluate it on every entry of
    `tasks` (a list, or a comma-separated string): a bundled task name, a task file, a text/JSONL file or a
    prepared shard folder (perplexity). Returns the results document `llama3 eval --output` writes:
    `{"model", "results": {name: {"metrics", ...}}, "config", "date"}` (+ `"samples"` with `log_samples`).
    The keyword arguments are those of `llama3 eval` (`fmt` is `--format`, `document_mask=False` is
    `--no-document-mask`)."""
    from ..checkpoint.load import load

    specs = [s.strip() for s in (tasks.split(",") if isinstance(tasks, str) else tasks) if s.strip()]
    if not specs:
        raise ValueError("--task is empty; name a task, a task file, a text file or a shard folder")
    loaded, tokenizer = load(model, device=device, dtype=dtype)
    results: dict[str, dict[str, Any]] = {}
    samples: dict[str, Any] = {}
    for spec in specs:
        start = time.perf_counter()
        if is_perplexity_source(spec):
            result = _perplexity(spec, loaded, tokenizer, window=window, stride=stride, batch_size=batch_size,
                                 split=split, packed=packed, document_mask=document_mask, limit=limit,
                                 progress=progress)
        else:
            result = _task(spec, loaded, tokenizer, fmt=fmt, fewshot_file=fewshot_file, data_dir=data_dir,
                           max_gen_toks=max_gen_toks, num_fewshot=num_fewshot, limit=limit,
                           batch_size=batch_size, progress=progress)
        name = spec if spec not in results else f"{spec}#{len(results)}"
        samples[name] = result.pop("samples", None)
        result["seconds"] = round(time.perf_counter() - start, 3)
        results[name] = result
    document = {"model": str(model), "results": results,
                "config": {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
                           "device": device, "dtype": dtype, "max_gen_toks": max_gen_toks},
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if log_samples:
        document["samples"] = samples
    return document
