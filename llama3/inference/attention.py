"""The decode step's attention on the project's CPU kernel (`llama3::attend_one_query`,
llama3/kernels/attend.cpp), installed into a model's attention layers, with its RMSNorm and RoPE as one
operator each (`llama3::rms_norm`, `llama3::rope_`, llama3/kernels/norm_rope.cpp).

`Attention` (llama3/model.py) attends a decode step's one query per sequence with a broadcast
multiply-and-sum, which a compiled step fuses into one loop but which, run eagerly, builds
(heads x positions x head_dim) products twice per layer. `use_decode_kernels(model)` gives each layer
`kernel_attention` instead: every cached key and value row is read once, as stored (float, bf16, fp16, or
int8 codes with their scales), over the span the mask covers. The generator and the serving engine install
it on CPU models; a compiled step does not call it (the model checks). The same call installs
`kernel_rms_norm` and `kernel_rope`: an eager step's RMSNorm and RoPE are a dozen PyTorch operators each,
whose dispatch (a few microseconds each, ~90 operators a layer) was a tenth of a quantized 1B decode step.

`kv_cache_layout(model, kv_cache)` turns the user's choice of cache format (`KV_CACHE_FORMATS`, or None for
the default) into what `Transformer.setup_caches` takes. By default the cache holds the model's dtype, except
for a model whose projections are GGUF blocks: its activations are float32, and a float32 cache would be read
in full at every step, so it keeps float16 (llama.cpp's default cache type too), half the bytes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels
from ..model import Attention, KVCache, RMSNorm, apply_rope, rms_norm

__all__ = ["KV_CACHE_FORMATS", "check_kv_cache", "kernel_attention", "kernel_rms_norm", "kernel_rope", "kv_cache_format",
           "kv_cache_layout", "use_decode_kernels"]

# the cache formats a user may ask for: a float dtype, or int8 codes with a scale per head and position
KV_CACHE_FORMATS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "int8": None}


def kernel_attention(q: torch.Tensor, cache: KVCache, mask: torch.Tensor) -> torch.Tensor:
    """q (B, 1, H, Dh) against `cache` over the first mask.shape[-1] slots, mask broadcastable to
    (B, 1, 1, S) -> (B, 1, H·Dh) in q's dtype."""
    B, K, _, Dh = cache.k.shape
    S = mask.shape[-1]  # the cache's length, or the filled span the model's default mask covers
    none = torch.empty(0)
    k_scale, v_scale = (none, none) if cache.k_scale is None else (cache.k_scale[:, :, :S], cache.v_scale[:, :, :S])
    out = torch.ops.llama3.attend_one_query(
        q.reshape(B, K, -1, Dh), cache.k[:, :, :S], cache.v[:, :, :S], k_scale, v_scale,
        mask.expand(B, 1, 1, S).reshape(B, S), 1.0 / math.sqrt(Dh))  # (B, K, n_rep, Dh) float32
    return out.to(q.dtype).reshape(B, 1, -1)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def kernel_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` as one operator (`llama3::rms_norm`) where it applies: CPU tensors of one dtype, no
    gradient asked for; else the PyTorch form."""
    if x.dtype != weight.dtype or x.device.type != "cpu" or _needs_grad(x, weight):
        return rms_norm(x, weight, eps)
    return torch.ops.llama3.rms_norm(x, weight, eps)


def kernel_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """`apply_rope` as one operator that rotates x in place (`llama3::rope_`): x is a fresh projection's
    q or k, which nothing else reads; the PyTorch form where a gradient is asked for."""
    if (x.device.type != "cpu" or x.stride(-1) != 1 or not rope.is_contiguous() or _needs_grad(x)
            or torch.compiler.is_compiling()):
        return apply_rope(x, rope)
    return torch.ops.llama3.rope_(x, rope)


def use_decode_kernels(model: nn.Module, enabled: bool = True) -> int:
    """Install the project's CPU kernels for inference in a CPU model whose kernels are built: every attention
    layer's decode step attends through `kernel_attention` and rotates q and k with `kernel_rope`, and every
    RMSNorm is `kernel_rms_norm` (each one operator where the PyTorch form is about a dozen: a decode step's
    dispatch costs less). `enabled=False` goes back to the PyTorch forms. Returns the number of attention
    layers that use the kernels."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    on = enabled and device.type == "cpu" and kernels.available()
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.cached_attention = kernel_attention if on else None
        if on:
            layer._rope = kernel_rope  # the instance's, over the class's `apply_rope`
        else:
            layer.__dict__.pop("_rope", None)
    for norm in model.modules():
        if isinstance(norm, RMSNorm):
            norm.kernel = kernel_rms_norm if on else None
    return len(layers) if on else 0


def check_kv_cache(kv_cache: str | None) -> None:
    """Refuse a cache format that is not one of `KV_CACHE_FORMATS` (None: the default)."""
    if kv_cache is not None and kv_cache not in KV_CACHE_FORMATS:
        raise ValueError(f"kv_cache must be None (the default) or one of {', '.join(KV_CACHE_FORMATS)}, "
                         f"got {kv_cache!r}")


def kv_cache_layout(model: nn.Module, kv_cache: str | None) -> tuple[torch.dtype | None, str | None]:
    """(dtype, quantize) for `model.setup_caches` from a cache format (see the module docstring): dtype None
    means the model's own."""
    check_kv_cache(kv_cache)
    if kv_cache == "int8":
        return None, "int8"
    if kv_cache is not None:
        return KV_CACHE_FORMATS[kv_cache], None
    from .ggml_quant import GGMLEmbedding, GGMLGroupLinear, GGMLLinear

    blocks = any(isinstance(m, (GGMLLinear, GGMLGroupLinear, GGMLEmbedding)) for m in model.modules())
    return (torch.float16 if blocks else None), None


def kv_cache_format(model: nn.Module) -> str | None:
    """The format of the cache `model` holds now, as `KV_CACHE_FORMATS` names it (None without a cache)."""
    cache = next((m.kv_cache for m in model.modules() if isinstance(m, Attention) and m.kv_cache is not None), None)
    if cache is None:
        return None
    if cache.quantized:
        return "int8"
    return next(name for name, dtype in KV_CACHE_FORMATS.items() if dtype == cache.k.dtype)
