"""Text generation: prefill and decode over the model's static KV cache.

    from llama3.inference import Generator, SamplingParams
    gen = Generator(model, tokenizer, compile=True)           # compile=False: pure eager PyTorch
    [result] = gen.generate(["Once upon a time"], max_new_tokens=50, sampling=SamplingParams(temperature=0))
    result.text, result.token_ids, result.finish_reason, result.timing.decode_tokens_per_s
    for piece in gen.stream("Once upon a time", max_new_tokens=50): print(piece, end="")

- Prompts are strings (encoded with BOS) or lists of token ids (used as given). A batch of prompts of
  different lengths is right-padded into one cache: each row has its own positions (`input_pos` (B, T)) and
  the model's default mask lets a token see cache slots up to its own position, so padding is never seen
  (slots a row padded into are overwritten by its own later tokens before any query reaches them).
- Each row stops on its own: at a stop id (default: the tokenizer's stop tokens; the stop id itself is
  not part of `token_ids`), when a stop string appears in its text (the text is cut before it), or after
  `max_new_tokens` ("length").
- `stream` yields text pieces that never split a UTF-8 character and never show part of a stop string.
- Timing: `prefill_s` is time to first token (prefill + first sample), `decode_s` the rest;
  `decode_tokens_per_s` counts tokens made by decode steps (all but the first).
- The KV cache grows with the sequence: it starts with room for the prompts and one `cache_bucket` of new
  tokens and doubles (copying its entries) when decoding reaches its end, up to the model's context.
  `kv_cache="int8"` stores it as int8 with a scale per head and position (about half of bf16's bytes).
- Prompts run in chunks of `prefill_chunk` (512) tokens, so a long prompt's activations stay bounded.
- Compilation (`compile=True`) happens once per cache shape (batch size × cache length), in a warm-up
  outside the timed region (`compile_s`); later calls of the same shape reuse it.

Lower-level pieces for other engines: `prefill(tokens, input_pos, last_index)` and
`decode_step(tokens, input_pos)` return (B, V) fp32 logits; `prepare_cache(batch_size, needed_len)`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..model import Transformer
from .attention import check_kv_cache, kv_cache_layout, use_decode_kernels
from .fast import compile_options, quiet_autotune
from .sampling import SamplingParams, make_generator, sample
from .stops import find_stop, shown_length

__all__ = ["GenerationResult", "GenerationTiming", "Generator"]

DEFAULT_SAMPLING = SamplingParams()


# Prompt columns per forward in `prefill`: bounds the activations of long prompts (the products run as GEMMs
# of this many rows, well past where they reach full speed).
PREFILL_CHUNK = 512


@dataclass
class GenerationTiming:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    num_prompt_tokens: int = 0
    num_new_tokens: int = 0
    compile_s: float = 0.0  # warm-up/compilation before the timed region (0 when nothing new compiled)
    step_s: list[float] = field(default_factory=list, repr=False)  # duration of each decode step

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.num_new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "num_prompt_tokens": self.num_prompt_tokens, "num_new_tokens": self.num_new_tokens,
                "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    timing: GenerationTiming
    prompt_token_ids: list[int] = field(default_factory=list)


class _Row:
    """Per-prompt decoding state: generated ids, incrementally decoded text, stop handling."""

    def __init__(self, generator: Generator, prompt: list[int], stop_strings: Sequence[str]):
        self.prompt = prompt
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters already handed to a stream
        self.finish_reason: str | None = None
        self.decoder = generator.tokenizer.stream_decoder()
        self.stop_strings = [s for s in stop_strings if s]
        self.max_stop = max((len(s) for s in self.stop_strings), default=0)

    def add(self, token: int, stop_ids: set[int], max_new_tokens: int) -> None:
        if token in stop_ids:
            self.finish(reason="stop")
            return
        self.ids.append(token)
        old_len = len(self.text)
        self.text += self.decoder.feed(token)
        if self.stop_strings and len(self.text) > old_len:
            self._check_stop_strings(max(0, old_len - self.max_stop + 1))
        if self.finish_reason is None and len(self.ids) >= max_new_tokens:
            self.finish(reason="length")

    def _check_stop_strings(self, start: int) -> None:
        if (cut := find_stop(self.text, self.stop_strings, start)) >= 0:
            self.text = self.text[:cut]
            self.finish_reason = "stop"

    def finish(self, reason: str) -> None:
        self.text += self.decoder.flush()
        if self.stop_strings:
            self._check_stop_strings(max(0, len(self.text) - self.max_stop - 4))
        if self.finish_reason is None:
            self.finish_reason = reason

    def pending_text(self) -> str:
        """New text that can be shown: all of it once finished, otherwise without a tail that could still
        become a stop string."""
        end = len(self.text) if self.finish_reason is not None else shown_length(self.text, self.stop_strings)
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece


class Generator:
    """Prefill + decode for one model and tokenizer. See the module docstring for the API."""

    def __init__(self, model: Transformer, tokenizer, *, compile: bool = False, cache_bucket: int = 256,
                 inductor_options: dict | None = None, kv_cache: str | None = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        check_kv_cache(kv_cache)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.model = model.eval()
        use_decode_kernels(model)  # eager steps: attention, RMSNorm and RoPE on the CPU kernels (CPU models)
        self.kv_cache = kv_cache
        self.tokenizer = tokenizer
        self.device = model.tok_embeddings.weight.device
        self.cache_bucket = cache_bucket
        self.compile = compile
        self.last_timing: GenerationTiming | None = None  # of the latest `stream`
        self._cache_shape: tuple[int, int] | None = None
        self._warm_shapes: set[tuple[int, int]] = set()
        self._decode_fn = self._decode_eager
        if compile:
            if inductor_options is None:
                inductor_options = compile_options(model.norm.weight.dtype)
            self._decode_fn = torch.compile(self._decode_eager, fullgraph=True, dynamic=False,
                                            options=inductor_options)

    # ----- model steps -----
    def _decode_eager(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, input_pos=input_pos)[:, -1]  # (B, V) fp32

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1), input_pos (B, 1) -> next-token logits (B, V) fp32, writing the KV cache."""
        return self._decode_fn(tokens, input_pos)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) right-padded prompts, input_pos (B, T), last_index (B,) each row's last real column
        -> logits there (B, V) fp32. Only the rows' last hidden states go through the output projection.
        Prompts longer than `prefill_chunk` run in chunks of that many columns, each writing the cache the
        next one reads, so activations stay bounded (a 32K-token prompt would otherwise hold gigabytes of
        feed-forward activations at once)."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        last = None  # (B, D): each row's hidden state at its last_index, taken from the chunk that holds it
        for start in range(0, tokens.shape[1], self.prefill_chunk):
            end = min(tokens.shape[1], start + self.prefill_chunk)
            hidden = self.model(tokens[:, start:end], input_pos=input_pos[:, start:end], return_hidden=True)
            if last is None:
                last = hidden.new_empty(tokens.shape[0], hidden.shape[-1])
            here = (last_index >= start) & (last_index < end)
            last[here] = hidden[rows[here], last_index[here] - start]
        return self.model.logits(last)  # (B, V)

    def cache_length_for(self, needed_len: int) -> int:
        """The cache length that holds `needed_len` positions: `cache_bucket` times a power of two (so a
        growing conversation reallocates, and a compiled step recompiles, a logarithmic number of times),
        at most the model's context."""
        length = self.cache_bucket
        while length < needed_len:
            length *= 2
        return min(length, self.model.args.max_seq_len)

    def prepare_cache(self, batch_size: int, needed_len: int) -> float:
        """Make sure a cache of `batch_size` rows holds `needed_len` positions: allocate it, or grow it in
        place keeping its entries (`cache_length_for`); compile and warm the decode step for that shape if
        new. Returns the seconds spent warming up."""
        length = self.cache_length_for(needed_len)
        cache = self.model.layers[0].attention.kv_cache if len(self.model.layers) else None
        # The model's own cache decides (another generator or an engine may have set up a different one).
        dtype, quantize = kv_cache_layout(self.model, self.kv_cache)
        if (cache is None or cache.k.shape[0] != batch_size or cache.quantized != (quantize == "int8")
                or (dtype is not None and cache.k.dtype != dtype)):
            self.model.setup_caches(batch_size, length, dtype, quantize=quantize)
        elif cache.length < needed_len:
            self.model.grow_caches(length)
        else:
            length = cache.length
        self._cache_shape = current = (batch_size, length)
        if not self.compile or current in self._warm_shapes:
            return 0.0
        start = time.perf_counter()
        tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        # The last slot: beyond every position written so far (warming may happen mid-generation, after a
        # growth), and overwritten by its row's own token before any query can see it.
        positions = torch.full((batch_size, 1), length - 1, dtype=torch.long, device=self.device)
        with quiet_autotune():
            for _ in range(2):  # the first call compiles, the second runs what later calls run
                self.decode_step(tokens, positions)
        self._warm_shapes.add(current)
        return time.perf_counter() - start

    # ----- public API -----
    def encode_prompts(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings or of token id lists")
        encoded = []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else [int(t) for t in prompt]
            if not ids:
                raise ValueError(f"prompt {i} is empty; give at least one token")
            vocab = self.model.args.vocab_size
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside the model's vocabulary [0, {vocab})")
            encoded.append(ids)
        return encoded

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                 sampling: SamplingParams | Sequence[SamplingParams] = DEFAULT_SAMPLING,
                 stop_strings: Sequence[str] = (), stop_ids: Sequence[int] | None = None) -> list[GenerationResult]:
        """Generate for a batch of prompts; one result per prompt, in order."""
        rows, timing = None, None
        for rows, timing in self._run(prompts, max_new_tokens, sampling, stop_strings, stop_ids):  # noqa: B007 - keep the last
            pass
        assert rows is not None and timing is not None
        return [GenerationResult(r.ids, r.text, r.finish_reason or "length",
                                 GenerationTiming(timing.prefill_s, timing.decode_s, len(r.prompt),
                                                  len(r.ids), timing.compile_s, timing.step_s), r.prompt)
                for r in rows]

    def stream(self, prompt: str | Sequence[int], *, max_new_tokens: int = 256,
               sampling: SamplingParams = DEFAULT_SAMPLING, stop_strings: Sequence[str] = (),
               stop_ids: Sequence[int] | None = None) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece, as soon as each piece is safe to show.
        Closing the iterator early (e.g. on Ctrl-C) stops generation."""
        for rows, timing in self._run([prompt], max_new_tokens, sampling, stop_strings, stop_ids):
            self.last_timing = timing
            piece = rows[0].pending_text()
            if piece:
                yield piece

    # ----- the loop -----
    def _run(self, prompts, max_new_tokens: int, sampling, stop_strings, stop_ids):
        """Yields (rows, timing) after the first token and after every decode step."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        encoded = self.encode_prompts(prompts)
        batch = len(encoded)
        params = [sampling] * batch if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != batch:
            raise ValueError(f"got {len(params)} SamplingParams for {batch} prompts")
        self._check_context(encoded, max_new_tokens)
        stop_set = set(self.tokenizer.stop_tokens if stop_ids is None else stop_ids)
        rows = [_Row(self, ids, stop_strings) for ids in encoded]
        generators = [make_generator(p, self.device) for p in params]
        generator = None if all(g is None for g in generators) else generators
        counts = self._initial_counts(encoded) if any(p.has_penalties for p in params) else None

        longest = max(len(ids) for ids in encoded)
        timing = GenerationTiming(num_prompt_tokens=sum(len(ids) for ids in encoded))
        # Room for the prompts and up to one bucket of new tokens; the cache grows as decoding goes on.
        timing.compile_s = self.prepare_cache(batch, longest + min(max_new_tokens, self.cache_bucket))

        start = time.perf_counter()
        tokens = torch.zeros(batch, longest, dtype=torch.long)  # (B, T) right-padded
        for i, ids in enumerate(encoded):
            tokens[i, :len(ids)] = torch.tensor(ids)
        positions = torch.arange(longest).expand(batch, longest).to(self.device)  # (B, T)
        lengths = torch.tensor([len(ids) for ids in encoded], device=self.device)
        logits = self.prefill(tokens.to(self.device), positions, lengths - 1)
        next_ids = self._pick(logits, params, generator, counts)
        timing.prefill_s = time.perf_counter() - start
        self._add(rows, next_ids, stop_set, max_new_tokens, counts)
        yield rows, timing

        start = step_start = time.perf_counter()
        input_pos = lengths.view(batch, 1).clone()  # (B, 1) position of each row's newest token
        top = longest  # the largest position in input_pos
        while any(r.finish_reason is None for r in rows):
            if top >= self._cache_shape[1]:  # the cache is full: grow it (warm-up time is not decode time)
                warm_s = self.prepare_cache(batch, top + 1)
                timing.compile_s += warm_s
                start, step_start = start + warm_s, step_start + warm_s
            logits = self.decode_step(next_ids.view(batch, 1), input_pos)
            top += 1
            next_ids = self._pick(logits, params, generator, counts)
            input_pos += 1
            self._add(rows, next_ids, stop_set, max_new_tokens, counts)
            now = time.perf_counter()
            timing.step_s.append(now - step_start)
            timing.decode_s, step_start = now - start, now
            yield rows, timing

    def _check_context(self, encoded: list[list[int]], max_new_tokens: int) -> None:
        limit = self.model.args.max_seq_len
        for i, ids in enumerate(encoded):
            if len(ids) + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that needs "
                    f"{len(ids) + max_new_tokens} positions, but the model's context length is {limit}. "
                    "Shorten the prompt or lower max_new_tokens.")

    def _initial_counts(self, encoded: list[list[int]]) -> torch.Tensor:
        vocab = self.model.args.vocab_size
        counts = torch.zeros(len(encoded), vocab, dtype=torch.int32, device=self.device)  # (B, V)
        for i, ids in enumerate(encoded):
            counts[i] = torch.bincount(torch.tensor(ids, device=self.device), minlength=vocab)
        return counts

    @staticmethod
    def _pick(logits, params, generator, counts) -> torch.Tensor:
        if generator is None and counts is None and all(p.greedy for p in params):
            return logits.argmax(-1)
        return sample(logits, params, generator=generator, token_counts=counts)

    @staticmethod
    def _add(rows: list[_Row], next_ids: torch.Tensor, stop_set: set[int], max_new_tokens: int,
             counts: torch.Tensor | None) -> None:
        if counts is not None:
            counts.scatter_add_(1, next_ids.view(-1, 1), torch.ones_like(next_ids.view(-1, 1), dtype=counts.dtype))
        for row, token in zip(rows, next_ids.tolist()):
            if row.finish_reason is None:
                row.add(token, stop_set, max_new_tokens)
