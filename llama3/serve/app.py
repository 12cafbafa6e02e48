"""The OpenAI-compatible HTTP API and the web chat page, as a FastAPI app over a running `Engine`.

    engine = Engine(model, tokenizer, num_slots=8).start()
    app = create_app(engine, api_key="secret", model_name="my-llama")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, GET /v1/models,
POST /v1/load_lora_adapter and /v1/unload_lora_adapter (with `allow_lora_updates`), GET /health, GET /metrics, GET / (the chat page). Errors always have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.engine import Engine, EngineClosed
from .embeddings import EmbeddingRequest, EmbeddingService
from .errors import APIError, SafeJSONResponse, error_response
from .handlers import CompletionService
from .metrics import HttpCounters, render_metrics
from .responses import GenerationFailed
from .schema import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    ServerLimits,
    UnloadLoRAAdapterRequest,
)

__all__ = ["APIError", "create_app"]

# The page runs only its own inline script and talks only to this server.
_PAGE_POLICY = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"


_log = logging.getLogger("llama3.serve")


class _Guard:
    """ASGI middleware: counts answers by path/status, caps the request body and the time it may take to
    arrive, checks the API key, and answers (and counts) a 500 in OpenAI's shape when the app fails."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, counters: HttpCounters,
                 body_timeout_s: float = 30.0):
        self.app, self.api_key, self.max_body_bytes, self.counters = app, api_key, max_body_bytes, counters
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions",
                                 "/v1/completions", "/v1/embeddings", "/v1/load_lora_adapter",
                                 "/v1/unload_lora_adapter") else "other"

        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counters.add(label, message["status"])
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            supplied = headers.get("authorization", "")
            token = supplied[7:] if supplied.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                err = APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                               code="invalid_api_key")
                return await error_response(err)(scope, receive, counting_send)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await self._too_large(scope, receive, counting_send)
        received, body_done = 0, False

        async def limited_receive():
            nonlocal received, body_done
            if body_done:  # after the body, receive() waits for a disconnect: as long as a stream lasts
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise APIError(408, f"The request body did not arrive within {self.body_timeout_s:g} s.",
                               code="request_timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    raise APIError(413, self._too_large_message(), code="request_too_large")
            return message

        try:
            await self.app(scope, limited_receive, counting_send)
        except Exception:  # noqa: BLE001 -- a bug must still answer in OpenAI's shape and show in /metrics
            _log.exception("llama3 serve: request to %s failed", path)
            if started:
                raise  # the status line is out: the server can only drop the connection
            await error_response(APIError(500, "The server failed to answer this request."))(
                scope, receive, counting_send)

    def _too_large_message(self) -> str:
        return f"The request body is larger than the limit of {self.max_body_bytes} bytes."

    async def _too_large(self, scope, receive, send):
        await error_response(APIError(413, self._too_large_message(), code="request_too_large"))(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"The body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}.", None
    param = ".".join(loc) or None
    where = f" in '{param}'" if param else ""
    return f"Invalid request{where}: {first.get('msg')}.", param


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, answered in OpenAI's shape."""
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(GenerationFailed)
    async def _failed(request: Request, exc: GenerationFailed):
        return error_response(APIError(500, str(exc)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail)))


def create_app(engine: Engine, *, api_key: str | None = None, model_name: str = "llama3",
               limits: ServerLimits | None = None, embedding_pooling: str = "mean",
               generation_defaults: dict | None = None, allow_lora_updates: bool = False) -> FastAPI:
    """The FastAPI app serving `engine` (already started; its `tokenizer` must be set). `api_key`, when
    given, is required as a Bearer token on /v1/* and /metrics; `limits` bound request sizes;
    `embedding_pooling` ("mean" or "last") is how /v1/embeddings pools the final hidden states;
    `generation_defaults` (the model's generation_config.json sampling, e.g. temperature and top_p) are
    listed in the model card for clients such as the chat page to start from. `allow_lora_updates` opens
    POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read folders on this machine, so they are
    refused unless the operator allows them)."""
    limits = limits or ServerLimits()
    service = CompletionService(engine, model_name, limits)
    embeddings = EmbeddingService(engine, embedding_pooling, limits.max_prompt_chars)
    counters = HttpCounters()
    app = FastAPI(title="llama3", docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=SafeJSONResponse)
    app.state.engine = engine
    _install_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        page = resources.files("llama3.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_POLICY})

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if not engine.running:
            raise APIError(503, "The engine is not running.")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(render_metrics(engine.snapshot(), counters, model_name),
                                 media_type="text/plain; version=0.0.4")

    def card() -> dict:
        extra = {"generation_config": generation_defaults} if generation_defaults else {}
        return service.model_card() | extra

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(), *service.adapter_cards()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        adapter = service.check_model(name)
        return card() if adapter is None else next(c for c in service.adapter_cards() if c["id"] == adapter)

    def check_lora_updates() -> None:
        if not allow_lora_updates:
            raise APIError(403, "Loading and unloading LoRA adapters is off on this server; start it with "
                                "--allow-lora-updates (or load adapters at start with --lora NAME=PATH).")

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        check_lora_updates()
        if body.lora_name == model_name:
            raise APIError(400, f"'{body.lora_name}' is the base model's name; give the adapter another name.",
                           param="lora_name")
        try:
            await asyncio.to_thread(engine.load_lora, body.lora_name, body.lora_path)
        except ValueError as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        except EngineClosed as exc:
            raise APIError(503, f"{exc}; retry shortly.", headers={"Retry-After": "5"}) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        check_lora_updates()
        try:
            await asyncio.to_thread(engine.unload_lora, body.lora_name)
        except ValueError as exc:
            raise APIError(404, str(exc), param="lora_name", code="model_not_found") from None
        except EngineClosed as exc:
            raise APIError(503, f"{exc}; retry shortly.", headers={"Retry-After": "5"}) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await service.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await service.complete(body, request)

    @app.post("/v1/embeddings")
    async def create_embeddings(body: EmbeddingRequest):
        if service.check_model(body.model) is not None:
            raise APIError(400, f"Embeddings come from the base model; send model '{model_name}' (or none), not "
                                f"the adapter '{body.model}'.", param="model")
        return await embeddings.create(body, model_name)

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes, counters=counters,
                       body_timeout_s=limits.body_timeout_s)
    return app
