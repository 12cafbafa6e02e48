"""`Runtime`: where the training loop runs. One process on one device is the default Runtime, with every
field filled in; distributed training (`llama3.distributed.runtime`) builds one with other values. The loop
calls the fields and never asks which kind it has."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import native
from ..model import Transformer
from .config import ParallelSection
from .loss import causal_lm_loss

__all__ = ["Runtime", "export_hf_folder", "init_weights_in_place", "parallelize_one_device",
           "save_checkpoint_one_process"]


def parallelize_one_device(model: Transformer, parallel_cfg: ParallelSection) -> Transformer:
    """`parallelize(model, None, cfg)`: activation checkpointing and compile, as under torchrun."""
    from ..distributed.parallelize import parallelize

    return parallelize(model, None, parallel_cfg)


def init_weights_in_place(model: Transformer) -> None:
    """`model.init_weights()` with the buffers (RoPE tables) on the device the weights were materialized on."""
    model.init_weights(buffer_device=model.tok_embeddings.weight.device)


def export_hf_folder(model: Transformer, tokenizer: Any, path: Path, log: Callable[[str], None]) -> None:
    """Write the trained model as one Hugging Face folder."""
    from ..checkpoint.load import save

    save(model, tokenizer, path, format="hf", overwrite=True)
    log(f"exported a Hugging Face folder to {path}")


def save_checkpoint_one_process(run_dir: Path, step: int, **kwargs: Any) -> Path:
    """`native.save_training_checkpoint`, looked up when called (so it can be swapped, e.g. by tests)."""
    return native.save_training_checkpoint(run_dir, step, **kwargs)


def _identity(value: torch.Tensor) -> torch.Tensor:
    return value


@dataclass
class Runtime:
    """Where this process trains. The defaults are one process on `device`."""

    device: torch.device
    dp_rank: int = 0
    dp_world_size: int = 1
    is_main: bool = True  # rank 0 writes logs and metrics
    world_size: int = 1  # processes in the job (MFU is per device)
    # meta-device model -> TP, activation checkpointing, compile, FSDP2 (`parallelize(model, mesh, cfg)`)
    parallelize: Callable[[Transformer, ParallelSection], Transformer] = parallelize_one_device
    # mean of a scalar tensor over data-parallel ranks (for logged losses)
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = _identity
    init_weights: Callable[[Transformer], None] = init_weights_in_place  # a materialized model, from scratch
    # the language-model loss, `(model, batch, *, chunk_size) -> scalar` (vocab-parallel under TP)
    lm_loss: Callable[..., torch.Tensor] = causal_lm_loss
    # (params, max_norm) -> total norm; the global norm of sharded gradients under FSDP/TP
    clip_grad_norm: Callable[[list[nn.Parameter], float], torch.Tensor] = functools.partial(
        torch.nn.utils.clip_grad_norm_, foreach=True)
    save_checkpoint: Callable[..., Path] = save_checkpoint_one_process  # called on every rank
    export_hf: Callable[[Transformer, Any, Path, Callable[[str], None]], None] = export_hf_folder  # every rank
