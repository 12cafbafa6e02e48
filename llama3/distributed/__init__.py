"""Distributed training and inference on PyTorch's own engine (torch.distributed): process groups and the
device mesh (`mesh`), FSDP2 + tensor parallel + activation checkpointing + compile applied from outside the
model (`parallelize`), cross-rank reductions (`collectives`) and sharded checkpoints (`checkpoint`).

Nothing here runs at import; `import llama3.distributed` only defines functions.
"""

from .mesh import (MESH_AXES, DistInfo, ParallelDims, build_mesh, data_parallel_mesh, data_parallel_rank, init_distributed, is_rank0,
                   launched_by_torchrun, log_rank0, mesh_dims, resolve_degrees)
from .parallelize import (apply_activation_checkpointing, apply_compile, apply_fsdp, apply_tensor_parallel,
                          check_tp_shapes, parallelize)

__all__ = ["MESH_AXES", "DistInfo", "ParallelDims", "build_mesh", "data_parallel_mesh", "data_parallel_rank", "mesh_dims", "init_distributed",
           "is_rank0", "launched_by_torchrun", "log_rank0", "resolve_degrees", "parallelize",
           "apply_tensor_parallel", "apply_activation_checkpointing", "apply_compile", "apply_fsdp",
           "check_tp_shapes"]
