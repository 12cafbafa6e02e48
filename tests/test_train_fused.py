"""The fused training kernels (llama3/kernels/train_ops.cpp via llama3.train.fused) against the plain torch
composition of llama3.model, forward and backward, in float64 (and bf16 where the kernels take it), and a
whole training step of a prepared model against an unprepared one."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from conftest import random_model

from llama3 import kernels
from llama3.config import ModelArgs
from llama3.model import apply_rope, precompute_rope, rms_norm
from llama3.train.config import TrainConfig
from llama3.train import fused, loss
from llama3.train.fused import (FusedAttention, FusedFeedForward, FusedRMSNorm, TiedEmbedding, fused_rms_norm,
                                fused_rope, fused_swiglu, prepare_for_training)
from llama3.train.loop import Runtime, build_model
from llama3.train.loss import causal_lm_loss


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    assert kernels.available(), kernels.why_unavailable()


def _grads(fn, *inputs):
    """fn's value and the gradients of sum(value * probe) with respect to each input (a fixed random probe,
    so every output element weighs differently)."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * probe).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("dim", [64, 67])  # 67: a remainder after the vector width
def test_rms_norm_forward_and_backward_equal_the_module_in_float64(dim):
    torch.manual_seed(0)
    x = torch.randn(3, 5, dim) * 3
    weight = torch.randn(dim)
    # RMSNorm's own computation (`model.rms_norm`, what its forward runs), the weight an input of the graph
    want, want_grads = _grads(lambda x64, w64: rms_norm(x64, w64, 1e-5), x.double(), weight.double())
    got, got_grads = _grads(lambda a, w: fused_rms_norm(a, w, 1e-5), x, weight)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_swiglu_forward_and_backward_equal_silu_times_up():
    torch.manual_seed(1)
    gate, up = torch.randn(4, 7, 99) * 4, torch.randn(4, 7, 99)
    want, want_grads = _grads(lambda g, u: F.silu(g) * u, gate.double(), up.double())
    got, got_grads = _grads(fused_swiglu, gate, up)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_swiglu_over_the_whole_range_of_gate_values():
    """The kernels' own exponential (a vectorized polynomial): silu(g) · u and its gradients stay within fp32
    rounding of the float64 values from where e^-g underflows to where it overflows, and beyond."""
    gate = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([-1e30, -88.7, -87.0, 0.0, 87.0, 88.8, 1e30])])
    up = torch.linspace(-3, 3, gate.numel())
    want, want_grads = _grads(lambda g, u: F.silu(g) * u, gate.double(), up.double())
    got, got_grads = _grads(fused_swiglu, gate, up)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-30)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-30)


def test_swiglu_in_bf16_is_the_fp32_value_rounded_once():
    torch.manual_seed(2)
    gate, up = (torch.randn(2, 3, 64) * 3).bfloat16(), torch.randn(2, 3, 64).bfloat16()
    got, (grad_gate, grad_up) = _grads(fused_swiglu, gate, up)
    assert got.dtype == grad_gate.dtype == grad_up.dtype == torch.bfloat16
    assert torch.equal(got, (F.silu(gate.float()) * up.float()).bfloat16())
    want, want_grads = _grads(lambda g, u: F.silu(g) * u, gate.double(), up.double())
    for g, w in zip((grad_gate, grad_up), want_grads):  # the probe's gradient rounded once to bf16
        torch.testing.assert_close(g.double(), w, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("batched_table", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_forward_and_backward_equal_apply_rope(batched_table, dtype):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, max_seq_len=16)
    table = precompute_rope(args, 16)  # (T, Dh/2, 2)
    positions = torch.tensor([[3, 4, 5, 6, 7, 8], [0, 1, 2, 0, 1, 2]])
    rope = table[positions] if batched_table else table[:6]
    x = torch.randn(2, 6, 3, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    got, (got_grad,) = _grads(lambda t: fused_rope(t, rope), x)
    assert got.dtype == dtype
    if dtype == torch.bfloat16:  # apply_rope computes in fp32 and rounds once, as the kernel does
        assert torch.equal(got, apply_rope(x, rope))
        return
    want, (want_grad,) = _grads(lambda t: apply_rope(t, rope.double()), x.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-6, atol=1e-6)


def _step_grads(model, batch):
    value = causal_lm_loss(model, batch)
    value.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return value.detach(), grads


@pytest.mark.parametrize("tied, packed", [(True, False), (False, True)])
def test_a_prepared_model_trains_like_the_plain_one(tied, packed, monkeypatch):
    """build_model's fused modules and tied-embedding gradient hand-over: the same loss and gradients as the
    model's own code, to fp32 rounding; without gradients (evaluation, generation) the very same logits."""
    taken = []

    def take(weight):
        taken.append(fused.take_dense_grad_slot(weight))
        return taken[-1]

    monkeypatch.setattr(loss, "take_dense_grad_slot", take)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=32,
                     tie_word_embeddings=tied)
    plain = random_model(args, seed=4).train()
    state = plain.state_dict()
    prepared = build_model(args, TrainConfig(), Runtime(device=torch.device("cpu")),
                           initialize=lambda m: m.load_state_dict(state)).train()
    assert isinstance(prepared.norm, FusedRMSNorm) and isinstance(prepared.layers[0].attention, FusedAttention)
    assert isinstance(prepared.layers[1].feed_forward, FusedFeedForward)
    assert isinstance(prepared.tok_embeddings, TiedEmbedding) == tied
    tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(5))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if packed:  # documents packed into rows: SDPA with the block-causal mask
        batch["document_ids"] = (torch.arange(16) >= torch.tensor([[5], [11]])).long()
    want_loss, want = _step_grads(plain, batch)
    taken.clear()
    got_loss, got = _step_grads(prepared, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == want.keys()
    # with tied weights the loss took the lookup's slot, and the lookup emptied it after adding its rows
    assert [slot is not None for slot in taken] == [tied]
    assert all(slot.grad is None for slot in taken if slot is not None)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        assert torch.equal(prepared(batch["inputs"]), plain(batch["inputs"]))


def test_a_loss_without_the_output_projection_gets_the_dense_embedding_gradient():
    """A tied lookup whose slot no loss took (this loss never uses the output projection) returns torch's
    dense gradient; micro-batches accumulate into `.grad` as before."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=32, max_seq_len=16,
                     tie_word_embeddings=True)
    model = prepare_for_training(random_model(args, seed=6), fuse=False, tied_embedding_grad=True)
    want_model = random_model(args, seed=6)
    assert isinstance(model.tok_embeddings, TiedEmbedding)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(7))
    for m in (model, want_model):
        for _ in range(2):
            m(tokens, return_hidden=True).square().sum().backward()
    torch.testing.assert_close(model.tok_embeddings.weight.grad, want_model.tok_embeddings.weight.grad)


def test_the_portable_level_gives_the_default_levels_numbers():
    """train_ops.cpp is plain C++ that the compiler vectorizes per level: the portable build (no vector
    flags) and the default one agree to fp32 rounding."""
    portable, default = kernels.ops("portable"), kernels.ops()
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(6, 67, generator=g), torch.randn(67, generator=g)
    gate, up = torch.randn(5, 33, generator=g), torch.randn(5, 33, generator=g)
    rope = torch.randn(6, 8, 2, generator=g)
    xr = torch.randn(6, 3, 16, generator=g)
    for name, args in [("train_rms_norm", (x, w, 1e-5)), ("train_rms_norm_backward", (x, x, w, x[:, 0].abs())),
                       ("train_swiglu", (gate, up)), ("train_swiglu_backward", (gate, gate, up)),
                       ("train_rope", (xr, rope, False)), ("train_rope", (xr, rope, True))]:
        got, want = getattr(portable, name)(*args), getattr(default, name)(*args)
        for a, b in zip(got if isinstance(got, tuple | list) else [got], want if isinstance(want, tuple | list) else [want]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
