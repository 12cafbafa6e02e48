"""Losses for the training loop. A loss function takes `(model, batch)` and returns a scalar tensor.

`causal_lm_loss` is the default: next-token cross-entropy over `model(..., return_hidden=True)` and the
output projection, computed `chunk_size` rows at a time by `linear_cross_entropy`, so the full
(tokens × vocab) logits never exist (with Llama 3's 128K vocab they would dwarf the activations). Targets
equal to `IGNORE_INDEX` (-100, as in PyTorch and HF) are masked out: fine-tuning marks prompt tokens so.

Batches are dicts: `inputs` (B, T) int64, `targets` (B, T) int64, optional `document_ids` (B, T) for the
packed-document attention mask. Other losses (DPO) take the same `(model, batch)` and read their own keys.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "linear_cross_entropy"]

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(hidden @ weight.T, targets), with the gradients computed chunk by chunk in the forward pass.

    Each chunk's logits are built, turned into their gradient (softmax - one_hot) / num_valid, multiplied
    back into the hidden-state and weight gradients, and freed; backward only scales the stored gradients.
    Same FLOPs as the plain forward + backward, peak memory of one (chunk, V) block."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, compute_dtype: torch.dtype):
        # hidden: (N, D), weight: (V, D), targets: (N,)
        need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != IGNORE_INDEX
        num_valid = valid.sum().clamp(min=1)
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        weight_c = weight.to(compute_dtype)
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64 for gradcheck
        loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_grads else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                end = min(start + chunk_size, hidden.shape[0])
                h = hidden[start:end].to(compute_dtype)  # (n, D)
                logits = (h @ weight_c.T).to(acc_dtype)  # (n, V)
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                t, v = safe_targets[start:end], valid[start:end]
                picked = logits.gather(1, t.unsqueeze(1)).squeeze(1)  # (n,)
                loss_sum += ((lse - picked) * v).sum()
                if not need_grads:
                    continue
                # softmax, in place in the logits buffer: no second (n, V) allocation or pass
                probs = logits.sub_(lse.unsqueeze(1)).exp_()
                probs[torch.arange(end - start, device=probs.device), t] -= 1.0
                probs.mul_((v / num_valid).unsqueeze(1).to(probs.dtype))
                grad_logits = probs.to(compute_dtype)  # (n, V): d(mean loss)/d(logits)
                grad_hidden[start:end] = (grad_logits @ weight_c).to(hidden.dtype)
                grad_weight += (grad_logits.T @ h).to(acc_dtype)
        if need_grads:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss_sum / num_valid

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None


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
