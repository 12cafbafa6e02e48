"""Losses for the training loop. A loss function takes `(model, batch)` and returns a scalar tensor.

`causal_lm_loss` is the default: next-token cross-entropy over `model(..., return_hidden=True)` and the
output projection, computed `chunk_size` rows at a time by `linear_cross_entropy`, so the full
(tokens × vocab) logits never exist (with Llama 3's 128K vocab they would dwarf the activations). Targets
equal to `IGNORE_INDEX` (-100, as in PyTorch and HF) are masked out: fine-tuning marks prompt tokens so.

Batches are dicts: `inputs` (B, T) int64, `targets` (B, T) int64, optional `document_ids` (B, T) for the
packed-document attention mask. Other losses (DPO) take the same `(model, batch)` and read their own keys.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from .. import kernels
from ..data import IGNORE_INDEX
from .fused import take_dense_grad_slot

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "linear_cross_entropy", "release_scratch"]



_workspace = threading.local()


def _scratch(role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor for a temporary of the loss. On the CPU it is kept (per thread, one per role)
    and handed out again at the next step: the chunk's logits (256 MB in bf16 with 1024 rows of a 128K
    vocabulary) and the (vocab, dim) temporaries are otherwise fresh memory every step, and the kernel's
    first touch of each of its 4 KiB pages costs more than a pass over the data (measured: a 1024 x 128256 x
    256 bf16 matmul ran at 241 GFLOP/s into a new tensor, 352 into a reused one). CUDA's caching allocator
    already reuses its blocks."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _workspace.__dict__.setdefault("buffers", {})
    buf = buffers.get((role, dtype))
    if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
        buffers[(role, dtype)] = buf = None  # let the old one go before the new one is made
        buffers[(role, dtype)] = buf = torch.empty(shape, dtype=dtype)
    return buf[: shape[0]]


def release_scratch() -> None:
    """Free this thread's reusable loss buffers (the training loop calls it when a run ends)."""
    _workspace.__dict__.pop("buffers", None)


def _plain(x: torch.Tensor) -> bool:
    """Not a tensor subclass such as DTensor (those keep their own buffers and kernels)."""
    return type(x) in (torch.Tensor, nn.Parameter)


def _mm(role: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, written into the scratch buffer of `role` when both are plain tensors."""
    if not (_plain(a) and _plain(b)):
        return a @ b
    return torch.mm(a, b, out=_scratch(role, (a.shape[0], b.shape[1]), a.dtype, a.device))


def _fused_rows(logits: torch.Tensor) -> bool:
    """Whether `llama3::xent_rows_` (llama3/kernels/xent.cpp) can take this chunk of logits."""
    return (_plain(logits) and logits.device.type == "cpu" and logits.is_contiguous()
            and logits.dtype in (torch.float32, torch.bfloat16) and kernels.available())


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(hidden @ weight.T, targets), with the gradients computed chunk by chunk in the forward pass.

    Each chunk's logits are built, turned into their gradient (softmax - one_hot) / num_valid, multiplied
    back into the hidden-state and weight gradients, and freed; backward only scales the stored gradients.
    Same FLOPs as the plain forward + backward, peak memory of one (chunk, V) block. On the CPU the softmax
    and its gradient are one pass of the `xent_rows_` kernel over the chunk, in place in the matmul's
    output (the matmul dtype), instead of a dozen element-wise operators over an fp32 copy."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, compute_dtype: torch.dtype):
        # hidden: (N, D), weight: (V, D), targets: (N,)
        need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # A tied embedding looked up through this weight adds its rows into our weight gradient (fused.py).
        ctx.slot = take_dense_grad_slot(weight) if ctx.needs_input_grad[1] else None
        valid = targets != IGNORE_INDEX
        num_valid = valid.sum().clamp(min=1)
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        row_weights = valid / num_valid  # fp32: each row's share of the mean
        weight_c = (weight if weight.dtype == compute_dtype or not _plain(weight)
                    else _scratch("weight", tuple(weight.shape), compute_dtype, weight.device).copy_(weight))
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64 for gradcheck
        loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grads else None
        grad_weight = None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                end = min(start + chunk_size, hidden.shape[0])
                h = hidden[start:end].to(compute_dtype)  # (n, D)
                t, v, w = safe_targets[start:end], valid[start:end], row_weights[start:end]
                logits = _mm("logits", h, weight_c.T)  # (n, V)
                if _fused_rows(logits):
                    nll = torch.ops.llama3.xent_rows_(logits, t, w.float(), need_grads)  # logits -> gradient
                    loss_sum += (nll * v).sum()
                    grad_logits = logits
                else:
                    logits = logits.to(acc_dtype)
                    lse = torch.logsumexp(logits, dim=-1)  # (n,)
                    picked = logits.gather(1, t.unsqueeze(1)).squeeze(1)  # (n,)
                    loss_sum += ((lse - picked) * v).sum()
                    if not need_grads:
                        continue
                    # softmax, in place in the logits buffer: no second (n, V) allocation or pass
                    probs = logits.sub_(lse.unsqueeze(1)).exp_()
                    probs[torch.arange(end - start, device=probs.device), t] -= 1.0
                    probs.mul_(w.unsqueeze(1).to(probs.dtype))
                    grad_logits = probs.to(compute_dtype)  # (n, V): d(mean loss)/d(logits)
                if not need_grads:
                    continue
                grad_hidden[start:end] = (grad_logits @ weight_c).to(hidden.dtype)
                if grad_weight is None and compute_dtype == acc_dtype:
                    grad_weight = grad_logits.T @ h  # (V, D), a new tensor: it becomes the weight's .grad
                    continue
                chunk_grad_weight = _mm("grad_weight", grad_logits.T, h)  # (V, D)
                if grad_weight is None:
                    grad_weight = chunk_grad_weight.to(acc_dtype)
                else:
                    grad_weight += chunk_grad_weight
        if need_grads:
            if grad_weight is None:  # no rows at all
                grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
            # Kept on ctx, not saved for backward: backward hands them on and drops its references, so the
            # weight's gradient becomes `.grad` without a copy.
            ctx.grads = (grad_hidden, grad_weight.to(weight.dtype))
        return loss_sum / num_valid

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        # The usual case, loss.backward() on this loss: the gradient is 1 and scaling would be a full pass
        # over the (vocab, dim) weight gradient. Checking it costs a device sync, so only on the CPU.
        if not (grad_output.device.type == "cpu" and grad_output.numel() == 1 and float(grad_output) == 1.0):
            grad_hidden, grad_weight = grad_hidden * grad_output, grad_weight * grad_output
        if ctx.slot is not None:
            ctx.slot.grad, ctx.slot = grad_weight, None
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk_size: int = 1024, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, ignoring `IGNORE_INDEX`.

    hidden: (N, D), weight: (V, D), targets: (N,). `compute_dtype` is the matmul dtype (default: the
    autocast dtype when autocast is on, else hidden's dtype); softmax and the loss are always fp32."""
    if compute_dtype is None:
        device_type = hidden.device.type
        compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                         else hidden.dtype)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, compute_dtype)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = 1024) -> torch.Tensor:
    """Next-token loss of a Transformer on a batch of `inputs`/`targets` (targets already shifted).
    Optional `input_pos` (B, T) gives positions that restart per packed document (chat SFT)."""
    hidden = model(batch["inputs"], input_pos=batch.get("input_pos"), document_ids=batch.get("document_ids"),
                   return_hidden=True)  # (B, T, D)
    return linear_cross_entropy(hidden.flatten(0, 1), model.output.weight, batch["targets"].flatten(),
                                chunk_size=chunk_size)
