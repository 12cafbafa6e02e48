"""AdamW with the usual parameter groups.

Only parameters with `requires_grad` are optimized (so a LoRA transform that freezes the base weights
hands just the adapters to the optimizer). 2-D weight matrices get weight decay; 1-D parameters (norm
weights) and the token embedding do not, unless `decay_norms_and_embeddings` is set: decaying the
embedding pulls rare tokens' vectors to zero, and decaying norm gains fights their role as scales.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import OptimSection

__all__ = ["build_optimizer", "param_groups"]


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    """Two groups, decayed and not; each trainable tensor appears once (tied weights are one tensor)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        exempt = p.dim() < 2 or id(p) in embedding_ids
        (no_decay if exempt and not cfg.decay_norms_and_embeddings else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return [{"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimSection, device_type: str) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. `auto` picks torch's fused kernel (one pass over each tensor
    instead of one per arithmetic operation: 5x faster on the CPU for a 128K-vocab embedding) wherever
    torch has one, CPU and CUDA included, and foreach elsewhere."""
    impl = cfg.implementation
    if impl == "auto":
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        impl = "fused" if device_type in _get_fused_kernels_supported_devices() else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **kwargs)
