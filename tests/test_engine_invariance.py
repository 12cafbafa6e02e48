"""Batch invariance: a request's greedy tokens and log-probabilities do not depend on what shares its batch
(other sequences decoding, a long prompt prefilling beside it, rows under a grammar or a logit bias)."""

from __future__ import annotations

import pytest

from llama3.inference.constraints import GrammarCompiler
from llama3.inference.engine import Engine, EngineRequest, TokenEvent
from llama3.inference.sampling import SamplingParams
from tests.conftest import random_model, tiny_args

pytestmark = pytest.mark.timeout(180)

PROMPT = (128000, 791, 3363, 315, 21362, 323, 4319, 4173, 374, 264)
NUM_NEW = 16


@pytest.fixture(scope="module")
def model(llama3_tokenizer):
    return random_model(tiny_args("gqa", vocab_size=llama3_tokenizer.n_words, max_seq_len=512), seed=11)


def run(engine: Engine, neighbours: list[EngineRequest]) -> list[tuple[int, float, list]]:
    """(token, logprob, top-3) of PROMPT's greedy continuation, submitted after `neighbours`."""
    others = [engine.submit(r) for r in neighbours]
    events = [e for e in engine.submit(EngineRequest(PROMPT, NUM_NEW, num_logprobs=3)) if isinstance(e, TokenEvent)]
    for handle in others:
        list(handle)
    return [(e.token_id, e.logprob, e.top_logprobs) for e in events]


def test_greedy_tokens_and_logprobs_do_not_depend_on_the_batch(model, llama3_tokenizer):
    tok = llama3_tokenizer
    compiler = GrammarCompiler(tok, tok.n_words, tok.stop_tokens)
    long_prompt = tuple(range(1000, 1300))  # prefills in several chunks while the others decode
    crowds = [
        [],
        [EngineRequest(PROMPT[:5], 40, SamplingParams(temperature=1.0, seed=1))],
        [EngineRequest(PROMPT, 30, constraint=compiler.regex("[a-z ]{5,200}")),
         EngineRequest(long_prompt, 20, SamplingParams(temperature=0.7, seed=2), logit_bias={13: 50.0}),
         EngineRequest(PROMPT[:3], 25, constraint=compiler.json_object(), num_logprobs=2)],
    ]
    engine = Engine(model, tok, num_slots=6, prefill_chunk=64, batch_invariant=True).start()
    try:
        results = [run(engine, crowd) for crowd in crowds]
    finally:
        engine.stop()
    alone = results[0]
    assert len(alone) == NUM_NEW
    for crowded in results[1:]:
        assert [t for t, _, _ in crowded] == [t for t, _, _ in alone]
        assert [lp for _, lp, _ in crowded] == [lp for _, lp, _ in alone]  # bit for bit
        assert [top for _, _, top in crowded] == [top for _, _, top in alone]


def test_invariance_holds_with_prefix_cache_hits_and_lora_rows(model, llama3_tokenizer, tmp_path):
    """The same request cold and as a prefix-cache hit, alone and beside LoRA rows, a constrained row and a
    long prompt prefilling: the same tokens and log-probabilities, bit for bit."""
    import copy

    import torch

    from llama3.train.lora import LoRAConfig, apply_lora, save_peft_adapter

    adapted = apply_lora(copy.deepcopy(model), LoRAConfig(rank=2, alpha=4, targets=("wq", "wv", "w2")))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    save_peft_adapter(adapted, tmp_path / "adapter")
    tok = llama3_tokenizer
    compiler = GrammarCompiler(tok, tok.n_words, tok.stop_tokens)
    prompt = PROMPT + tuple(range(2000, 2040))  # 50 tokens: 3 full blocks, 2 reusable (one always recomputed)
    engine = Engine(model, tok, num_slots=4, prefill_chunk=64, batch_invariant=True, prefix_cache_bytes=1 << 22)
    engine.load_lora("a", str(tmp_path / "adapter"))
    engine.start()

    def run_prompt(neighbours):
        others = [engine.submit(r) for r in neighbours]
        events = [e for e in engine.submit(EngineRequest(prompt, NUM_NEW, num_logprobs=3)) if isinstance(e, TokenEvent)]
        for handle in others:
            list(handle)
        return [(e.token_id, e.logprob, e.top_logprobs) for e in events]

    crowd = [EngineRequest(prompt, 20, adapter="a"),  # the same tokens under an adapter: its own cache blocks
             EngineRequest(PROMPT, 12, constraint=compiler.regex("[a-z ]{5,200}")),
             EngineRequest(tuple(range(3000, 3200)), 10, SamplingParams(temperature=0.8, seed=3), adapter="a")]
    try:
        cold = run_prompt([])
        hits_before = engine.stats["prefix_cache_hit_tokens_total"]
        warm = run_prompt([])
        crowded = run_prompt(crowd)
        hits = engine.stats["prefix_cache_hit_tokens_total"] - hits_before
    finally:
        engine.stop()
    assert len(cold) == NUM_NEW and warm == cold and crowded == cold
    assert hits == 2 * 2 * 16  # both warm runs reused the prompt's two blocks
