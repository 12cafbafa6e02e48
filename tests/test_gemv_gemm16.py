"""Prompts on 16-bit weights: `llama3::gemm16` (bf16 and f16 weights where they lie, one or several side by
side) on every instruction-set level this CPU runs, against a float64 reference, at the shapes its tiles and
blocks meet (rows 1-9, 64 and 512; tails of the 3-row and 4-column tiles, of the 8-lane steps, of the
512-column blocks and of the 64-row thread chunks, parts that a chunk straddles); and the prompt route of
`GemvLinear` / `GemvGroupLinear`, which sends prompts of `GEMM16_ROWS` rows or more to it."""

from __future__ import annotations

import pytest
import torch

from llama3 import kernels
from llama3.inference import gemv
from llama3.inference.gemv import GEMM16_ROWS, GemvGroupLinear, GemvLinear
from tests.conftest import at_threads

# (M, K, parts' N)
SHAPES = [(1, 64, (40,)), (2, 7, (3, 5)), (3, 100, (77, 5)), (4, 130, (129, 3, 64)), (5, 16, (4,)),
          (6, 520, (9,)), (7, 1100, (66, 2)), (8, 33, (130,)), (9, 2048, (64, 16, 16)), (64, 96, (257,)),
          (512, 40, (70, 6))]


def _assert_close_to_float64(y, x, weights):
    w = torch.cat(weights).double()
    ref = x.double() @ w.T
    # fp32 sums of exact products (f16 and bf16 widen exactly): each sum off by at most K fp32 roundings of
    # the sum of the products' magnitudes; then one rounding to x's dtype
    ulp = 2**-8 if x.dtype == torch.bfloat16 else 2**-23
    bound = ref.abs() * ulp + x.shape[1] * 2**-24 * (x.double().abs() @ w.abs().T) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,K,parts", SHAPES)
@pytest.mark.parametrize("w_dtype,x_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32)])
def test_gemm16_equals_float64_reference(ops, M, K, parts, threads, w_dtype, x_dtype):
    torch.manual_seed(M * 1000 + K)
    x = torch.randn(M, K).to(x_dtype)
    weights = [torch.randn(n, K).to(w_dtype) for n in parts]
    y = at_threads(threads, ops.gemm16, x, weights)
    assert y.dtype == x_dtype and y.shape == (M, sum(parts))
    _assert_close_to_float64(y, x, weights)


def test_gemm16_f16_subnormals_and_extremes(ops):
    # the portable widening decodes f16 by hand: subnormals, zeros of both signs and the largest values
    values = torch.tensor([2**-24, -(2**-24), 2**-14 - 2**-24, 0.0, -0.0, 65504.0, -65504.0, 1.0],
                          dtype=torch.float16)
    w = values.repeat(5, 3)[:, :20].contiguous()  # (5, 20)
    x = torch.randn(4, 20)
    _assert_close_to_float64(ops.gemm16(x, [w]), x, [w])


def test_gemm16_rejects_bad_inputs_with_clear_errors():
    x = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="needs at least one weight"):
        torch.ops.llama3.gemm16(x, [])
    with pytest.raises(RuntimeError, match="weights must be bfloat16 or float16"):
        torch.ops.llama3.gemm16(x, [torch.zeros(4, 8)])
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.llama3.gemm16(x, [torch.zeros(4, 8, dtype=torch.half), torch.zeros(4, 8, dtype=torch.bfloat16)])
    with pytest.raises(RuntimeError, match="x has 8 columns but a weight has 9"):
        torch.ops.llama3.gemm16(x, [torch.zeros(4, 9, dtype=torch.half)])
    with pytest.raises(RuntimeError, match="x must be bfloat16 or float32"):
        torch.ops.llama3.gemm16(x.half(), [torch.zeros(4, 8, dtype=torch.half)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prompts_take_gemm16_and_match_float64(monkeypatch, dtype):
    assert kernels.available()
    calls = []
    real = torch.ops.llama3.gemm16

    class Spy:
        def __getattr__(self, name):
            if name == "gemm16":
                return lambda *args: calls.append(name) or real(*args)
            return getattr(torch.ops.llama3, name)

    torch.manual_seed(0)
    parts = [torch.nn.Parameter(torch.randn(n, 72).to(dtype), requires_grad=False) for n in (48, 16, 16)]
    group, single = GemvGroupLinear(parts), GemvLinear(parts[0])
    x = torch.randn(1, GEMM16_ROWS, 72).to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    monkeypatch.setattr(gemv.torch.ops, "llama3", Spy())
    y_group, y_single = group(x), single(x)
    # bf16 weights on a CPU with native bf16 products go to torch's own bf16 GEMM instead
    widened = dtype == torch.float16 or not gemv.native_bf16_products()
    assert len(calls) == (2 if gemv.gemm16_available() and widened else 0)
    _assert_close_to_float64(y_group.view(GEMM16_ROWS, -1), x.view(GEMM16_ROWS, 72), list(parts))
    _assert_close_to_float64(y_single.view(GEMM16_ROWS, -1), x.view(GEMM16_ROWS, 72), [parts[0]])
