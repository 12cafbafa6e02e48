"""Distributed side of checkpoints: gathering a sharded model into one state dict and the Hugging Face
export from rank 0. The sharded step-folder format itself (`save_sharded_checkpoint`,
`load_sharded_checkpoint`, written with `torch.distributed.checkpoint`) lives beside the single-process one
in `llama3.checkpoint.native`, since `llama3.load` reads both; it is re-exported here for callers that
think of it as distributed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..checkpoint.native import (DCP_METADATA, is_sharded_checkpoint, load_sharded_checkpoint,
                                 save_sharded_checkpoint)

__all__ = [
    "DCP_METADATA",
    "export_hf",
    "full_state_dict",
    "is_sharded_checkpoint",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole unsharded state dict on CPU in rank 0 (an empty dict on other ranks). A collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def export_hf(model: torch.nn.Module, tokenizer: Any, path: str | Path, *, dtype: str | torch.dtype | None = None,
              **save_kwargs: Any) -> Path | None:
    """Gather the sharded `model` and write one Hugging Face folder from rank 0 with `llama3.save`.

    All ranks must call it; returns the path on rank 0 and None elsewhere. Rank 0 needs host memory for
    the full model once."""
    from ..checkpoint.load import save
    from ..model import Transformer

    weights = full_state_dict(model)
    path_out = None
    if _rank() == 0:
        plain = Transformer.on_meta(model.args)
        plain.to_empty(device="cpu")
        plain.load_state_dict(weights, strict=not model.args.tie_word_embeddings)
        plain.init_buffers("cpu")
        path_out = save(plain, tokenizer, path, format="hf", dtype=dtype, **save_kwargs)
    _barrier()
    return path_out
