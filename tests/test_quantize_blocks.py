"""Runtime int8/int4 quantization stored as GGUF blocks (Q8_0 / Q4_1) on the block kernels, the route taken
on CPUs without byte dot-product instructions (`quantize.blocks_preferred`): the blocks hold the intended
values (checked with the gguf package's dequantization), the layers' products equal a float64 reference of
those values up to the int8 rounding of the activations, and a whole model stays close to its float logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama3 import kernels
from llama3.checkpoint.gguf_quants import dequantize
from llama3.inference.quantize import (Int4WeightOnlyLinear, Int8WeightOnlyLinear, q4_1_blocks, q8_0_blocks,
                                       quantize_model)

from conftest import random_model, tiny_args


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.available(), kernels.why_unavailable()


def test_q4_1_blocks_hold_the_int4_values_exactly():
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))
    codes, scale, low = Int4WeightOnlyLinear._codes(w, 32, fp16_params=True)
    values = (low + codes.view(24, 3, 32).float() * scale).reshape(24, 96)
    blocks = q4_1_blocks(codes, scale, low)
    assert blocks.shape == (24, 3 * 20) and blocks.dtype == torch.uint8
    np.testing.assert_array_equal(dequantize(blocks.numpy(), "Q4_1").reshape(24, 96), values.numpy())


def test_q8_0_blocks_are_within_half_a_step():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    w[3, :32] = 0  # an all-zero block: scale 0, codes 0
    blocks = q8_0_blocks(w)
    assert blocks.shape == (16, 2 * 34)
    decoded = torch.from_numpy(dequantize(blocks.numpy(), "Q8_0").reshape(16, 64))
    step = w.view(16, 2, 32).abs().amax(-1, keepdim=True) / 127
    assert ((decoded - w).view(16, 2, 32).abs() <= step / 2 * 1.01 + 1e-7).all()
    assert torch.equal(decoded[3, :32], torch.zeros(32))


def _reference(x: torch.Tensor, layer) -> torch.Tensor:
    """x · Wᵀ in float64 for the values the layer's blocks hold (decoded by the gguf package)."""
    kind = "Q8_0" if isinstance(layer, Int8WeightOnlyLinear) else "Q4_1"
    N, K = layer.out_features, layer.in_features
    if isinstance(layer, Int8WeightOnlyLinear):
        file_layout = q8_0_blocks(layer._source)
    else:
        file_layout = q4_1_blocks(*Int4WeightOnlyLinear._codes(layer._source, 32, fp16_params=True))
    w = torch.from_numpy(dequantize(file_layout.numpy(), kind).reshape(N, K)).double()
    return x.double() @ w.T


@pytest.mark.parametrize("cls", [Int8WeightOnlyLinear, Int4WeightOnlyLinear])
@pytest.mark.parametrize("rows", [1, 3, 9, 64])
def test_block_layers_equal_the_float64_product_of_their_values(cls, rows):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(40, 256, generator=g) / 16  # 40 rows: five groups of 8
    layer = cls(weight, blocks=True)
    layer._source = weight
    assert layer.blocks and layer.weight_blocks.dtype == torch.uint8
    if int(torch.ops.llama3.ggml_repack_block_bytes(layer.block_type & 255)):
        assert layer.block_type & 256 and layer.weight_blocks.shape[0] == 5  # the kernels' 8-row layout
    x = torch.randn(rows, 256, generator=g)
    out = layer(x)
    ref = _reference(x, layer)
    assert out.shape == (rows, 40) and out.dtype == torch.float32
    # the activations are rounded to int8 per block of 32, as llama.cpp's products do: ~1% of the sum's size
    scale = (x.double().abs() @ _reference(torch.eye(256), layer).abs()).clamp(min=1e-6)  # Σ |x| |w|
    assert ((out.double() - ref).abs() / scale).max() < 0.01
    assert cls(weight, blocks=False)(x).shape == out.shape  # the other route still there


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_model_on_block_layers_stays_close_to_its_float_logits(mode, monkeypatch):
    """quantize_model with the block route forced on (as on an AVX2 CPU without VNNI)."""
    from llama3.inference import quantize

    monkeypatch.setattr(quantize, "blocks_preferred", lambda *a: True)
    model = random_model(tiny_args("gqa", dim=128, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64))
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens)
        quantize_model(model, mode)
        logits = model(tokens)
    layers = [m for m in model.modules() if isinstance(m, (Int8WeightOnlyLinear, Int4WeightOnlyLinear))]
    assert layers and all(m.blocks for m in layers)
    p, q = F.log_softmax(reference.double(), -1), F.log_softmax(logits.double(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl < (1e-3 if mode == "int8" else 2e-2), kl
