"""Prompt rows (`gemv.PROMPT_ROWS` or more) on stored weights: bf16 (`GemvLinear`) and int8
(`quantize`) widen a slice of weight rows at a time for torch's float GEMM (`gemv.sliced_matmul`); the
result equals the product with the layer's own dequantized weight, the weight is asked for in slices (never
whole), and fewer rows keep their kernels."""

import pytest
import torch

from llama3 import kernels
from llama3.inference import gemv
from llama3.inference.gemv import GemvLinear
from llama3.inference.quantize import Int8WeightOnlyLinear

N, K = 40, 192


@pytest.fixture
def slices(monkeypatch):
    """Slices of 16 weight rows (a 40-row matrix takes three, the last partial), each recorded."""
    assert kernels.available(), f"the CPU kernels must build on every test machine: {kernels.why_unavailable()}"
    monkeypatch.setattr(gemv, "SLICE_BYTES", 16 * K * 4)
    monkeypatch.setattr(gemv, "native_bf16_products", lambda: False)  # the fp32 path, whatever the CPU
    # bf16 prompts take `llama3::gemm16` where it has a vector build (tests/test_gemv_gemm16.py); this is the
    # route of the portable level
    monkeypatch.setattr(gemv, "gemm16_available", lambda: False)
    sizes = []
    real = gemv.sliced_matmul

    def recording(x2, out_features, weight_rows, dtype, out=None):
        return real(x2, out_features, lambda n0, n1: sizes.append(n1 - n0) or weight_rows(n0, n1), dtype, out)

    monkeypatch.setattr(gemv, "sliced_matmul", recording)
    return sizes


def test_bf16_prompts_widen_slices_to_fp32(slices):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(N, K).bfloat16(), requires_grad=False)
    layer = GemvLinear(weight)
    x = torch.randn(2, gemv.PROMPT_ROWS, K).bfloat16()
    y = layer(x)
    assert slices == [16, 16, 8] and y.dtype == torch.bfloat16
    reference = (x.double() @ weight.double().T)
    torch.testing.assert_close(y.double(), reference, rtol=0.01, atol=0.01 * float(reference.abs().max()))
    slices.clear()
    layer(x[0, :gemv.PROMPT_ROWS - 1])  # below the threshold: torch's bf16 product as before
    assert slices == []


def test_int8_prompts_dequantize_slices(slices):
    torch.manual_seed(1)
    layer = Int8WeightOnlyLinear(torch.randn(N, K), blocks=False)  # the per-row int8 layout
    dequantized = layer.weight_int8.double() * layer.scales.double()[:, None]
    x = torch.randn(gemv.PROMPT_ROWS + 3, K)
    y = layer(x)
    assert slices == [16, 16, 8] and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ dequantized.T, rtol=1e-5, atol=1e-4)


def test_ggml_prompt_rows_follow_the_same_threshold(slices):
    from llama3.checkpoint.gguf_quants import quantize
    from llama3.inference.ggml_quant import GGMLLinear

    data = torch.from_numpy(quantize(torch.randn(N, 256).numpy(), "Q4_K"))
    layer = GGMLLinear(data, "Q4_K", 256)
    y = layer(torch.randn(gemv.PROMPT_ROWS, 256))
    assert y.shape == (gemv.PROMPT_ROWS, N) and slices == [12, 12, 12, 4]  # the bytes of 16 rows of 192: 12 of 256
