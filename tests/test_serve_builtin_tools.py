"""Llama 3.1's built-in tools (brave_search, wolfram_alpha, code_interpreter), tool_choice by grammar, and
tool calls streamed as OpenAI streams them; end to end through the official client, plus the parser alone."""

from __future__ import annotations

import json

import openai
import pytest

from llama3.inference.engine import Engine
from llama3.serve.schema import ChatCompletionRequest
from llama3.serve.tools import ToolCallStream, build_dialog, encode_prompt, parse_tool_calls, split_json_calls
from llama3.tokenizer import ChatFormat
from tests.conftest import random_model, tiny_args
from tests.serve_server import RunningServer, scripted_model

pytestmark = pytest.mark.timeout(180)

MODEL = "tool-llama3"
ASK = [{"role": "user", "content": "Who owns Netherfield?"}]


def function(name: str, parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


BUILTINS = [function("brave_search"), function("wolfram_alpha")]
WEATHER = function("get_weather", {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                                   "properties": {"city": {"type": "string", "enum": ["Paris", "Bath"]},
                                                  "days": {"type": "integer", "minimum": 1, "maximum": 9}}})
TIME = function("get_time", {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
                             "required": ["zone"], "additionalProperties": False})


def scripted_server(tok, answer_ids: list[int]) -> RunningServer:
    """A server whose model answers every chat with `answer_ids` after the assistant header."""
    header = ChatFormat(tok).encode_header({"role": "assistant", "content": ""})[-3:]
    model = scripted_model(tok.n_words, [header + answer_ids], context_len=3)
    return RunningServer(Engine(model, tok, num_slots=2), model_name=MODEL)


@pytest.fixture(scope="module")
def search_server(llama3_tokenizer):
    tok = llama3_tokenizer
    running = scripted_server(tok, [tok.python_tag_id] + tok.encode('brave_search.call(query="Netherfield")')
                              + [tok.eom_id])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def code_server(llama3_tokenizer):
    tok = llama3_tokenizer
    running = scripted_server(tok, [tok.python_tag_id] + tok.encode("print(2 + 2)") + [tok.eom_id])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def random_server(llama3_tokenizer):
    model = random_model(tiny_args("gqa", vocab_size=llama3_tokenizer.n_words, max_seq_len=1024), seed=5)
    running = RunningServer(Engine(model, llama3_tokenizer, num_slots=4), model_name=MODEL)
    yield running
    running.stop()


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_brave_search_call_as_meta_writes_it(search_server, llama3_tokenizer):
    client = client_of(search_server)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=BUILTINS, temperature=0)
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
    assert call.function.name == "brave_search" and json.loads(call.function.arguments) == {"query": "Netherfield"}
    # The prompt: built-ins on the Tools line of the system message, no JSON definitions in the user turn.
    tok = llama3_tokenizer
    system = {"role": "system", "content": "Environment: ipython\nTools: brave_search, wolfram_alpha\n\n"}
    assert reply.usage.prompt_tokens == len(ChatFormat(tok).encode_dialog_prompt([system, *ASK]))
    # The call goes back into the prompt in Meta's form, the result as an ipython message.
    follow_up = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                       {"role": "tool", "tool_call_id": call.id, "content": "Mr. Bingley rents it."}]
    again = client.chat.completions.create(model=MODEL, messages=follow_up, tools=BUILTINS, temperature=0)
    chat = ChatFormat(tok)
    header = chat.encode_header({"role": "assistant", "content": ""})
    expected = (chat.encode_dialog_prompt([system, *ASK], add_generation_prompt=False) + header
                + [tok.python_tag_id] + tok.encode('brave_search.call(query="Netherfield")') + [tok.eom_id]
                + chat.encode_message({"role": "ipython", "content": "Mr. Bingley rents it."}) + header)
    assert again.usage.prompt_tokens == len(expected)
    body = ChatCompletionRequest(messages=follow_up, tools=BUILTINS)
    assert encode_prompt(chat, build_dialog(body)) == expected


def test_streamed_builtin_call_never_leaks_as_content(search_server):
    stream = client_of(search_server).chat.completions.create(model=MODEL, messages=ASK, tools=BUILTINS,
                                                               temperature=0, stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    assert not "".join(d.delta.content or "" for d in deltas)
    calls = [call for d in deltas for call in (d.delta.tool_calls or [])]
    assert calls[0].function.name == "brave_search" and calls[0].id.startswith("call_")
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"query": "Netherfield"}
    assert deltas[-1].finish_reason == "tool_calls"


def test_code_interpreter(code_server):
    client = client_of(code_server)
    tools = [function("code_interpreter")]
    for choice in (None, {"type": "function", "function": {"name": "code_interpreter"}}):
        extra = {} if choice is None else {"tool_choice": choice}
        reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, temperature=0, **extra)
        [call] = reply.choices[0].message.tool_calls
        assert call.function.name == "code_interpreter"
        assert json.loads(call.function.arguments) == {"code": "print(2 + 2)"}
    # Without the tool offered, the tag is a special token: the text alone is plain content.
    plain = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0)
    assert plain.choices[0].message.content == "print(2 + 2)"


def test_required_and_named_tool_choice_hold_even_for_random_weights(random_server):
    client = client_of(random_server)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, names in (("required", {"get_weather", "get_time"}), (named, {"get_weather"})):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=1.0,
                                               seed=3, n=3, max_tokens=120, tool_choice=choice)
        for c in reply.choices:
            [call] = c.message.tool_calls
            assert c.finish_reason == "tool_calls" and call.function.name in names
            args = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                assert args["city"] in ("Paris", "Bath") and 1 <= args["days"] <= 9
            else:
                assert set(args) == {"zone"} and len(args["zone"]) <= 12
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], temperature=1.0, seed=4,
                                            max_tokens=120, tool_choice=named, stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [call for d in deltas for call in (d.delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].function.arguments == ""
    assert len(calls) > 2  # the arguments came in pieces as they were generated
    assert all(c.index == 0 and c.id is None and c.function.name is None for c in calls[1:])
    assert json.loads("".join(c.function.arguments for c in calls))["city"] in ("Paris", "Bath")
    assert not "".join(d.delta.content or "" for d in deltas)
    with pytest.raises(openai.BadRequestError, match="already fixes"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                       response_format={"type": "json_object"})


# ----- the parser alone -----
def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=ASK, tools=[WEATHER, TIME], **fields)


TWO_CALLS = ('{"name": "get_weather", "parameters": {"city": "Bath", "days": 2}}; '
             '{"name": "get_time", "parameters": {"zone": "UTC"}}')


def test_parallel_calls_and_parallel_tool_calls_false():
    calls = parse_tool_calls(TWO_CALLS, request())
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"zone": "UTC"}
    listed = "[" + TWO_CALLS.replace("; ", ", ") + "]"
    assert len(parse_tool_calls(listed, request())) == 2
    assert len(parse_tool_calls(TWO_CALLS, request(parallel_tool_calls=False))) == 1
    assert parse_tool_calls('{"name": "launch", "parameters": {}}', request()) is None
    assert parse_tool_calls('{"name": "get_time", "parameters": {"zone": "UT', request()) is None
    assert split_json_calls('{"name": "get_ti', {"get_time"}) == []  # may still become a call


@pytest.mark.parametrize("piece", [1, 3, 7])
def test_streamed_calls_piece_by_piece(piece):
    stream = ToolCallStream(request())
    deltas = []
    for i in range(0, len(TWO_CALLS), piece):
        deltas += stream.feed(TWO_CALLS[i:i + piece])
    deltas += stream.feed("", final=True)
    assert all("content" not in d for d in deltas)
    calls = [c for d in deltas for c in d["tool_calls"]]
    heads = [c for c in calls if "id" in c]
    assert [h["function"]["name"] for h in heads] == ["get_weather", "get_time"]
    for index, expected in enumerate([{"city": "Bath", "days": 2}, {"zone": "UTC"}]):
        args = "".join(c["function"]["arguments"] for c in calls if c["index"] == index)
        assert json.loads(args) == expected
    assert stream.calls_sent


def test_streamed_text_that_is_not_a_call_comes_out_whole():
    for text in ('{"city": "Paris"} is not a call', "Mr. Darcy {is} proud", '{"name": "launch", "parameters": {}}'):
        stream = ToolCallStream(request())
        out = [d for ch in text for d in stream.feed(ch)] + stream.feed("", final=True)
        assert "".join(d["content"] for d in out) == text and not stream.calls_sent
