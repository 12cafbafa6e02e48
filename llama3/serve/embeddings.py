"""POST /v1/embeddings in OpenAI's shape.

`input` is a string, a list of strings, a list of token ids or a list of such lists (at most
`MAX_EMBEDDING_INPUTS`); text is encoded with a BOS token in front, as in completions. `encoding_format` is
`float` (lists of numbers) or `base64` (the little-endian float32 bytes, base64-encoded, as OpenAI sends them);
`dimensions` keeps the first N coordinates and renormalises. The vectors are pooled final hidden states
(`llama3.inference.embeddings`: mean or last-token, L2-normalised), computed on the engine's thread between
decode steps, all of one request's inputs in one job, each input in its own forward pass.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any, Literal

from pydantic import Field

from ..inference.embeddings import POOLINGS, embed, truncate_and_normalize
from ..inference.engine import Engine, EngineClosed
from .errors import APIError
from .schema import MAX_TOKEN_ID, _Strict

__all__ = ["EmbeddingRequest", "EmbeddingService", "MAX_EMBEDDING_INPUTS"]

MAX_EMBEDDING_INPUTS = 256

TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID, strict=True)]], Field(min_length=1)]


class EmbeddingRequest(_Strict):
    input: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)] | TokenIds
            | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)])
    model: Annotated[str, Field(max_length=256)] = ""
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, strict=True)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None


class EmbeddingService:
    """Embeddings over the engine's model, pooled as `pooling` says (one of `POOLINGS`)."""

    def __init__(self, engine: Engine, pooling: str = "mean", max_chars: int = 1_000_000):
        if pooling not in POOLINGS:
            raise ValueError(f"embedding pooling {pooling!r} is not one of {POOLINGS}")
        self.engine, self.pooling, self.max_chars = engine, pooling, max_chars
        self.dim = engine.model.args.dim

    def token_lists(self, body: EmbeddingRequest) -> list[list[int]]:
        """The four input forms -> token-id lists, each checked against the vocabulary and the context."""
        inputs = body.input
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if isinstance(inputs[0], str):
            if sum(map(len, inputs)) > self.max_chars:
                raise APIError(400, f"The input holds over {self.max_chars} characters.", param="input")
            if any(text == "" for text in inputs):
                raise APIError(400, "An input string is empty; give text to embed.", param="input")
            tokenizer = self.engine.tokenizer
            lists = [tokenizer.encode(text, bos=True) for text in inputs]
        else:
            lists = [list(ids) for ids in inputs]
        limit, vocab = self.engine.max_seq_len, self.engine.vocab_size
        for i, ids in enumerate(lists):
            if len(ids) > limit:
                raise APIError(400, f"Input {i} has {len(ids)} tokens, over this model's maximum context of "
                                    f"{limit} tokens; shorten it.", param="input", code="context_length_exceeded")
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise APIError(400, f"Input {i} holds token id {bad[0]}, outside the vocabulary [0, {vocab}).",
                               param="input")
        return lists

    async def create(self, body: EmbeddingRequest, model_name: str) -> dict[str, Any]:
        """The `list` of `embedding` objects, with usage."""
        if body.dimensions is not None and body.dimensions > self.dim:
            raise APIError(400, f"dimensions={body.dimensions} is more than this model's {self.dim}; ask for "
                                f"at most {self.dim}.", param="dimensions")
        lists = self.token_lists(body)
        model = self.engine.model
        try:
            future = self.engine.run_on_engine(lambda: embed(model, lists, pooling=self.pooling))
        except EngineClosed as exc:
            raise APIError(503, f"{exc}; retry shortly.", headers={"Retry-After": "5"}) from None
        vectors = truncate_and_normalize(await asyncio.wrap_future(future), body.dimensions)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        num_tokens = sum(map(len, lists))
        return {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}


def _encode(vector, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
