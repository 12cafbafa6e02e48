"""Loss parallel: next-token cross-entropy over vocab-sharded logits, for tensor-parallel training.

With tensor parallel the output projection is split by vocabulary rows, so each rank can produce only its
V/tp columns of the logits. Gathering them (B·T × V per rank, 128K columns for Llama 3) would cost more
memory and bandwidth than the whole block stack; instead the softmax is computed across ranks on the
shards (`torch.distributed.tensor.parallel.loss_parallel`: a max and a sum-of-exp all-reduce per row).

Like `llama3.train.loss.linear_cross_entropy`, the gradients are computed chunk by chunk during the
forward call and only scaled in backward: peak memory is one (chunk, V/tp) block, and the vocab-sharded
DTensor ops all run inside the `loss_parallel()` context they require, whatever context the caller's
`backward()` runs in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from ..train.loss import IGNORE_INDEX

__all__ = ["vocab_parallel_lm_loss"]


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """mean CE(output(hidden), targets) with `output` a vocab-sharded (colwise) linear layer."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, output: nn.Module, chunk_size: int):
        # hidden: (N, D) plain tensor, the same on every tensor-parallel rank; weight: output's (V, D) DTensor
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = None
        with torch.enable_grad(), loss_parallel():
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start:start + chunk_size].detach().requires_grad_(need_hidden)
                logits = output(h).float()  # (n, V) DTensor, sharded on V
                chunk_loss = F.cross_entropy(logits, targets[start:start + chunk_size], ignore_index=IGNORE_INDEX,
                                             reduction="sum") / num_valid
                wanted = [t for t, need in ((h, need_hidden), (weight, need_weight)) if need]
                grads = list(torch.autograd.grad(chunk_loss, wanted)) if wanted else []
                if need_hidden:
                    grad_hidden[start:start + chunk_size] = grads.pop(0)
                if need_weight:
                    grad = grads.pop(0)
                    grad_weight = grad if grad_weight is None else grad_weight + grad
                value = chunk_loss.detach()
                loss_sum += value.to_local() if isinstance(value, DTensor) else value  # replicated scalar
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.item()  # a scalar multiplies plain and DTensor gradients alike
        return (None if grad_hidden is None else grad_hidden * scale,
                None if grad_weight is None else grad_weight * scale, None, None, None)


def vocab_parallel_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], *,
                           chunk_size: int = 1024) -> torch.Tensor:
    """Next-token loss (targets already shifted, `IGNORE_INDEX` masked) of a model parallelized with
    `parallelize(..., loss_parallel=True)`; equal to `llama3.train.loss.causal_lm_loss` on one device."""
    hidden = model(batch["inputs"], document_ids=batch.get("document_ids"), return_hidden=True)  # (B, T, D)
    return _VocabParallelLinearCrossEntropy.apply(hidden.flatten(0, 1), model.output.weight,
                                                  batch["targets"].flatten(), model.output, chunk_size)
