"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model"), with the Llama 3 recipe's additions (paper §4.1.4): formatting tokens
masked out of the scored responses (done in `llama3.data.sft`) and an NLL term on the chosen responses
(weight 0.2, after Pang et al. 2024).

    loss = -log σ(β · [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])
           + λ · NLL(y_w | x) / |y_w|

log π(y|x) is the sum of the response tokens' log-probs. The reference is a frozen copy of the starting
model, or its log-probs computed once before training (`compute_reference_logps`), which needs no second
model in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.sft import IGNORE_INDEX, PreferenceExample, preference_batch, with_reference_logps

__all__ = ["DPOConfig", "DPOLoss", "compute_reference_logps", "dpo_loss", "sequence_logprobs"]


@dataclass
class DPOConfig:
    """beta: strength of the KL tie to the reference (Llama 3: 0.1); nll_weight: weight of the per-token
    NLL on chosen responses (Llama 3: 0.2; 0 gives plain DPO)."""
    beta: float = 0.1
    nll_weight: float = 0.2

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"DPO beta must be positive, got {self.beta}")
        if self.nll_weight < 0:
            raise ValueError(f"DPO nll_weight must be >= 0, got {self.nll_weight}")


def sequence_logprobs(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, *,
                      chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label | prefix) over the labelled positions of each row, and their count.

    tokens, labels: (B, T), labels IGNORE_INDEX where unscored -> (B,) fp32 sums, (B,) counts. Logits are
    made `chunk_size` positions at a time from the hidden states, so the (B, T, V) fp32 tensor never exists
    whole (V is 128256 for Llama 3)."""
    hidden = model(tokens, return_hidden=True)  # (B, T, D)
    total = torch.zeros(tokens.shape[0], dtype=torch.float32, device=tokens.device)
    for start in range(0, tokens.shape[1], chunk_size):
        chunk_labels = labels[:, start: start + chunk_size]  # (B, t)
        logits = model.logits(hidden[:, start: start + chunk_size])  # (B, t, V) fp32
        nll = F.cross_entropy(logits.transpose(1, 2), chunk_labels, ignore_index=IGNORE_INDEX,
                              reduction="none")  # (B, t), 0 where ignored
        total = total - nll.sum(dim=1)
    return total, (labels != IGNORE_INDEX).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards β·(log π - log π_ref) of chosen and rejected, all (B,)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


class DPOLoss:
    """The training loop's `loss_fn(model, batch) -> scalar` for batches of
    `llama3.data.sft.preference_batch`: rows [0, B) chosen, [B, 2B) rejected. Reference log-probs come from
    the batch (precomputed) or, failing that, from `reference_model` (kept frozen, evaluated without
    gradients). `last_metrics` holds the DPO loss, NLL, mean reward margin and accuracy of the last call."""

    def __init__(self, config: DPOConfig | None = None, reference_model: nn.Module | None = None):
        self.config = config or DPOConfig()
        self.reference_model = reference_model
        self.last_metrics: dict[str, float] = {}
        if reference_model is not None:
            reference_model.eval().requires_grad_(False)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        if self.reference_model is None:
            raise ValueError("DPO needs reference log-probs: give a reference model or precompute them "
                             "with compute_reference_logps")
        with torch.no_grad():
            logps, _ = sequence_logprobs(self.reference_model, batch["inputs"], batch["targets"])
        num_pairs = logps.shape[0] // 2
        return logps[:num_pairs], logps[num_pairs:]

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logps, counts = sequence_logprobs(model, batch["inputs"], batch["targets"])
        num_pairs = logps.shape[0] // 2
        policy_chosen, policy_rejected = logps[:num_pairs], logps[num_pairs:]
        ref_chosen, ref_rejected = self.reference_logps(batch)
        ref_chosen, ref_rejected = ref_chosen.to(logps.device), ref_rejected.to(logps.device)
        losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen,
                                                            ref_rejected, self.config.beta)
        loss = losses.mean()
        # Per-token NLL of the chosen responses (summed log-probs over summed lengths), not per sequence, so
        # long answers are not favoured.
        nll = -policy_chosen.sum() / counts[:num_pairs].sum().clamp(min=1)
        if self.config.nll_weight:
            loss = loss + self.config.nll_weight * nll
        margins = chosen_rewards - rejected_rewards
        self.last_metrics = {"dpo_loss": losses.mean().item(), "nll": nll.item(),
                             "reward_margin": margins.mean().item(),
                             "reward_accuracy": (margins > 0).float().mean().item()}
        return loss


@torch.no_grad()
def compute_reference_logps(model: nn.Module, examples: Sequence[PreferenceExample], pad_id: int, *,
                            batch_size: int = 8) -> list[PreferenceExample]:
    """The examples with `ref_chosen_logp`/`ref_rejected_logp` filled in by `model` (the reference, usually
    the starting weights). Run it before training starts: afterwards the model has moved."""
    was_training = model.training
    model.eval()
    logps: list[tuple[float, float]] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start: start + batch_size])
        batch = preference_batch(chunk, pad_id)
        device = next(model.parameters()).device
        seq_logps, _ = sequence_logprobs(model, batch["inputs"].to(device), batch["targets"].to(device))
        seq_logps = seq_logps.double().cpu()
        logps += list(zip(seq_logps[: len(chunk)].tolist(), seq_logps[len(chunk):].tolist()))
    model.train(was_training)
    return with_reference_logps(examples, logps)
