"""`llama3 convert`: move a model between Meta's format, Hugging Face and GGUF.

    llama3 convert Llama3.1-8B/ llama31-8b-hf --to hf                      # Meta download -> HF folder
    llama3 convert llama31-8b-hf llama31-8b.Q8_0.gguf --dtype q8_0           # HF -> llama.cpp / Ollama (--to gguf
                                                                             # follows from the name)
    llama3 convert llama31-8b-hf llama31-8b.Q4_K_M.gguf --dtype q4_k_m       # llama.cpp's Q4_K_M mixture
    llama3 convert llama3-70b-hf llama3-70b-meta --to meta --shards 8        # HF -> Meta, 8 model-parallel shards
    llama3 convert out/pretrain/step-00001000 out/hf --to hf --dtype bf16    # training checkpoint -> HF

The source format is detected from its files. Output is written to a temporary path beside DST and renamed
when complete, so DST never holds a half-written model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = "convert a model between Meta, Hugging Face and GGUF formats (sharding, dtype, GGUF quantization)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama3 convert", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("src", help="model folder (Hugging Face, Meta, training checkpoint) or .gguf file")
    parser.add_argument("dst", help="output folder (hf, meta) or file (gguf)")
    parser.add_argument("--to", choices=["hf", "meta", "gguf"],
                        help="output format (default: gguf when DST ends in .gguf; otherwise required)")
    parser.add_argument("--dtype", default=None,
                        help="weights' dtype: float32 | bfloat16 | float16; for gguf also f32 | f16 | bf16 and "
                             "llama.cpp's quantization presets q4_0 | q4_1 | q5_0 | q5_1 | q8_0 | q4_k_m | q5_k_m | "
                             "q6_k (default: as stored)")
    parser.add_argument("--shards", type=int, default=1, help="meta: number of model-parallel shards (default 1)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="hf: split safetensors above this size, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return parser


def _check_destination(args: argparse.Namespace) -> None:
    """Decide the output format and refuse a destination that cannot be written, before the (possibly
    minutes-long) load."""
    from pathlib import Path

    is_gguf_name = args.dst.lower().endswith(".gguf")
    if args.to is None:
        if not is_gguf_name:
            raise ValueError(f"pass --to hf, meta or gguf: the format of {args.dst} cannot be told from its name")
        args.to = "gguf"
    elif is_gguf_name != (args.to == "gguf"):
        raise ValueError(f"{args.dst} {'ends' if is_gguf_name else 'does not end'} in .gguf but --to is {args.to}; "
                         "name a .gguf file for --to gguf and a folder for hf or meta")
    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise ValueError(f"{dst} already exists; choose a new output path or pass --overwrite")
    parent = dst.resolve().parent
    if not parent.is_dir() and parent.exists():
        raise ValueError(f"cannot write {dst}: {parent} is not a folder")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from ..checkpoint.load import detect_format, load, save
    from ..checkpoint.safety import parse_dtype
    from ..inference.ggml_quant import dequantize_model, has_ggml_layers

    try:
        _check_destination(args)
        if args.to != "meta" and args.shards != 1:
            raise ValueError("--shards applies to --to meta; use --max-shard-size for hf")
        started = time.perf_counter()
        src_format = detect_format(args.src)
        print(f"loading {args.src} ({src_format})", file=sys.stderr)
        # GGUF quantized types are chosen at write time; the model itself loads in its stored float dtype.
        load_dtype = None if args.to == "gguf" else args.dtype
        if src_format == "gguf":  # written out from the file's blocks: no repack for the kernels' products
            from ..checkpoint.gguf import load_gguf

            model, tokenizer = load_gguf(Path(args.src).expanduser(), dtype=load_dtype, progress=True, repack=False)
        else:
            model, tokenizer = load(args.src, dtype=load_dtype, progress=src_format != "training")
        if has_ggml_layers(model):  # a quantized GGUF source: written out from its dequantized values,
            # straight in the requested float dtype (an 8B model in float32 first would need 32 GB)
            dequantize_model(model, parse_dtype(load_dtype) or torch.float32)
        print(f"loaded {model.num_params() / 1e6:.1f}M parameters in {time.perf_counter() - started:.1f}s",
              file=sys.stderr)
        extra = {"hf": {"max_shard_size": args.max_shard_size}, "meta": {"num_shards": args.shards},
                 "gguf": {}}[args.to]
        path = save(model, tokenizer, args.dst, format=args.to, dtype=args.dtype, overwrite=args.overwrite,
                    progress=True, **extra)
    except ValueError as e:
        print(f"llama3 convert: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk: one line naming where, not a traceback
        from ..checkpoint.safety import os_error_of

        os_error = os_error_of(e, args.dst)
        if os_error is None:
            raise
        print(f"llama3 convert: error: {os_error.filename}: cannot write: {os_error.strerror}; nothing was "
              f"left at {args.dst}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.to}) in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0
