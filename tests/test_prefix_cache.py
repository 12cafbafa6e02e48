"""Automatic prefix caching: the block store alone, and the engine reusing prompt prefixes with the same
greedy tokens and log-probabilities, bit for bit, as a full prefill."""

from __future__ import annotations

import pytest
import torch

from llama3.inference.engine import Engine, EngineRequest, TokenEvent
from llama3.inference.fast import fuse_projections
from llama3.inference.prefix_cache import PrefixCache, block_bytes
from llama3.serve.metrics import HttpCounters, render_metrics
from tests.conftest import at_threads, random_model, tiny_args

pytestmark = pytest.mark.timeout(180)

SYSTEM = tuple(range(200, 300))  # a shared "system prompt" of 100 tokens


def layers(num_layers=2, rows=2, seq=64):
    """Per-layer (k, v) caches filled with distinct numbers."""
    out = []
    for i in range(num_layers):
        k = torch.arange(rows * 2 * seq * 4, dtype=torch.float32).view(rows, 2, seq, 4) + 1000 * i
        out.append((k, -k))
    return out


def test_lookup_finds_the_longest_stored_prefix_and_load_copies_it():
    source = layers()
    cache = PrefixCache(4, capacity_bytes=10 * block_bytes(source, 4), bytes_per_block=block_bytes(source, 4))
    prompt = list(range(10, 30))
    assert cache.store(prompt, 11, source, row=1) == 2  # full blocks only: tokens 0..7
    assert cache.lookup(prompt, 20) == cache.lookup(prompt[:8] + [99] * 12, 20)  # the same two blocks
    assert len(cache.lookup(prompt, 20)) == 2
    assert len(cache.lookup(prompt, 7)) == 1  # never more than asked for
    assert cache.lookup([10, 11, 12, 99] + prompt[4:], 20) == []  # block 2's tokens agree, not its prefix
    assert cache.lookup(prompt, 20, namespace="adapter") == []  # another namespace shares nothing
    target = layers()
    for k, v in target:
        k.zero_(), v.zero_()
    assert cache.load(cache.lookup(prompt, 20), target, row=0) == 8
    for (k, v), (sk, sv) in zip(target, source):
        assert torch.equal(k[0, :, :8], sk[1, :, :8]) and torch.equal(v[0, :, :8], sv[1, :, :8])
        assert not k[0, :, 8:].any()


def test_lru_eviction_keeps_the_budget_and_drops_leaves_before_their_parents():
    source = layers()
    per_block = block_bytes(source, 4)
    cache = PrefixCache(4, capacity_bytes=3 * per_block + per_block // 2, bytes_per_block=per_block)
    assert cache.capacity_blocks == 3
    a, b = list(range(8)), list(range(100, 108))
    cache.store(a, 8, source, row=0)
    cache.store(b, 8, source, row=0)  # one of a's blocks must go: its leaf, not its root
    assert cache.num_blocks == 3 and cache.num_bytes == 3 * per_block
    assert len(cache.lookup(a, 8)) == 1
    assert len(cache.lookup(b, 8)) == 2


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="budget"):
        PrefixCache(16, capacity_bytes=-1, bytes_per_block=1)
    model = random_model(tiny_args("gqa", vocab_size=512, max_seq_len=256))
    with pytest.raises(ValueError, match="multiple of the block size"):
        Engine(model, prefill_chunk=40, prefix_cache_bytes=1 << 20, prefix_block_size=16)


def greedy(engine: Engine, prompt: tuple[int, ...], num_new: int = 8) -> list[tuple[int, float, list]]:
    events = [e for e in engine.submit(EngineRequest(prompt, num_new, num_logprobs=3)) if isinstance(e, TokenEvent)]
    return [(e.token_id, e.logprob, e.top_logprobs) for e in events]


def cold_then_warm(model, prompts, repeats=(), **engine_kwargs):
    """Greedy results of `prompts` on an engine without a prefix cache, then of `prompts` + `repeats` on
    one with it; returns (cold results, warm results, the warm engine's stats)."""
    kwargs = dict(num_slots=2, prefill_chunk=64, **engine_kwargs)
    cold = Engine(model, **kwargs).start()
    try:
        expected = [greedy(cold, p) for p in prompts]
    finally:
        cold.stop()
    warm = Engine(model, prefix_cache_bytes=1 << 22, **kwargs).start()
    try:
        got = [greedy(warm, p) for p in [*prompts, *repeats]]
        stats = dict(warm.stats)
    finally:
        warm.stop()
    return expected, got, stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_invariant", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_cache_hit_gives_the_same_tokens_and_logprobs_as_a_full_prefill(dtype, batch_invariant, threads):
    """Also on 2 threads, where the GEMM's rows may round differently at different row counts: the engine
    chunks prompts alike with and without the cache."""
    model = fuse_projections(random_model(tiny_args("gqa", vocab_size=512, max_seq_len=512), seed=3, dtype=dtype))
    first = SYSTEM + tuple(range(5, 40))
    turns = [first, SYSTEM + tuple(range(40, 77)),  # same system prompt, other question
             first + (7, 8, 9) + tuple(range(300, 331))]  # the next turn of the first chat
    # the repeat of turn 3: now the whole of it but the last block is cached
    expected, (*got, again), stats = at_threads(threads, cold_then_warm, model, turns, turns[2:],
                                                batch_invariant=batch_invariant)
    assert got == expected and again == expected[2]  # tokens, logprobs and top-3, bit for bit
    assert stats["prefix_cache_query_tokens_total"] == sum(map(len, turns)) + len(turns[2])
    # turn 2 reuses the 96 tokens of SYSTEM's whole blocks; turn 3 all of turn 1's full blocks; the repeat
    # everything but at least one block.
    assert stats["prefix_cache_hit_tokens_total"] == 96 + 128 + (len(turns[2]) - 16) // 16 * 16


def test_prompt_logprobs_requests_prefill_everything_and_metrics_show_the_cache():
    model = random_model(tiny_args("gqa", vocab_size=512, max_seq_len=256), seed=4)
    engine = Engine(model, num_slots=2, prefill_chunk=64, prefix_cache_bytes=1 << 22).start()
    try:
        greedy(engine, SYSTEM + (1, 2, 3))
        list(engine.submit(EngineRequest(SYSTEM + (4, 5), 1, prompt_logprobs=True)))  # may not reuse: needs all
        greedy(engine, SYSTEM + (6,))
        text = render_metrics(engine.snapshot(), HttpCounters(), "tiny")
    finally:
        engine.stop()
    assert "llama3_prefix_cache_query_tokens_total 204" in text
    assert "llama3_prefix_cache_hit_tokens_total 80" in text  # the third: 101 tokens, 16 kept back
    assert f"llama3_prefix_cache_hit_rate {80 / 204:.6f}" in text
    assert "llama3_prefix_cache_blocks 6\n" in text  # SYSTEM's 6 full blocks, stored once
    assert "llama3_prefix_cache_capacity_blocks" in text and "llama3_prefix_cache_bytes" in text


def test_an_int8_kv_cache_reuses_its_scales_with_the_blocks():
    """With `kv_cache="int8"` a block is the int8 entries and their per-position scales: a hit must give the
    int8 cache's own cold result bit for bit (copying the entries without their scales would not)."""
    model = fuse_projections(random_model(tiny_args("gqa", vocab_size=512, max_seq_len=512), seed=5))
    prompts = [SYSTEM + tuple(range(5, 30)), SYSTEM + tuple(range(30, 61))]
    expected, got, stats = cold_then_warm(model, prompts, kv_cache="int8")
    assert stats["prefix_cache_hit_tokens_total"] == 96  # the second prompt took SYSTEM's six full blocks from the store
    assert got == expected
