"""Fine-tuning: chat SFT or DPO of a released (or our own) model, fully or with LoRA, on the one training
loop. Only the initial weights (`finetune.model_path`), the transform (LoRA), the batches (chat JSONL or
preference pairs) and the loss (assistant-token cross-entropy or DPO) differ from pretraining.

    cfg = finetune_recipe("sft-lora"); cfg.finetune.model_path = "runs/demo/base"; cfg.data.path = "chat.jsonl"
    report = finetune(cfg)

Writes into `train.out_dir`: the loop's checkpoints and metrics.jsonl, `hf/` (the merged model as a Hugging
Face folder), `adapter/` (the LoRA adapters alone in PEFT's layout, when LoRA is used) and
`finetune_report.json` (validation figures before and after).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["finetune", "lora_config_of"]


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
    from .lora import LoRAConfig

    ft = cfg.finetune
    if ft.lora_rank <= 0:
        return None
    targets = tuple(t.strip() for t in ft.lora_targets.split(",") if t.strip())
    alpha = 2.0 * ft.lora_rank if ft.lora_alpha is None else ft.lora_alpha
    return LoRAConfig(rank=ft.lora_rank, alpha=alpha, dropout=ft.lora_dropout, targets=targets,
                      quantize_base=ft.lora_quantize_base)


def finetune(cfg, *, resume: bool = False, fit_seq_len: bool = False, log=print) -> dict[str, Any]:
    """Fine-tune as `cfg` (a TrainConfig, e.g. `llama3.train.recipes.finetune_recipe("sft-lora")` with
    `finetune.model_path` and `data.path` set) says; returns the report also written to
    OUT/finetune_report.json.

    `fit_seq_len`: a data.seq_len longer than the model's context shrinks to it (the command line does this
    when the user did not set data.seq_len); otherwise that is an error."""
    import copy

    from ..distributed.mesh import launched_by_torchrun
    from .dpo import DPOConfig, DPOLoss
    from .loop import setup_runtime, train
    from .lora import apply_lora

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
    from .dpo import compute_reference_logps
    from .runtime import autocast_dtype

    base, tokenizer = load(cfg.finetune.model_path, device=device, dtype=torch.float32)
    require_float_weights(base, cfg.finetune.model_path, "fine-tuning")
    _fit_seq_len(cfg, base.args.max_seq_len, log, shrink=fit_seq_len)
    train_examples, val_examples = _load_examples(cfg, chat_format_for(tokenizer))
    log(f"{cfg.data.path}: {len(train_examples)} training and {len(val_examples)} validation "
        f"{'dialogs' if cfg.finetune.method == 'sft' else 'pairs'}")
    if cfg.finetune.method == "dpo":
        # The reference is the starting model; its log-probs are computed once, so no second copy is kept,
        # under the same autocast as training so that policy and reference agree exactly at step 0.
        amp_dtype = autocast_dtype(cfg.train.dtype, torch.device(device))  # None where bf16 would be emulated
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
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

    from ..checkpoint.load import save
    from ..checkpoint.safety import atomic_output_file
    from .lora import merge_lora, save_peft_adapter

    out = Path(cfg.train.out_dir)
    if cfg.finetune.lora_rank > 0:
        save_peft_adapter(model, out / "adapter", base_model_name_or_path=str(cfg.finetune.model_path))
        log(f"saved the LoRA adapters (PEFT layout) to {out / 'adapter'}")
        merge_lora(model)
    save(model, tokenizer, out / "hf", format="hf", overwrite=True)
    log(f"exported the fine-tuned model (Hugging Face folder) to {out / 'hf'}")
    with atomic_output_file(out / "finetune_report.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


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
