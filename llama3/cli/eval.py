"""`llama3 eval`: perplexity and benchmark tasks for a model folder; a printed table and a JSON file."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

HELP = "evaluate a model: perplexity / bits per byte, MMLU, HellaSwag, ARC, GSM8K or your own task files"

EPILOG = """\
tasks (--task, comma-separated for several):
  mmlu, hellaswag, arc_easy, gsm8k   bundled samples, or the full data with --data-dir DIR
  FILE.jsonl / .json / .csv          a task file in the MMLU, HellaSwag, ARC, GSM8K or custom layout
  FILE.txt, or .jsonl with "text"    perplexity and bits per byte of the documents
  DIR (from `llama3 prepare`)        perplexity of a split of prepared shards (--split, --packed)

examples:
  llama3 eval --model runs/demo/base --task arc_easy,hellaswag --num-fewshot 2
  llama3 eval --model runs/demo/base --task data/austen/persuasion.txt --stride 128
  llama3 eval --model runs/demo/base --task runs/demo/data --split val --packed --window 256
"""


def build_parser() -> argparse.ArgumentParser:
    from ..eval.runner import DEFAULT_MAX_WINDOW

    parser = argparse.ArgumentParser(
        prog="llama3 eval",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="model folder (Hugging Face, Meta, training checkpoint)"
    )
    parser.add_argument("--task", required=True, help="task name(s), task file(s), text file or shard folder")
    parser.add_argument("--num-fewshot", type=int, default=0, help="solved examples before each question (0)")
    parser.add_argument(
        "--limit", type=int, help="evaluate only the first N examples (documents, or windows with --packed)"
    )
    parser.add_argument("--output", help="write the results as JSON to this file")
    parser.add_argument(
        "--format",
        choices=["mmlu", "hellaswag", "arc", "gsm8k", "custom"],
        help="layout of a task file (default: detected from its fields)",
    )
    parser.add_argument("--fewshot-file", help="draw few-shot examples from this file (same layout)")
    parser.add_argument(
        "--data-dir", help="folder laid out like data/tasks/ holding the full benchmark files"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (8)")
    parser.add_argument(
        "--max-gen-toks",
        type=int,
        default=None,
        help="generation tasks: new-token limit (default 256, at most half the model's context)",
    )
    parser.add_argument(
        "--window",
        type=int,
        help=f"perplexity: tokens per window (default: the model's context, at most {DEFAULT_MAX_WINDOW})",
    )
    parser.add_argument(
        "--stride",
        type=int,
        help="perplexity: new tokens predicted per window after the "
        "first (default: the window, i.e. disjoint windows)",
    )
    parser.add_argument("--split", default="val", help="split of a prepared shard folder (val)")
    parser.add_argument(
        "--packed",
        action="store_true",
        help="shards: score packed windows of --window tokens "
        "as the training loop's validation does (its loss equals token_nll)",
    )
    parser.add_argument(
        "--no-document-mask",
        action="store_true",
        help="with --packed: attention crosses documents (runs with data.document_mask=false)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (cpu)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: as stored)")
    parser.add_argument("--log-samples", action="store_true", help="include per-example details in --output")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per (task, metric): value, standard error and number of examples."""
    rows = [("task", "metric", "value", "stderr", "n")]
    for name, result in results.items():
        metrics = result["metrics"]
        count = result.get("num_samples", metrics.get("num_tokens", ""))
        for key, value in metrics.items():
            if key.endswith("_stderr") or key.startswith("num_"):
                continue
            stderr = metrics.get(f"{key}_stderr")
            stderr_text = "" if stderr is None or math.isnan(stderr) else f"{stderr:.4f}"
            rows.append((name, key, f"{value:.4f}", stderr_text, str(count)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for j, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    from ..checkpoint.safety import atomic_output_file

    with atomic_output_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=True) + "\n", encoding="utf-8")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """`llama3.eval.run` with the parsed flags; returns the results document."""
    from ..eval.runner import run

    return run(args.model, args.task, num_fewshot=args.num_fewshot, limit=args.limit, fmt=args.format,
               fewshot_file=args.fewshot_file, data_dir=args.data_dir, batch_size=args.batch_size,
               max_gen_toks=args.max_gen_toks, window=args.window, stride=args.stride, split=args.split,
               packed=args.packed, document_mask=not args.no_document_mask, device=args.device,
               dtype=args.dtype, log_samples=args.log_samples, progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_fewshot", "batch_size", "max_gen_toks"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_fewshot" else 1):
            parser.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'num_fewshot' else '>= 1'}")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    try:
        document = evaluate(args)
    except ValueError as e:
        print(f"llama3 eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(document["results"]))
    if args.output:
        write_json_atomic(args.output, document)
        print(f"results written to {args.output}")
    return 0
