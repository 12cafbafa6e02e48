"""`Runtime`: where the training loop runs. One process on one device is the default Runtime, with every
field filled in; distributed training (`llama3.distributed.runtime`) builds one with other values. The loop
calls the fields and never asks which kind it has."""

from __future__ import annotations

import functools
import platform
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

__all__ = ["Runtime", "autocast_dtype", "bf16_notice", "export_hf_folder", "init_weights_in_place",
           "native_bf16", "parallelize_one_device", "save_checkpoint_one_process"]


def _x86_cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo on x86 (None elsewhere, or where it cannot be read)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return set(next((line for line in text.splitlines() if line.startswith("flags")), "").partition(":")[2].split())


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run on bf16 instructions here. False only for an x86 CPU without AVX-512 BF16
    or AMX: there oneDNN emulates bf16 products, which made a training step 10-15x slower than in fp32 on
    a Zen 3 (BENCHMARKS.md). GPUs and other CPUs are taken at their word."""
    flags = _x86_cpu_flags() if device.type == "cpu" else None
    return flags is None or bool({"avx512_bf16", "amx_bf16"} & flags)


def autocast_dtype(train_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a run of `train.dtype` uses on `device`: bf16 where it is native, else none (fp32:
    on a CPU without bf16 instructions an emulated bf16 step is far slower than an fp32 one, and fp32 loses
    nothing in accuracy)."""
    if train_dtype == "bf16" and native_bf16(device):
        return torch.bfloat16
    return None


def bf16_notice(train_dtype: str, device: torch.device) -> str | None:
    """The one line to print when `train.dtype=bf16` runs in fp32 on this CPU (None otherwise)."""
    if train_dtype != "bf16" or autocast_dtype(train_dtype, device) is not None:
        return None
    return ("train.dtype=bf16: this CPU has no bf16 instructions (AVX-512 BF16 / AMX), where bf16 matmuls are "
            "emulated and many times slower; training in fp32 instead")


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
