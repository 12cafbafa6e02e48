"""Parallelize an unchanged `llama3.model.Transformer` from outside, in torchtitan's fixed order:

    tensor parallel → activation checkpointing → per-block torch.compile → FSDP2 (blocks, then root)

then the caller materializes the weights (`to_empty` + `init_weights()`, or loads a checkpoint). Each step
only rewires modules the model already has (by Meta's names), so the model file stays single-device.

Tensor parallel (Megatron-LM, Shoeybi et al. 2019) splits each block's matmuls across the "tp" ranks:
wq/wk/wv/w1/w3 by output features (colwise: each rank owns whole heads / a slice of the FFN), wo/w2 by
input features (rowwise: partial sums, reduced). With sequence parallelism (Korthikanti et al. 2022) the
residual stream and the RMSNorms between blocks hold only T/tp positions per rank, so the all-reduce after
wo/w2 becomes a reduce-scatter and the norms' activations are not replicated.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Literal

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from ..model import Transformer

__all__ = [
    "ActivationCheckpoint",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fsdp",
    "apply_tensor_parallel",
    "check_tp_shapes",
    "parallelize",
]

ActivationCheckpoint = Literal["none", "full", "selective"]


def check_tp_shapes(args, tp: int, seq_len: int | None = None) -> None:
    """Raise ValueError unless every split dimension divides evenly by the tensor-parallel degree."""
    splits = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "hidden_dim (FFN)": args.hidden_dim,
              "vocab_size": args.vocab_size}
    if seq_len is not None:
        splits["seq_len (sequence parallel)"] = seq_len
    bad = {name: value for name, value in splits.items() if value % tp}
    if bad:
        raise ValueError(f"--parallel.tp={tp} must divide {', '.join(f'{k}={v}' for k, v in bad.items())}; "
                         "choose a tensor-parallel degree that divides them all")


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True,
                          loss_parallel: bool = False) -> None:
    """Shard `model`'s matmuls over `tp_mesh` with a declarative plan keyed by module name.

    sequence_parallel: residual stream sharded on the sequence dim between blocks (training). Without it
        (inference, where a decode step has T=1) activations stay replicated and wo/w2 all-reduce.
    loss_parallel: the output projection returns vocab-sharded logits as a DTensor, to be consumed by
        `F.cross_entropy` inside `torch.distributed.tensor.parallel.loss_parallel()`; otherwise logits are
        gathered to full (B, T, V) on every rank.
    """
    if sequence_parallel:
        residual = Shard(1)  # (B, T/tp, D) between blocks
        norm_plan = SequenceParallel()
    else:
        residual = Replicate()
    top_plan: dict[str, object] = {
        # Embedding rows (vocab) split across ranks; each rank looks up its rows, partial sums are reduced.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "output": ColwiseParallel(input_layouts=Replicate(),
                                  output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    }
    if sequence_parallel:
        top_plan["norm"] = norm_plan
    parallelize_module(model, tp_mesh, top_plan)
    if sequence_parallel:
        # Gather the final norm's output to full length (B, T, D), so `model.logits(h)` also works on any
        # chunk of rows (chunked losses); the output projection would gather its input anyway.
        parallelize_module(model.norm, tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))
    for block in model.layers:
        block_plan: dict[str, object] = {
            # Attention(x, rope, mask, cache_pos): gather x to full length; the rest pass through.
            "attention": PrepareModuleInput(input_layouts=(residual, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=residual),
            "feed_forward": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=residual),
        }
        if sequence_parallel:
            block_plan["attention_norm"] = norm_plan
            block_plan["ffn_norm"] = norm_plan
        parallelize_module(block, tp_mesh, block_plan)
    if model.args.tie_word_embeddings:
        # Both plans shard the shared (V, D) weight on dim 0 over the same mesh, so one DTensor serves both;
        # parallelize_module replaced each module's Parameter separately, which broke the tie.
        model.output.weight = model.tok_embeddings.weight


# ----- activation checkpointing -----

def _selective_policy():
    """Op-level selective checkpointing (Korthikanti et al. 2022, torchtitan's "op" mode): keep the outputs
    of attention kernels, reductions of collectives and every other matmul; recompute the cheap pointwise
    ops (norms, RoPE, SiLU) and the other half of the matmuls in backward."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    names = ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu", "max"]
    keep = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    keep.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    mm_seen: dict[str, int] = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        if func == aten.mm.default:
            phase = "recompute" if ctx.is_recompute else "forward"  # count each pass separately
            mm_seen[phase] += 1
            save = mm_seen[phase] % 2 == 1
        else:
            save = func in keep
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(model: Transformer, mode: ActivationCheckpoint, *,
                                   selective_option: str = "2") -> None:
    """Recompute blocks' activations in backward instead of storing them, with torchtitan's meanings:

    - "full": every block keeps only its input;
    - "selective" with `selective_option` an integer N (default "2"): every N-th block, starting with the
      first, is checkpointed in full (layer-selective), the others keep their activations;
    - "selective" with `selective_option="op"`: every block keeps its matmul/attention outputs and
      recomputes the rest (`_selective_policy`, op-level).

    The same on one device and under torchrun. Each block's `forward` is wrapped in place (no wrapper
    module), so parameter names and checkpoints are unchanged."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"--parallel.activation_checkpoint={mode!r}: choose none, full or selective")
    every = _selective_every(selective_option) if mode == "selective" else 1
    for i, block in enumerate(model.layers):
        if every == 0 or i % every == 0:
            block.forward = functools.partial(_checkpointed, block.forward, op_level=every == 0)


def _checkpointed(forward, *args, op_level: bool, **kwargs):
    """`forward(*args, **kwargs)` under non-reentrant activation checkpointing. A plain function (not a
    partial of `checkpoint` itself), so a compiled block traces through it into one graph."""
    from torch.utils.checkpoint import checkpoint

    if op_level:
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_op_level_contexts, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _op_level_contexts():
    """Op-level selective checkpointing's context managers, with a fresh policy per call (it counts the
    matmuls of one pass). Defined at module level: torch.compile cannot take a function created while it
    traces."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy())


def _selective_every(option: str) -> int:
    """N of "every N-th block" for `--parallel.selective_ac_option`, 0 for "op"."""
    if str(option) == "op":
        return 0
    try:
        every = int(option)
    except ValueError:
        every = 0
    if every < 1:
        raise ValueError(f"--parallel.selective_ac_option={option!r}: give 'op' (op-level) or a positive "
                         "integer N (checkpoint every N-th block)")
    return every


def apply_compile(model: Transformer, *, backend: str = "inductor") -> None:
    """torch.compile each block in place (`Module.compile` keeps parameter names), with activation
    checkpointing inside the graph when a block has it. Blocks alike share one graph, so compilation
    happens once per kind of block; the loop between blocks stays eager for FSDP's hooks."""
    for block in model.layers:
        block.compile(backend=backend, fullgraph=True)


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype = torch.bfloat16,
               reduce_dtype: torch.dtype = torch.float32) -> None:
    """FSDP2 (`fully_shard`): each block is one communication group, the root holds the embeddings, final
    norm and output (one group, so tied embeddings stay one parameter). Parameters are stored sharded in
    their own dtype (fp32 master weights); `param_dtype` is what forward/backward compute in and
    `reduce_dtype` what gradients are averaged in (fp32: bf16 sums lose bits across many ranks).
    A 2-D `dp_mesh` ("dp_replicate", "dp_shard") gives HSDP: shard within, replicate across."""
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    num_blocks = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=i < num_blocks - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)


def parallelize(model: Transformer, mesh: DeviceMesh | None, cfg, *, param_dtype: torch.dtype = torch.float32,
                reduce_dtype: torch.dtype = torch.float32, loss_parallel: bool = False,
                sequence_parallel: bool = True, force_fsdp: bool = False,
                compile_backend: str = "inductor") -> Transformer:
    """Apply tensor parallel, activation checkpointing, compile and FSDP2 to `model` (best built on the
    meta device) in that order, per `cfg` (a `ParallelSection`: dp_replicate, dp_shard, tp,
    activation_checkpoint, selective_ac_option, compile) and `mesh` from `build_mesh`. Returns the same
    model object.

    `mesh=None` is one device: only activation checkpointing and compile apply, with the same meaning
    as under torchrun (single-device training goes through here too). With a mesh, FSDP is applied when
    there is more than one data-parallel rank, when `param_dtype` differs from the weights' dtype (FSDP2 is
    what carries bf16 mixed precision), or when `force_fsdp`. Afterwards call `model.to_empty(device=...)`
    and `model.init_weights()` (or load a checkpoint).
    """
    weight_dtype = model.tok_embeddings.weight.dtype
    if mesh is None and (force_fsdp or loss_parallel or param_dtype != weight_dtype):
        raise ValueError("FSDP mixed precision and loss parallel need a device mesh (run under torchrun); "
                         "on one device use --train.dtype=bf16 (autocast) instead")
    tp = mesh["tp"].size() if mesh is not None else 1
    if tp > 1:
        check_tp_shapes(model.args, tp)
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    apply_activation_checkpointing(model, getattr(cfg, "activation_checkpoint", "none"),
                                   selective_option=getattr(cfg, "selective_ac_option", "2"))
    if getattr(cfg, "compile", False):
        apply_compile(model, backend=compile_backend)
    if mesh is None:
        return model
    dp_replicate, dp_shard = mesh["dp_replicate"].size(), mesh["dp_shard"].size()
    if force_fsdp or dp_replicate * dp_shard > 1 or param_dtype != weight_dtype:
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dp_replicate > 1 else mesh["dp_shard"]
        apply_fsdp(model, dp_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    return model
