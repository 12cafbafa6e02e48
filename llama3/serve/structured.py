"""Structured output and logit bias for the generation endpoints.

Request fields (chat and text completions alike):

- `response_format`: OpenAI's `{"type": "text"}`, `{"type": "json_object"}` (any JSON object) or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (a value valid under the schema);
- vLLM's extensions: `guided_json` (a schema), `guided_regex`, `guided_choice` (a list of strings) and
  `guided_grammar` (Lark, or llama.cpp's GBNF);
- `logit_bias`: {token id as a string: bias in [-100, 100]}, added to the logits before sampling.

At most one constraint per request. The constraint is compiled here, off the event loop, so a schema the
grammar engine cannot compile is a 400 with its reason before anything is queued; each of the request's
`n` sequences gets its own copy, and the engine masks every row by its own grammar
(`llama3.inference.constraints`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ..inference.constraints import GrammarCompiler, GrammarError, TokenConstraint
from .errors import APIError

__all__ = ["StructuredOutput"]

_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class StructuredOutput:
    """Turns a request's constraint and bias fields into what the engine takes, for one tokenizer."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids):
        self.vocab_size = vocab_size
        self.compiler = GrammarCompiler(tokenizer, vocab_size, stop_ids)

    async def constraint(self, body) -> TokenConstraint | None:
        """The request's grammar state, or None when it asks for free text; 400 if it cannot compile."""
        param, build = self._requested(body)
        if build is None:
            return None
        return await self._compile(build, param)

    async def schema_constraint(self, schema: dict[str, Any], param: str) -> TokenConstraint:
        """A JSON schema's grammar state (e.g. a tool call's, for tool_choice); 400 on `param` if it cannot
        compile."""
        return await self._compile(lambda: self.compiler.json_schema(schema), param)

    async def _compile(self, build, param: str) -> TokenConstraint:
        try:
            return await asyncio.to_thread(build)
        except GrammarError as exc:
            raise APIError(400, f"Invalid {param}: {exc}.", param=param) from None
        except ImportError:
            raise APIError(400, f"{param} needs the grammar engine llguidance, which is not installed on this "
                                "server: pip install 'llama3[serve]'.", param=param) from None

    def _requested(self, body) -> tuple[str | None, Any]:
        asked = [name for name in _GUIDED if getattr(body, name) is not None]
        fmt = body.response_format
        if fmt is not None and fmt.type != "text":
            asked.insert(0, "response_format")
        if len(asked) > 1:
            raise APIError(400, f"Give at most one of response_format (json_object or json_schema), "
                                f"{', '.join(_GUIDED)}; this request sets {', '.join(asked)}.", param=asked[1])
        if not asked:
            return None, None
        param = asked[0]
        compiler = self.compiler
        if param == "response_format":
            return param, self._response_format(fmt)
        if param == "guided_json":
            schema = _schema_from(body.guided_json, param)
            return param, lambda: compiler.json_schema(schema)
        if param == "guided_regex":
            return param, lambda: compiler.regex(body.guided_regex)
        if param == "guided_choice":
            return param, lambda: compiler.choice(body.guided_choice)
        return param, lambda: compiler.grammar(body.guided_grammar)

    def _response_format(self, fmt):
        if fmt.type == "json_object":
            return self.compiler.json_object
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema: "
                                '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}.',
                           param="response_format.json_schema")
        schema = fmt.json_schema.json_schema
        return lambda: self.compiler.json_schema(schema)

    def logit_bias(self, body) -> dict[int, float] | None:
        """OpenAI's logit_bias with its keys as token ids; 400 for a key that is not one."""
        if not body.logit_bias:
            return None
        out = {}
        for key, value in body.logit_bias.items():
            try:
                token_id = int(key)
            except ValueError:
                token_id = -1
            if not 0 <= token_id < self.vocab_size or str(token_id) != key.strip():
                raise APIError(400, f"logit_bias key {key!r} is not a token id: keys are token ids in "
                                    f"[0, {self.vocab_size}) written as strings.", param="logit_bias")
            out[token_id] = float(value)
        return out


def _schema_from(value: dict[str, Any] | str, param: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    try:
        schema = json.loads(value)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"{param} is a string but not JSON: {exc}.", param=param) from None
    if not isinstance(schema, dict):
        raise APIError(400, f"{param} must be a JSON schema object.", param=param)
    return schema
