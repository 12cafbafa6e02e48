"""Tensor-parallel inference: one model split across the ranks of a torchrun job, for models that do not
fit one device.

    torchrun --nproc_per_node 2 -m llama3 generate --model out/hf --prompt "..." --temperature 0

Every rank runs the same prompts; the weights of each block are split by heads and FFN columns (the
training plan without sequence parallelism, since a decode step has one position), each rank keeps the
KV cache of its own kv heads only, and the logits are gathered so every rank samples the same token.
Rank 0 reads the checkpoint once into host memory and scatters the shards; only rank 0 prints.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..inference.generate import Generator
from ..model import Transformer
from .mesh import init_distributed
from .parallelize import apply_tensor_parallel, check_tp_shapes

__all__ = ["TensorParallelGenerator", "load_tensor_parallel", "tensor_parallel_generator"]


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) weight."""
    return weight.to_local() if hasattr(weight, "to_local") else weight


class TensorParallelGenerator(Generator):
    """`Generator` over a tensor-parallel model: the same API, eager decode, per-rank KV caches (the
    model's `setup_caches` sizes each rank's cache for the kv heads its shard of `wk` holds)."""

    def __init__(self, model: Transformer, tokenizer, *, cache_bucket: int = 256, kv_cache: str | None = None):
        super().__init__(model, tokenizer, compile=False, cache_bucket=cache_bucket, kv_cache=kv_cache)
        self.device = _local(model.tok_embeddings.weight).device


def load_tensor_parallel(path: str | Path, tp_mesh: DeviceMesh, *, device: torch.device,
                         dtype: str | torch.dtype | None = None):
    """(model, tokenizer) with the model split over `tp_mesh`. A collective: every rank of the mesh calls
    it. Rank 0 holds the full checkpoint in host memory once; each rank's device gets only its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from ..checkpoint.load import load

    # Shapes and tokenizer on every rank, without keeping any weights (the meta device holds no data).
    shape_model, tokenizer = load(path, device="meta", dtype=dtype)
    args, weight_dtype = shape_model.args, shape_model.tok_embeddings.weight.dtype
    check_tp_shapes(args, tp_mesh.size())
    model = Transformer.on_meta(args).to(weight_dtype)
    apply_tensor_parallel(model, tp_mesh, sequence_parallel=False)
    model.to_empty(device=device)
    full = load(path, device="cpu", dtype=dtype)[0].state_dict() if tp_mesh.get_rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.init_buffers(device)
    return model.eval(), tokenizer


def tensor_parallel_generator(model_path: str | Path, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
                              seed: int | None = None, cache_bucket: int = 256,
                              quiet_other_ranks: bool = True, kv_cache: str | None = None) -> TensorParallelGenerator:
    """A generator whose model is split over all ranks of this torchrun job (one tensor-parallel group).
    A collective: every rank calls it with the same arguments.

    `device` "cuda" puts each rank on its own GPU. Sampling stays in step across ranks because all ranks
    draw from the same seed (`seed`, or rank 0's random one) on the same gathered logits. With
    `quiet_other_ranks`, ranks other than 0 send their stdout to /dev/null so text prints once. `kv_cache`
    "int8" keeps each rank's cache as int8 (see `Transformer.setup_caches`)."""
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    info = init_distributed(device_type)
    mesh = init_device_mesh(device_type, (info.world_size,), mesh_dim_names=("tp",))
    shared_seed = torch.tensor([seed if seed is not None else int.from_bytes(os.urandom(4), "little")])
    dist.broadcast(shared_seed, src=0)
    torch.manual_seed(int(shared_seed))
    model, tokenizer = load_tensor_parallel(model_path, mesh, device=info.device, dtype=dtype)
    if quiet_other_ranks and info.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return TensorParallelGenerator(model, tokenizer, cache_bucket=cache_bucket, kv_cache=kv_cache)
