"""Distributed training and inference on PyTorch's own engine (torch.distributed).

- `mesh`: `init_distributed()` from torchrun's environment, `build_mesh()` with the axes
  ("dp_replicate", "dp_shard", "tp"), rank-0 logging;
- `parallelize`: tensor parallel → activation checkpointing → compile → FSDP2, from outside the model;
- `runtime`: what `llama3 pretrain` does differently under torchrun (the loop's `Runtime`);
- `collectives`, `loss`: global gradient norm, data-parallel means, loss parallel;
- `checkpoint`: sharded `torch.distributed.checkpoint` step folders, HF export from rank 0;
- `inference`: tensor-parallel generation (`llama3 generate` under torchrun).

Nothing here runs at import; `import llama3.distributed` only defines functions.
"""

from .mesh import (MESH_AXES, DistInfo, ParallelDims, build_mesh, data_parallel_mesh, data_parallel_rank,
                   init_distributed, is_rank0, launched_by_torchrun, log_rank0, mesh_dims, resolve_degrees)
from .parallelize import (apply_activation_checkpointing, apply_compile, apply_fsdp, apply_tensor_parallel,
                          check_tp_shapes, parallelize)

__all__ = ["MESH_AXES", "DistInfo", "ParallelDims", "apply_activation_checkpointing", "apply_compile",
           "apply_fsdp", "apply_tensor_parallel", "build_mesh", "check_tp_shapes", "data_parallel_mesh",
           "data_parallel_rank", "init_distributed", "is_rank0", "launched_by_torchrun", "log_rank0",
           "mesh_dims", "parallelize", "resolve_degrees"]
