"""`llama3 finetune`: chat SFT or DPO of a released (or our own) model, fully or with LoRA, on the one
training loop. Only the initial weights (`--model`), the transform (LoRA), the batches (chat JSONL or
preference pairs) and the loss (assistant-token cross-entropy or DPO) differ from pretraining.

Writes into --out: the loop's checkpoints and metrics.jsonl, `hf/` (the merged model as a Hugging Face
folder, loadable by transformers and by `llama3 generate/chat/serve`), `adapter/` (the LoRA adapters alone
in PEFT's layout, when LoRA is used) and `finetune_report.json` (validation figures before and after).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

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
    try:
        run(cfg, resume=args.resume, fit_seq_len=not _sets(overrides, "data.seq_len"))
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


def _load_examples(cfg, chat_format):
    from ..data.sft import load_chat_jsonl, load_preference_jsonl, split_train_val

    ft = cfg.finetune
    if ft.method == "sft":
        examples = load_chat_jsonl(cfg.data.path, chat_format, max_seq_len=cfg.data.seq_len, train_on=ft.train_on,
                                   overlong=ft.overlong)
    else:
        examples = load_preference_jsonl(cfg.data.path, chat_format, max_seq_len=cfg.data.seq_len,
                                         mask_formatting=ft.dpo_mask_formatting)
    return split_train_val(examples, ft.val_fraction, seed=cfg.data.seed)


def _batches(cfg, examples, pad_id, *, shuffle: bool = True):
    from ..data.sft import PreferenceBatches, SFTBatches

    kind = SFTBatches if cfg.finetune.method == "sft" else PreferenceBatches
    # Validation: one pass in the file's order; training: endless, reshuffled every epoch.
    return kind(examples, batch_size=cfg.data.batch_size, pad_id=pad_id, seq_len=cfg.data.seq_len,
                pack=cfg.finetune.pack and cfg.finetune.method == "sft", seed=cfg.data.seed, shuffle=shuffle,
                num_epochs=None if shuffle else 1)


def lora_config_of(cfg):
    """The LoRAConfig the `finetune` section asks for, or None for full fine-tuning."""
    from ..train.lora import LoRAConfig

    ft = cfg.finetune
    if ft.lora_rank <= 0:
        return None
    targets = tuple(t.strip() for t in ft.lora_targets.split(",") if t.strip())
    alpha = 2.0 * ft.lora_rank if ft.lora_alpha is None else ft.lora_alpha
    return LoRAConfig(rank=ft.lora_rank, alpha=alpha, dropout=ft.lora_dropout, targets=targets,
                      quantize_base=ft.lora_quantize_base)


def run(cfg, *, resume: bool = False, fit_seq_len: bool = False, log=print) -> dict[str, Any]:
    """Fine-tune as `cfg` says; returns the report also written to OUT/finetune_report.json.

    `fit_seq_len`: a data.seq_len longer than the model's context shrinks to it (the command line does this
    when the user did not set data.seq_len); otherwise that is an error."""
    import copy

    from ..distributed.mesh import launched_by_torchrun
    from ..train.dpo import DPOConfig, DPOLoss
    from ..train.loop import setup_runtime, train
    from ..train.lora import apply_lora

    cfg = copy.deepcopy(cfg)
    ft = cfg.finetune
    if ft.method not in ("sft", "dpo"):
        raise ValueError(f"finetune.method must be sft or dpo, got {ft.method!r}")
    lora = lora_config_of(cfg)  # validates the LoRA settings before anything heavy
    dpo_config = DPOConfig(beta=ft.dpo_beta, nll_weight=ft.dpo_nll_weight) if ft.method == "dpo" else None
    if launched_by_torchrun():
        raise ValueError("llama3 finetune runs in one process (one device); start it without torchrun")
    runtime = setup_runtime(cfg)
    base, tokenizer, train_examples, val_examples = _prepare(cfg, runtime.device, log, fit_seq_len)
    model_args, holder = base.args, {"base": base}
    del base

    def initialize(model):
        model.load_state_dict(holder.pop("base").state_dict())  # the loaded weights, then drop the copy

    loss_fn = DPOLoss(dpo_config) if dpo_config else None  # None: the loop's chunked cross-entropy
    val_batches = None
    if val_examples:
        def val_batches():
            return _batches(cfg, val_examples, tokenizer.pad_id, shuffle=False)
    cfg.checkpoint.export_hf = False  # exported below, after merging the adapters
    result = train(cfg, tokenizer=tokenizer, train_batches=_batches(cfg, train_examples, tokenizer.pad_id),
                   val_batches=val_batches, model_args=model_args, initialize=initialize,
                   transform=(lambda m: apply_lora(m, lora)) if lora else None, loss_fn=loss_fn,
                   resume=resume, runtime=runtime, log=log)
    report: dict[str, Any] = {"method": ft.method, "lora_rank": ft.lora_rank, "steps": result.step,
                              "val_loss": {str(k): v for k, v in result.val_losses.items()}}
    if ft.method == "dpo" and val_examples:
        report["val_reward"] = _dpo_val_metrics(result.model.eval(), val_examples, tokenizer.pad_id, loss_fn)
    if runtime.is_main:
        _export(cfg, result.model.eval(), tokenizer, report, log)
    return report


def _prepare(cfg, device, log, fit_seq_len: bool):
    """The starting model and tokenizer, and the encoded train/validation examples (for DPO with the
    starting model's reference log-probs attached)."""
    import torch

    from ..checkpoint.load import load
    from ..chat_template import chat_format_for
    from ..inference.ggml_quant import require_float_weights
    from ..train.dpo import compute_reference_logps

    base, tokenizer = load(cfg.finetune.model_path, device=device, dtype=torch.float32)
    require_float_weights(base, cfg.finetune.model_path, "fine-tuning")
    _fit_seq_len(cfg, base.args.max_seq_len, log, shrink=fit_seq_len)
    train_examples, val_examples = _load_examples(cfg, chat_format_for(tokenizer))
    log(f"{cfg.data.path}: {len(train_examples)} training and {len(val_examples)} validation "
        f"{'dialogs' if cfg.finetune.method == 'sft' else 'pairs'}")
    if cfg.finetune.method == "dpo":
        # The reference is the starting model; its log-probs are computed once, so no second copy is kept,
        # under the same autocast as training so that policy and reference agree exactly at step 0.
        bf16 = cfg.train.dtype == "bf16"
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            train_examples = compute_reference_logps(base, train_examples, tokenizer.pad_id)
            if val_examples:
                val_examples = compute_reference_logps(base, val_examples, tokenizer.pad_id)
    return base, tokenizer, train_examples, val_examples


def _fit_seq_len(cfg, context: int, log, *, shrink: bool) -> None:
    """Rows longer than the model's context cannot be trained on: with `shrink` (the recipe's default, not
    a value the user set) data.seq_len becomes the context, with a notice; otherwise it is refused."""
    if cfg.data.seq_len <= context:
        return
    if not shrink:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's context ({context}); "
                         f"pass --data.seq_len={context} or less")
    log(f"the model's context is {context} tokens, shorter than the recipe's data.seq_len={cfg.data.seq_len}; "
        f"training on rows of {context} (--data.seq_len sets it)")
    cfg.data.seq_len = context


def _export(cfg, model, tokenizer, report: dict[str, Any], log) -> None:
    """OUT/adapter (PEFT, when LoRA), OUT/hf (merged), OUT/finetune_report.json."""
    import os

    from ..checkpoint.load import save
    from ..train.lora import merge_lora, save_peft_adapter

    out = Path(cfg.train.out_dir)
    if cfg.finetune.lora_rank > 0:
        save_peft_adapter(model, out / "adapter", base_model_name_or_path=str(cfg.finetune.model_path))
        log(f"saved the LoRA adapters (PEFT layout) to {out / 'adapter'}")
        merge_lora(model)
    save(model, tokenizer, out / "hf", format="hf", overwrite=True)
    log(f"exported the fine-tuned model (Hugging Face folder) to {out / 'hf'}")
    tmp = out / f".finetune_report.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "finetune_report.json")


def _dpo_val_metrics(model, examples, pad_id: int, loss_fn) -> dict[str, float]:
    """Mean implicit-reward margin and accuracy of the trained model on the validation pairs."""
    import torch

    from ..data.sft import preference_batch

    device = next(model.parameters()).device
    margins, accuracies = [], []
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            chunk = examples[start: start + 8]
            batch = {k: v.to(device) for k, v in preference_batch(chunk, pad_id).items()}
            loss_fn(model, batch)
            margins.append(loss_fn.last_metrics["reward_margin"] * len(chunk))
            accuracies.append(loss_fn.last_metrics["reward_accuracy"] * len(chunk))
    return {"margin": sum(margins) / len(examples), "accuracy": sum(accuracies) / len(examples)}
