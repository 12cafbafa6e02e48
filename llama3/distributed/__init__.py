"""Distributed training and inference on PyTorch's own engine (torch.distributed).

- `mesh`: `init_distributed()` from torchrun's environment, `build_mesh()` with the axes
  ("dp_replicate", "dp_shard", "tp"), rank-0 logging;
- `parallelize`: tensor parallel → activation checkpointing → compile → FSDP2, from outside the model;
- `runtime`: what `llama3 pretrain` does differently under torchrun (the loop's `Runtime`);
- `collectives`, `loss`: global gradient norm, data-parallel means, loss parallel;
- `checkpoint`: sharded `torch.distributed.checkpoint` step folders, HF export from rank 0;
- `inference`: tensor-parallel generation (`llama3 generate` under torchrun).

Nothing here runs at import; `import llama3.distributed` loads a submodule only when one of its names is used.
"""

import importlib

# Where each public name lives. Loaded on first use (PEP 562): `llama3 generate` asks only whether torchrun
# started it (`mesh.launched_by_torchrun`), and importing `parallelize` (FSDP, tensor parallel, checkpoint
# wrappers) for that took 0.8 s of its 3.4 s to a first token on the demo model (measured).
_HOMES = {name: "mesh" for name in ("MESH_AXES", "DistInfo", "ParallelDims", "build_mesh", "data_parallel_mesh",
                                    "data_parallel_rank", "init_distributed", "is_rank0", "launched_by_torchrun",
                                    "log_rank0", "mesh_dims", "resolve_degrees")}
_HOMES.update({name: "parallelize" for name in ("apply_activation_checkpointing", "apply_compile", "apply_fsdp",
                                                "apply_tensor_parallel", "check_tp_shapes", "parallelize")})

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
