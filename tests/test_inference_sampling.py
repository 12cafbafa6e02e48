"""Sampling functions: parameter validation, filters, penalties, and the distributions they sample from."""

from __future__ import annotations

import math

import pytest
import torch

from llama3.inference.sampling import (
    SamplingParams,
    apply_penalties,
    make_generator,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()


def draw_counts(logits: torch.Tensor, params: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = sample(logits.expand(n, -1).contiguous(), params, generator=generator)
    return torch.bincount(ids, minlength=logits.shape[-1]).float() / n


@pytest.mark.parametrize("field, value, phrase", [
    ("temperature", -0.1, ">= 0"), ("top_k", -1, "integer >= 0"), ("top_k", 1.5, "integer"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("min_p", 2.0, "[0, 1]"),
    ("repetition_penalty", 0.0, "[0.01, 100.0]"), ("frequency_penalty", 3.0, "[-2, 2]"),
    ("temperature", float("nan"), "finite"), ("seed", "7", "integer"),
])
def test_invalid_params_name_the_field(field, value, phrase):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert f"SamplingParams.{field}" in str(info.value) and phrase in str(info.value)


def test_greedy_is_argmax_even_with_generator():
    logits = torch.randn(5, 50)
    ids = sample(logits, SamplingParams(temperature=0), generator=torch.Generator().manual_seed(1))
    assert torch.equal(ids, logits.argmax(-1))


def test_temperature_one_matches_softmax_distribution():
    freqs = draw_counts(LOGITS, SamplingParams(temperature=1.0))
    assert torch.allclose(freqs, PROBS[0], atol=0.03)


def test_temperature_sharpens_distribution():
    freqs = draw_counts(LOGITS, SamplingParams(temperature=0.5))
    expected = (LOGITS / 0.5).softmax(-1)[0]  # p^2 renormalized
    assert torch.allclose(freqs, expected, atol=0.03)


def test_top_k_support_is_exactly_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0, 0.0]])
    filtered = top_k_filter(logits, 3)
    assert torch.isfinite(filtered).nonzero()[:, 1].tolist() == [1, 2, 3]
    freqs = draw_counts(logits, SamplingParams(top_k=3))
    assert set(freqs.nonzero()[:, 0].tolist()) == {1, 2, 3}
    expected = logits[0, [1, 2, 3]].softmax(-1)
    assert torch.allclose(freqs[[1, 2, 3]], expected, atol=0.03)


def test_top_p_keeps_smallest_set_reaching_mass():
    # 0.5 alone < 0.7, 0.5 + 0.3 reaches it: keep tokens {0, 1}, renormalized to 0.625 / 0.375.
    filtered = top_p_filter(LOGITS, 0.7)
    assert torch.isfinite(filtered[0]).tolist() == [True, True, False, False]
    freqs = draw_counts(LOGITS, SamplingParams(top_p=0.7))
    assert torch.allclose(freqs, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03)
    # A tiny top_p keeps only the most likely token.
    assert torch.isfinite(top_p_filter(LOGITS, 0.01)[0]).tolist() == [True, False, False, False]


def test_min_p_drops_tokens_below_fraction_of_top():
    # threshold 0.2 x 0.5 = 0.1: 0.05 goes, 0.15 stays.
    assert torch.isfinite(min_p_filter(LOGITS, 0.2)[0]).tolist() == [True, True, True, False]
    freqs = draw_counts(LOGITS, SamplingParams(min_p=0.2))
    assert freqs[3] == 0 and torch.allclose(freqs[:3], PROBS[0, :3] / 0.95, atol=0.03)


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[1, 2, 0, 3]])
    rep = apply_penalties(logits, counts, SamplingParams(repetition_penalty=2.0))
    assert torch.allclose(rep, torch.tensor([[1.0, -4.0, 1.0, 0.25]]))
    freq = apply_penalties(logits, counts, SamplingParams(frequency_penalty=0.5))
    assert torch.allclose(freq, torch.tensor([[1.5, -3.0, 1.0, -1.0]]))
    pres = apply_penalties(logits, counts, SamplingParams(presence_penalty=0.5))
    assert torch.allclose(pres, torch.tensor([[1.5, -2.5, 1.0, 0.0]]))
    # Greedy with a strong repetition penalty avoids the seen token 0.
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=3.0), token_counts=counts).item() == 2


def test_seed_reproducibility():
    logits = torch.randn(3, 1000)
    params = SamplingParams(temperature=1.0, seed=1234)
    first = [sample(logits, params, generator=g).tolist() for g in [make_generator(params)] * 1]
    again = [sample(logits, params, generator=make_generator(params)).tolist()]
    assert first == again
    other = sample(logits, params, generator=make_generator(SamplingParams(seed=99)))
    assert other.tolist() != first[0]


def test_per_row_params_and_generators():
    logits = torch.randn(2, 100)
    rows = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5)]
    gens = [make_generator(p) for p in rows]
    ids = sample(logits, rows, generator=gens)
    assert ids[0] == logits[0].argmax()
    # Row 1 draws the same token as sampling that row alone with the same seed: rows are independent.
    alone = sample(logits[1:], rows[1], generator=make_generator(rows[1]))
    assert ids[1] == alone[0]
    with pytest.raises(ValueError, match="one per row"):
        sample(logits, rows[:1] * 3)


def test_sample_rejects_wrong_shape():
    with pytest.raises(ValueError, match="batch, vocab"):
        sample(torch.randn(10), SamplingParams())


def test_filters_never_remove_everything():
    logits = torch.full((1, 8), -math.inf)
    logits[0, 3] = 0.0
    params = SamplingParams(top_k=2, top_p=0.1, min_p=0.9)
    assert sample(logits, params, generator=torch.Generator().manual_seed(0)).item() == 3
