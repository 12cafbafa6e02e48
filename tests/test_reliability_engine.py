"""Issue 19, item 1: no sampling parameter of one request can fail the requests decoding beside it.

Tiny temperatures and top_p values that are 0 in fp32 used to give NaN probabilities, `torch.multinomial`
raised inside the batched step, and the engine ended every running request with an error."""

from __future__ import annotations

import threading

import pytest
import torch

import llama3.inference.engine as engine_module
from llama3.inference.engine import Engine, EngineRequest, FinishEvent, TokenEvent
from llama3.inference.sampling import GREEDY, SamplingParams, sample
from tests.conftest import random_model, reference_greedy, tiny_args

pytestmark = pytest.mark.timeout(120)



@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args("gqa", max_seq_len=256), seed=5)



@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-300), SamplingParams(temperature=1e-40), SamplingParams(temperature=9e-6),
    SamplingParams(top_p=1e-320), SamplingParams(top_p=1e-45, temperature=0.7),
])
def test_tiny_values_sample_the_top_token(params):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ids = sample(logits, params, generator=torch.Generator().manual_seed(1))
    assert ids.tolist() == logits.argmax(-1).tolist()


def test_tiny_temperature_is_greedy_and_small_valid_one_is_not():
    assert SamplingParams(temperature=1e-300).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    logits = torch.tensor([[0.0, 1e-6]])  # at T=1e-5 the gap is 0.1: both tokens stay possible, finite
    probs = (logits / 1e-5).softmax(-1)
    assert torch.isfinite(probs).all()


@pytest.mark.parametrize("value", [1e-320, 1e-300, 0.0, -1.0, 1e300, float("inf")])
def test_repetition_penalty_out_of_fp32_range_is_refused(value):
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=value)


def test_extreme_but_valid_penalties_keep_probabilities_finite():
    counts = torch.ones(2, 50)
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(2)) * 30
    for penalty in (0.01, 100.0):
        ids = sample(logits, SamplingParams(repetition_penalty=penalty, temperature=1e-5), token_counts=counts,
                     generator=torch.Generator().manual_seed(0))
        assert ids.shape == (2,)


def test_nan_row_raises_before_any_generator_advances():
    logits = torch.randn(2, 20)
    logits[1, 3] = float("nan")
    generators = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    before = [g.get_state().clone() for g in generators]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sample(logits, SamplingParams(temperature=1.0), generator=generators)
    assert all(torch.equal(b, g.get_state()) for b, g in zip(before, generators))


def _run_all(engine, requests):
    """Submit every request at once; each one's (token ids, finish event)."""
    handles = [engine.submit(r) for r in requests]
    results = [None] * len(handles)

    def collect(i):
        events = list(handles[i])
        results[i] = ([e.token_id for e in events if isinstance(e, TokenEvent)], events[-1])

    threads = [threading.Thread(target=collect, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_tiny_values_in_the_engine_decode_like_greedy_beside_greedy_streams(model):
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [3, 4], [17, 18, 19]]
    hostile = [SamplingParams(temperature=1e-300), SamplingParams(temperature=1e-40), SamplingParams(top_p=1e-320)]
    sampling = [GREEDY, GREEDY, *hostile]
    engine = Engine(model, num_slots=5).start()
    try:
        results = _run_all(engine, [EngineRequest(tuple(p), 12, s) for p, s in zip(prompts, sampling)])
    finally:
        engine.stop()
    for prompt, (ids, finish) in zip(prompts, results):
        assert finish.reason == "length", finish
        assert ids == reference_greedy(model, prompt, 12)


def test_a_failing_row_ends_alone_and_the_others_keep_decoding(model, monkeypatch):
    """Whatever makes one row's draw fail (here: its draw raises whenever it is part of the batch), that
    request ends with an error and the three greedy streams beside it finish exactly as alone."""
    real_sample = engine_module.sample

    def poisoned(logits, params, **kwargs):
        rows = [params] if isinstance(params, SamplingParams) else list(params)
        if any(p.seed == 666 for p in rows):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sample(logits, params, **kwargs)

    monkeypatch.setattr(engine_module, "sample", poisoned)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [20, 21]]
    sampling = [GREEDY, GREEDY, GREEDY, SamplingParams(temperature=0.8, seed=666)]
    engine = Engine(model, num_slots=4).start()
    try:
        results = _run_all(engine, [EngineRequest(tuple(p), 16, s) for p, s in zip(prompts, sampling)])
        assert engine.stats["finished_error"] == 1
        assert engine.generate([1, 2, 3], 4) == reference_greedy(model, [1, 2, 3], 4)  # still serving
    finally:
        engine.stop()
    for prompt, (ids, finish) in zip(prompts[:3], results[:3]):
        assert finish.reason == "length"
        assert ids == reference_greedy(model, prompt, 16)
    ids, finish = results[3]
    assert isinstance(finish, FinishEvent) and finish.reason == "error"
    assert "sampling" in finish.message and ids == []


def test_a_failing_prefill_ends_alone(model, monkeypatch):
    """A prompt whose prefill raises ends with an error; the request prefilled beside it is untouched."""
    engine = Engine(model, num_slots=2).start()
    real_chunk = engine._prefill_chunk

    def chunk(slot, max_tokens):
        if slot.handle.request.prompt_ids[0] == 99:
            raise RuntimeError("boom")
        return real_chunk(slot, max_tokens)

    monkeypatch.setattr(engine, "_prefill_chunk", chunk)
    try:
        results = _run_all(engine, [EngineRequest((99, 1, 2), 8), EngineRequest((4, 5, 6), 8)])
    finally:
        engine.stop()
    assert results[0][1].reason == "error" and "boom" in results[0][1].message
    assert results[1][1].reason == "length" and results[1][0] == reference_greedy(model, [4, 5, 6], 8)


@pytest.mark.parametrize("flags", [["--temperature", "1e-300"], ["--temperature", "1e-40"],
                                   ["--temperature", "0.7", "--top-p", "1e-320"]])
def test_generate_cli_with_tiny_values_is_greedy(tmp_path, llama3_tokenizer, capsys, flags):
    """`llama3 generate --temperature 1e-300` crashed with NaN probabilities; now it is greedy decoding."""
    import json

    import llama3
    from llama3.cli.generate import main

    model = random_model(tiny_args("tied", vocab_size=llama3_tokenizer.n_words, max_seq_len=128), seed=4)
    folder = llama3.save(model, llama3_tokenizer, tmp_path / "m")
    common = ["--model", str(folder), "--prompt", "It was", "--max-new-tokens", "6", "--json", "--no-compile"]
    assert main([*common, "--temperature", "0"]) == 0
    greedy = json.loads(capsys.readouterr().out)["token_ids"]
    assert main([*common, *flags]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == greedy


def test_generate_cli_refuses_a_repetition_penalty_that_is_zero_in_fp32(tmp_path, llama3_tokenizer, capsys):
    import llama3
    from llama3.cli.generate import main

    model = random_model(tiny_args("tied", vocab_size=llama3_tokenizer.n_words, max_seq_len=128), seed=4)
    folder = llama3.save(model, llama3_tokenizer, tmp_path / "m")
    code = main(["--model", str(folder), "--prompt", "It was", "--max-new-tokens", "2", "--no-compile",
                 "--repetition-penalty", "1e-320"])
    assert code == 2 and "repetition_penalty" in capsys.readouterr().err
