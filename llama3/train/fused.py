"""The training step's element-wise operators fused, and the tied embedding's gradient kept sparse (CPU).

`prepare_for_training(model, ...)` is applied by `build_model` to a model trained on one CPU process:

- RMSNorm, SwiGLU and RoPE run as one C++ pass each way (`llama3/kernels/train_ops.cpp`) instead of a
  chain of torch operators, each a pass over the activations. The modules keep their class's parameters and
  names (their class becomes a subclass of it), and take the fused path only while gradients are recorded
  and their inputs are plain CPU tensors of a dtype the kernels take; otherwise (evaluation under
  `no_grad`, generation from the trained model, other devices) they run the model's own code unchanged.
- With tied embeddings the input lookup's gradient (a few rows: the batch's tokens) is added in place into
  the output projection's dense gradient of the same tensor, which the loss (`linear_cross_entropy`) has
  just made, instead of torch's dense (vocab × dim) embedding gradient: zero-filled, scattered into and added,
  295 MB each at Llama 3's 128K vocabulary and dim 576. The hand-over is a `DenseGradSlot`: the lookup opens
  one, the loss takes it in its forward and puts its weight gradient there in its backward, and the lookup's
  backward (which runs later: the loss's input depends on the lookup's output) adds its rows into it. When
  no loss took the slot (a loss without the output projection) the lookup returns torch's dense gradient.

The plain torch composition in `llama3.model` is the reference the kernels are tested against
(tests/test_train_fused.py).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..model import Attention, FeedForward, RMSNorm, Transformer, apply_rope

__all__ = ["DenseGradSlot", "TiedEmbedding", "fused_rms_norm", "fused_rope", "fused_swiglu", "prepare_for_training",
           "take_dense_grad_slot"]


def _ops():
    return torch.ops.llama3


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, rstd = _ops().train_rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = _ops().train_rms_norm_backward(grad.contiguous(), x, weight, rstd)
        return grad_x, grad_weight, None


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _ops().train_swiglu(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return _ops().train_swiglu_backward(grad.contiguous().to(gate.dtype), gate, up)


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rope):
        ctx.save_for_backward(rope)
        return _ops().train_rope(x, rope, False)

    @staticmethod
    def backward(ctx, grad):
        (rope,) = ctx.saved_tensors
        return _ops().train_rope(grad.contiguous(), rope, True), None


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of fp32 `x` (..., D) with an fp32 `weight` (D,): `RMSNorm.forward`'s value in one pass."""
    return _RMSNormFn.apply(x.contiguous(), weight, eps)


def fused_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (fp32 or bf16, computed in fp32, one rounding to the input dtype)."""
    return _SwiGLUFn.apply(gate.contiguous(), up.contiguous())


def fused_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """`apply_rope(x, rope)` for x (B, T, H, Dh) and rope (B, T, Dh/2, 2) or (T, Dh/2, 2)."""
    B, T, H, Dh = x.shape
    rope = rope.expand(B, T, Dh // 2, 2) if rope.dim() == 3 else rope
    out = _RopeFn.apply(x.contiguous().view(B * T, H, Dh), rope.contiguous().view(B * T, Dh // 2, 2))
    return out.view(B, T, H, Dh)


def _takes(*tensors: torch.Tensor, dtypes=(torch.float32, torch.bfloat16)) -> bool:
    """Whether the fused path applies: gradients recorded, plain CPU tensors of a dtype the kernels take."""
    return torch.is_grad_enabled() and all(
        type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.dtype in dtypes for t in tensors)


class FusedRMSNorm(RMSNorm):
    """RMSNorm whose training forward and backward are one kernel pass each (fp32 input and weight; the
    residual stream is fp32 under bf16 autocast too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _takes(x, self.weight, dtypes=(torch.float32,)):
            return fused_rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FusedFeedForward(FeedForward):
    """SwiGLU whose gate (silu(w1 x) * w3 x) is one kernel pass each way while training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            return super().forward(x)
        gate, up = self.w1(x), self.w3(x)
        if _takes(gate, up) and gate.dtype == up.dtype:
            return self.w2(fused_swiglu(gate, up))
        return self.w2(nn.functional.silu(gate) * up)


class FusedAttention(Attention):
    """Attention whose RoPE rotation is one kernel pass each way while training, and whose grouped heads
    go to SDPA as they are (`enable_gqa`) instead of being repeated for every query head first: no copies
    of the keys and values, and no sum over the copies' gradients."""

    def _attend(self, q, keys, values, mask):
        B, T = q.shape[:2]
        if not _takes(q, keys, values) or keys.shape[1] == q.shape[2]:
            return super()._attend(q, keys, values, mask)
        q = q.transpose(1, 2)  # (B, H, T, Dh)
        if mask is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H·Dh)

    @staticmethod
    def _rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        if _takes(x) and _takes(rope, dtypes=(torch.float32,)):
            return fused_rope(x, rope)
        return apply_rope(x, rope)


class DenseGradSlot:
    """Where a loss leaves the dense gradient of a tied weight for the embedding lookup to add into."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad: torch.Tensor | None = None


_open_slots = threading.local()  # id(weight) -> the DenseGradSlot of the latest lookup through it


def take_dense_grad_slot(weight: torch.Tensor) -> DenseGradSlot | None:
    """The slot the latest embedding lookup through `weight` opened, once (None if there is none)."""
    return _open_slots.__dict__.pop(id(weight), None)


class _TiedLookupFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, tokens):
        ctx.save_for_backward(tokens)
        ctx.weight_shape = weight.shape
        ctx.slot = _open_slots.__dict__[id(weight)] = DenseGradSlot()
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad):
        (tokens,) = ctx.saved_tensors
        slot, ctx.slot = ctx.slot, None
        rows = grad.reshape(-1, grad.shape[-1])  # (B·T, D)
        if slot.grad is None:  # no loss handed over a dense gradient: torch's dense one
            dense = torch.zeros(ctx.weight_shape, dtype=grad.dtype, device=grad.device)
            return dense.index_add_(0, tokens.flatten(), rows), None
        target, slot.grad = slot.grad, None  # drop the slot's reference: autograd may then reuse the tensor
        target.index_add_(0, tokens.flatten(), rows.to(target.dtype))
        return None, None


class TiedEmbedding(nn.Embedding):
    """The token embedding of a model with tied weights, whose training gradient is added into the output
    projection's (see the module docstring)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if _takes(self.weight, dtypes=(torch.float32,)) and self.weight.requires_grad and self.padding_idx is None \
                and self.max_norm is None and not self.sparse:
            return _TiedLookupFn.apply(self.weight, tokens)
        return super().forward(tokens)


_FUSED = {RMSNorm: FusedRMSNorm, FeedForward: FusedFeedForward, Attention: FusedAttention}


def prepare_for_training(model: Transformer, *, fuse: bool, tied_embedding_grad: bool) -> Transformer:
    """Swap in the fused modules (`fuse`, when the kernels build) and, with tied weights, the embedding
    whose gradient goes into the output projection's (`tied_embedding_grad`). Parameters, names and state
    dicts stay as they are."""
    if fuse and kernels.available():
        for module in model.modules():
            fused = _FUSED.get(type(module))
            if fused is not None:
                module.__class__ = fused
    if (tied_embedding_grad and model.output.weight is model.tok_embeddings.weight
            and type(model.tok_embeddings) is nn.Embedding):
        model.tok_embeddings.__class__ = TiedEmbedding
    return model
