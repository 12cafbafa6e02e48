"""`load_for_inference`: `llama3.load` followed by `optimize_for_inference`, the one call a command makes to
get a decode-ready model.

It sits in its own module because it joins two layers: the checkpoint readers (which themselves use
`inference.ggml_quant` for quantized GGUF weights) and the fast-path transforms of `inference.fast`. Kept
apart from both, neither imports the other through it (tests/test_architecture.py checks for cycles).
"""

from __future__ import annotations

import torch

from ..checkpoint.load import load
from .fast import optimize_for_inference

__all__ = ["load_for_inference"]


def load_for_inference(path, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
                       quantize: str | None = None, fuse: bool = True):
    """`llama3.load` a model folder, then `optimize_for_inference` it. Returns (model, tokenizer)."""
    model, tokenizer = load(path, device=device, dtype=dtype)
    return optimize_for_inference(model, fuse=fuse, quantize=quantize), tokenizer
