"""The OpenAI-compatible HTTP API and the web chat page, as a FastAPI app over a running `Engine`.

    engine = Engine(model, tokenizer, num_slots=8).start()
    app = create_app(engine, api_key="secret", model_name="my-llama")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics,
GET / (the chat page). Errors always have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.engine import Engine, EngineClosed, EngineRequest, QueueFull
from ..inference.sampling import SamplingParams
from .completions import Choice, created, merge_events, new_id
from .metrics import HttpCounters, render_metrics
from .responses import GenerationFailed, chat_chunks, chat_response, completion_chunks, completion_response
from .schema import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, ServerLimits
from .tools import build_dialog, forced_prefix

__all__ = ["APIError", "create_app"]

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
                 503: "service_unavailable"}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _STATUS_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                        headers=err.headers)


class _Guard:
    """ASGI middleware: counts answers by path/status, caps the request body, checks the API key."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, counters: HttpCounters):
        self.app, self.api_key, self.max_body_bytes, self.counters = app, api_key, max_body_bytes, counters

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions",
                                 "/v1/completions") else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counters.add(label, message["status"])
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            supplied = headers.get("authorization", "")
            token = supplied[7:] if supplied.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                err = APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                               code="invalid_api_key")
                return await _error_response(err)(scope, receive, counting_send)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await self._too_large(scope, receive, counting_send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise APIError(413, self._too_large_message())
            return message

        await self.app(scope, limited_receive, counting_send)

    def _too_large_message(self) -> str:
        return f"The request body is larger than the limit of {self.max_body_bytes} bytes."

    async def _too_large(self, scope, receive, send):
        await _error_response(APIError(413, self._too_large_message(), code="request_too_large"))(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"The body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}.", None
    param = ".".join(loc) or None
    where = f" in '{param}'" if param else ""
    return f"Invalid request{where}: {first.get('msg')}.", param


def create_app(engine: Engine, *, api_key: str | None = None, model_name: str = "llama3",
               limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (already started; its `tokenizer` must be set)."""
    if engine.tokenizer is None:
        raise ValueError("the engine needs a tokenizer to serve text: Engine(model, tokenizer, ...)")
    tokenizer = engine.tokenizer
    limits = limits or ServerLimits()
    from ..tokenizer import ChatFormat

    chat_format = ChatFormat(tokenizer)
    counters = HttpCounters()
    app = FastAPI(title="llama3", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(GenerationFailed)
    async def _failed(request: Request, exc: GenerationFailed):
        return _error_response(APIError(500, str(exc)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error_response(APIError(exc.status_code, str(exc.detail)))

    def check_model(name: str) -> None:
        if name and name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")

    def check_context(num_prompt: int, max_new: int | None, param: str) -> int:
        limit = engine.max_seq_len
        if max_new is None:
            # Default: the rest of the context, at least one token (so a full prompt gets the error below).
            max_new = max(limit - num_prompt, 1)
        if num_prompt + max_new > limit or max_new < 0:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{num_prompt + max_new} tokens ({num_prompt} in the {param}, {max_new} in the "
                                f"completion). Please reduce the length of the {param} or the completion.",
                           param=param, code="context_length_exceeded")
        return max_new

    def sampling_for(body, index: int) -> SamplingParams:
        seed = None if body.seed is None else (body.seed + index) % 2**63  # choices differ, reproducibly
        return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                              repetition_penalty=body.repetition_penalty, frequency_penalty=body.frequency_penalty,
                              presence_penalty=body.presence_penalty, seed=seed)

    def submit_all(requests: list[EngineRequest], loop) -> list:
        handles = []
        try:
            for r in requests:
                handles.append(engine.submit(r, loop=loop))
        except QueueFull as exc:
            for h in handles:
                h.cancel()
            raise APIError(429, str(exc), code="queue_full",
                           headers={"Retry-After": str(int(exc.retry_after_s))}) from None
        except EngineClosed as exc:
            for h in handles:
                h.cancel()
            raise APIError(503, f"{exc}; retry shortly.", headers={"Retry-After": "5"}) from None
        except ValueError as exc:
            for h in handles:
                h.cancel()
            raise APIError(400, str(exc)) from None
        return handles

    def check_text_size(total_chars: int, param: str) -> None:
        if total_chars > limits.max_prompt_chars:
            raise APIError(400, f"The {param} hold {total_chars} characters, over the limit of "
                                f"{limits.max_prompt_chars}.", param=param)

    def stop_strings(body) -> list[str]:
        return body.stop_list()

    async def collect(choices: list[Choice], request: Request) -> None:
        async for choice, event in merge_events(choices, request.is_disconnected):
            choice.feed(event)

    def sse(chunks):
        async def body():
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ----- routes -----
    @app.get("/", response_class=HTMLResponse)
    async def index():
        page = resources.files("llama3.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; "
                                           "script-src 'unsafe-inline'; style-src 'unsafe-inline'"})

    @app.get("/health")
    async def health():
        if not engine.running:
            raise APIError(503, "The engine is not running.")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(render_metrics(engine.snapshot(), counters, model_name),
                                 media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "llama3",
                "max_model_len": engine.max_seq_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        check_text_size(sum(len(m.text()) for m in body.messages), "messages")
        try:
            prefix = forced_prefix(body)
            prompt_ids = chat_format.encode_dialog_prompt(build_dialog(body)) + tokenizer.encode(prefix)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        max_new = check_context(len(prompt_ids), body.max_new_tokens(), "messages")
        num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = [EngineRequest(tuple(prompt_ids), max_new, sampling_for(body, i),
                                  frozenset(tokenizer.stop_tokens), num_logprobs) for i in range(body.n)]
        handles = submit_all(requests, asyncio.get_running_loop())
        choices = [Choice(i, h, tokenizer, stop_strings(body)) for i, h in enumerate(handles)]
        meta = {"id": new_id("chatcmpl"), "created": created(), "model": model_name}
        if body.stream:
            return sse(chat_chunks(choices, body, meta, prefix, request.is_disconnected))
        await collect(choices, request)
        return chat_response(choices, body, meta, prefix, len(prompt_ids))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts, texts = _prompt_ids(body, tokenizer, check_text_size)
        requests = []
        for p, ids in enumerate(prompts):
            max_new = check_context(len(ids), body.max_tokens, "prompt")
            for i in range(body.n):
                requests.append(EngineRequest(tuple(ids), max_new, sampling_for(body, p * body.n + i),
                                              frozenset(tokenizer.stop_tokens), body.logprobs,
                                              prompt_logprobs=body.echo and body.logprobs is not None))
        handles = submit_all(requests, asyncio.get_running_loop())
        choices = [Choice(i, h, tokenizer, stop_strings(body)) for i, h in enumerate(handles)]
        for choice in choices:  # echo returns the prompt as given (text), or decoded (token ids)
            p = choice.index // body.n
            choice.prompt_text = texts[p] if texts is not None else tokenizer.decode(prompts[p])
        meta = {"id": new_id("cmpl"), "created": created(), "model": model_name}
        if body.stream:
            return sse(completion_chunks(choices, body, meta, request.is_disconnected))
        await collect(choices, request)
        return completion_response(choices, body, meta, sum(len(ids) for ids in prompts))

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes, counters=counters)
    return app


def _prompt_ids(body: CompletionRequest, tokenizer, check_text_size) -> tuple[list[list[int]], list[str] | None]:
    """The completions API's four prompt forms -> (token-id lists, the texts if given as text). Text gets a
    BOS token in front, as Llama 3 saw in training; token ids are taken as they are."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if len(prompt) * body.n > MAX_PROMPTS:
        raise APIError(400, f"{len(prompt)} prompts × n={body.n} is over the limit of {MAX_PROMPTS} sequences "
                            "per request; split the request.", param="prompt")
    if isinstance(prompt[0], str):
        check_text_size(sum(map(len, prompt)), "prompt")
        return [tokenizer.encode(text, bos=True) for text in prompt], list(prompt)
    return [list(ids) for ids in prompt], None
