"""Inference: sampling, prefill/decode generation over a static KV cache, fast-path transforms
(fused projections, compiled decode), weight-only quantization and speculative decoding.

    from llama3.inference import Generator, SamplingParams, optimize_for_inference
"""

from .generate import GenerationResult, GenerationTiming, Generator
from .sampling import SamplingParams, sample

__all__ = ["GenerationResult", "GenerationTiming", "Generator", "SamplingParams", "sample"]
