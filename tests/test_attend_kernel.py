"""Decode-time attention on the CPU kernel (`llama3::attend_one_query`, llama3/kernels/attend.cpp) against a
float64 reference, at every instruction-set level this CPU runs, and inside the model against the PyTorch
form it replaces."""

from __future__ import annotations

import math

import pytest
import torch

from llama3 import kernels
from llama3.inference import attention
from llama3.inference.generate import Generator

from conftest import random_model, tiny_args


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.available(), kernels.why_unavailable()


def reference(q, keys, values, mask, k_scale=None, v_scale=None):
    """float64 softmax attention: q (B, K, R, D), keys/values (B, K, S, D), mask (B, S) -> (B, K, R, D)."""
    k, v = keys.double(), values.double()
    if k_scale is not None:
        k, v = k * k_scale.double(), v * v_scale.double()
    scores = torch.einsum("bkrd,bksd->bkrs", q.double(), k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bkrs,bksd->bkrd", scores.softmax(-1), v)


def random_mask(B, S, generator):
    """Rows of different lengths, each with a hole or two (a batch's padding, an evicted span)."""
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        length = int(torch.randint(S // 2, S + 1, (1,), generator=generator))
        mask[b, :length] = True
        mask[b, int(torch.randint(0, length, (1,), generator=generator))] = False
        mask[b, 0] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,K,R,S,D", [(1, 2, 4, 9, 64), (2, 3, 1, 17, 40), (2, 4, 4, 2100, 64), (1, 1, 3, 1, 8),
                                        (1, 2, 6, 300, 24), (1, 1, 2, 5, 36)])
def test_attend_one_query_equals_float64_reference(ops, dtype, B, K, R, S, D):
    g = torch.Generator().manual_seed(B * 1000 + S)
    q = torch.randn(B, K, R, D, generator=g)
    # a cache view over the first S of S + 5 positions: strided along S as `KVCache.view` leaves it
    keys = torch.randn(B, K, S + 5, D, generator=g).to(dtype)[:, :, :S]
    values = torch.randn(B, K, S + 5, D, generator=g).to(dtype)[:, :, :S]
    mask = random_mask(B, S, g)
    none = torch.empty(0)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):  # S = 2100 is big enough to be split over threads
            torch.set_num_threads(n)
            out = ops.attend_one_query(q, keys, values, none, none, mask, 1.0 / math.sqrt(D))
            assert out.dtype == torch.float32 and out.shape == q.shape
            torch.testing.assert_close(out.double(), reference(q, keys, values, mask), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("R", [4, 5])
def test_attend_one_query_reads_int8_codes_with_their_scales(ops, R):
    g = torch.Generator().manual_seed(7)
    B, K, S, D = 2, 2, 33, 64
    q = torch.randn(B, K, R, D, generator=g)
    keys = torch.randint(-127, 128, (B, K, S, D), generator=g, dtype=torch.int8)
    values = torch.randint(-127, 128, (B, K, S, D), generator=g, dtype=torch.int8)
    k_scale = torch.rand(B, K, S, 1, generator=g) / 50
    v_scale = torch.rand(B, K, S, 1, generator=g) / 50
    mask = random_mask(B, S, g)
    out = ops.attend_one_query(q, keys, values, k_scale, v_scale, mask, 1.0 / math.sqrt(D))
    torch.testing.assert_close(out.double(), reference(q, keys, values, mask, k_scale, v_scale), rtol=1e-5, atol=1e-5)


def test_attend_one_query_keeps_a_peaked_softmax_exact(ops):
    """Scores hundreds apart: the exponentials of all but the top underflow to zero, as in float64."""
    g = torch.Generator().manual_seed(11)
    q = 40 * torch.randn(1, 2, 4, 64, generator=g)
    keys, values = torch.randn(1, 2, 40, 64, generator=g), torch.randn(1, 2, 40, 64, generator=g)
    mask = torch.ones(1, 40, dtype=torch.bool)
    none = torch.empty(0)
    out = ops.attend_one_query(q, keys, values, none, none, mask, 1.0 / 8)
    torch.testing.assert_close(out.double(), reference(q, keys, values, mask), rtol=1e-5, atol=1e-5)


def test_attend_one_query_refuses_bad_inputs_with_clear_errors():
    q, kv = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 5, 8)
    none = torch.empty(0)
    with pytest.raises(RuntimeError, match="no position to attend to"):
        torch.ops.llama3.attend_one_query(q, kv, kv, none, none, torch.zeros(1, 5, dtype=torch.bool), 1.0)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.llama3.attend_one_query(q, kv, kv, none, none, torch.ones(1, 4, dtype=torch.bool), 1.0)
    codes = torch.zeros(1, 2, 5, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="int8 keys/values need k_scale"):
        torch.ops.llama3.attend_one_query(q, codes, codes, none, none, torch.ones(1, 5, dtype=torch.bool), 1.0)
    with pytest.raises(RuntimeError, match="does not fit keys"):
        torch.ops.llama3.attend_one_query(torch.randn(1, 2, 2, 4), kv, kv, none, none,
                                          torch.ones(1, 5, dtype=torch.bool), 1.0)


@pytest.mark.parametrize("kv_cache", [None, "int8"])
def test_model_decode_on_the_kernel_equals_the_torch_form(monkeypatch, kv_cache):
    """Teacher-forced decoding of two prompts of different lengths: next-token logits on the kernel equal the
    multiply-and-sum form step by step, for a float and an int8 cache, and the kernel really ran."""
    model = random_model(tiny_args("gqa")).eval()
    tokens = torch.randint(0, model.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([5, 2])

    def run(on_kernel: bool):
        gen = Generator(model, None, cache_bucket=8, kv_cache=kv_cache)  # installs the kernel
        assert attention.use_decode_kernels(model, enabled=on_kernel) == (model.args.n_layers if on_kernel else 0)
        gen.prepare_cache(2, 12)
        positions = torch.arange(5).expand(2, 5)
        steps = [gen.prefill(tokens[:, :5], positions, lengths - 1)]
        for t in range(6):  # row 0 continues at 5.., row 1 at 2..: different cache fills per row
            pos = (lengths + t).view(2, 1)
            steps.append(gen.decode_step(tokens.gather(1, pos), pos))
        return torch.stack(steps)

    calls = []
    real = attention.kernel_attention
    monkeypatch.setattr(attention, "kernel_attention", lambda *a: calls.append(1) or real(*a))
    on_kernel = run(True)
    assert len(calls) == 6 * model.args.n_layers, "the decode steps did not all reach the kernel"
    on_torch = run(False)
    assert len(calls) == 6 * model.args.n_layers, "the PyTorch form still called the kernel"
    torch.testing.assert_close(on_kernel, on_torch, rtol=1e-5, atol=1e-5)
