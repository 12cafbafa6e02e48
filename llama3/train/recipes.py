"""Recipes: named Python functions that return a complete `TrainConfig`.

`llama3 pretrain --recipe NAME` starts from `RECIPES[NAME]()` and then applies `--section.key=value`
overrides. Add a recipe by writing a function here and registering it in `RECIPES`.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import TrainConfig

__all__ = ["FINETUNE_RECIPES", "RECIPES", "finetune_recipe", "finetune_recipe_names", "recipe", "recipe_names"]


def debug() -> TrainConfig:
    """A ~0.4M-parameter model on a small vocabulary: trains in seconds on a CPU (tests, smoke runs)."""
    cfg = TrainConfig(recipe="debug")
    cfg.model.preset = "debug"
    cfg.data.batch_size, cfg.data.seq_len = 8, 128
    cfg.optim.lr, cfg.optim.weight_decay = 3e-3, 0.1
    cfg.schedule.warmup_steps = 10
    cfg.train.steps, cfg.train.val_interval, cfg.train.val_batches = 50, 25, 4
    cfg.checkpoint.interval, cfg.checkpoint.keep = 25, 2
    cfg.train.out_dir = "runs/debug"
    return cfg


def demo() -> TrainConfig:
    """The embedded default: a small Llama 3 for the Austen corpus on a 2-core CPU, in bf16 autocast.
    `llama3 demo` sets `train.steps` from the time budget it is given."""
    cfg = TrainConfig(recipe="demo")
    cfg.model.preset = "debug"
    # Untied embeddings: with tied ones the initial logits favour repeating the input token (loss ≫ ln V).
    cfg.model.overrides = {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 64,
                           "tie_word_embeddings": False}
    # Measured on the Austen shards at an equal token budget (240K tokens): batch 8 at lr 3e-3 reached
    # validation loss 5.38, batch 16 at 2e-3 5.84 (and tied embeddings 6.07): with minutes of CPU time,
    # more and smaller steps win.
    cfg.data.batch_size, cfg.data.seq_len = 8, 256
    cfg.optim.lr, cfg.optim.weight_decay = 3e-3, 0.1
    cfg.schedule.name, cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio = "cosine", 30, 0.05
    cfg.train.dtype = "bf16"
    cfg.train.steps, cfg.train.val_interval, cfg.train.val_batches = 600, 100, 16
    cfg.checkpoint.interval, cfg.checkpoint.keep = 200, 2
    cfg.logging.progress_bar = True
    cfg.train.out_dir = "runs/demo"
    return cfg


def small_15m() -> TrainConfig:
    """The `15m` preset (~15M parameters) on one GPU or a patient CPU, bf16."""
    cfg = TrainConfig(recipe="15m")
    cfg.model.preset = "15m"
    cfg.data.batch_size, cfg.data.seq_len = 32, 512
    cfg.optim.lr = 1e-3
    cfg.schedule.warmup_steps = 200
    cfg.train.dtype, cfg.train.steps = "bf16", 5000
    cfg.train.out_dir = "runs/15m"
    return cfg


def llama3_8b() -> TrainConfig:
    """Llama 3 8B shape (paper Table 3: peak lr 3e-4, warmup, cosine to 1/10 of peak, AdamW β=(0.9, 0.95),
    weight decay 0.1, 8K context), for a GPU cluster under torchrun with FSDP2 and full activation
    checkpointing. The global batch is data.batch_size × grad_accum × data-parallel ranks sequences."""
    cfg = TrainConfig(recipe="llama3-8b")
    cfg.model.preset = "llama3-8b"
    cfg.data.batch_size, cfg.data.seq_len = 1, 8192
    cfg.optim.lr, cfg.optim.weight_decay = 3e-4, 0.1
    cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio = 2000, 0.1
    cfg.train.dtype, cfg.train.steps, cfg.train.grad_accum = "bf16", 100_000, 8
    cfg.train.loss_chunk_size = 4096
    cfg.parallel.activation_checkpoint, cfg.parallel.compile = "full", True
    cfg.checkpoint.interval = 1000
    cfg.train.out_dir = "runs/llama3-8b"
    return cfg


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "debug": debug,
    "demo": demo,
    "15m": small_15m,
    "llama3-8b": llama3_8b,
}


def _finetune(name: str, method: str, lr: float, lora_rank: int) -> TrainConfig:
    """Post-training defaults (Llama 3 paper §4.1: SFT and DPO at lr 1e-5; DPO beta 0.1 with a 0.2 NLL
    term). The model shape comes from the starting weights, so the `model` section is unused."""
    cfg = TrainConfig(recipe=name)
    cfg.finetune.method, cfg.finetune.lora_rank = method, lora_rank
    cfg.data.batch_size, cfg.data.seq_len = (8, 1024) if method == "sft" else (4, 1024)
    cfg.optim.lr, cfg.optim.weight_decay = lr, 0.0
    cfg.schedule.name, cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio = "cosine", 10, 0.1
    cfg.train.steps, cfg.train.val_interval, cfg.train.val_batches = 200, 50, 8
    cfg.checkpoint.interval, cfg.checkpoint.keep = 100, 1
    cfg.train.out_dir = f"runs/{name}"
    return cfg


FINETUNE_RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "sft": lambda: _finetune("sft", "sft", 1e-5, 0),
    # LoRA trains a few million parameters from zero: it needs a learning rate ~10x a full fine-tune's.
    "sft-lora": lambda: _finetune("sft-lora", "sft", 2e-4, 16),
    "dpo": lambda: _finetune("dpo", "dpo", 1e-5, 0),
    "dpo-lora": lambda: _finetune("dpo-lora", "dpo", 5e-5, 16),
}


def finetune_recipe_names() -> list[str]:
    return list(FINETUNE_RECIPES)


def finetune_recipe(name: str) -> TrainConfig:
    """A fresh TrainConfig for `llama3 finetune` from the named recipe."""
    if name not in FINETUNE_RECIPES:
        raise ValueError(f"unknown fine-tuning recipe {name!r}; choose one of: {', '.join(FINETUNE_RECIPES)}")
    return FINETUNE_RECIPES[name]()


def recipe_names() -> list[str]:
    return list(RECIPES)


def recipe(name: str) -> TrainConfig:
    """A fresh TrainConfig from the named recipe."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]()
