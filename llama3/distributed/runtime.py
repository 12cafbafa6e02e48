"""The distributed `Runtime` of the training loop: what changes when `llama3 pretrain` runs under torchrun.

The loop (`llama3.train.loop`) is written once; a `Runtime` tells it where it runs. This module fills one
in for a torchrun job:

- the device (GPU LOCAL_RANK with NCCL, or CPU with gloo) and the mesh from `cfg.parallel`;
- `parallelize`: TP → activation checkpointing → compile → FSDP2 on the meta-device model, with bf16
  compute and fp32 gradient reduction when `train.dtype=bf16`;
- `init_weights`: the single-process initialization computed once and scattered, so a run's weights do not
  depend on its mesh (2 ranks start exactly where 1 process or 4 ranks start);
- data sharded by data-parallel rank (`dp_rank`, `dp_world_size`), logged losses averaged over it;
- gradient clipping on the global norm of the sharded gradients (the same number on every rank, so the
  non-finite check skips a step everywhere or nowhere);
- loss parallel under tensor parallel (vocab-sharded logits never gathered);
- sharded checkpoints (DCP) written by every rank, and the HF export gathered to rank 0.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from ..model import Transformer
from ..train.loss import causal_lm_loss
from ..train.runtime import Runtime, autocast_dtype
from .checkpoint import export_hf, save_sharded_checkpoint
from .collectives import all_reduce_mean, clip_grad_norm_
from .loss import vocab_parallel_lm_loss
from .mesh import build_mesh, data_parallel_mesh, init_distributed, mesh_dims
from .parallelize import check_tp_shapes, parallelize

__all__ = ["broadcast_init_weights", "distributed_runtime"]


@torch.no_grad()
def broadcast_init_weights(model: Transformer, *, device: torch.device) -> None:
    """Initialize a parallelized, materialized `model` with exactly the values `model.init_weights()` gives
    one process from the current RNG state: rank 0 initializes a full copy on the CPU (one fp32 copy of
    the model in host memory) and every rank receives its own shards. The caller seeds the RNG alike on
    every rank (only rank 0's draws are used)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full: dict[str, torch.Tensor] = {}
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        plain = Transformer.on_meta(model.args)
        plain.to_empty(device="cpu")
        plain.init_weights(buffer_device="cpu")
        full = plain.state_dict()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    model.init_buffers(device)


def distributed_runtime(cfg, *, compile_backend: str = "inductor") -> Any:
    """A `llama3.train.runtime.Runtime` for this torchrun process and `cfg` (a `TrainConfig`)."""
    device = None if cfg.train.device == "auto" else cfg.train.device
    info = init_distributed(device)
    mesh = build_mesh(cfg.parallel, info.world_size, info.device.type)
    dims = mesh_dims(mesh)
    if dims.tp > 1 and cfg.data.seq_len % dims.tp:
        raise ValueError(f"--data.seq_len={cfg.data.seq_len} must be divisible by --parallel.tp={dims.tp} "
                         "(sequence parallelism splits each sequence across the tensor-parallel ranks)")
    dp_mesh = data_parallel_mesh(mesh)
    # bf16 where it is native; fp32 on a CPU that would emulate it, as the single-process loop does
    param_dtype = autocast_dtype(cfg.train.dtype, info.device) or torch.float32
    loss_parallel = dims.tp > 1

    def parallelize_model(model: Transformer, parallel_cfg) -> Transformer:
        if dims.tp > 1:
            check_tp_shapes(model.args, dims.tp, cfg.data.seq_len)
        return parallelize(model, mesh, parallel_cfg, param_dtype=param_dtype, reduce_dtype=torch.float32,
                           loss_parallel=loss_parallel, compile_backend=compile_backend)

    if info.rank == 0:  # the training loop logs with print on rank 0; this line joins them
        print(f"distributed: {info.world_size} ranks on {info.device.type} ({info.backend}), mesh "
              f"dp_replicate={dims.dp_replicate} × dp_shard={dims.dp_shard} × tp={dims.tp}", flush=True)
    return Runtime(
        device=info.device,
        dp_rank=dp_mesh.get_local_rank(),
        dp_world_size=dp_mesh.size(),
        is_main=info.rank == 0,
        parallelize=parallelize_model,
        all_reduce_mean=functools.partial(all_reduce_mean, group=dp_mesh.get_group()),
        world_size=info.world_size,
        init_weights=functools.partial(broadcast_init_weights, device=info.device),
        lm_loss=vocab_parallel_lm_loss if loss_parallel else causal_lm_loss,
        clip_grad_norm=functools.partial(clip_grad_norm_, foreach=True),
        save_checkpoint=save_sharded_checkpoint,
        export_hf=_export_hf,
    )


def _export_hf(model: Transformer, tokenizer: Any, path: Path, log) -> None:
    """Gather the sharded model and write one HF folder from rank 0 (every rank must call it)."""
    written = export_hf(model, tokenizer, path, overwrite=True)
    if written is not None:
        log(f"exported a Hugging Face folder to {written}")
