"""Repacked GGUF weights (`llama3::ggml_repack`, `GGMLLinear.repack`, `repack_for_inference`): Q4_0, Q8_0,
Q4_K, Q5_K and Q6_K rewritten at load into the kernels' 8-row layout give the products of the file's layout up to float
summation order (the integer sums are exact), at every row count of x, with a tail of rows that stays in
the file's layout; a repacked model's logits equal the unrepacked model's, prompt and decode, and its
layers still dequantize (export) from the file. Shapes as in test_gguf_quants.py (dim 256 for the K types)."""

import numpy as np
import pytest
import torch

import llama3
from llama3 import kernels
from llama3.checkpoint.gguf_quants import QUANT_TYPES, dequantize, quantize
from llama3.inference import gemv
from llama3.inference.ggml_quant import GGMLEmbedding, GGMLGroupLinear, GGMLLinear, repack_for_inference
from tests.test_gguf_quants import AFFINE, _centre_bias, _kl, _model, _rounded_activations, _weights

REPACKED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")  # what the AVX2 kernels repack: all
REPACKED_FLAG = 256


def _repacked_isas() -> list[str]:
    return [isa for isa in kernels.supported_isas() if isa != "portable"]


def _repack(ops, data: torch.Tensor, kind: str, K: int) -> torch.Tensor:
    qtype = QUANT_TYPES[kind]
    group_bytes = ops.ggml_repack_block_bytes(qtype.ggml_id)
    out = torch.empty(data.shape[0] // 8, K // qtype.block_values * group_bytes, dtype=torch.uint8)
    ops.ggml_repack(data, qtype.ggml_id, K, out)
    return out


@pytest.mark.parametrize("isa", _repacked_isas())
@pytest.mark.parametrize("kind", REPACKED)
def test_repacked_products_equal_the_file_layout_and_a_float64_reference(kind, isa):
    """Every row count of x from 1 to 9 (passes of 4, 3, 2, 1 rows) and a prompt's 64: the repacked
    product equals the file-layout kernel to float rounding and the float64 sum of what the kernel
    multiplies (x rounded per block of 32 against centred codes, exact against an affine type's bias)."""
    ops = kernels.ops(isa)
    K, N = 768, 40  # three super-blocks; five groups of 8 rows (the runs' 16-row tiles end half full)
    data = quantize(_weights(N, K, seed=3), kind)
    w = dequantize(data, kind).astype(np.float64)
    bias = _centre_bias(data, kind) if kind in AFFINE else np.zeros_like(w)
    repacked = _repack(ops, torch.from_numpy(data), kind, K)
    assert repacked.numel() >= data.size  # the same bytes moved (Q4_K: its sub-scales unpacked to bytes)
    ggml_id = QUANT_TYPES[kind].ggml_id
    for rows in [*range(1, 10), 64]:
        x = np.random.default_rng(rows).standard_normal((rows, K)).astype(np.float32)
        expected = _rounded_activations(x) @ (w - bias).T + x.astype(np.float64) @ bias.T
        y = ops.ggml_matmul(torch.from_numpy(x), repacked, ggml_id | REPACKED_FLAG, K)
        file_layout = ops.ggml_matmul(torch.from_numpy(x), torch.from_numpy(data), ggml_id, K)
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=2e-6 * scale)
        torch.testing.assert_close(y, file_layout, rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("isa", _repacked_isas())
@pytest.mark.parametrize("kind", REPACKED)
def test_unrepack_gives_back_the_files_bytes(kind, isa):
    """`ggml_unrepack` inverts `ggml_repack` byte for byte (every type's scales, sub-scales and code bits; a
    slice of groups alone too); a type or shape it cannot take is refused naming what was wrong."""
    ops = kernels.ops(isa)
    K = 512
    data = torch.from_numpy(quantize(_weights(24, K, seed=5) * 3, kind))
    repacked = _repack(ops, data, kind, K)
    ggml_id = QUANT_TYPES[kind].ggml_id
    assert torch.equal(ops.ggml_unrepack(repacked, ggml_id, K), data)
    assert torch.equal(ops.ggml_unrepack(repacked[1:2], ggml_id, K), data[8:16])
    with pytest.raises(RuntimeError, match="without the repacked flag"):
        ops.ggml_unrepack(repacked, ggml_id | REPACKED_FLAG, K)
    with pytest.raises(RuntimeError, match="w must be contiguous uint8"):
        ops.ggml_unrepack(repacked[:, 1:], ggml_id, K)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_K", "Q6_K", "Q8_0"])
def test_prompts_on_repacked_weights_take_bf16_slices_where_the_cpu_multiplies_bf16(monkeypatch, kind):
    """From REPACKED_PROMPT_ROWS rows on a CPU with native bf16 products (forced here, so that every machine
    runs the route), a repacked layer's prompt is torch's bf16 GEMM on slices decoded from the repacked
    bytes: it never reads the file's own rows (released at load), slices cross the repacked rows and the
    out_features % 8 tail, and the result equals the dequantized weight's product to bf16 rounding."""
    from llama3.inference import ggml_quant

    K, N = 512, 45  # five groups of 8 rows and a tail of 5
    data = torch.from_numpy(quantize(_weights(N, K, seed=9), kind))
    layer = GGMLLinear(data, kind, K)
    assert layer.repack() > 0 and layer.repacked
    monkeypatch.setattr(gemv, "native_bf16_products", lambda: True)
    monkeypatch.setattr(gemv, "SLICE_BYTES", 16 * K * 2)  # slices of 16 rows: one straddles the tail
    unrepacked = []
    real = torch.ops.llama3.ggml_unrepack
    monkeypatch.setattr(ggml_quant.torch.ops.llama3, "ggml_unrepack",
                        lambda *a: unrepacked.append(a[0].shape[0]) or real(*a), raising=False)
    layer.data = torch.full_like(data, 255)  # the file's rows: a read of them would show in the result
    x = torch.randn(ggml_quant.REPACKED_PROMPT_ROWS, K, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    assert sum(unrepacked) == 5 and len(unrepacked) >= 3
    reference = x.double() @ torch.from_numpy(dequantize(data.numpy(), kind)).double().T
    scale = float(reference.abs().max())
    torch.testing.assert_close(y.double(), reference, rtol=0, atol=0.02 * scale)


@pytest.mark.parametrize("isa", _repacked_isas())
def test_a_group_mixes_repacked_file_layout_and_tail_pieces(isa):
    """Parts of several types (as a Q4_K_M layer mixes Q4_K and Q6_K) with row counts that leave tails:
    the repacked rows of each part and its tail in the file's layout (a part of fewer than 8 rows whole)
    in one group call equal the separate file-layout products column for column."""
    ops = kernels.ops(isa)
    K = 512
    kinds, sizes = ["Q4_K", "Q4_0", "Q6_K", "Q8_0", "Q5_K", "Q5_1", "Q4_1"], [43, 21, 33, 19, 25, 17, 5]
    ws, types, reference = [], [], []
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(0))
    for i, (kind, n) in enumerate(zip(kinds, sizes)):
        data = torch.from_numpy(quantize(_weights(n, K, seed=i), kind))
        ggml_id = QUANT_TYPES[kind].ggml_id
        reference.append(ops.ggml_matmul(x, data, ggml_id, K))
        if n >= 8:
            rows = n // 8 * 8
            ws += [_repack(ops, data[:rows], kind, K), data[rows:]]
            types += [ggml_id | REPACKED_FLAG, ggml_id]
        else:
            ws.append(data)
            types.append(ggml_id)
    y = ops.ggml_matmul_group(x, ws, types, K)
    expected = torch.cat(reference, dim=1)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    y16 = ops.ggml_matmul_group(x.bfloat16(), ws, types, K)
    assert y16.dtype == torch.bfloat16 and (y16.float() - y).abs().max() < 0.03 * y.abs().max()


def test_repack_refuses_what_it_cannot_repack():
    assert kernels.available(), f"the CPU kernels must build on every test machine: {kernels.why_unavailable()}"
    if kernels.loaded_isa() == "portable":
        pytest.fail("this test expects the AVX2 kernels (the test machines have them)")
    ops = torch.ops.llama3
    data = torch.from_numpy(quantize(_weights(16, 256), "Q4_0"))
    out = _repack(ops, data, "Q4_0", 256)
    with pytest.raises(RuntimeError, match="repacks groups of 8 rows, got 12"):
        ops.ggml_repack(data[:12], 2, 256, out[:1])
    with pytest.raises(RuntimeError, match=r"out must be contiguous uint8 \(2, 1152\)"):
        ops.ggml_repack(data, 2, 256, out[:1])
    with pytest.raises(RuntimeError, match="already repacked"):
        ops.ggml_repack(out, 2 | REPACKED_FLAG, 256, out)
    assert all(ops.ggml_repack_block_bytes(QUANT_TYPES[k].ggml_id) == 8 * QUANT_TYPES[k].block_bytes
               + (32 if k in ("Q4_K", "Q5_K") else 0) for k in REPACKED)  # Q4_K / Q5_K: sub-scales as bytes
    with pytest.raises(RuntimeError, match=r"a repacked Q4_0 w must be contiguous uint8 \(N / 8, 1152\)"):
        ops.ggml_matmul(torch.randn(1, 256), data, 2 | REPACKED_FLAG, 256)


def test_portable_kernels_repack_nothing_and_refuse_repacked_weights():
    """The portable level multiplies the file's layout only: it names no type to repack, and a layer
    on it keeps its bytes (the products stay those of the file)."""
    ops = kernels.ops("portable")
    assert all(ops.ggml_repack_block_bytes(QUANT_TYPES[k].ggml_id) == 0 for k in QUANT_TYPES)
    data = torch.from_numpy(quantize(_weights(8, 256), "Q4_0"))
    with pytest.raises(RuntimeError, match="Q4_0 is not repacked by this build"):
        ops.ggml_matmul(torch.randn(1, 256), data.view(1, -1), 2 | REPACKED_FLAG, 256)


@pytest.mark.parametrize("kind", REPACKED)
def test_linear_layer_repacks_with_a_tail_and_still_dequantizes(kind):
    K, N = 256, 37
    data = torch.from_numpy(quantize(_weights(N, K, seed=9), kind))
    layer = GGMLLinear(data, kind, K)
    x = torch.randn(3, 5, K)
    before = layer(x)
    prompt = torch.randn(gemv.PROMPT_ROWS, K)
    assert layer.repack() > 0 and layer.repacked
    assert [w.shape[0] for w, _ in layer.kernel_weights] == [4, 5]  # 32 rows as 4 groups, then 5 file rows
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))
    # a prompt on repacked weights runs on the int8 products (not torch's GEMM on dequantized slices)
    reference = prompt.double() @ torch.from_numpy(dequantize(data.numpy(), kind)).double().T
    y = layer(prompt)
    assert (y.double() - reference).abs().max() < 0.02 * reference.abs().max()
    ws, types = zip(*layer.kernel_weights)
    torch.testing.assert_close(y, torch.ops.llama3.ggml_matmul_group(prompt, list(ws), list(types), K))
    assert np.array_equal(layer.dequantize().numpy(), dequantize(data.numpy(), kind))
    assert layer.repack() == 0  # once


@pytest.mark.timeout(180)
@pytest.mark.parametrize("preset", ["q4_0", "q4_k_m", "q8_0", "q5_k_m"])
def test_optimized_quantized_model_repacks_and_keeps_its_logits(preset, tmp_path, monkeypatch):
    """optimize_for_inference on a Q4_0 / Q4_K_M / Q8_0 / Q5_K_M file repacks every product weight of a
    repacked type (grouped q/k/v and gate/up too), never the token embeddings; its logits equal the same
    file fused but not repacked (prompt rows on the same int8 products there, so only the summation order
    differs) and stay within the KL bound of the gguf package's dequantization; decode equals the prompt;
    the model still dequantizes to the file's values (export)."""
    from tests.test_checkpoint_hf import byte_tokenizer

    from llama3.checkpoint.gguf import load_gguf
    from llama3.inference.fast import fuse_projections, optimize_for_inference
    from llama3.inference.ggml_quant import dequantize_model

    path = llama3.save(_model(), byte_tokenizer(), tmp_path / f"m-{preset}.gguf", format="gguf", dtype=preset)
    plain, _ = load_gguf(path, repack=False)  # the file's layout (llama3.load repacks at load)
    fuse_projections(plain)
    ours, _ = llama3.load(path)
    optimize_for_inference(ours)
    linears = [m for m in ours.modules() if isinstance(m, GGMLLinear)]
    linears += [p for m in ours.modules() if isinstance(m, GGMLGroupLinear) for p in m.parts]
    assert {m.kind for m in linears if m.repacked} == {"q4_0": {"Q4_0", "Q6_K"}, "q4_k_m": {"Q4_K", "Q6_K"},
                                                       "q8_0": {"Q8_0"}, "q5_k_m": {"Q5_K", "Q6_K"}}[preset]
    assert all(m.repacked == (m.kind in REPACKED) for m in linears)
    assert isinstance(ours.tok_embeddings, GGMLEmbedding)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))  # 80 rows: a prompt
    reference, _ = load_gguf(path, dequantize=True)
    with torch.no_grad():
        logits = ours(tokens)  # every product on the repacked int8 kernels, prompts too
        assert _kl(reference(tokens), logits) <= 5e-4
        monkeypatch.setattr(gemv, "PROMPT_ROWS", 10_000)  # every layer on the int8 products, both models
        expected, same = plain(tokens), ours(tokens)
        # Only the summation order differs, but every product rounds its activations to int8: a value on a
        # rounding edge in one model and not in the other moves that token's row a little (seen: 1 of 80).
        tolerance = 1e-4 * float(expected.abs().max()) + 1e-4 * expected.abs()
        rows_equal = ((same - expected).abs() <= tolerance).all(-1).flatten()
        assert int(rows_equal.sum()) >= rows_equal.numel() - 2, f"{int((~rows_equal).sum())} rows differ"
        assert _kl(expected, same) <= 5e-5
        ours.setup_caches(batch_size=1, max_seq_len=48)
        steps = [ours(tokens[:1, i:i + 1], input_pos=torch.tensor([i])) for i in range(6)]
    decoded = torch.cat(steps, dim=1)
    steps_equal = torch.isclose(decoded, same[:1, :6], rtol=1e-4, atol=1e-4).all(-1).flatten()
    assert int(steps_equal.sum()) >= 5 and _kl(same[:1, :6], decoded) <= 5e-5  # int8 rounding edges, as above
    ours.clear_caches()
    floats = dequantize_model(ours)
    wq = floats.layers[0].attention.wqkv.weight[:256]
    assert torch.equal(wq, reference.layers[0].attention.wq.weight)


def test_repack_for_inference_without_kernels_changes_nothing():
    data = torch.from_numpy(quantize(_weights(16, 256), "Q4_0"))
    layer = GGMLLinear(data, "Q4_0", 256, use_kernel=False)
    model = torch.nn.Sequential(layer)
    assert repack_for_inference(model) == 0 and not layer.repacked
    assert layer.kernel_weights[0][0] is data
