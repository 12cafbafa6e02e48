"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server on a
tiny random Llama 3 with the real Llama 3 tokenizer."""

from __future__ import annotations

import asyncio
import copy
import json

import httpx
import openai
import pytest
import torch

from llama3.inference.engine import Engine
from llama3.inference.generate import Generator
from llama3.inference.sampling import GREEDY
from llama3.serve.schema import ServerLimits
from llama3.tokenizer import ChatFormat
from tests.conftest import random_model, tiny_args
from tests.serve_server import RunningServer

pytestmark = pytest.mark.timeout(120)

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny-llama3"
NUM_SLOTS, MAX_QUEUE = 8, 4
HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def setup(llama3_tokenizer):
    model = random_model(tiny_args("gqa", vocab_size=llama3_tokenizer.n_words, max_seq_len=2048), seed=1)
    reference = Generator(copy.deepcopy(model), llama3_tokenizer)
    engine = Engine(model, llama3_tokenizer, num_slots=NUM_SLOTS, max_queue=MAX_QUEUE, prefill_chunk=128)
    server = RunningServer(engine, api_key=KEY, model_name=MODEL, limits=ServerLimits(max_body_bytes=64 * 1024))
    yield server, reference, llama3_tokenizer
    server.stop()


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup[0].url + "/v1", api_key=KEY, max_retries=0)


def plain_greedy_text(reference, tokenizer, messages, num_new: int) -> tuple[str, int]:
    """What plain (non-server) greedy generation says for a chat, as text without special tokens."""
    prompt = ChatFormat(tokenizer).encode_dialog_prompt(messages)
    [result] = reference.generate([prompt], max_new_tokens=num_new, sampling=GREEDY)
    ids = [t for t in result.token_ids if not tokenizer.is_special(t)]
    return tokenizer.decode(ids), len(result.token_ids)


def test_models_health_and_auth(setup, client):
    server = setup[0]
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/v1/models").json()["error"]["type"] == "authentication_error"


def test_sync_chat_equals_plain_greedy_generation(setup, client):
    _, reference, tokenizer = setup
    expected, num_tokens = plain_greedy_text(reference, tokenizer, HELLO, 30)
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=30, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    prompt_len = len(ChatFormat(tokenizer).encode_dialog_prompt(HELLO))
    assert reply.usage.prompt_tokens == prompt_len
    assert reply.usage.completion_tokens == num_tokens == 30
    assert reply.usage.total_tokens == prompt_len + 30


def test_streaming_with_usage_matches_the_whole_reply(setup, client):
    _, reference, tokenizer = setup
    expected, _ = plain_greedy_text(reference, tokenizer, HELLO, 20)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs_and_several_streamed_choices(setup, client):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 8
    assert "".join(c.token for c in content) == reply.choices[0].message.content
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=1.0, n=3,
                                            seed=11, stream=True)
    texts, finishes, roles = {}, {}, set()
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add(choice.index)
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert roles == {0, 1, 2} and finishes == {0: "length", 1: "length", 2: "length"}
    again = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=1.0, n=3, seed=11)
    assert [c.message.content for c in again.choices] == [texts[i] for i in range(3)]
    assert len(set(texts.values())) > 1  # each choice samples with its own seed


def test_async_greedy_while_eight_other_streams_run(setup):
    server, reference, tokenizer = setup
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    expected, _ = plain_greedy_text(reference, tokenizer, messages, 40)

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

        async def other(i):
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Other request {i} " * (i + 1)}],
                max_tokens=60, temperature=1.0, seed=i, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def greedy():
            await asyncio.sleep(0.05)  # join a batch that is already running
            reply = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40,
                                                         temperature=0)
            return reply.choices[0].message.content

        results = await asyncio.gather(greedy(), *[other(i) for i in range(8)])
        await client.close()
        return results

    results = asyncio.run(main())
    assert results[0] == expected
    assert all(isinstance(r, str) and r for r in results[1:])


def test_completions_echo_logprobs_are_the_models(setup, client):
    _, reference, tokenizer = setup
    prompt = [tokenizer.bos_id, *tokenizer.encode("It is a truth universally acknowledged")]
    # the lm-evaluation-harness `local-completions` loglikelihood request
    reply = client.completions.create(model=MODEL, prompt=[prompt], max_tokens=1, echo=True, logprobs=1,
                                      temperature=0, seed=1234)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    plain = copy.deepcopy(reference.model)
    plain.clear_caches()
    with torch.no_grad():
        logprobs = plain(torch.tensor([prompt]))[0].log_softmax(-1)  # (T, V): the full forward, no cache
    expected = [float(logprobs[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    assert lp.token_logprobs[1:len(prompt)] == pytest.approx(expected, abs=1e-4)
    greedy_next = int(logprobs[-1].argmax())
    assert lp.token_logprobs[-1] == pytest.approx(float(logprobs[-1, greedy_next]), abs=1e-4)
    assert next(iter(lp.top_logprobs[-1].values())) == pytest.approx(lp.token_logprobs[-1], abs=1e-6)
    assert choice.text.startswith(tokenizer.decode(prompt))
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 1


def test_lm_eval_local_completions_loglikelihood(setup, tmp_path):
    """lm-evaluation-harness's `local-completions` model, pointed at the server, scores continuations with
    the model's own log-probabilities."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    server, reference, tokenizer = setup
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer.to_hf_json()))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    lm = LocalCompletionsAPI(model=MODEL, base_url=server.url + "/v1/completions", tokenizer=str(tmp_path),
                             tokenizer_backend="huggingface", header=AUTH, max_length=2048, max_retries=1)
    pairs = [("It is a truth universally", " acknowledged"), ("Call me", " Ishmael. Some years ago")]
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                               disable_tqdm=True)
    plain = copy.deepcopy(reference.model)
    plain.clear_caches()
    for (context, continuation), (loglikelihood, is_greedy) in zip(pairs, results):
        context_ids = tokenizer.encode(context)
        whole = tokenizer.encode(context + continuation)
        with torch.no_grad():
            logprobs = plain(torch.tensor([whole]))[0].log_softmax(-1)  # (T, V)
        targets = range(len(context_ids), len(whole))
        expected = sum(float(logprobs[i - 1, whole[i]]) for i in targets)
        assert loglikelihood == pytest.approx(expected, abs=1e-3)
        assert is_greedy == all(int(logprobs[i - 1].argmax()) == whole[i] for i in targets)


def test_completions_text_prompts_n_seed_and_stop(client):
    reply = client.completions.create(model=MODEL, prompt=["Once upon a time", "Call me"], max_tokens=8, n=2,
                                      temperature=1.0, seed=7)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    again = client.completions.create(model=MODEL, prompt=["Once upon a time", "Call me"], max_tokens=8, n=2,
                                      temperature=1.0, seed=7)
    assert [c.text for c in reply.choices] == [c.text for c in again.choices]
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[:text.index(stop)]


def test_disconnect_mid_stream_frees_the_slot(setup):
    server = setup[0]
    cancelled_before = server.metric('llama3_requests_finished_total{reason="cancelled"}', AUTH)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1900, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        data = [line for line in (next(lines) for _ in range(12)) if line.startswith("data: ")]
        assert json.loads(data[0][6:])["choices"][0]["delta"]["role"] == "assistant"
        assert server.metric("llama3_active_slots", AUTH) == 1
    # the client is gone; the slot is free within a step
    assert server.wait_for_metric("llama3_active_slots", 0, AUTH) == 0
    assert server.wait_for_metric('llama3_requests_finished_total{reason="cancelled"}', cancelled_before + 1,
                                  AUTH) == cancelled_before + 1


def test_non_streaming_client_that_gives_up_frees_the_slot(setup):
    server = setup[0]
    cancelled_before = server.metric('llama3_requests_finished_total{reason="cancelled"}', AUTH)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1900}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=0.5)
    assert server.wait_for_metric("llama3_active_slots", 0, AUTH) == 0
    assert server.metric('llama3_requests_finished_total{reason="cancelled"}', AUTH) == cancelled_before + 1


def test_full_queue_answers_429_with_retry_after(setup, client):
    server = setup[0]
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1900, "stream": True}
    streams, responses = [], []
    try:
        for _ in range(NUM_SLOTS + MAX_QUEUE):
            cm = httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
            streams.append(cm)
            responses.append(cm.__enter__())
            assert responses[-1].status_code == 200
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert info.value.body["code"] == "queue_full"
        assert server.metric("llama3_queue_depth", AUTH) == MAX_QUEUE
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)
    assert server.wait_for_metric("llama3_active_slots", 0, AUTH) == 0
    assert server.wait_for_metric("llama3_queue_depth", 0, AUTH) == 0
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices[0].finish_reason


BAD_CHAT_FIELDS = [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 9}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"seed": "seven"}, "seed"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"stream": "yes"}, "stream"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
]


@pytest.mark.parametrize("fields,param", BAD_CHAT_FIELDS, ids=[p for _, p in BAD_CHAT_FIELDS])
def test_bad_field_is_a_400_naming_it(client, fields, param):
    kwargs = {"model": MODEL, "messages": HELLO, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kwargs)
    error = info.value.body
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(param)


def test_prompt_plus_max_tokens_over_context_is_a_400_naming_the_limit(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2040)
    assert info.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="2048"):
        client.completions.create(model=MODEL, prompt=[[1] * 2049], max_tokens=1)


def test_invalid_json_oversized_body_and_unknown_model(setup, client):
    server = setup[0]
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [', headers=headers)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]

    def chunked_body():  # no Content-Length: the limit holds while the body streams in
        yield b'{"model": "tiny-llama3", "messages": [{"role": "user", "content": "'
        yield from (b"x" * 1000 for _ in range(70))
        yield b'"}]}'

    r = httpx.post(server.url + "/v1/chat/completions", content=chunked_body(), headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="token id"):
        client.completions.create(model=MODEL, prompt=[[1, 10**7]], max_tokens=1)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "suffix": "x"}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
