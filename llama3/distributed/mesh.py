"""Process groups and the device mesh: who talks to whom.

`torchrun` starts one process per device and describes the job in environment variables (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, ...). `init_distributed()` reads them once, at call time, and joins the default
process group (NCCL between GPUs, gloo between CPU processes). `build_mesh()` then arranges the ranks in a
3-D `DeviceMesh` with axes

    ("dp_replicate", "dp_shard", "tp")      outermost → innermost

so that tensor-parallel peers, which talk every layer, are neighbours (the same node), FSDP peers next,
and the rarely-synchronised replicas (HSDP) span nodes. The two data-parallel axes are also flattened into
one "dp" axis: ranks that share a "dp" coordinate see the same data.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = [
    "MESH_AXES",
    "DistInfo",
    "ParallelDims",
    "build_mesh",
    "data_parallel_mesh",
    "data_parallel_rank",
    "init_distributed",
    "is_rank0",
    "launched_by_torchrun",
    "log_rank0",
    "mesh_dims",
    "resolve_degrees",
]

MESH_AXES = ("dp_replicate", "dp_shard", "tp")

_LOG = logging.getLogger("llama3.distributed")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when running as a single plain process (no process group)

    @property
    def distributed(self) -> bool:
        return self.backend is not None


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees of each mesh axis (no -1 left); their product is the world size."""

    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard


def launched_by_torchrun() -> bool:
    """True when torchrun (or any launcher following its protocol) started this process."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_distributed(device: str | torch.device | None = None, *, timeout_s: float = 600.0) -> DistInfo:
    """Join the job torchrun described in the environment, or describe a single plain process.

    `device`: "cuda", "cpu" or None (CUDA when available). On CUDA each process takes GPU LOCAL_RANK and
    uses NCCL; on CPU, gloo. Calling it twice returns the same answer without re-initialising.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    if not launched_by_torchrun():
        dev = torch.device(device_type, 0) if device_type == "cuda" else torch.device(device_type)
        return DistInfo(rank=0, local_rank=0, world_size=1, device=dev, backend=None)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                             "launch at most one process per GPU (torchrun --nproc_per_node)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif device_type == "cpu":
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"distributed training supports cuda and cpu devices, not {device_type!r}")
    if not dist.is_initialized():
        from datetime import timedelta

        # device_id binds NCCL's communicator eagerly to this GPU (fewer surprises at the first collective).
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend)


def resolve_degrees(dp_replicate: int, dp_shard: int, tp: int, world_size: int) -> ParallelDims:
    """Fill in the one axis given as -1 with the ranks left over, and check the product is `world_size`."""
    degrees = {"dp_replicate": dp_replicate, "dp_shard": dp_shard, "tp": tp}
    for name, value in degrees.items():
        if not isinstance(value, int) or (value < 1 and value != -1):
            raise ValueError(f"--parallel.{name}={value!r}: must be a positive integer or -1 (the rest)")
    free = [name for name, value in degrees.items() if value == -1]
    if len(free) > 1:
        raise ValueError(f"only one of --parallel.{{dp_replicate,dp_shard,tp}} may be -1, got {', '.join(free)}")
    fixed = 1
    for value in degrees.values():
        fixed *= value if value != -1 else 1
    if free:
        if world_size % fixed:
            raise ValueError(f"world size {world_size} is not divisible by the fixed degrees {degrees} "
                             f"(product {fixed}); change --parallel.* or the number of processes")
        degrees[free[0]] = world_size // fixed
    dims = ParallelDims(**degrees)
    if dims.world_size != world_size:
        raise ValueError(f"--parallel degrees {degrees} multiply to {dims.world_size}, but the job has "
                         f"{world_size} processes; make them match or set one degree to -1")
    return dims


def build_mesh(parallel_cfg, world_size: int, device_type: str = "cpu") -> DeviceMesh:
    """The ("dp_replicate", "dp_shard", "tp") mesh for `parallel_cfg` (anything with integer attributes
    `dp_replicate`, `dp_shard`, `tp`; -1 = the rest). Needs an initialised process group
    (`init_distributed`); every rank must call it (it creates the sub-groups)."""
    dims = resolve_degrees(parallel_cfg.dp_replicate, parallel_cfg.dp_shard, parallel_cfg.tp, world_size)
    mesh = init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard, dims.tp), mesh_dim_names=MESH_AXES)
    data_parallel_mesh(mesh)  # create the flattened group now, collectively, on every rank
    return mesh


def mesh_dims(mesh: DeviceMesh) -> ParallelDims:
    """The degrees of a mesh made by `build_mesh`."""
    return ParallelDims(*(mesh[axis].size() for axis in MESH_AXES))


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """One 1-D axis "dp" over both data axes: ranks with the same "dp" coordinate see the same data, and
    losses/token counts are averaged over it. Created once, then returned from the mesh's cache."""
    return mesh["dp_replicate", "dp_shard"]._flatten("dp")


def data_parallel_rank(mesh: DeviceMesh | None) -> tuple[int, int]:
    """(rank, size) along the flattened data-parallel axis; (0, 1) without a mesh."""
    if mesh is None:
        return 0, 1
    dp_mesh = data_parallel_mesh(mesh)
    return dp_mesh.get_local_rank(), dp_mesh.size()


def is_rank0() -> bool:
    """True in the process that should print and write shared files (global rank 0, or no process group)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def log_rank0(message: str, *args, level: int = logging.INFO, logger: logging.Logger | None = None) -> None:
    """Log once per job rather than once per rank."""
    if is_rank0():
        (logger or _LOG).log(level, message, *args)
