"""`llama3 train-tokenizer`: learn a byte-level BPE vocabulary (Llama 3 split regex) in tiktoken format."""

from __future__ import annotations

import argparse
import sys
import time

HELP = "train a byte-level BPE tokenizer (Llama 3 split regex) and write a tiktoken-format tokenizer.model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama3 train-tokenizer", description=HELP)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="text, JSONL (field 'text') or parquet (column 'text') files")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="BPE ranks: 256 bytes + merges (the 256 special tokens come on top)")
    parser.add_argument("--output", required=True, help="tokenizer.model path, or a folder to write it into")
    parser.add_argument("--workers", type=int, default=None, help="processes for counting (default: all cores)")
    args = parser.parse_args(argv)
    from ..bpe import train_tokenizer

    start = time.perf_counter()
    try:
        tokenizer = train_tokenizer(args.input, args.vocab_size, args.output, num_workers=args.workers)
    except ValueError as e:
        print(f"llama3 train-tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {len(tokenizer.mergeable_ranks)} BPE ranks + {len(tokenizer.special_tokens)} "
          f"special tokens = {tokenizer.n_words} ids ({time.perf_counter() - start:.1f}s)")
    return 0
