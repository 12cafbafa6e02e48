"""The model against HF transformers' LlamaForCausalLM, and its KV cache against the full forward."""

import pytest
import torch
import torch.nn.functional as F

from llama3.model import Transformer, precompute_rope
from tests.conftest import TINY_CONFIGS, hf_model_from, random_model, tiny_args


def _kl(p_logits, q_logits):
    # in float64: fp32 log-softmax noise alone is ~1e-9
    p_logits, q_logits = p_logits.double(), q_logits.double()
    return F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), log_target=True,
                    reduction="batchmean").item()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_logits_equal_hf_llama(name):
    args = tiny_args(name)
    model = random_model(args, seed=1)
    hf = hf_model_from(model)
    torch.manual_seed(0)
    T = 100 if args.use_scaled_rope else 24  # long enough to reach the scaled low-frequency band
    tokens = torch.randint(0, args.vocab_size, (2, T))
    with torch.no_grad():
        ours = model(tokens)
        ref = hf(tokens).logits.float()
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-5
    assert _kl(ref.view(-1, args.vocab_size), ours.view(-1, args.vocab_size)) <= 1e-9


def test_missing_qk_permutation_is_detected():
    """Without the permutation the logits differ measurably: the parity test above can fail."""
    from transformers import LlamaConfig, LlamaForCausalLM

    args = tiny_args("gqa")
    model = random_model(args, seed=2)
    cfg = args.to_hf_config(torch_dtype="float32", bos_token_id=0, eos_token_id=1)
    cfg.pop("architectures")
    hf = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    from llama3.checkpoint.keymap import meta_to_hf_key

    hf.load_state_dict({meta_to_hf_key(k): v for k, v in model.state_dict().items()}, strict=False)
    tokens = torch.randint(0, args.vocab_size, (1, 16))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() > 1e-4


def test_rope_scaling_changes_only_low_frequencies():
    plain = tiny_args("gqa", max_seq_len=64)
    scaled = plain.replace(use_scaled_rope=True, rope_scaling_factor=8.0, rope_original_max_seq_len=32)
    a, b = precompute_rope(plain, 64), precompute_rope(scaled, 64)
    assert torch.equal(a[:, 0], b[:, 0])  # highest frequency untouched
    assert not torch.allclose(a[:, -1], b[:, -1])  # lowest frequency divided by the factor


@pytest.mark.parametrize("name", ["gqa", "mqa", "tied", "rope31"])
def test_kv_cache_decode_equals_full_forward(name):
    args = tiny_args(name)
    model = random_model(args, seed=3)
    torch.manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(batch_size=2, max_seq_len=32)
        prefill = model(tokens[:, :8], input_pos=torch.arange(8))
        steps = [prefill]
        for t in range(8, 20):
            steps.append(model(tokens[:, t:t + 1], input_pos=torch.tensor([t])))
        model.clear_caches()
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() <= 1e-5
    assert torch.equal(cached.argmax(-1), full.argmax(-1))


def test_kv_cache_rows_at_different_positions():
    """Each row writes and attends at its own positions: a ragged batch equals each row alone."""
    args = tiny_args("gqa")
    model = random_model(args, seed=4)
    torch.manual_seed(2)
    a, b = torch.randint(0, 256, (1, 10)), torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        ref_a, ref_b = model(a)[:, -1], model(b)[:, -1]
        model.setup_caches(batch_size=2, max_seq_len=16)
        batch = torch.zeros(2, 10, dtype=torch.long)
        batch[0], batch[1, :6] = a[0], b[0]
        logits = model(batch, input_pos=torch.arange(10).expand(2, 10))
        assert torch.allclose(logits[0, -1], ref_a[0], atol=1e-5)
        assert torch.allclose(logits[1, 5], ref_b[0], atol=1e-5)
        # next token for row b lands at position 6, overwriting its padding
        nxt = torch.tensor([[1], [2]])
        step = model(nxt, input_pos=torch.tensor([[10], [6]]))
        model.clear_caches()
        full_b = model(torch.cat([b, torch.tensor([[2]])], dim=1))[:, -1]
    assert torch.allclose(step[1, -1], full_b[0], atol=1e-5)


def test_document_mask_isolates_packed_documents():
    args = tiny_args("gqa")
    model = random_model(args, seed=5)
    torch.manual_seed(3)
    doc1, doc2 = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 9))
    packed = torch.cat([doc1, doc2], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        out = model(packed, document_ids=doc_ids)
        alone1 = model(doc1)
        # positions keep counting across the pack, so compare doc2 with the same positions
        alone2 = model(doc2, input_pos=torch.arange(7, 16))
        leaky = model(packed)
    assert torch.allclose(out[:, :7], alone1, atol=1e-5)
    assert torch.allclose(out[:, 7:], alone2, atol=1e-5)
    assert not torch.allclose(leaky[:, 7:], alone2, atol=1e-3)


def test_meta_device_construction_allocates_nothing_then_inits():
    args = tiny_args("tied")
    with torch.device("meta"):
        model = Transformer(args)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()


def test_init_weights_scales():
    from llama3.config import preset

    model = Transformer(preset("debug", vocab_size=512))
    model.init_weights()
    wo0 = model.layers[0].attention.wo.weight.std().item()
    wo1 = model.layers[1].attention.wo.weight.std().item()
    assert wo1 < wo0 < 0.02  # depth-scaled residual projections
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_bf16_forward_keeps_fp32_logits():
    model = random_model(tiny_args("gqa"), dtype=torch.bfloat16)
    out = model(torch.randint(0, 256, (1, 8)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_on_meta_builds_shapes_only_and_restores_the_initializers():
    """Loads start from `Transformer.on_meta`: meta tensors of the right shapes, no initializer run, and
    torch's initializers back in place afterwards (they are swapped out only while it builds)."""
    from torch import nn

    before = (nn.init.uniform_, nn.init.normal_, nn.init.kaiming_uniform_)
    args = tiny_args("gqa")
    model = Transformer.on_meta(args)
    assert (nn.init.uniform_, nn.init.normal_, nn.init.kaiming_uniform_) == before
    assert all(p.is_meta for p in model.parameters())
    assert model.rope_cache.is_meta and tuple(model.rope_cache.shape) == (args.max_seq_len, args.head_dim // 2, 2)
    real = random_model(args, seed=0)
    model.load_state_dict(real.state_dict(), assign=True)
    model.init_buffers()
    tokens = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model(tokens), real(tokens), rtol=0, atol=0)
