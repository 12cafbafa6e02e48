"""16-bit weights where they lie: `llama3::gemv_group` (bf16 and f16 weights side by side, no concatenated
copy) on every instruction-set level this CPU runs, against a float64 reference; `GemvGroupLinear` and f16
`GemvLinear` for decode rows and prompts; and `fuse_projections(group=True)`, which fuses a model's q/k/v
and gate/up without copying a weight and leaves its logits as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama3.inference.fast import fuse_projections, optimize_for_inference
from llama3.inference.gemv import PROMPT_ROWS, GemvGroupLinear, GemvLinear
from tests.conftest import at_threads, random_model, tiny_args

# (M, K, parts' N): one row and several (a second pass past 8), widths with and without a tail of the
# vector steps, parts that do not divide the thread split or the kernels' tiles of 2-4 weight rows
SHAPES = [(1, 64, (40, 8, 8)), (1, 576, (1000,)), (3, 100, (77, 5)), (9, 130, (129, 3, 64)), (2, 7, (3, 3)),
          (8, 2048, (64, 16, 16)), (12, 40, (3, 5, 2))]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,K,parts", SHAPES)
@pytest.mark.parametrize("w_dtype,x_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16),
                                             (torch.float16, torch.float32)])
def test_gemv_group_equals_float64_reference(ops, M, K, parts, threads, w_dtype, x_dtype):
    torch.manual_seed(M * 1000 + K)
    x = torch.randn(M, K).to(x_dtype)
    weights = [torch.randn(n, K).to(w_dtype) for n in parts]
    y = at_threads(threads, ops.gemv_group, x, weights)
    assert y.dtype == x_dtype and y.shape == (M, sum(parts))
    ref = x.double() @ torch.cat(weights).double().T
    # fp32 sums of exact products (f16 and bf16 widen exactly), then one rounding to x's dtype
    ulp = 2**-8 if x_dtype == torch.bfloat16 else 2**-23
    bound = ref.abs() * ulp + 1e-5 * K
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max()


def test_gemv_group_rejects_bad_inputs_with_clear_errors():
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="needs at least one weight"):
        torch.ops.llama3.gemv_group(x, [])
    with pytest.raises(RuntimeError, match="weights must be bfloat16 or float16"):
        torch.ops.llama3.gemv_group(x.float(), [torch.zeros(4, 8)])
    with pytest.raises(RuntimeError, match="all weights must have one dtype"):
        torch.ops.llama3.gemv_group(x, [torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.half)])
    with pytest.raises(RuntimeError, match="x has 8 columns but w has 6"):
        torch.ops.llama3.gemv_group(x, [torch.zeros(4, 8, dtype=torch.half), torch.zeros(4, 6, dtype=torch.half)])
    with pytest.raises(RuntimeError, match="bfloat16 weights need bfloat16 x"):
        torch.ops.llama3.gemv_group(x.float(), [torch.zeros(4, 8, dtype=torch.bfloat16)])


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, PROMPT_ROWS + 3])  # decode (kernel), a few rows, a prompt (slices)
def test_group_linear_equals_its_parts(w_dtype, rows):
    torch.manual_seed(rows)
    weights = [torch.nn.Parameter(torch.randn(n, 96).to(w_dtype), requires_grad=False) for n in (64, 16, 16)]
    layer = GemvGroupLinear(weights)
    assert [w.data_ptr() for w in layer.weights] == [w.data_ptr() for w in weights]  # not copied
    x = torch.randn(1, rows, 96).bfloat16()
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (1, rows, 96)
    ref = x.double() @ torch.cat(weights).double().T
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-3).all()


def test_f16_gemv_linear_decodes_and_prefills():
    torch.manual_seed(0)
    layer = GemvLinear(torch.nn.Parameter(torch.randn(80, 64).half(), requires_grad=False))
    for rows in (1, PROMPT_ROWS):
        x = torch.randn(rows, 64).bfloat16()
        with torch.no_grad():
            y = layer(x)
        ref = x.double() @ layer.weight.double().T
        assert y.dtype == torch.bfloat16 and ((y.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-3).all()


def test_group_linear_under_compile_equals_eager():
    torch.manual_seed(1)
    layer = GemvGroupLinear([torch.nn.Parameter(torch.randn(n, 64).bfloat16(), requires_grad=False)
                             for n in (32, 8, 8)])
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for x in (torch.randn(1, 1, 64).bfloat16(), torch.randn(1, 5, 64).bfloat16()):
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def _prefill_and_step(model, tokens):
    model.setup_caches(1, 16)
    with torch.no_grad():
        return [model(tokens[:, :8], input_pos=torch.arange(8)).float(),
                model(tokens[:, 8:], input_pos=torch.tensor([8])).float()]  # a prompt (F.linear), a decode step


def _assert_same_logits(out, ref):
    for a, b in zip(out, ref):
        cosine = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cosine > 0.999, cosine


TOKENS = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))


def test_grouped_fusion_copies_nothing_and_keeps_the_logits():
    model = random_model(tiny_args("gqa")).to(torch.bfloat16)
    layer = model.layers[0]
    pointers = [layer.attention.wq.weight.data_ptr(), layer.feed_forward.w1.weight.data_ptr()]
    fuse_projections(model, group=True)
    assert isinstance(layer.attention.wqkv, GemvGroupLinear) and isinstance(layer.feed_forward.w13, GemvGroupLinear)
    assert layer.attention.wqkv.weights[0].data_ptr() == pointers[0]
    assert layer.feed_forward.w13.weights[0].data_ptr() == pointers[1]
    _assert_same_logits(_prefill_and_step(model, TOKENS), _prefill_and_step(random_model(tiny_args("gqa")), TOKENS))


@pytest.mark.parametrize("config", ["gqa", "tied"])
def test_f16_model_runs_its_weights_as_stored(config):
    """An f16 model (a GGUF f16 file) keeps its projections in f16 where they are, its activations in bf16."""
    model = random_model(tiny_args(config)).to(torch.float16)
    layer = model.layers[1]
    pointers = [layer.attention.wk.weight.data_ptr(), layer.feed_forward.w2.weight.data_ptr()]
    optimize_for_inference(model)
    assert layer.attention.wqkv.weights[1].dtype == torch.float16
    assert layer.attention.wqkv.weights[1].data_ptr() == pointers[0]
    assert isinstance(layer.feed_forward.w2, GemvLinear) and layer.feed_forward.w2.weight.data_ptr() == pointers[1]
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 and layer.attention_norm.weight.dtype == torch.bfloat16
    out = _prefill_and_step(model, TOKENS)
    assert layer.attention.kv_cache.k.dtype == torch.bfloat16
    _assert_same_logits(out, _prefill_and_step(random_model(tiny_args(config)), TOKENS))


def test_optimize_for_inference_groups_weights_without_moving_them():
    model = random_model(tiny_args("gqa")).to(torch.bfloat16)
    pointer = model.layers[1].feed_forward.w3.weight.data_ptr()
    optimize_for_inference(model)
    assert model.layers[1].feed_forward.w13.weights[1].data_ptr() == pointer
