"""The continuous-batching engine: exact against plain generation, slots freed on cancel, bounded queue."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from llama3.inference.engine import (
    Engine,
    EngineRequest,
    FinishEvent,
    PromptLogprobsEvent,
    QueueFull,
    TokenEvent,
)
from llama3.inference.sampling import GREEDY, SamplingParams
from tests.conftest import random_model, reference_greedy, tiny_args

pytestmark = pytest.mark.timeout(120)



@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args("gqa", max_seq_len=512), seed=3)



def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def generate_concurrently(engine, prompts, num_new: int) -> list[list[int]]:
    """Every prompt from its own thread at once; the token ids of each."""
    results = [None] * len(prompts)

    def run(i):
        results[i] = engine.generate(prompts[i], num_new)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_greedy_equals_plain_generation(model):
    prompts = prompts_of([5, 17, 300, 40, 9, 3, 77, 130, 11])
    expected = [reference_greedy(model, p, 24) for p in prompts]
    # 4 slots for 9 requests: requests wait, join a running batch, and prefill in chunks of 64.
    engine = Engine(model, num_slots=4, prefill_chunk=64).start()
    try:
        assert generate_concurrently(engine, prompts, 24) == expected
        counters = engine.snapshot()["counters"]
        assert counters["finished_length"] == len(prompts)
        assert counters["prompt_tokens_total"] == sum(map(len, prompts))
    finally:
        engine.stop()


def test_fused_model_matches_and_logprobs_are_the_models(model):
    from llama3.inference.fast import optimize_for_inference

    fused = optimize_for_inference(copy.deepcopy(model))
    prompt = prompts_of([33], seed=1)[0]
    engine = Engine(fused, num_slots=2, prefill_chunk=16).start()
    try:
        request = EngineRequest(tuple(prompt), 6, GREEDY, num_logprobs=3, prompt_logprobs=True)
        events = list(engine.submit(request))
    finally:
        engine.stop()
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [e.token_id for e in tokens] == reference_greedy(model, prompt, 6)
    [prompt_event] = [e for e in events if isinstance(e, PromptLogprobsEvent)]
    full = prompt + [e.token_id for e in tokens]
    with torch.no_grad():
        logprobs = model(torch.tensor([full]))[0].log_softmax(-1)  # (T, V), no cache
    expected_prompt = [float(logprobs[i - 1, full[i]]) for i in range(1, len(prompt))]
    assert prompt_event.logprobs[0] is None
    assert prompt_event.logprobs[1:] == pytest.approx(expected_prompt, abs=1e-4)
    for i, e in enumerate(tokens):
        row = logprobs[len(prompt) - 1 + i]
        assert e.logprob == pytest.approx(float(row[e.token_id]), abs=1e-4)
        assert [t for t, _ in e.top_logprobs] == row.topk(3).indices.tolist()
    assert isinstance(events[-1], FinishEvent) and events[-1].reason == "length"


def test_seeded_sampling_does_not_depend_on_batch_neighbours(model):
    prompt = prompts_of([12], seed=2)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, frequency_penalty=0.5)
    engine = Engine(model, num_slots=4).start()
    try:
        alone = engine.generate(prompt, 16, sampling=params)
        others = [engine.submit(EngineRequest(tuple(p), 40, SamplingParams(temperature=1.0)))
                  for p in prompts_of([7, 9, 11], seed=5)]
        crowded = engine.generate(prompt, 16, sampling=params)
        for h in others:
            list(h)
    finally:
        engine.stop()
    assert alone == crowded
    assert alone != reference_greedy(model, prompt, 16)  # it really sampled


def test_cancel_frees_the_slot_and_full_queue_refuses(model):
    engine = Engine(model, num_slots=2, max_queue=1).start()
    try:
        long = [engine.submit(EngineRequest(tuple(p), 400)) for p in prompts_of([4, 5, 6], seed=7)]
        with pytest.raises(QueueFull) as info:
            engine.submit(EngineRequest((1, 2, 3), 4))
        assert info.value.retry_after_s >= 1
        first = iter(long[0])
        assert isinstance(next(first), TokenEvent)
        long[0].cancel()
        finish = next(e for e in first if isinstance(e, FinishEvent))
        assert finish.reason == "cancelled" and finish.num_generated_tokens < 400
        deadline = time.monotonic() + 5
        while engine.snapshot()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.snapshot()["queue_depth"] == 0  # the waiting request took the freed slot
        for h in long[1:]:
            h.cancel()
            list(h)
        assert engine.snapshot()["active_slots"] == 0
        assert engine.snapshot()["counters"]["finished_cancelled"] == 3
    finally:
        engine.stop()


def test_requests_that_cannot_fit_are_refused(model):
    engine = Engine(model, num_slots=1, max_seq_len=64).start()
    try:
        with pytest.raises(ValueError, match="context limit is 64"):
            engine.submit(EngineRequest(tuple(range(60)), 10))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit(EngineRequest((1, 999), 1))
        with pytest.raises(ValueError, match="empty"):
            engine.submit(EngineRequest((), 1))
        # max_new_tokens=0 scores the prompt only (completions with echo)
        events = list(engine.submit(EngineRequest((1, 2, 3), 0, prompt_logprobs=True, num_logprobs=0)))
        assert isinstance(events[0], PromptLogprobsEvent) and len(events[0].logprobs) == 3
        assert events[-1].reason == "length" and events[-1].num_generated_tokens == 0
    finally:
        engine.stop()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_in_the_engine_equals_plain_generation(model, mode):
    """The quantized kernels round each row's activations on their own, so a request's tokens do not depend
    on which other requests share its batch: the engine equals plain generation exactly."""
    from llama3.inference.quantize import quantize_model

    quantized = quantize_model(copy.deepcopy(model), mode)
    prompts = prompts_of([5, 70, 12, 33], seed=1)
    expected = [reference_greedy(quantized, p, 12) for p in prompts]
    engine = Engine(quantized, num_slots=4, prefill_chunk=64).start()
    try:
        assert generate_concurrently(engine, prompts, 12) == expected
    finally:
        engine.stop()
