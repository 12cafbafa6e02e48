"""The decode step's attention on the project's CPU kernel (`llama3::attend_one_query`,
llama3/kernels/attend.cpp), installed into a model's attention layers.

`Attention` (llama3/model.py) attends a decode step's one query per sequence with a broadcast
multiply-and-sum, which a compiled step fuses into one loop but which, run eagerly, builds
(heads x positions x head_dim) products twice per layer. `use_attention_kernel(model)` gives each layer
`kernel_attention` instead: every cached key and value row is read once, as stored (float, bf16, fp16, or
int8 codes with their scales), over the span the mask covers. The generator and the serving engine install
it on CPU models; a compiled step does not call it (the model checks).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels
from ..model import Attention, KVCache

__all__ = ["kernel_attention", "use_attention_kernel"]


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
