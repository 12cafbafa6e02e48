"""The decode step's attention on the project's CPU kernel (`llama3::attend_one_query`,
llama3/kernels/attend.cpp), installed into a model's attention layers.

`Attention` (llama3/model.py) attends a decode step's one query per sequence with a broadcast
multiply-and-sum, which a compiled step fuses into one loop but which, run eagerly, builds
(heads x positions x head_dim) products twice per layer. `use_attention_kernel(model)` gives each layer
`kernel_attention` instead: every cached key and value row is read once, as stored (float, bf16, fp16, or
int8 codes with their scales), over the span the mask covers. The generator and the serving engine install
it on CPU models; a compiled step does not call it (the model checks).

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
from ..model import Attention, KVCache

__all__ = ["KV_CACHE_FORMATS", "check_kv_cache", "kernel_attention", "kv_cache_format", "kv_cache_layout", "use_attention_kernel"]

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


def use_attention_kernel(model: nn.Module, enabled: bool = True) -> int:
    """Install `kernel_attention` in every attention layer of a CPU model whose kernels are built (or, with
    `enabled=False`, go back to the PyTorch form); returns the number of layers that use it."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    on = enabled and device.type == "cpu" and kernels.available()
    for layer in layers:
        layer.cached_attention = kernel_attention if on else None
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
