"""From engine events to OpenAI responses: text with stop strings, log-probabilities, chunks, usage.

One `Choice` follows one engine request. It detokenizes incrementally (never splitting a UTF-8 character),
holds back text that might be the start of a stop string, and cuts the text at the first stop string, as
the OpenAI API does (the stop string itself is not returned).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..inference.engine import FinishEvent, PromptLogprobsEvent, RequestHandle, TokenEvent
from ..inference.stops import find_stop, shown_length
from .errors import APIError

__all__ = ["Choice", "chat_logprob_entry", "merge_events", "new_id", "token_text", "usage_dict"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def token_text(tokenizer, token_id: int) -> str:
    """A token as text for log-probability listings (a partial UTF-8 character shows as U+FFFD)."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def chat_logprob_entry(tokenizer, event: TokenEvent) -> dict[str, Any]:
    """One element of a chat choice's `logprobs.content`."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token_id), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes(token_id))}

    out = entry(event.token_id, event.logprob)
    out["top_logprobs"] = [entry(i, lp) for i, lp in (event.top_logprobs or [])]
    return out


def usage_dict(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


class Choice:
    """The text (and log-probabilities) of one generated sequence, built as its events arrive."""

    def __init__(self, index: int, handle: RequestHandle, tokenizer, stop: list[str], *,
                 deadline: float | None = None):
        self.index, self.handle, self.tokenizer, self.stop = index, handle, tokenizer, stop
        self.deadline = deadline  # event-loop time by which generation must end (ServerLimits.request_timeout_s)
        self._decoder = tokenizer.stream_decoder(skip_special=True)
        self.text = ""  # everything decoded so far, cut at a stop string once one is seen
        self._sent = 0  # characters of `text` already handed out as deltas
        self.token_events: list[TokenEvent] = []
        self.prompt_logprobs: PromptLogprobsEvent | None = None
        self.finish: FinishEvent | None = None
        self.stopped_by_string = False

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def finish_reason(self) -> str:
        if self.stopped_by_string or self.finish is None or self.finish.reason == "cancelled":
            return "stop"  # OpenAI knows stop, length, tool_calls, content_filter
        return self.finish.reason

    @property
    def num_generated(self) -> int:
        return self.finish.num_generated_tokens if self.finish else len(self.token_events)

    def feed(self, event) -> tuple[str, list[TokenEvent]]:
        """Take one event; return (text now safe to send, the token events it covers)."""
        if isinstance(event, PromptLogprobsEvent):
            self.prompt_logprobs = event
            return "", []
        if isinstance(event, FinishEvent):
            self.finish = event
            if not self.stopped_by_string:
                self.text += self._decoder.flush()
                self._cut_at_stop()
            return self._take(final=True), []
        if self.stopped_by_string:
            return "", []
        self.token_events.append(event)
        if not event.is_stop:
            self.text += self._decoder.feed(event.token_id)
        if self._cut_at_stop():
            self.handle.cancel()  # the engine frees the slot; the FinishEvent("cancelled") is ignored
        return self._take(final=self.stopped_by_string), [event]

    def _cut_at_stop(self) -> bool:
        if self.stopped_by_string or not self.stop:
            return False
        longest = max(map(len, self.stop))
        cut = find_stop(self.text, self.stop, max(0, self._sent - longest))
        if cut < 0:
            return False
        self.text = self.text[:cut]
        self.stopped_by_string = True
        return True

    def _take(self, final: bool) -> str:
        safe = len(self.text) if final else shown_length(self.text, self.stop)
        delta = self.text[self._sent:safe]
        self._sent = max(self._sent, safe)
        return delta


async def merge_events(choices: list[Choice], is_disconnected=None, poll_s: float = 0.25) -> AsyncIterator:
    """(choice, event) pairs from several handles as they arrive, until every choice has finished.
    `is_disconnected` (an async callable) is polled while waiting; when it says so, all handles are cancelled.
    Cancelling the consumer (client gone) cancels the handles too. Past the choices' deadline the handles
    are cancelled and APIError 504 is raised."""
    queue: asyncio.Queue = asyncio.Queue()
    deadlines = [c.deadline for c in choices if c.deadline is not None]
    deadline = min(deadlines) if deadlines else None

    async def pump(choice: Choice) -> None:
        async for event in choice.handle:
            await queue.put((choice, event))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    remaining = len(choices)
    loop = asyncio.get_running_loop()
    last_check = loop.time()
    try:
        while remaining:
            try:
                choice, event = await asyncio.wait_for(queue.get(), timeout=poll_s)
            except asyncio.TimeoutError:
                choice, event = None, None
            if is_disconnected is not None and loop.time() - last_check >= poll_s:
                last_check = loop.time()
                if await is_disconnected():
                    return
            if deadline is not None and loop.time() > deadline:
                raise APIError(504, "Generation took longer than this server's limit per request; ask for fewer "
                                    "tokens.", code="request_timeout")
            if event is None:
                continue
            if isinstance(event, FinishEvent):
                remaining -= 1
            yield choice, event
    finally:
        for c in choices:
            if not c.done:
                c.handle.cancel()
        for t in tasks:
            t.cancel()


def created() -> int:
    return int(time.time())
