"""OpenAI response bodies and server-sent-event chunks for chat and text completions.

Shapes follow the OpenAI API reference: `chat.completion` / `chat.completion.chunk` (first chunk carries
the role, the last one per choice an empty delta and the finish_reason; with
`stream_options.include_usage` every chunk has `"usage": null` and a final chunk with no choices carries the
usage), and `text_completion` with legacy logprobs (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .completions import Choice, chat_logprob_entry, merge_events, token_text, usage_dict
from .tools import ToolCallStream, ToolPlan, parse_tool_calls, tools_active

__all__ = ["GenerationFailed", "chat_chunks", "chat_response", "completion_chunks", "completion_response"]


class GenerationFailed(RuntimeError):
    """The engine failed a request (the model raised); answered as a 500."""


def _check_failed(choices: list[Choice]) -> None:
    for c in choices:
        if c.finish is not None and c.finish.reason == "error":
            raise GenerationFailed(c.finish.message or "generation failed")


def _chat_logprobs(choice: Choice, events) -> dict[str, Any] | None:
    if choice.handle.request.num_logprobs is None:
        return None
    return {"content": [chat_logprob_entry(choice.tokenizer, e) for e in events if not e.is_stop]}


def _usage(choices: list[Choice], num_prompt: int) -> dict[str, int]:
    return usage_dict(num_prompt, sum(c.num_generated for c in choices))


def _python_tagged(choice: Choice, plan: ToolPlan) -> bool:
    """The answer opens with <|python_tag|> (forced by the plan, or the model's first token)."""
    tag = getattr(choice.tokenizer, "python_tag_id", None)
    first = choice.token_events[0].token_id if choice.token_events else None
    return plan.python_tag or (tag is not None and first == tag)


def chat_response(choices: list[Choice], body, meta: dict, plan: ToolPlan, num_prompt: int) -> dict[str, Any]:
    """A whole `chat.completion` once every choice has finished."""
    _check_failed(choices)
    out = []
    for c in choices:
        answer = plan.prefix_text + c.text
        calls = parse_tool_calls(answer, body, _python_tagged(c, plan)) if tools_active(body) else None
        if calls:
            message, reason = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        else:
            message, reason = {"role": "assistant", "content": answer}, c.finish_reason
        out.append({"index": c.index, "message": message, "logprobs": _chat_logprobs(c, c.token_events),
                    "finish_reason": reason})
    return {**meta, "object": "chat.completion", "system_fingerprint": None, "choices": out,
            "usage": _usage(choices, num_prompt)}


async def chat_chunks(choices: list[Choice], body, meta: dict, plan: ToolPlan, is_disconnected) -> AsyncIterator[dict]:
    """`chat.completion.chunk` objects as tokens arrive. With tools, each choice's text passes through a
    `ToolCallStream`, which holds back what may become a call and streams calls as OpenAI does."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None}
    if include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}]}

    streams = {c.index: ToolCallStream(body, plan.prefix_text, plan.python_tag) if tools_active(body) else None
               for c in choices}
    for c in choices:
        yield chunk(c.index, {"role": "assistant", "content": ""})
    num_prompt = len(choices[0].handle.request.prompt_ids)
    async for c, event in merge_events(choices, is_disconnected):
        delta, events = c.feed(event)
        logprobs = _chat_logprobs(c, events) if events else None
        stream = streams[c.index]
        if stream is None:
            if delta or logprobs:
                yield chunk(c.index, {"content": delta}, logprobs)
        else:
            deltas = stream.feed(delta, python_tag=_python_tagged(c, plan), final=c.done) or (
                [{"content": ""}] if logprobs else [])
            for i, d in enumerate(deltas):
                yield chunk(c.index, d, logprobs if i == 0 else None)
        if c.done:
            if c.finish.reason == "error":
                yield {"error": {"message": c.finish.message, "type": "server_error", "param": None, "code": None}}
                return
            calls = stream is not None and stream.calls_sent
            yield chunk(c.index, {}, finish_reason="tool_calls" if calls else c.finish_reason)
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(choices, num_prompt)}


def _completion_logprobs(choice: Choice, echo: bool) -> dict[str, Any] | None:
    """Legacy logprobs of one completion choice; with echo, prompt tokens come first."""
    if choice.handle.request.num_logprobs is None:
        return None
    tok = choice.tokenizer
    ids, logprobs, tops = [], [], []
    if echo and choice.prompt_logprobs is not None:
        ids += list(choice.handle.request.prompt_ids)
        logprobs += choice.prompt_logprobs.logprobs
        tops += [None if t is None else {token_text(tok, i): lp for i, lp in t} for t in choice.prompt_logprobs.top_logprobs]
    for e in choice.token_events:
        ids.append(e.token_id)
        logprobs.append(e.logprob)
        tops.append({token_text(tok, i): lp for i, lp in (e.top_logprobs or [])})
    tokens = [token_text(tok, i) for i in ids]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def completion_response(choices: list[Choice], body, meta: dict, num_prompt: int) -> dict[str, Any]:
    """A whole `text_completion`."""
    _check_failed(choices)
    out = [{"index": c.index, "text": (c.prompt_text if body.echo else "") + c.text,
            "logprobs": _completion_logprobs(c, body.echo), "finish_reason": c.finish_reason} for c in choices]
    return {**meta, "object": "text_completion", "system_fingerprint": None, "choices": out,
            "usage": _usage(choices, num_prompt)}


async def completion_chunks(choices: list[Choice], body, meta: dict, is_disconnected) -> AsyncIterator[dict]:
    """`text_completion` chunks as tokens arrive (the prompt first, with echo)."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {**meta, "object": "text_completion", "system_fingerprint": None}
    if include_usage:
        base["usage"] = None

    def chunk(index: int, text: str, logprobs=None, finish_reason=None) -> dict:
        return {**base, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                     "finish_reason": finish_reason}]}

    if body.echo:
        for c in choices:
            yield chunk(c.index, c.prompt_text)
    async for c, event in merge_events(choices, is_disconnected):
        delta, events = c.feed(event)
        if delta or events and body.logprobs is not None:
            logprobs = None
            if body.logprobs is not None and events:
                tok = c.tokenizer
                logprobs = {"tokens": [token_text(tok, e.token_id) for e in events],
                            "token_logprobs": [e.logprob for e in events],
                            "top_logprobs": [{token_text(tok, i): lp for i, lp in (e.top_logprobs or [])}
                                             for e in events], "text_offset": [0] * len(events)}
            yield chunk(c.index, delta, logprobs)
        if c.done:
            if c.finish.reason == "error":
                yield {"error": {"message": c.finish.message, "type": "server_error", "param": None, "code": None}}
                return
            yield chunk(c.index, "", finish_reason=c.finish_reason)
    if include_usage:
        num_prompt = sum(len(c.handle.request.prompt_ids) for c in choices[::body.n])
        yield {**base, "choices": [], "usage": _usage(choices, num_prompt)}
