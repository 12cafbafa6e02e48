"""`llama3 prepare`: tokenize text/JSONL/parquet into token shards with a validation split."""

from __future__ import annotations

import argparse
import sys
import time

HELP = "tokenize text/JSONL/parquet files into uint16/uint32 token shards with a held-out validation split"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama3 prepare", description=HELP)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="text (split into documents at paragraph breaks), JSONL (field 'text') or parquet")
    parser.add_argument("--output", required=True, help="dataset folder to write")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer.model (tiktoken format) or a folder holding one, e.g. from train-tokenizer")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out (default 0.02)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val assignment")
    parser.add_argument("--text-chunk-chars", type=int, default=8000,
                        help="plain text: characters per document, cut at blank lines (0 = one document per file)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: all cores)")
    args = parser.parse_args(argv)
    from ..data.pretrain import prepare_dataset

    start = time.perf_counter()
    try:
        index = prepare_dataset(args.input, args.output, args.tokenizer, val_fraction=args.val_fraction,
                                seed=args.seed, text_chunk_chars=args.text_chunk_chars, num_workers=args.workers)
    except ValueError as e:
        print(f"llama3 prepare: error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    splits = ", ".join(f"{name}: {s['num_documents']} documents, {s['num_tokens']:,} tokens"
                       for name, s in index["splits"].items())
    print(f"wrote {args.output} ({index['dtype']}) — {splits}; "
          f"{index['num_chars'] / 1e6 / elapsed:.2f} M chars/s")
    return 0
