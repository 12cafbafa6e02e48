"""The KV cache: one set-up for plain, fused and quantized-GGUF models, views and growth that keep entries,
a cache that grows during generation giving the same greedy output as a preallocated one, the int8 cache
close to the float one at about half the bytes, and exact logits at late positions (Llama 3.1 / 3.2 RoPE
scaling, against HF transformers) without a context-sized cache."""

import copy

import pytest
import torch
import torch.nn.functional as F

from llama3.inference.engine import Engine
from llama3.inference.fast import fuse_projections
from llama3.inference.generate import Generator
from llama3.inference.sampling import GREEDY, SamplingParams
from llama3.model import KVCache
from tests.conftest import hf_model_from, random_model, tiny_args


def _peaked(model):
    """Logits far from ties, so greedy choices do not flip on rounding."""
    with torch.no_grad():
        model.output.weight.mul_(8.0)
    return model


def _sharp(model):
    """Larger q and k, so attention scores (and their dependence on RoPE angles) are far from uniform."""
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(4.0)
            layer.attention.wk.weight.mul_(4.0)
    return model


def _kl(p_logits, q_logits) -> float:
    p, q = F.log_softmax(p_logits.double(), -1), F.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _decode_logits(model, tokens, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then one token at a time; the logits of every position (B, T, V)."""
    with torch.no_grad():
        steps = [model(tokens[:, :prefill], input_pos=torch.arange(prefill))]
        for t in range(prefill, tokens.shape[1]):
            steps.append(model(tokens[:, t:t + 1], input_pos=torch.tensor([t])))
    return torch.cat(steps, dim=1)


def test_fused_model_runs_the_same_attention_and_cache():
    """Fusion is a state change of the same modules: the set-up sizes the cache from `wqkv`, and decode
    through it equals the unfused model's full forward."""
    model = random_model(tiny_args("gqa"), seed=4)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(tokens)
    fuse_projections(model)
    attn = model.layers[0].attention
    assert attn.wqkv is not None and not hasattr(attn, "wq") and model.layers[0].feed_forward.w13 is not None
    model.setup_caches(batch_size=2, max_seq_len=16)
    assert attn.kv_cache.k.shape == (2, 2, 16, 16)  # 2 kv heads of 16
    torch.testing.assert_close(_decode_logits(model, tokens, 5), full, atol=1e-5, rtol=1e-5)


def test_view_writes_into_the_pool_and_grow_keeps_entries():
    pool = KVCache.allocate(4, 2, 8, 16, torch.float32)
    window = pool.view(slice(1, 3), 4)
    k = torch.randn(2, 1, 2, 16)
    window.update(torch.tensor([[3], [3]]), k, k)
    assert torch.equal(pool.k[1:3, :, 3], k[:, 0])  # written through the view
    pool.grow(32)
    assert pool.length == 32 and torch.equal(pool.k[1:3, :, 3], k[:, 0])
    assert pool.k[:, :, 8:].abs().sum() == 0


@pytest.mark.parametrize("kv_cache", [None, "int8"])
def test_grown_cache_gives_the_preallocated_output(kv_cache):
    """A cache that starts at 32 positions (prompt + one 16-token bucket) and doubles twice while decoding
    gives exactly the tokens of one allocated at 128 up front: greedy, and sampled with a seed (the sampled
    tokens wander, so every cache entry written before a growth is read after it)."""
    model = _peaked(random_model(tiny_args("gqa", max_seq_len=256), seed=5))
    prompts = [[3, 14, 15, 92, 65], [35, 89, 79]]
    outputs = {}
    for bucket in (16, 128):
        generator = Generator(model, _NoText(), cache_bucket=bucket, kv_cache=kv_cache)
        for name, sampling in (("greedy", GREEDY), ("sampled", SamplingParams(temperature=1.0, top_p=1.0, seed=3))):
            model.clear_caches()
            results = generator.generate(prompts, max_new_tokens=100, sampling=sampling, stop_ids=[])
            outputs[bucket, name] = [r.token_ids for r in results]
            assert model.cache_len == 128  # grown: 32 -> 64 -> 128; preallocated: 128
    assert outputs[16, "greedy"] == outputs[128, "greedy"]
    assert outputs[16, "sampled"] == outputs[128, "sampled"]
    assert len(set(outputs[16, "sampled"][0])) > 20


@pytest.mark.parametrize("kv_cache", [None, "int8"])
def test_engine_pool_grows_and_matches_generate(kv_cache):
    """The engine's pool starts at 512 positions per slot and doubles when a 500-token prompt's reply
    passes it; the tokens are those of plain generation with the same kind of cache."""
    model = _peaked(random_model(tiny_args("gqa", max_seq_len=1024), seed=8))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (500, 20)]
    reference = Generator(copy.deepcopy(model), _NoText(), kv_cache=kv_cache)
    expected = [r.token_ids for r in reference.generate(prompts, max_new_tokens=30, sampling=GREEDY, stop_ids=[])]
    engine = Engine(model, num_slots=2, kv_cache=kv_cache).start()
    try:
        start_bytes = engine.cache_bytes()
        assert [engine.generate(p, 30) for p in prompts] == expected
        assert engine.cache_bytes() == 2 * start_bytes == engine.snapshot()["kv_cache_bytes"]
    finally:
        engine.stop()


def test_int8_cache_is_close_to_the_float_cache_at_about_half_the_bytes():
    """int8 entries with a scale per head and position: decode logits stay within KL 1e-4 (and 2% of the
    logit range) of the bf16-sized float cache's; the bytes are (Dh + 4) / (2·Dh) of a bf16 cache."""
    args = tiny_args("gqa", dim=256, n_heads=2, n_kv_heads=1)  # head_dim 128, as Llama 3's
    model = random_model(args, seed=6)
    tokens = torch.randint(0, 256, (2, 40))
    model.setup_caches(2, 64)
    reference = _decode_logits(model, tokens, 8)
    model.setup_caches(2, 64, quantize="int8")
    quantized = _decode_logits(model, tokens, 8)
    assert _kl(reference, quantized) <= 1e-4
    assert (quantized - reference).abs().max() <= 0.02 * (reference.max() - reference.min())
    assert not torch.equal(quantized, reference)  # the int8 path did run
    int8_bytes = model.cache_bytes()
    model.setup_caches(2, 64, dtype=torch.bfloat16)
    assert int8_bytes == model.cache_bytes() * (128 + 4) // (2 * 128)
    with pytest.raises(ValueError, match="int8"):
        model.setup_caches(2, 64, quantize="int4")


@pytest.mark.parametrize("name,factor,start", [("rope31", 8.0, 100_000), ("rope32", 32.0, 126_000)])
def test_late_positions_equal_hf(name, factor, start):
    """Llama 3.1 (factor 8) and 3.2 (factor 32) RoPE scaling past 100K: three tokens at positions 0-2, then
    seven at `start`... (prefilled, then decoded one by one) give HF's logits for the same position ids, so
    queries ~100K positions after their keys are exact. The context is 128K; the cache holds only the
    positions the sequence reaches (slot = position), grown from 256, not a context-sized table."""
    args = tiny_args(name, rope_scaling_factor=factor, rope_original_max_seq_len=8192, max_seq_len=131072)
    model = _sharp(random_model(args, seed=7))
    hf = hf_model_from(model)
    tokens = torch.randint(0, 256, (1, 10))
    positions = torch.cat([torch.arange(3), torch.arange(start, start + 7)]).unsqueeze(0)  # (1, 10)
    with torch.no_grad():
        ref = hf(tokens, position_ids=positions).logits.float()
        model.setup_caches(1, 256)
        model.grow_caches(start + 7)
        assert model.cache_len == start + 7 < args.max_seq_len
        # Slots 3 .. start-1 were never written (no 100K-token prompt here): each query sees slots 0-2 and
        # those from `start` to its own position, the sequence HF sees.
        slots = torch.arange(model.cache_len)
        visible = ((slots < 3) | (slots >= start)) & (slots <= positions[0].view(-1, 1))  # (10, S)
        steps = [model(tokens[:, :5], input_pos=positions[:, :5], mask=visible[None, None, :5])]
        for t in range(5, 10):
            steps.append(model(tokens[:, t:t + 1], input_pos=positions[:, t:t + 1], mask=visible[None, None, t:t + 1]))
    ours = torch.cat(steps, dim=1)
    assert (ours - ref).abs().max().item() <= 1e-4
    model.clear_caches()
    with torch.no_grad():  # the scaling matters at these distances: unscaled RoPE gives other logits
        plain = _sharp(random_model(args.replace(use_scaled_rope=False), seed=7))
        assert (plain(tokens, input_pos=positions) - ref).abs().max().item() > 1e-2


class _NoText:
    """Just enough tokenizer for Generator on token-id prompts."""

    stop_tokens: tuple = ()

    def stream_decoder(self):
        return _NoDecoder()


class _NoDecoder:
    def feed(self, token: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_fresh_prompt_runs_causal_without_a_mask_and_equals_the_masked_forward(quantize):
    """Positions 0..T-1 into an empty cache take SDPA's causal path (no mask, the first T slots); the
    logits equal those of the same prompt with the explicit mask the model builds otherwise, and with no cache."""
    model = random_model(tiny_args("gqa")).eval()
    tokens = torch.randint(0, model.args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(7)
    assert model._fresh_prompt(positions.expand(2, 7)) and not model._fresh_prompt(positions[None, 1:])
    with torch.no_grad():
        plain = model(tokens)
        model.setup_caches(2, 16, quantize=quantize)
        fresh = model(tokens, input_pos=positions)
        model.setup_caches(2, 16, quantize=quantize)
        mask = (torch.arange(16).view(1, 1, 1, -1) <= positions.view(1, 1, 7, 1))
        masked = model(tokens, input_pos=positions, mask=mask)
        model.clear_caches()
    torch.testing.assert_close(fresh, masked, rtol=1e-5, atol=1e-5)
    if quantize is None:  # an int8 cache rounds the keys and values the prompt attends to
        torch.testing.assert_close(fresh, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_long_prompt_prefilled_in_chunks_equals_one_pass(quantize):
    """Prompts longer than `prefill_chunk` run chunk by chunk through the cache: the last-token logits of
    rows of different lengths (their last columns in different chunks) and the decode step after them
    equal a single pass."""
    model = random_model(tiny_args("gqa")).eval()
    tokens = torch.randint(0, model.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(8))
    lengths = torch.tensor([9, 4])

    def run(chunk):
        gen = Generator(model, None, cache_bucket=8, kv_cache=quantize, prefill_chunk=chunk)
        gen.prepare_cache(2, 12)
        first = gen.prefill(tokens, torch.arange(9).expand(2, 9), lengths - 1)
        pos = lengths.view(2, 1)
        return first, gen.decode_step(first.argmax(-1).view(2, 1), pos)

    one_pass, chunked = run(512), run(3)
    for a, b in zip(one_pass, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prefill_chunk must be at least 1"):
        Generator(model, None, prefill_chunk=0)


def test_cache_formats_and_the_quantized_gguf_default_of_f16(tmp_path):
    """A quantized GGUF model (f32 activations) keeps an f16 cache by default, half the bytes of an f32 one,
    with decode logits within KL 1e-4 of the f32 cache's; `kv_cache` picks any float format or int8; an unknown
    format is refused by the generator and the engine."""
    import llama3
    from llama3.inference.attention import kv_cache_layout
    from tests.test_checkpoint_hf import byte_tokenizer
    from tests.test_gguf_quants import _model

    path = llama3.save(_model(), byte_tokenizer(), tmp_path / "m.gguf", format="gguf", dtype="q4_0")
    model, tokenizer = llama3.load(path)
    assert kv_cache_layout(model, None) == (torch.float16, None)
    assert kv_cache_layout(random_model(tiny_args("gqa")), None) == (None, None)  # a float model: its own dtype
    assert kv_cache_layout(model, "bf16") == (torch.bfloat16, None) and kv_cache_layout(model, "int8") == (None, "int8")
    tokens = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    logits, sizes = {}, {}
    for name in ("f32", "f16"):
        dtype, _ = kv_cache_layout(model, name)
        model.setup_caches(1, 32, dtype)
        logits[name], sizes[name] = _decode_logits(model, tokens, 4), model.cache_bytes()
    assert _kl(logits["f32"], logits["f16"]) <= 1e-4 and not torch.equal(logits["f32"], logits["f16"])
    assert sizes["f16"] * 2 == sizes["f32"]
    for kv_cache, dtype in ((None, torch.float16), ("f32", torch.float32), ("bf16", torch.bfloat16)):
        model.clear_caches()
        Generator(model, tokenizer, kv_cache=kv_cache).generate([[1, 2, 3]], max_new_tokens=2, sampling=GREEDY)
        assert model.layers[0].attention.kv_cache.k.dtype == dtype
    with pytest.raises(ValueError, match="f32, f16, bf16, int8"):
        Generator(model, tokenizer, kv_cache="fp8")
    with pytest.raises(ValueError, match="f32, f16, bf16, int8"):
        Engine(model, kv_cache="int4")
