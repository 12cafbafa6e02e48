"""Tool calling in Llama 3.1's JSON format, end to end through the server and the official client.

The model is a real Llama 3 Transformer with weights set so that, greedy, it answers a chat with a given
function call (see `scripted_model`); the server must render the tools, parse the answer into OpenAI
`tool_calls` and accept the tool's result as a `role: tool` message."""

from __future__ import annotations

import json

import openai
import pytest

from llama3.inference.engine import Engine
from llama3.serve.tools import TOOL_INSTRUCTION
from llama3.tokenizer import ChatFormat
from tests.serve_server import RunningServer, scripted_model

pytestmark = pytest.mark.timeout(120)

MODEL = "tool-llama3"
CALL = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}'
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What will the weather be in Paris?"}]


@pytest.fixture(scope="module")
def server(llama3_tokenizer):
    tok = llama3_tokenizer
    header = ChatFormat(tok).encode_header({"role": "assistant", "content": ""})[-3:]  # assistant<|end_header_id|>\n\n
    prefix = tok.encode('{"name": "get_weather", "parameters": ')
    scripts = [
        header + tok.encode(CALL) + [tok.eot_id],  # after the assistant header: the call, then end of turn
        # tool_choice naming the function puts the call's opening into the prompt; the model goes on
        prefix[-3:] + tok.encode('{"city": "Paris", "days": 3}}') + [tok.eot_id],
    ]
    model = scripted_model(tok.n_words, scripts, context_len=3)
    running = RunningServer(Engine(model, tok, num_slots=2), model_name=MODEL)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def check_call(calls):
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 3}


@pytest.mark.parametrize("tool_choice", [None, "auto", "required",
                                         {"type": "function", "function": {"name": "get_weather"}}])
def test_answer_becomes_tool_calls(client, tool_choice):
    extra = {} if tool_choice is None else {"tool_choice": tool_choice}
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, **extra)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    check_call(choice.message.tool_calls)


def test_streamed_tool_calls(client):
    """As OpenAI streams them: a first delta with the call's index, id, type and name (arguments ""), then the
    arguments in pieces as they are generated; never any of it as content."""
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    calls = [call for d in deltas for call in (d.tool_calls or [])]
    assert len(calls) > 2 and all(c.index == 0 for c in calls)
    head, rest = calls[0], calls[1:]
    assert head.function.arguments == "" and all(c.id is None and c.function.name is None for c in rest)
    head.function.arguments = "".join(c.function.arguments for c in rest)
    check_call([head])
    assert not "".join(d.content or "" for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_json_is_plain_content(client):
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, **extra)
        assert reply.choices[0].message.content == CALL
        assert reply.choices[0].message.tool_calls is None
        assert reply.choices[0].finish_reason == "stop"


def test_tool_results_go_back_as_ipython_messages(client, llama3_tokenizer):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    follow_up = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny", "high_c": 21}'},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=follow_up, tools=TOOLS, temperature=0)
    # The prompt the server built: tools in the first user message, the call, the result as ipython.
    dialog = [{"role": "system", "content": "Environment: ipython"},
              {"role": "user", "content": TOOL_INSTRUCTION + json.dumps(TOOLS[0], indent=4) + "\n\n" + ASK[0]["content"]},
              {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather",
                                                                 "arguments": call.function.arguments}}]},
              {"role": "ipython", "content": '{"forecast": "sunny", "high_c": 21}'}]
    expected = ChatFormat(llama3_tokenizer).encode_dialog_prompt(dialog)
    assert reply.usage.prompt_tokens == len(expected)
    text = llama3_tokenizer.decode(expected)
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n{\"forecast\": \"sunny\"" in text
    assert '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}<|eot_id|>' in text


def test_unknown_tool_choice_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "launch"}})
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[{"type": "function", "function": {"name": "bad name!"}}])
    assert info.value.body["param"].startswith("tools")
