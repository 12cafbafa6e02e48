"""Sampling as pure functions on logits.

API (the serving engine builds on it):

- `SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
  frequency_penalty=0.0, presence_penalty=0.0, seed=None)`; `temperature=0` means greedy, and so does any
  temperature below `MIN_TEMPERATURE` (1e-5, as vLLM): dividing fp32 logits by less overflows to inf and
  the draw would see NaN probabilities. Invalid values raise `ValueError` at construction, naming the field
  and the allowed range.
- `apply_penalties(logits (B, V), token_counts (B, V), params) -> (B, V)`: repetition (CTRL, Keskar et al.
  2019: positive logits of seen tokens divided by the penalty, negative ones multiplied), frequency
  (minus penalty × count) and presence (minus penalty once seen) penalties, as OpenAI and vLLM define them.
- `top_k_filter`, `top_p_filter`, `min_p_filter`: (B, V) logits -> (B, V) with removed tokens at -inf.
- `sample(logits (B, V) fp32, params, *, generator=None, token_counts=None) -> (B,) int64 ids`.

Per-row parameters: everywhere `params` is accepted, a list of `SamplingParams` with one entry per row
works too (each row its own temperature, filters and penalties). `generator` is one `torch.Generator`
for the whole batch, or a list with one generator (or None) per row, which is how rows with different
seeds stay reproducible independently of the batch they share: `make_generator(params)` gives the
generator a row's seed asks for.

Order of operations (as HF transformers' logits processors): penalties, temperature, top-k, top-p, min-p,
then softmax and a multinomial draw. Greedy rows take the argmax after penalties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "GREEDY",
    "MAX_REPETITION_PENALTY",
    "MIN_REPETITION_PENALTY",
    "MIN_TEMPERATURE",
    "SamplingParams",
    "apply_penalties",
    "make_generator",
    "min_p_filter",
    "sample",
    "top_k_filter",
    "top_p_filter",
]


# Below this a temperature acts as greedy: logits / 1e-5 stay finite in fp32, logits / 1e-40 do not.
MIN_TEMPERATURE = 1e-5
# The repetition penalty multiplies or divides logits: outside this range the result leaves fp32's finite
# range (or the penalty itself rounds to 0 in fp32), and every probability of the row becomes NaN.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. `temperature=0` is greedy (argmax); `top_k=0`, `top_p=1`, `min_p=0` and
    penalties of 1/0/0 switch the corresponding step off. `seed` makes sampling reproducible."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(field: str, value: object, allowed: str) -> ValueError:
            return ValueError(f"SamplingParams.{field}={value!r} is invalid: it must be {allowed}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                     "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, value, "a finite number")
        if self.temperature < 0:
            raise bad("temperature", self.temperature, ">= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "an integer >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "in (0, 1] (1 turns it off)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "in [0, 1] (0 turns it off)")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", self.repetition_penalty,
                      f"in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}] (1 turns it off)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, getattr(self, name), "in [-2, 2] (0 turns it off), as in the OpenAI API")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", self.seed, "an integer or None")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or one too small to divide fp32 logits by (`MIN_TEMPERATURE`)."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)


GREEDY = SamplingParams(temperature=0.0)

ParamsArg = SamplingParams | Sequence[SamplingParams]
GeneratorArg = torch.Generator | Sequence[torch.Generator | None] | None


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with `params.seed`, or None (torch's global RNG) when no seed is set."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def _rows(params: ParamsArg, batch_size: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * batch_size
    rows = list(params)
    if len(rows) != batch_size:
        raise ValueError(f"got {len(rows)} SamplingParams for a batch of {batch_size} rows; "
                         "pass one SamplingParams, or one per row")
    return rows


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)  # (B, 1)


def apply_penalties(logits: torch.Tensor, token_counts: torch.Tensor, params: ParamsArg) -> torch.Tensor:
    """Penalize tokens already seen. logits (B, V) float; token_counts (B, V) how often each token occurred
    (in the prompt and output, as the caller chooses). Returns a new tensor."""
    rows = _rows(params, logits.shape[0])
    if not any(p.has_penalties for p in rows):
        return logits
    counts = token_counts.to(logits.dtype)
    seen = token_counts > 0
    repetition = _column([p.repetition_penalty for p in rows], logits)
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    out = torch.where(seen, penalized, logits)
    out = out - _column([p.frequency_penalty for p in rows], logits) * counts
    return out - _column([p.presence_penalty for p in rows], logits) * seen.to(logits.dtype)


def top_k_filter(logits: torch.Tensor, top_k: int | torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits of each row (k=0: keep all). top_k: int or (B,) ints. Ties at the k-th
    value are all kept."""
    vocab = logits.shape[-1]
    k = torch.as_tensor(top_k, device=logits.device).reshape(-1)
    k = torch.where(k <= 0, vocab, k.clamp(max=vocab))
    if bool((k >= vocab).all()):
        return logits
    sorted_desc = logits.sort(dim=-1, descending=True).values  # (B, V)
    kth = sorted_desc.gather(-1, (k - 1).expand(logits.shape[0]).unsqueeze(1))  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose probability
    mass reaches top_p (at least one token). top_p: float or (B,) floats."""
    p = torch.as_tensor(top_p, dtype=torch.float32, device=logits.device).reshape(-1, 1)  # (B or 1, 1)
    if bool((p >= 1).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.float().softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    remove_sorted = mass_before >= p
    remove_sorted[:, 0] = False  # the most likely token always stays, even for a top_p that is 0 in fp32
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p × the top token's probability (Nguyen et al. 2024).
    min_p: float or (B,) floats."""
    m = torch.as_tensor(min_p, dtype=torch.float32, device=logits.device).reshape(-1, 1)
    if bool((m <= 0).all()):
        return logits
    log_probs = logits.float().log_softmax(-1)
    threshold = log_probs.max(-1, keepdim=True).values + torch.log(m)  # log(min_p · p_max)
    return logits.masked_fill(log_probs < threshold, float("-inf"))


def _draw(probs: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    generators = list(generator)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g).squeeze(1)
                      for i, g in enumerate(generators)])


def sample(logits: torch.Tensor, params: ParamsArg = GREEDY, *, generator: GeneratorArg = None,
           token_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row. logits (B, V) (fp32 preferred); token_counts (B, V) enables penalties.
    Returns (B,) int64 ids."""
    if logits.dim() != 2:
        raise ValueError(f"sample expects logits of shape (batch, vocab), got {tuple(logits.shape)}")
    rows = _rows(params, logits.shape[0])
    logits = logits.float()
    if token_counts is not None:
        logits = apply_penalties(logits, token_counts, rows)
    greedy_rows = [p.greedy for p in rows]
    if all(greedy_rows):
        return logits.argmax(-1)
    temperature = _column([1.0 if p.greedy else p.temperature for p in rows], logits)
    scaled = logits / temperature
    scaled = top_k_filter(scaled, torch.tensor([p.top_k for p in rows], device=logits.device))
    scaled = top_p_filter(scaled, torch.tensor([p.top_p for p in rows], device=logits.device))
    scaled = min_p_filter(scaled, torch.tensor([p.min_p for p in rows], device=logits.device))
    probs = scaled.softmax(-1)  # (B, V)
    invalid = ~torch.isfinite(probs).all(-1)  # (B,)
    if bool(invalid.any()):  # checked before any draw, so no generator has advanced when this raises
        raise ValueError(f"rows {invalid.nonzero().flatten().tolist()} have no valid probability distribution "
                         "(their logits hold NaN or infinity)")
    drawn = _draw(probs, generator)
    if not any(greedy_rows):
        return drawn
    is_greedy = torch.tensor(greedy_rows, device=logits.device)
    return torch.where(is_greedy, logits.argmax(-1), drawn)
