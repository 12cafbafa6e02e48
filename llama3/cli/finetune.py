"""`llama3 finetune`: parses the recipe, flags and `--section.key=value` overrides into a TrainConfig and
calls `llama3.train.finetune.finetune` (chat SFT or DPO, fully or with LoRA, on the one training loop).

Writes into --out: the loop's checkpoints and metrics.jsonl, `hf/` (the merged model as a Hugging Face
folder, loadable by transformers and by `llama3 generate/chat/serve`), `adapter/` (the LoRA adapters alone
in PEFT's layout, when LoRA is used) and `finetune_report.json` (validation figures before and after).
"""

from __future__ import annotations

import argparse
import sys

HELP = "fine-tune on chat JSONL (SFT) or preference pairs (DPO), fully or with LoRA; exports HF + PEFT folders"


def build_parser() -> argparse.ArgumentParser:
    from ..train.recipes import finetune_recipe_names

    parser = argparse.ArgumentParser(
        prog="llama3 finetune", description=HELP,
        epilog="Any config field can be set as --section.key=value, e.g. --train.steps=100 --optim.lr=2e-4 "
               "--finetune.lora_alpha=32 --finetune.dpo_beta=0.1 --data.seq_len=512. --print-config shows "
               "them all. Chat lines: {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}; preference "
               "lines: {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}.")
    parser.add_argument("--model", help="the starting model: an HF or Meta folder or a training checkpoint")
    parser.add_argument("--data", help="chat JSONL (sft) or preference-pair JSONL (dpo)")
    parser.add_argument("--out", help="run folder (checkpoints, metrics.jsonl, hf/, adapter/)")
    parser.add_argument("--method", choices=["sft", "dpo"], help="sft (default) or dpo")
    parser.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank (0 = full fine-tuning)")
    parser.add_argument("--recipe", choices=finetune_recipe_names(),
                        help="starting config (default: METHOD, or METHOD-lora with --lora-rank > 0)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; on a busy "
                                                    "machine 1 can be faster than 2)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return parser


def resolve_config(args: argparse.Namespace, overrides: list[str]):
    """Recipe (from --recipe, or --method and --lora-rank), then the named flags, then overrides."""
    from ..train.config import apply_overrides
    from ..train.recipes import finetune_recipe

    method = args.method or "sft"
    name = args.recipe or (f"{method}-lora" if (args.lora_rank or 0) > 0 else method)
    cfg = finetune_recipe(name)
    if args.method:
        cfg.finetune.method = args.method
    if args.lora_rank is not None:
        cfg.finetune.lora_rank = args.lora_rank
    if args.model:
        cfg.finetune.model_path = args.model
    if args.data:
        cfg.data.path = args.data
    if args.out:
        cfg.train.out_dir = args.out
    return apply_overrides(cfg, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = resolve_config(args, overrides)
    except ValueError as e:
        parser.error(str(e))
    if args.print_config:
        print(cfg.to_json(), end="")
        return 0
    if not cfg.finetune.model_path:
        parser.error("no starting model: pass --model PATH (an HF or Meta folder, or a training checkpoint)")
    if not cfg.data.path:
        parser.error("no data: pass --data FILE.jsonl")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from ..train.finetune import finetune

    try:
        finetune(cfg, resume=args.resume, fit_seq_len=not _sets(overrides, "data.seq_len"))
    except ValueError as e:
        print(f"llama3 finetune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # WriteFailed from the loop, or another write (a full disk): one line, no traceback
        print(f"llama3 finetune: error: {e}", file=sys.stderr)
        return 1
    return 0


def _sets(overrides: list[str], name: str) -> bool:
    """Whether the --section.key overrides set `name` (as --name=value or --name value)."""
    return any(arg.split("=", 1)[0] == f"--{name}" for arg in overrides)
