"""`llama3::ggml_dequantize` (llama3/kernels/ggml_dequant.cpp) against the `gguf` package's dequantization,
bit for bit, at every instruction-set level this CPU runs, on random bytes in every block layout; and the
prompt path of `GGMLLinear` that multiplies slices of dequantized rows with torch's GEMM."""

import gguf
import numpy as np
import pytest
import torch

from llama3 import kernels
from llama3.checkpoint.gguf_quants import QUANT_TYPES, quantize
from llama3.inference import gemv, ggml_quant
from llama3.inference.fast import fuse_projections
from llama3.inference.ggml_quant import GGMLEmbedding, GGMLGroupLinear, GGMLLinear
from tests.test_gguf_quants import _random_blocks, _weights


def _reference(data: np.ndarray, kind: str) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])


@pytest.fixture(autouse=True)
def kernels_built():
    assert kernels.available(), f"the CPU kernels must build on every test machine: {kernels.why_unavailable()}"


@pytest.mark.parametrize("isa", kernels.supported_isas())
@pytest.mark.parametrize("kind", list(QUANT_TYPES))
def test_dequantize_is_bit_equal_to_the_gguf_package(kind, isa):
    """Random bytes decode every bit of the layout (negative scales and mins, all codes); quantized real
    weights add an all-zero block. bf16 is the fp32 result rounded to nearest even."""
    ops = kernels.ops(isa)
    K = 768  # three 256-value super-blocks
    for data in (_random_blocks(kind, 21, K, seed=4), quantize(_weights(5, K), kind)):
        expected = _reference(data, kind)
        got = ops.ggml_dequantize(torch.from_numpy(data), QUANT_TYPES[kind].ggml_id, K, torch.float32)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        # bit patterns, so that -0.0 against +0.0 counts as a difference too
        assert np.array_equal(got.numpy().view(np.int32), expected.view(np.int32))
        got16 = ops.ggml_dequantize(torch.from_numpy(data), QUANT_TYPES[kind].ggml_id, K, torch.bfloat16)
        assert got16.dtype == torch.bfloat16
        assert torch.equal(got16.view(torch.int16), torch.from_numpy(expected).bfloat16().view(torch.int16))


def test_dequantize_takes_a_slice_of_rows_and_refuses_bad_inputs():
    data = torch.from_numpy(quantize(_weights(12, 512), "Q6_K"))
    whole = torch.ops.llama3.ggml_dequantize(data, 14, 512, torch.float32)
    assert torch.equal(torch.ops.llama3.ggml_dequantize(data[3:7], 14, 512, torch.float32), whole[3:7])
    assert torch.ops.llama3.ggml_dequantize(data[:0], 14, 512, torch.float32).shape == (0, 512)
    with pytest.raises(RuntimeError, match="ggml type 99 is not one of"):
        torch.ops.llama3.ggml_dequantize(data, 99, 512, torch.float32)
    with pytest.raises(RuntimeError, match=r"w must be contiguous uint8 \(N, 420\)"):
        torch.ops.llama3.ggml_dequantize(data[:, :100], 14, 512, torch.float32)
    with pytest.raises(RuntimeError, match="multiple of 256"):
        torch.ops.llama3.ggml_dequantize(data, 14, 300, torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be float32 or bfloat16"):
        torch.ops.llama3.ggml_dequantize(data, 14, 512, torch.float16)


def test_dequantize_works_under_torch_compile():
    data = torch.from_numpy(quantize(_weights(8, 256), "Q4_K"))
    compiled = torch.compile(lambda w: torch.ops.llama3.ggml_dequantize(w, 12, 256, torch.float32) * 2,
                             fullgraph=True, backend="eager")
    assert torch.equal(compiled(data), torch.from_numpy(_reference(data.numpy(), "Q4_K")) * 2)


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_1", "Q4_K", "Q6_K"])
def test_prompt_rows_multiply_slices_of_dequantized_rows(kind, monkeypatch):
    """Rows at or past the prompt threshold: y = x · dequantized Wᵀ in float32, the weight decoded a slice
    of rows at a time (slices of 16 here, so that a 40-row matrix takes three, the last one partial)."""
    monkeypatch.setattr(gemv, "SLICE_BYTES", 16 * 512 * 4)
    monkeypatch.setattr(gemv, "native_bf16_products", lambda: False)  # fp32 slices, whatever the CPU
    data = torch.from_numpy(quantize(_weights(40, 512), kind))
    layer = GGMLLinear(data, kind, 512)
    assert layer.use_kernel
    weight = torch.from_numpy(_reference(data.numpy(), kind))
    slices = []
    real = torch.ops.llama3.ggml_dequantize
    monkeypatch.setattr(ggml_quant, "_dequantize_op", lambda *a: slices.append(a[0].shape[0]) or real(*a))
    x = torch.randn(2, gemv.PROMPT_ROWS, 512)
    y = layer(x)
    assert slices == [16, 16, 8]
    # float32 sums of 512 products in the GEMM's order: within 2^-16 of Σ|x||w| of the exact value
    exact = torch.nn.functional.linear(x.double(), weight.double())
    bound = torch.nn.functional.linear(x.double().abs(), weight.double().abs()) * 2**-16
    assert y.dtype == torch.float32 and ((y.double() - exact).abs() <= bound).all()
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y, rtol=0.02, atol=0.02 * float(y.abs().max()))
    # fewer rows than the threshold stay on the byte products (activations rounded to int8: not equal)
    slices.clear()
    layer(x[0, :gemv.PROMPT_ROWS - 1])
    assert slices == []


def test_embedding_lookup_dequantizes_only_its_rows_through_the_kernel():
    data = torch.from_numpy(quantize(_weights(64, 256), "Q5_K"))
    table = GGMLEmbedding(data, "Q5_K", 256)
    ids = torch.tensor([[5, 9, 5], [63, 0, 9]])
    expected = torch.from_numpy(_reference(data.numpy(), "Q5_K"))[ids]
    assert torch.equal(table(ids), expected)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("preset,fused", [("q4_0", False), ("q4_k_m", False), ("q4_k_m", True)])
def test_long_prompt_on_a_quantized_file_takes_the_gemm_path(preset, fused, tmp_path, monkeypatch):
    """A whole model from a quantized GGUF file (Q4_0 or Q4_K with Q6_K), its q/k/v and gate/up grouped or
    not: a prompt of PROMPT_ROWS tokens runs every product through slices of dequantized rows, and its logits
    equal the float model on the `gguf` package's dequantization of the same file (fp32 both ways: only the
    summation order differs)."""
    import llama3
    from llama3.checkpoint.gguf import load_gguf
    from tests.test_checkpoint_hf import byte_tokenizer
    from tests.test_gguf_quants import _kl, _model

    path = llama3.save(_model(), byte_tokenizer(), tmp_path / f"m-{preset}.gguf", format="gguf", dtype=preset)
    ours, _ = load_gguf(path, repack=False)  # the file's layout: a plain load repacks Q4_0 / Q4_K / Q6_K
    if fused:
        fuse_projections(ours)
        assert isinstance(ours.layers[0].attention.wqkv, GGMLGroupLinear)
    reference, _ = load_gguf(path, dequantize=True)
    monkeypatch.setattr(gemv, "native_bf16_products", lambda: False)
    kinds = []
    real = ggml_quant._dequantize_op
    monkeypatch.setattr(ggml_quant, "_dequantize_op", lambda w, t, *a: kinds.append(t) or real(w, t, *a))
    tokens = torch.randint(0, 512, (1, gemv.PROMPT_ROWS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, ref_logits = ours(tokens), reference(tokens)
    layers = [m for m in ours.modules() if isinstance(m, GGMLLinear)]
    layers += [p for m in ours.modules() if isinstance(m, GGMLGroupLinear) for p in m.parts]
    assert len(kinds) >= len(layers) and {QUANT_TYPES[m.kind].ggml_id for m in layers} <= set(kinds)
    assert _kl(ref_logits, logits) <= 5e-4
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
