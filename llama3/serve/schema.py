"""Request bodies of the OpenAI API we serve, with every field bounded.

Field names and ranges follow the OpenAI API reference (temperature in [0, 2], top_p in (0, 1], at most 4
stop sequences, top_logprobs <= 20, penalties in [-2, 2]); a few server-side caps (`ServerLimits`) bound
what the API leaves open (n, message count, string lengths). Validation failures become 400 errors naming
the field (see `app.py`). Responses are plain dicts built in `app.py`, shaped exactly as OpenAI's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

__all__ = [
    "MAX_N",
    "MAX_STOP",
    "MAX_TOP_LOGPROBS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ServerLimits",
    "StreamOptions",
    "ToolDefinition",
]

MAX_N = 8
MAX_STOP = 4
MAX_STOP_CHARS = 200
MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 1024
MAX_PROMPTS = 64
MAX_TOOLS = 64
MAX_TOKEN_ID = 2**31 - 1
MAX_LOGIT_BIAS = 1024  # OpenAI states no limit; a bound keeps one request's work small
MAX_GRAMMAR_CHARS = 100_000
MAX_CHOICES = 256

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1, strict=True)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


@dataclass(frozen=True)
class ServerLimits:
    """Server-side bounds. `max_body_bytes` caps a request body; `max_prompt_chars` caps any text field;
    `max_n` caps choices per request (at most MAX_N); `request_timeout_s` bounds the generation of one
    request (then a 504, or an error event ending the stream); `body_timeout_s` bounds the wait for each
    part of a request body (then a 408)."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_chars: int = 1_000_000
    max_n: int = MAX_N
    request_timeout_s: float = 600.0
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_n <= MAX_N:
            raise ValueError(f"ServerLimits.max_n must be in [1, {MAX_N}], got {self.max_n}")
        for name in ("request_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerLimits.{name} must be positive, got {getattr(self, name)!r}")


class _Strict(BaseModel):
    # Unknown fields are ignored (clients send vendor extras), but known ones are type-checked.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    arguments: str = "{}"


class ToolCall(_Strict):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One message. `developer` is OpenAI's newer name for `system`; `tool` carries a tool's result."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: dict[str, str]

    @field_validator("function")
    @classmethod
    def _has_name(cls, value: dict[str, str]) -> dict[str, str]:
        if not value.get("name"):
            raise ValueError("tool_choice.function needs a 'name'")
        return value


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`: the schema the answer must follow (`strict` or not, it is enforced)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _StructuredOutputFields(_Strict):
    """OpenAI's `response_format` and `logit_bias`, and vLLM's guided-decoding extensions (at most one of
    response_format json_* / guided_json / guided_regex / guided_choice / guided_grammar); see structured.py."""

    response_format: ResponseFormat | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)] | None = None
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)]],
                             Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    guided_grammar: Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)] | None = None


class _SamplingFields(_StructuredOutputFields):
    model: Annotated[str, Field(max_length=256)] = ""
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N, strict=True)] = 1
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    # Extensions most open servers (vLLM, llama.cpp) accept as well.
    top_k: Annotated[int, Field(ge=0, le=1000, strict=True)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10.0, allow_inf_nan=False)] = 1.0  # see sampling.py
    user: Annotated[str, Field(max_length=256)] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1, strict=True)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, strict=True)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS, strict=True)] | None = None
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID, strict=True)]], Field(min_length=1)]


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter, in vLLM's shape."""
    model_config = ConfigDict(extra="forbid")
    lora_name: Annotated[str, Field(min_length=1, max_length=256)]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]


class UnloadLoRAAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter, in vLLM's shape (adapters are named, so no `lora_int_id`)."""
    model_config = ConfigDict(extra="forbid")
    lora_name: Annotated[str, Field(min_length=1, max_length=256)]


class CompletionRequest(_SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: Annotated[int, Field(ge=0, strict=True)] = 16  # the OpenAI default for completions
    echo: StrictBool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS, strict=True)] | None = None
    suffix: None = Field(default=None, description="not supported: insertion needs a fill-in-the-middle model")
    best_of: Annotated[int, Field(ge=1, le=1, strict=True)] | None = None
