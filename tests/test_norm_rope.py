"""Inference's RMSNorm and RoPE as one operator each (`llama3::rms_norm`, `llama3::rope_`,
llama3/kernels/norm_rope.cpp) against the model's PyTorch forms, at every instruction-set level this CPU runs,
and installed in a model by `use_decode_kernels`."""

from __future__ import annotations

import pytest
import torch

from llama3 import kernels
from llama3.inference import attention
from llama3.inference.generate import Generator
from llama3.model import RMSNorm, apply_rope, rms_norm

from conftest import random_model, tiny_args

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.available(), kernels.why_unavailable()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2048), (3, 7, 64), (300, 200), (5, 1, 17)])
def test_rms_norm_equals_the_pytorch_form(ops, dtype, shape):
    """Equal up to the order of the sum of squares: float32 within a few ulps, and the 16-bit results (rounded
    twice, like the PyTorch form's) the same values but for a rare last-bit tie."""
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    weight = torch.randn(shape[-1], generator=g).to(dtype)
    reference = rms_norm(x, weight, 1e-5)
    out = ops.rms_norm(x, weight, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, reference, rtol=4e-7, atol=1e-6)
    else:
        differ = (out != reference).float().mean().item()
        assert differ <= 0.01, f"{differ:.1%} of the values differ"
        torch.testing.assert_close(out.float(), reference.float(), rtol=1e-2, atol=1e-2)
    # a strided input is read as its values
    wide = torch.cat([x, x], dim=-1)[..., : shape[-1]]
    assert torch.equal(ops.rms_norm(wide, weight, 1e-5), out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope_dtype", [torch.float32, torch.bfloat16])  # a model cast to bf16 holds a bf16 table
@pytest.mark.parametrize("table", ["positions", "per_sequence", "one_sequence"])
def test_rope_in_place_equals_the_pytorch_form_bit_for_bit(ops, dtype, rope_dtype, table):
    """q and k as views into a fused projection's output (strided heads): rotated in place, equal to
    `apply_rope` bit for bit (each product rounded before the sum), the v part untouched."""
    B, T, H, K, Dh = 2, 5, 4, 2, 64
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, T, (H + 2 * K) * Dh, generator=g).to(dtype)
    rope = {"positions": torch.randn(T, Dh // 2, 2, generator=g),
            "per_sequence": torch.randn(B, T, Dh // 2, 2, generator=g),
            "one_sequence": torch.randn(1, T, Dh // 2, 2, generator=g)}[table].to(rope_dtype)
    before = qkv.clone()
    q, k, v = (part.view(B, T, -1, Dh) for part in qkv.split([H * Dh, K * Dh, K * Dh], dim=-1))
    expected_q, expected_k = apply_rope(q, rope), apply_rope(k, rope)
    assert ops.rope_(q, rope) is q
    ops.rope_(k, rope)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(qkv[..., (H + K) * Dh:], before[..., (H + K) * Dh:])


def test_bad_inputs_are_refused_with_what_was_wrong():
    with pytest.raises(RuntimeError, match="weight must be \\(D,\\)"):
        torch.ops.llama3.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.llama3.rms_norm(torch.randn(2, 8), torch.randn(8).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.llama3.rms_norm(torch.randn(2, 8).double(), torch.randn(8).double(), 1e-5)
    with pytest.raises(RuntimeError, match="even head_dim"):
        torch.ops.llama3.rope_(torch.randn(1, 2, 3, 5), torch.randn(2, 2, 2))
    with pytest.raises(RuntimeError, match="rope must be a contiguous \\(T, head_dim/2, 2\\)"):
        torch.ops.llama3.rope_(torch.randn(1, 2, 3, 8), torch.randn(3, 4, 2))
    with pytest.raises(RuntimeError, match="rope must be float32, bfloat16 or float16"):
        torch.ops.llama3.rope_(torch.randn(1, 2, 3, 8), torch.randn(2, 4, 2).double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_installed_kernels_give_the_pytorch_forms_tokens_and_step_through_the_operators(monkeypatch, dtype):
    """`use_decode_kernels` puts every RMSNorm and every attention layer's RoPE on the operators (counted),
    `enabled=False` takes them out again; greedy tokens equal and logits stay close either way, for a
    prompt and its decode steps; with a gradient asked for, the PyTorch forms run (autograd works)."""
    model = random_model(tiny_args("gqa", vocab_size=512, max_seq_len=64), seed=11, dtype=dtype).eval()
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    counts = {"rms_norm": 0, "rope_": 0}
    namespace = torch.ops.llama3

    class Counting:
        def __getattr__(self, name):
            real = getattr(namespace, name)
            if name in counts:
                return lambda *args: counts.__setitem__(name, counts[name] + 1) or real(*args)
            return real

    monkeypatch.setattr(attention.torch.ops, "llama3", Counting())
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))

    def run(on: bool):
        generator = Generator(model, None, cache_bucket=16)  # installs the kernels
        attention.use_decode_kernels(model, enabled=on)
        assert all((n.kernel is not None) == on for n in norms)
        generator.prepare_cache(1, 32)
        logits = [generator.prefill(prompt, torch.arange(9).view(1, 9), torch.tensor([8]))]
        tokens = []
        for t in range(6):
            tokens.append(int(logits[-1].argmax(-1)))
            logits.append(generator.decode_step(torch.tensor([[tokens[-1]]]), torch.tensor([[9 + t]])))
        return tokens, torch.stack([step.float() for step in logits])

    tokens_on, logits_on = run(True)
    layers = model.args.n_layers
    assert counts == {"rms_norm": 7 * (2 * layers + 1), "rope_": 7 * 2 * layers}  # the prompt and 6 steps
    tokens_off, logits_off = run(False)
    assert counts["rms_norm"] == 7 * (2 * layers + 1), "the PyTorch forms still called the operators"
    assert tokens_on == tokens_off
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(logits_on, logits_off, rtol=tolerance, atol=tolerance)

    attention.use_decode_kernels(model)
    model.clear_caches()
    with torch.enable_grad():
        loss = model(prompt).float().logsumexp(-1).sum()
        loss.backward()  # an in-place rotation or the kernels' outputs would have no gradient
    assert all(n.weight.grad is not None for n in norms)
    attention.use_decode_kernels(model, enabled=False)
