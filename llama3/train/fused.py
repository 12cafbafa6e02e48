"""The training step's element-wise operators fused, and the tied embedding's gradient kept sparse (CPU).

`prepare_for_training(model, ...)` is applied by `build_model` to a model trained on one CPU process:

- RMSNorm, SwiGLU and RoPE run as one C++ pass each way (`llama3/kernels/train_ops.cpp`) instead of a
  chain of torch operators, each a pass over the activations. The modules keep their class's parameters and
  names (their class becomes a subclass of it), and take the fused path only while gradients are recorded
  and their inputs are plain CPU tensors of a dtype the kernels take; otherwise (evaluation under
  `no_grad`, generation from the trained model, other devices) they run the model's own code unchanged.
- With tied embeddings the input embedding's gradient is made sparse (`nn.Embedding.sparse`): the
  lookup's backward then touches only the rows of the batch's tokens, and autograd adds them in place into
  the output projection's dense gradient of the same tensor, instead of zero-filling and adding a dense
  (vocab × dim) gradient: 295 MB each at Llama 3's 128K vocabulary and dim 576.

The plain torch composition in `llama3.model` is the reference the kernels are tested against
(tests/test_train_fused.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..model import Attention, FeedForward, RMSNorm, Transformer, apply_rope

__all__ = ["densify_sparse_grads", "fused_rms_norm", "fused_rope", "fused_swiglu", "prepare_for_training"]


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
    """Attention whose RoPE rotation is one kernel pass each way while training."""

    @staticmethod
    def _rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        if _takes(x) and _takes(rope, dtypes=(torch.float32,)):
            return fused_rope(x, rope)
        return apply_rope(x, rope)


_FUSED = {RMSNorm: FusedRMSNorm, FeedForward: FusedFeedForward, Attention: FusedAttention}


def prepare_for_training(model: Transformer, *, fuse: bool, sparse_embedding_grad: bool) -> Transformer:
    """Swap in the fused modules (`fuse`, when the kernels build) and make a tied embedding's gradient
    sparse (`sparse_embedding_grad`, only with tied weights: the output projection's dense gradient is what
    the sparse one is added into). Parameters, names and state dicts stay as they are."""
    if fuse and kernels.available():
        for module in model.modules():
            fused = _FUSED.get(type(module))
            if fused is not None:
                module.__class__ = fused
    if sparse_embedding_grad and model.output.weight is model.tok_embeddings.weight:
        model.tok_embeddings.sparse = True
    return model


def densify_sparse_grads(params: list[nn.Parameter]) -> None:
    """Make any sparse `.grad` dense. A tied embedding's gradient is sparse only if the loss never used the
    output projection (a custom loss); optimizers and clipping want dense gradients."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()
