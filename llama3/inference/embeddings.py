"""Sentence embeddings from a causal Llama 3: pooled final hidden states, L2-normalised.

The model runs once over each sequence (no KV cache), and its final hidden states (after the last RMSNorm,
the vectors the output projection reads) are pooled into one vector per sequence:

- `mean`: the average over all positions (the default; every token counts equally);
- `last`: the last position's state, which under causal attention is the only one that has seen the
  whole sequence (how decoder embedding models such as E5-Mistral pool).

Either way the vector is divided by its L2 norm, so a dot product is a cosine similarity. A batch of
sequences is one call, but each sequence runs as its own forward pass: the matrix shapes, and so the float
rounding, are then the sequence's own, and its vector is bit for bit the same alone or batched (rows
stacked into one GEMM can round differently as the batch changes, and padding would need attention masks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

__all__ = ["POOLINGS", "embed", "truncate_and_normalize"]

POOLINGS = ("mean", "last")
Pooling = Literal["mean", "last"]


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module):
    """Detach the layers' KV caches for a plain full-sequence forward, and put them back after."""
    saved = [layer.attention.kv_cache for layer in model.layers]
    for layer in model.layers:
        layer.attention.kv_cache = None
    try:
        yield
    finally:
        for layer, cache in zip(model.layers, saved):
            layer.attention.kv_cache = cache


def _pool(hidden: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """hidden (B, T, D) -> (B, D) in fp32."""
    hidden = hidden.float()
    return hidden.mean(dim=1) if pooling == "mean" else hidden[:, -1]


@torch.inference_mode()
def embed(model: nn.Module, sequences: Sequence[Sequence[int]], *, pooling: Pooling = "mean") -> torch.Tensor:
    """Token-id sequences -> (N, D) float32 unit vectors, in the order given."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every sequence to embed needs at least one token")
    device = model.tok_embeddings.weight.device
    out = torch.empty(len(sequences), model.args.dim)
    with _without_kv_cache(model):
        for i, seq in enumerate(sequences):
            hidden = model(torch.tensor([list(seq)], device=device), return_hidden=True)  # (1, T, D)
            out[i] = _pool(hidden, pooling)[0].cpu()
    return torch.nn.functional.normalize(out, dim=-1)


def truncate_and_normalize(vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    """The first `dimensions` coordinates of each vector, renormalised (OpenAI's `dimensions`)."""
    if dimensions is None or dimensions >= vectors.shape[-1]:
        return vectors
    return torch.nn.functional.normalize(vectors[..., :dimensions], dim=-1)
