"""Constrained decoding: a grammar's token mask per row of a batch, and OpenAI's `logit_bias`.

Grammars run on llguidance (the Rust engine behind Guidance; chosen over xgrammar by
`benchmarks/grammar_engines.py`: it compiles a request's schema faster on Llama 3's 128K vocabulary, needs
no torch/triton/transformers of its own, and reads llama.cpp's GBNF). A `GrammarCompiler` is built once per
tokenizer (2–4 seconds for 128K tokens on first use; the server does it off the engine thread) and turns a
JSON schema, a regex, a list of choices or a Lark/GBNF grammar into a `TokenConstraint`: one row's parser
state.

Each decode step the engine asks `constrain_logits` to
1. add each row's logit bias (one `index_add_` for the whole batch), and
2. fill one bitmask row per constrained row (bit t of row r: token t may follow), in parallel in Rust,
   and set the logits of forbidden tokens to -inf with one vectorized unpack (no Python loop over the
   vocabulary; `apply_token_bitmask`);
then, once a token is drawn, `TokenConstraint.advance` moves the parser on. A grammar that may end allows the
tokenizer's stop tokens; once nothing but a stop token could follow (`finished`), the engine ends the row
("stop") without a further step. The mask does not depend on the weights: output follows the grammar even
from a random model.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["GrammarCompiler", "GrammarError", "TokenConstraint", "apply_token_bitmask", "constrain_logits",
           "logit_bias_tensors"]

# JSON on one line with ", " and ": " between items (Python's json.dumps layout, which Llama 3 writes and
# its tool-call format uses) and no free whitespace, so a model cannot stall in whitespace. A schema may
# still choose otherwise through llguidance's "x-guidance" key.
_JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema, regex or grammar the engine cannot compile; the message says why."""


class TokenConstraint:
    """One sequence's grammar state (an llguidance matcher). Not shared between sequences: each of a
    request's `n` choices gets its own (`fork`)."""

    def __init__(self, matcher, description: str):
        self.matcher, self.description = matcher, description

    def fork(self) -> TokenConstraint:
        """A fresh copy in the same state, for another sequence."""
        return TokenConstraint(self.matcher.deep_copy(), self.description)

    def advance(self, token_id: int) -> None:
        """Take the token that was drawn; raises RuntimeError if the grammar refuses it (a bug: the mask
        should have made that impossible)."""
        if not self.matcher.consume_token(token_id):
            raise RuntimeError(f"the {self.description} constraint refused token {token_id}: "
                               f"{self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete: only a stop token may follow."""
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary size (the model's, which may exceed the
    tokenizer's). Thread-safe; the llguidance tokenizer is built on first use."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._lltokenizer = None
        self._lock = threading.Lock()

    def lltokenizer(self):
        """llguidance's view of the vocabulary: token bytes, the BPE (to re-tokenize forced text) and the
        stop tokens a finished grammar allows."""
        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = _build_lltokenizer(self.tokenizer, self.vocab_size, self.stop_ids)
            return self._lltokenizer

    # ----- the constraint kinds -----
    def json_object(self) -> TokenConstraint:
        """Any JSON object (`response_format: {"type": "json_object"}`)."""
        return self.json_schema({"type": "object"}, description="JSON object")

    def json_schema(self, schema: dict[str, Any] | bool, description: str = "JSON schema") -> TokenConstraint:
        """A JSON value valid under `schema` (draft 2020-12 as llguidance implements it)."""
        import llguidance

        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the JSON schema cannot be used: {exc}") from None
        return self._compile(grammar, description)

    def regex(self, pattern: str) -> TokenConstraint:
        """Text matching the regular expression `pattern` as a whole (Rust `regex` syntax)."""
        import llguidance

        return self._compile(llguidance.LLMatcher.grammar_from_regex(pattern), "regex")

    def choice(self, options: Sequence[str]) -> TokenConstraint:
        """Exactly one of `options`."""
        import llguidance

        if not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError("choices must be a non-empty list of non-empty strings")
        lark = "start: " + " | ".join(json.dumps(o) for o in options)
        return self._compile(llguidance.LLMatcher.grammar_from_lark(lark), "choice")

    def grammar(self, text: str) -> TokenConstraint:
        """A context-free grammar in Lark syntax (llguidance's) or llama.cpp's GBNF (told apart by `::=`)."""
        import llguidance

        try:
            grammar = llguidance.grammar_from("grammar", text)
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        return self._compile(grammar, "grammar")

    def _compile(self, grammar: str, description: str) -> TokenConstraint:
        import llguidance

        lltokenizer = self.lltokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltokenizer)
        if is_error:
            raise GrammarError(f"the {description} cannot be compiled: {messages[0].strip()}")
        matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the {description} cannot be compiled: {matcher.get_error().strip()}")
        return TokenConstraint(matcher, description)


def _build_lltokenizer(tokenizer, vocab_size: int, stop_ids: list[int]):
    """From our tiktoken-based tokenizer directly; any other tokenizer through its token bytes."""
    import llguidance
    from llguidance.tiktoken import lltokenizer_from_encoding

    encoding = getattr(tokenizer, "model", None)
    if encoding is not None and hasattr(encoding, "_mergeable_ranks"):
        return lltokenizer_from_encoding(encoding, n_vocab=vocab_size, eos_token=stop_ids)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_BytesVocabulary(tokenizer, stop_ids)),
                                  n_vocab=vocab_size, eos_token=stop_ids)


class _BytesVocabulary:
    """The minimal tokenizer interface llguidance's TokenizerWrapper reads, for tokenizers without tiktoken."""

    def __init__(self, tokenizer, stop_ids: list[int]):
        self._tokenizer = tokenizer
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.n_words)]
        self.eos_token_id = stop_ids[0]
        self.bos_token_id = getattr(tokenizer, "bos_id", None)
        self.special_token_ids = [i for i in range(tokenizer.n_words) if tokenizer.is_special(i)]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)


# ----- applying constraints to a batch of logits -----
# Row b of this table: the 8 bits of byte b, lowest first. Unpacking a bitmask is one lookup per byte.
_BYTE_BITS = torch.tensor([[(b >> i) & 1 for i in range(8)] for b in range(256)], dtype=torch.bool)  # (256, 8)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Logits (R, V) with -inf where the bitmask (R, ceil(V/32)) int32 has a 0 bit (a new tensor). Bit t % 32
    of word t // 32 is token t (llguidance's and xgrammar's layout), so with each word's bytes lowest first
    it is bit t % 8 of byte t // 8.

    On the CPU this runs in numpy (`unpackbits` and one `where`, single-threaded): on a shared machine it
    measured 5x faster than the same in torch with 2 intra-op threads, whose parallel regions wait for
    descheduled threads. Other devices unpack with a byte -> 8 bits lookup table in torch."""
    num_rows, vocab = logits.shape
    as_bytes = bitmask.contiguous().cpu().view(torch.uint8)  # (R, 4W)
    if sys.byteorder == "big":  # put each word's lowest byte first
        as_bytes = as_bytes.view(num_rows, -1, 4).flip(-1).reshape(num_rows, -1)
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        allowed = np.unpackbits(as_bytes.numpy(), axis=1, count=vocab, bitorder="little").view(bool)  # (R, V)
        return torch.from_numpy(np.where(allowed, logits.numpy(), np.float32(-np.inf)))
    table = _BYTE_BITS.to(logits.device)
    allowed = table[as_bytes.to(logits.device).long()].view(num_rows, -1)[:, :vocab]  # (R, V)
    return torch.where(allowed, logits, float("-inf"))


def logit_bias_tensors(biases: Sequence[dict[int, float] | None], vocab_size: int,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row {token id: bias} -> (flat indices into a (R, V) tensor, values), or None if no row has any."""
    index, values = [], []
    for row, bias in enumerate(biases):
        for token_id, value in (bias or {}).items():
            index.append(row * vocab_size + token_id)
            values.append(value)
    if not index:
        return None
    return torch.tensor(index, device=device), torch.tensor(values, device=device)


class _MaskWorkspace:
    """A reusable bitmask buffer and llguidance's thread pool, grown to the widest batch seen."""

    def __init__(self):
        self.bitmask: torch.Tensor | None = None
        self.executor = None

    def bitmask_for(self, num_rows: int, vocab_size: int) -> torch.Tensor:
        words = (vocab_size + 31) // 32
        if self.bitmask is None or self.bitmask.shape[0] < num_rows or self.bitmask.shape[1] != words:
            self.bitmask = torch.full((num_rows, words), -1, dtype=torch.int32)
        return self.bitmask[:num_rows]

    def fill(self, rows: list[tuple[Any, int]], bitmask: torch.Tensor) -> None:
        """Rows (matcher, row index) of `bitmask` (R, W) int32, contiguous, on the CPU: filled in parallel in
        Rust. (Not through llguidance.torch, whose import pulls in torch.compile's machinery: seconds.)"""
        import llguidance

        if self.executor is None:
            self.executor = llguidance.LLExecutor(num_threads=2)
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
        self.executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])


_WORKSPACES = threading.local()  # one per engine thread: the buffer is written every step


def constrain_logits(logits: torch.Tensor, constraints: Sequence[TokenConstraint | None],
                     biases: Sequence[dict[int, float] | None]) -> torch.Tensor:
    """Logits (R, V) of R rows -> the logits to sample from: each row's bias added and, for rows with a
    constraint, tokens its grammar forbids at -inf. The input is left as it is (the caller keeps the model's
    own distribution for log-probabilities); returns it unchanged when no row asks for either."""
    bias = logit_bias_tensors(biases, logits.shape[1], logits.device)
    constrained = [(c.matcher, row) for row, c in enumerate(constraints) if c is not None]
    if bias is None and not constrained:
        return logits
    out = logits.float()
    if bias is not None:
        out = out.clone()
        out.view(-1).index_add_(0, bias[0], bias[1].to(out.dtype))
    if constrained:
        workspace = getattr(_WORKSPACES, "value", None) or _MaskWorkspace()
        _WORKSPACES.value = workspace
        bitmask = workspace.bitmask_for(len(constraints), out.shape[1])
        bitmask[[row for row, c in enumerate(constraints) if c is None]] = -1  # free rows: every token
        workspace.fill(constrained, bitmask)
        out = apply_token_bitmask(out, bitmask)
    return out
