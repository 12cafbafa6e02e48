"""The two generation endpoints: validated OpenAI requests -> engine requests -> responses or SSE streams.

`CompletionService` holds what both need: the engine, its tokenizer and chat format, the served model's name
and the server limits. Each check raises `APIError` with the field at fault.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..inference.engine import Engine, EngineClosed, EngineRequest, QueueFull
from ..inference.sampling import SamplingParams
from ..chat_template import TemplateChatFormat, chat_format_for
from .completions import Choice, created, merge_events, new_id
from .errors import APIError, error_body, json_bytes
from .responses import chat_chunks, chat_response, completion_chunks, completion_response
from .schema import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, ServerLimits
from .structured import StructuredOutput
from .tools import ToolPlan, build_dialog, encode_prompt, plan_tools, tools_active

__all__ = ["CompletionService"]


_log = logging.getLogger("llama3.serve")


def _sse(chunks) -> StreamingResponse:
    """Server-sent events: one `data: {json}` per chunk, then `data: [DONE]`. A failure after the 200 has
    gone out (the request's time limit, a bug) ends the stream with an error event and the terminator, so
    the client sees why it stopped instead of a cut connection."""
    async def body():
        try:
            async for chunk in chunks:
                yield b"data: " + json_bytes(chunk) + b"\n\n"
        except APIError as exc:
            yield b"data: " + json_bytes(error_body(exc.status, exc.message, exc.param, exc.code)) + b"\n\n"
        except Exception:  # noqa: BLE001 -- the status line is out; say so in the stream
            _log.exception("llama3 serve: a stream failed")
            yield b"data: " + json_bytes(error_body(500, "The server failed while streaming.")) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _collect(choices: list[Choice], request: Request) -> None:
    async for choice, event in merge_events(choices, request.is_disconnected):
        choice.feed(event)


class CompletionService:
    """Chat and text completions over one engine."""

    def __init__(self, engine: Engine, model_name: str, limits: ServerLimits):
        if engine.tokenizer is None:
            raise ValueError("the engine needs a tokenizer to serve text: Engine(model, tokenizer, ...)")
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.tokenizer = engine.tokenizer
        try:  # Llama 3's ChatFormat, or the model's own Jinja template
            self.chat_format, self.chat_error = chat_format_for(self.tokenizer), None
        except ValueError as e:  # a base model without a template still serves /v1/completions
            self.chat_format, self.chat_error = None, str(e)
        self.stop_ids = frozenset(self.tokenizer.stop_tokens)
        self.structured = StructuredOutput(self.tokenizer, engine.vocab_size, self.stop_ids)
        self.chat_stop_ids = frozenset(self.chat_format.stop_tokens) if self.chat_format else self.stop_ids

    # ----- checks -----
    def check_model(self, name: str) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model); a 404 for an unknown name."""
        if not name or name == self.model_name:
            return None
        if name in self.engine.lora.adapters:
            return name
        served = ", ".join(f"'{n}'" for n in [self.model_name, *self.engine.lora.adapters])
        raise APIError(404, f"The model '{name}' does not exist; this server serves {served}.",
                       param="model", code="model_not_found")

    def check_context(self, num_prompt: int, max_new: int | None, param: str) -> int:
        """The number of new tokens to generate; a 400 stating the limit if the request cannot fit."""
        limit = self.engine.max_seq_len
        if max_new is None:
            # Default: the rest of the context, at least one token (so a full prompt gets the error below).
            max_new = max(limit - num_prompt, 1)
        if num_prompt + max_new > limit or max_new < 0:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{num_prompt + max_new} tokens ({num_prompt} in the {param}, {max_new} in the "
                                f"completion). Please reduce the length of the {param} or the completion.",
                           param=param, code="context_length_exceeded")
        return max_new

    def check_text_size(self, total_chars: int, param: str) -> None:
        if total_chars > self.limits.max_prompt_chars:
            raise APIError(400, f"The {param} hold {total_chars} characters, over the limit of "
                                f"{self.limits.max_prompt_chars}.", param=param)

    def check_n(self, num_sequences: int, param: str = "n") -> None:
        if num_sequences > self.limits.max_n:
            raise APIError(400, f"This request asks for {num_sequences} sequences; this server allows at most "
                                f"{self.limits.max_n} per request.", param=param)

    @staticmethod
    def sampling_for(body, index: int) -> SamplingParams:
        seed = None if body.seed is None else (body.seed + index) % 2**63  # choices differ, reproducibly
        try:
            return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                  min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                  frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                                  seed=seed)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    def submit_all(self, requests: list[EngineRequest], stop: list[str]) -> list[Choice]:
        """Queue every sequence of a request, or none: a refusal cancels those already queued."""
        loop = asyncio.get_running_loop()
        handles = []
        try:
            for r in requests:
                handles.append(self.engine.submit(r, loop=loop))
        except (QueueFull, EngineClosed, ValueError) as exc:
            for h in handles:
                h.cancel()
            if isinstance(exc, QueueFull):
                raise APIError(429, str(exc), code="queue_full",
                               headers={"Retry-After": str(int(exc.retry_after_s))}) from None
            if isinstance(exc, EngineClosed):
                raise APIError(503, f"{exc}; retry shortly.", headers={"Retry-After": "5"}) from None
            raise APIError(400, str(exc)) from None
        deadline = loop.time() + self.limits.request_timeout_s
        return [Choice(i, h, self.tokenizer, stop, deadline=deadline) for i, h in enumerate(handles)]

    async def constraints_and_bias(self, body, num_sequences: int,
                                   plan: ToolPlan | None = None) -> tuple[list, dict[int, float] | None]:
        """One grammar state per sequence (None for free text) and the logit bias, checked (400s). `plan`:
        what tool_choice fixes about the answer (a call's schema, or an opening)."""
        bias = self.structured.logit_bias(body)
        constraint = await self.structured.constraint(body)
        if plan is not None and (plan.schema is not None or plan.prefix_ids):
            if constraint is not None:
                raise APIError(400, "tool_choice 'required' or a named function already fixes the answer's "
                                    "form; drop response_format / guided_*, or use tool_choice 'auto'.",
                               param="tool_choice")
            if plan.schema is not None:
                constraint = await self.structured.schema_constraint(plan.schema, "tools")
        if constraint is None:
            return [None] * num_sequences, bias
        return [constraint] + [constraint.fork() for _ in range(num_sequences - 1)], bias

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "llama3",
                "max_model_len": self.engine.max_seq_len}

    def adapter_cards(self) -> list[dict[str, Any]]:
        """One card per loaded LoRA adapter: `root` is its folder, `parent` the base model (as vLLM lists them)."""
        return [{"id": name, "object": "model", "created": 0, "owned_by": "llama3", "root": adapter.path,
                 "parent": self.model_name, "max_model_len": self.engine.max_seq_len}
                for name, adapter in list(self.engine.lora.adapters.items())]

    # ----- endpoints -----
    async def chat(self, body: ChatCompletionRequest, request: Request):
        """POST /v1/chat/completions."""
        adapter = self.check_model(body.model)
        self.check_n(body.n)
        if body.tool_choice is not None and not body.tools:
            raise APIError(400, "'tool_choice' is only allowed when 'tools' are given.", param="tool_choice")
        self.check_text_size(sum(len(m.text()) for m in body.messages), "messages")
        if self.chat_format is None:
            raise APIError(400, self.chat_error, param="messages")
        try:
            plan = plan_tools(body, self.tokenizer)
        except ValueError as exc:
            raise APIError(400, str(exc), param="tool_choice") from None
        try:
            prompt_ids = self._chat_prompt(body) + plan.prefix_ids
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        max_new = self.check_context(len(prompt_ids), body.max_new_tokens(), "messages")
        num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        constraints, bias = await self.constraints_and_bias(body, body.n, plan)
        requests = [EngineRequest(tuple(prompt_ids), max_new, self.sampling_for(body, i), self.chat_stop_ids,
                                  num_logprobs, constraint=constraints[i], logit_bias=bias, adapter=adapter)
                    for i in range(body.n)]
        choices = self.submit_all(requests, body.stop_list())
        meta = {"id": new_id("chatcmpl"), "created": created(), "model": adapter or self.model_name}
        if body.stream:
            return _sse(chat_chunks(choices, body, meta, plan, request.is_disconnected))
        await _collect(choices, request)
        return chat_response(choices, body, meta, plan, len(prompt_ids))

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """The prompt ids of a chat request. Llama 3: tools in its 3.1 JSON layout (`tools.py`); a derivative's
        template renders the tool definitions itself, if it reads them at all."""
        if not isinstance(self.chat_format, TemplateChatFormat):
            return encode_prompt(self.chat_format, build_dialog(body))
        tools = [t.model_dump() for t in body.tools] if tools_active(body) else None
        if tools and not self.chat_format.supports_tools:
            raise ValueError("this model's chat template does not render tools; send the request without tools")
        return self.chat_format.encode_dialog_prompt(build_dialog(body, inline_tools=False), tools=tools)

    async def complete(self, body: CompletionRequest, request: Request):
        """POST /v1/completions."""
        adapter = self.check_model(body.model)
        prompts, texts = self._prompt_ids(body)
        constraints, bias = await self.constraints_and_bias(body, len(prompts) * body.n)
        requests = []
        for p, ids in enumerate(prompts):
            max_new = self.check_context(len(ids), body.max_tokens, "prompt")
            for i in range(body.n):
                requests.append(EngineRequest(tuple(ids), max_new, self.sampling_for(body, p * body.n + i),
                                              self.stop_ids, body.logprobs,
                                              prompt_logprobs=body.echo and body.logprobs is not None,
                                              constraint=constraints[p * body.n + i], logit_bias=bias,
                                              adapter=adapter))
        choices = self.submit_all(requests, body.stop_list())
        for choice in choices:  # echo returns the prompt as given (text), or decoded (token ids)
            p = choice.index // body.n
            choice.prompt_text = texts[p] if texts is not None else self.tokenizer.decode(prompts[p])
        meta = {"id": new_id("cmpl"), "created": created(), "model": adapter or self.model_name}
        if body.stream:
            return _sse(completion_chunks(choices, body, meta, request.is_disconnected))
        await _collect(choices, request)
        return completion_response(choices, body, meta, sum(len(ids) for ids in prompts))

    def _prompt_ids(self, body: CompletionRequest) -> tuple[list[list[int]], list[str] | None]:
        """The completions API's four prompt forms -> (token-id lists, the texts if given as text). Text gets
        a BOS token in front, as Llama 3 saw in training; token ids are taken as they are."""
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if len(prompt) * body.n > MAX_PROMPTS:
            raise APIError(400, f"{len(prompt)} prompts × n={body.n} is over the limit of {MAX_PROMPTS} "
                                "sequences per request; split the request.", param="prompt")
        self.check_n(body.n)
        if isinstance(prompt[0], str):
            self.check_text_size(sum(map(len, prompt)), "prompt")
            return [self.tokenizer.encode(text, bos=True) for text in prompt], list(prompt)
        return [list(ids) for ids in prompt], None
