"""Continuous batching: many requests share one model and one static KV cache.

The cache (`model.setup_caches(num_slots, ...)`) is a pool of slots, one row per running sequence; its
position dimension starts small and doubles, for every slot, when a sequence needs more (up to
`max_seq_len`). `kv_cache="int8"` stores it as int8 with a scale per head and position.
A single engine thread owns the model and loops:

1. admit waiting requests into free slots (a bounded queue in front: `QueueFull` when it is full);
2. prefill at most `prefill_chunk` prompt tokens of newly admitted requests (a long prompt is split over
   steps, several short ones share a step), so running streams never stall for more than one chunk;
3. run one decode step for every running sequence at once, each at its own position (per-row `input_pos`);
4. drop finished and cancelled sequences, which frees their slots for the next iteration.

A client that goes away calls `RequestHandle.cancel()`; its slot is free before the next decode step. The
model is only ever called on a window of the cache: the rows `[0, n)` that cover every running slot (slots
are handed out lowest first) and the positions `[0, L)` that cover every written token, rounded up to a
bucket, so a step costs what the live sequences need, not what the pool could hold.

With a prefix cache (`prefix_cache_bytes` > 0, see prefix_cache.py), a newly admitted prompt first copies the
keys and values of its longest already-seen prefix into its row and prefills only the rest; every prompt's
full blocks are kept for the requests after it.

Events flow back through the handle, to a thread (`for event in handle`) or to an asyncio loop
(`async for event in handle`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model import KVCache
from .attention import check_kv_cache, kv_cache_layout, use_decode_kernels
from .constraints import TokenConstraint, constrain_logits
from .multi_lora import LoRASet
from .prefix_cache import PrefixCache, block_bytes
from .sampling import GREEDY, SamplingParams, make_generator, sample

__all__ = [
    "MAX_TOP_LOGPROBS",
    "Engine",
    "EngineClosed",
    "EngineRequest",
    "FinishEvent",
    "PromptLogprobsEvent",
    "QueueFull",
    "RequestHandle",
    "TokenEvent",
]

MAX_TOP_LOGPROBS = 20  # as the OpenAI API
_POSITION_BUCKET = 128  # the attention window grows in steps of this many positions
_POOL_START = 512  # positions per slot the cache pool starts with (it doubles when a window needs more)


class QueueFull(RuntimeError):
    """The waiting queue is at capacity; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineClosed(RuntimeError):
    """The engine is not running (not started, or shutting down)."""


@dataclass(frozen=True)
class EngineRequest:
    """One sequence to generate.

    num_logprobs: None for no log-probabilities; k >= 0 for the chosen token's plus the k most likely.
    prompt_logprobs: also return the log-probability of every prompt token given the ones before it
        (the completions API's `echo` with `logprobs`).
    constraint: this sequence's grammar state (`constraints.GrammarCompiler`); the engine masks the tokens
        it forbids and advances it with each token drawn. One per request, never shared.
    logit_bias: {token id: value in [-100, 100]} added to the logits before sampling (OpenAI's logit_bias).
        Log-probabilities stay the model's own, before bias and mask.
    adapter: the name of a LoRA adapter loaded with `Engine.load_lora` (None: the base model).
    """

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = GREEDY
    stop_token_ids: frozenset[int] = frozenset()
    num_logprobs: int | None = None
    prompt_logprobs: bool = False
    constraint: TokenConstraint | None = None
    logit_bias: dict[int, float] | None = None
    adapter: str | None = None


@dataclass
class TokenEvent:
    """A generated token. `is_stop`: one of the request's stop tokens, sent (for its log-probability) just
    before the FinishEvent; it is not part of the output text."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    is_stop: bool = False


@dataclass
class PromptLogprobsEvent:
    """Per prompt token: its log-probability (None for the first token) and the top alternatives."""

    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclass
class FinishEvent:
    reason: str  # "stop" (a stop token), "length" (max_new_tokens), "cancelled", "error"
    num_prompt_tokens: int
    num_generated_tokens: int
    message: str = ""


class RequestHandle:
    """The caller's end of a request: iterate it for events (ending with a `FinishEvent`), or cancel it."""

    def __init__(self, request: EngineRequest, request_id: int, loop: asyncio.AbstractEventLoop | None):
        self.request = request
        self.request_id = request_id
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self._cancelled = threading.Event()
        self._loop = loop
        self._async_queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._sync_queue: queue.SimpleQueue = queue.SimpleQueue()

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot before its next step and sends FinishEvent("cancelled")."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, event) -> None:
        if self._loop is None:
            self._sync_queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._async_queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._cancelled.set()

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this handle was submitted with an event loop: use `async for`")
        while True:
            event = self._sync_queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return

    async def __aiter__(self):
        if self._async_queue is None:
            raise TypeError("this handle was submitted without an event loop: use `for`")
        while True:
            event = await self._async_queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return


@dataclass
class _Slot:
    """A running sequence in cache row `index`. `num_cached` tokens of it are in the cache."""

    index: int
    handle: RequestHandle
    generator: torch.Generator | None
    num_prefilled: int = 0
    num_cached: int = 0
    last_token: int = -1
    num_generated: int = 0
    prefix_checked: bool = False  # the prefix cache was asked for this prompt
    lora_slot: int = 0  # the adapter's slot in the LoRA stacks; 0 = the base model
    namespace: int | None = None  # the adapter's prefix-cache namespace (None for the base model)
    prompt_logprobs: list = field(default_factory=list)
    prompt_top: list = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.num_prefilled < len(self.handle.request.prompt_ids)


class _Histogram:
    """Cumulative histogram in Prometheus' layout (upper bounds in seconds)."""

    BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

    def __init__(self):
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.total = 0.0
        self.num = 0

    def observe(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(self.BOUNDS) if seconds <= b), len(self.BOUNDS))
        self.counts[i] += 1
        self.total += seconds
        self.num += 1


class Engine:
    """A continuous-batching generator over `num_slots` KV-cache rows of `max_seq_len` positions.

    `tokenizer` is carried for callers that need text (the server); the engine itself works on ids.
    `max_queue` requests may wait for a free slot; `prefill_chunk` bounds the prompt tokens one step
    prefills, so running streams wait at most one chunk's forward pass for their next token.
    `prefix_cache_bytes` > 0 keeps prompt prefixes' keys and values in blocks of `prefix_block_size` tokens
    for the requests that start the same way (0: off).

        engine = Engine(model, tokenizer, num_slots=8).start()
        handle = engine.submit(EngineRequest(prompt_ids=(...), max_new_tokens=64))
        for event in handle: ...
        engine.stop()
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, num_slots: int = 8, max_seq_len: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 256, batch_invariant: bool = False,
                 kv_cache: str | None = None, prefix_cache_bytes: int = 0, prefix_block_size: int = 16):
        if num_slots < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("num_slots and prefill_chunk must be >= 1 and max_queue >= 0")
        check_kv_cache(kv_cache)
        self.kv_cache = kv_cache
        if prefix_cache_bytes < 0:
            raise ValueError(f"the prefix-cache budget must be >= 0 bytes (0 turns it off), got {prefix_cache_bytes}")
        if prefix_cache_bytes and (prefix_block_size < 1 or prefill_chunk % prefix_block_size
                                   or prefill_chunk < 2 * prefix_block_size):
            raise ValueError(f"with a prefix cache, prefill_chunk ({prefill_chunk}) must be a multiple of the block "
                             f"size ({prefix_block_size}) and at least two blocks")
        self.prefix_cache_bytes, self.prefix_block_size = prefix_cache_bytes, prefix_block_size
        self.prefix_cache: PrefixCache | None = None  # made in start(), once the cache's shapes are known
        self.lora = LoRASet(model)
        self.model, self.tokenizer = model, tokenizer  # the tokenizer is for callers (the server); not used here
        use_decode_kernels(model)  # eager decode steps: attention, RMSNorm and RoPE on the CPU kernels
        self.num_slots, self.max_queue, self.prefill_chunk = num_slots, max_queue, prefill_chunk
        self.batch_invariant = batch_invariant
        self.max_seq_len = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        self.vocab_size = model.args.vocab_size
        self.device = model.tok_embeddings.weight.device
        self._cond = threading.Condition()
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._calls: collections.deque[tuple] = collections.deque()  # run_on_engine's (fn, future) pairs
        self._slots: list[_Slot | None] = [None] * num_slots
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count(1)
        self._full_caches: list[KVCache] = []
        self._windows: dict[tuple[int, int, int], list[KVCache]] = {}
        self._token_counts: torch.Tensor | None = None  # (num_slots, V), made on first use of penalties
        self._step_seconds = 0.05  # running mean of one loop iteration, for Retry-After
        # Every key exists from the start, so /metrics can copy the dict while the engine thread counts.
        self.stats = collections.Counter({k: 0 for k in (
            "requests_total", "prompt_tokens_total", "generation_tokens_total", "finished_stop",
            "finished_length", "finished_cancelled", "finished_error",
            "prefix_cache_query_tokens_total", "prefix_cache_hit_tokens_total")})
        self.ttft_hist, self.latency_hist = _Histogram(), _Histogram()

    # ----- lifecycle -----
    def start(self) -> Engine:
        """Allocate the KV cache and start the engine thread."""
        if self._thread is not None:
            return self
        # The pool starts with one bucket of positions per slot and grows as sequences get longer.
        dtype, quantize = kv_cache_layout(self.model, self.kv_cache)
        self.model.setup_caches(self.num_slots, min(_POOL_START, self.max_seq_len), dtype, quantize=quantize)
        self._full_caches = [layer.attention.kv_cache for layer in self.model.layers]
        if self.prefix_cache_bytes:
            layers = self._cache_tensors()
            self.prefix_cache = PrefixCache(self.prefix_block_size, self.prefix_cache_bytes,
                                            block_bytes(layers, self.prefix_block_size))
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llama3-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish every request as cancelled, stop the thread and release the cache."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self.model.clear_caches()
        self._windows.clear()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ----- requests -----
    def submit(self, request: EngineRequest, *, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request. Raises ValueError (it cannot fit), QueueFull, or EngineClosed."""
        num_prompt = len(request.prompt_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if num_prompt + request.max_new_tokens > self.max_seq_len:
            raise ValueError(f"the prompt has {num_prompt} tokens and {request.max_new_tokens} new tokens were "
                             f"asked for, {num_prompt + request.max_new_tokens} in all, but the context limit "
                             f"is {self.max_seq_len} tokens; shorten the prompt or lower max_tokens")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if request.num_logprobs is not None and not 0 <= request.num_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"num_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        self._check_logit_bias(request.logit_bias)
        if request.adapter is not None and request.adapter not in self.lora.adapters:
            raise ValueError(f"no LoRA adapter named '{request.adapter}' is loaded")
        with self._cond:
            if not self.running:
                raise EngineClosed("the engine is not running")
            if len(self._pending) >= self.max_queue + self.num_free_slots():
                raise QueueFull(f"the server is busy: {len(self._pending)} requests are waiting; retry later",
                                retry_after_s=self._retry_after())
            handle = RequestHandle(request, next(self._ids), loop)
            self._pending.append(handle)
            self.stats["requests_total"] += 1
            self._cond.notify_all()
        return handle

    def _check_logit_bias(self, logit_bias: dict[int, float] | None) -> None:
        for token_id, value in (logit_bias or {}).items():
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
                raise ValueError(f"logit_bias names token {token_id!r}, outside the vocabulary [0, {self.vocab_size})")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias for token {token_id} is {value}; it must be in [-100, 100]")

    def run_on_engine(self, fn) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between two steps, where it may use the model alone (the thread
        owns it): for work beside generation, such as embeddings. Raises EngineClosed."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self.running:
                raise EngineClosed("the engine is not running")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as exc:  # noqa: BLE001 -- the caller gets the error, the engine goes on
                future.set_exception(exc)

    # ----- LoRA adapters -----
    def load_lora(self, name: str, path: str) -> None:
        """Serve the PEFT LoRA folder at `path` as adapter `name` (a request picks it by `adapter=name`).
        Blocks until done (on the engine thread, between two steps, when the engine runs). ValueError on a
        bad folder, a name in use, or an adapter for another base model."""
        self._between_steps(lambda: self.lora.add(name, path))

    def unload_lora(self, name: str) -> None:
        """Stop serving adapter `name`; requests still using it end with an error. ValueError if unknown."""
        self._between_steps(lambda: self._unload_lora(name))

    def _unload_lora(self, name: str) -> None:
        self.lora.remove(name)
        for slot in filter(None, list(self._slots)):
            if slot.handle.request.adapter == name:
                self._finish(slot, "error", f"the LoRA adapter '{name}' was unloaded")

    def _between_steps(self, fn):
        if self._thread is None:  # not started: nothing else uses the model
            return fn()
        return self.run_on_engine(fn).result()

    def generate(self, prompt_ids, max_new_tokens: int, **kwargs) -> list[int]:
        """Blocking convenience: the generated ids of one request (for scripts and tests)."""
        request = EngineRequest(prompt_ids=tuple(prompt_ids), max_new_tokens=max_new_tokens, **kwargs)
        return [e.token_id for e in self.submit(request) if isinstance(e, TokenEvent) and not e.is_stop]

    def num_free_slots(self) -> int:
        return sum(s is None for s in self._slots)

    def snapshot(self) -> dict:
        """Gauges and counters for /metrics."""
        with self._cond:
            return {"queue_depth": len(self._pending),
                    "active_slots": self.num_slots - self.num_free_slots(),
                    "num_slots": self.num_slots, "max_queue": self.max_queue, "kv_cache_bytes": self.cache_bytes(),
                    "counters": dict(self.stats),
                    "prefix_cache": self._prefix_cache_gauges(),
                    "ttft": self.ttft_hist, "latency": self.latency_hist}

    def _retry_after(self) -> float:
        # Waiting requests drain roughly one slot-lifetime at a time; a second or more is a fair hint.
        return max(1.0, round(self._step_seconds * 32))

    # ----- the engine thread -----
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while (not self._stopping and not self._pending and not self._calls
                           and self.num_free_slots() == self.num_slots):
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._admit()
                self._run_calls()
                started = time.perf_counter()
                try:
                    self._drop_cancelled()
                    self._prefill_step()
                    self._drop_cancelled()
                    self._decode_step()
                except Exception as exc:  # noqa: BLE001 -- a failed step must not kill the server: fail the running requests
                    for slot in list(filter(None, self._slots)):
                        self._finish(slot, "error", f"generation failed: {exc}")
                self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.perf_counter() - started)
        with self._cond:
            while self._calls:
                self._calls.popleft()[1].set_exception(EngineClosed("the engine is shutting down"))
            for slot in list(filter(None, self._slots)):
                self._finish(slot, "cancelled", "the server is shutting down")
            while self._pending:
                handle = self._pending.popleft()
                handle._emit(FinishEvent("cancelled", len(handle.request.prompt_ids), 0, "the server is shutting down"))

    def _admit(self) -> None:
        """Move waiting requests into free slots, lowest index first (keeps the decode window small)."""
        while self._pending and None in self._slots:
            handle = self._pending.popleft()
            if handle.cancelled:
                self._count_finish("cancelled")
                handle._emit(FinishEvent("cancelled", len(handle.request.prompt_ids), 0))
                continue
            adapter = self.lora.adapters.get(handle.request.adapter) if handle.request.adapter else None
            if handle.request.adapter and adapter is None:  # unloaded while the request waited
                self._count_finish("error")
                handle._emit(FinishEvent("error", len(handle.request.prompt_ids), 0,
                                         f"the LoRA adapter '{handle.request.adapter}' is not loaded"))
                continue
            index = self._slots.index(None)
            generator = make_generator(handle.request.sampling, self.device)
            self._slots[index] = _Slot(index, handle, generator)
            if adapter is not None:
                self._slots[index].lora_slot, self._slots[index].namespace = adapter.slot, adapter.namespace
            if self._token_counts is not None:
                self._token_counts[index].zero_()

    def _drop_cancelled(self) -> None:
        """Free the slots of cancelled requests, and forget cancelled ones still waiting."""
        with self._cond:
            if any(h.cancelled for h in self._pending):
                gone = [h for h in self._pending if h.cancelled]
                self._pending = collections.deque(h for h in self._pending if not h.cancelled)
                for handle in gone:
                    self._count_finish("cancelled")
                    handle._emit(FinishEvent("cancelled", len(handle.request.prompt_ids), 0))
        for slot in filter(None, list(self._slots)):
            if slot.handle.cancelled:
                self._finish(slot, "cancelled")

    def _finish(self, slot: _Slot, reason: str, message: str = "") -> None:
        self._slots[slot.index] = None
        request = slot.handle.request
        self._count_finish(reason)
        self.latency_hist.observe(time.monotonic() - slot.handle.submitted_at)
        slot.handle._emit(FinishEvent(reason, len(request.prompt_ids), slot.num_generated, message))

    def _advance_constraint(self, slot: _Slot, token: int) -> bool:
        """Move the row's grammar on by `token`; a refusal (which the mask should prevent) ends that row alone."""
        constraint = slot.handle.request.constraint
        if constraint is None:
            return True
        try:
            constraint.advance(token)
        except RuntimeError as exc:
            self._finish(slot, "error", str(exc))
            return False
        return True

    def _count_finish(self, reason: str) -> None:
        self.stats[f"finished_{reason}"] += 1

    # ----- cache windows -----
    def _window(self, row_start: int, row_stop: int, num_positions: int) -> list[KVCache]:
        """Per layer, a view of rows [row_start, row_stop) and positions [0, num_positions) (rounded up to
        a bucket) of the pool: writes through it land in the pool. The pool's position dimension grows
        (for every slot, doubling) when a window reaches past it."""
        length = min(self.max_seq_len, -(-num_positions // _POSITION_BUCKET) * _POSITION_BUCKET)
        if length > self._full_caches[0].length:
            self._grow_pool(length)
        key = (row_start, row_stop, length)
        if key not in self._windows:
            if len(self._windows) > 1024:  # views are cheap to rebuild; keep the dict bounded
                self._windows.clear()
            self._windows[key] = [full.view(slice(row_start, row_stop), length) for full in self._full_caches]
        return self._windows[key]

    def _grow_pool(self, needed: int) -> None:
        """Double the pool's positions until `needed` fit (at most `max_seq_len`), keeping every entry."""
        length = self._full_caches[0].length
        while length < needed:
            length *= 2
        self.model.grow_caches(min(length, self.max_seq_len))
        self._windows.clear()  # views of the old buffers

    def cache_bytes(self) -> int:
        """Bytes of the KV-cache pool now (it grows with the longest sequence)."""
        return sum(full.nbytes() for full in self._full_caches)

    def _forward(self, window: list[KVCache], tokens: torch.Tensor, input_pos: torch.Tensor,
                 lora_slots: list[int]) -> torch.Tensor:
        """The model on a cache window, row i under LoRA adapter slot `lora_slots[i]` (0: none); returns
        final hidden states (B, T, D)."""
        for layer, view in zip(self.model.layers, window):
            layer.attention.kv_cache = view
        self.lora.select(lora_slots)
        try:
            return self.model(tokens, input_pos=input_pos, return_hidden=True)
        finally:
            self.lora.select(None)
            for layer, full in zip(self.model.layers, self._full_caches):
                layer.attention.kv_cache = full

    # ----- prefix cache -----
    def _cache_tensors(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer, the whole pool's (k, v), each (num_slots, K, S, Dh), and for an int8 cache its scales
        (num_slots, K, S, 1): what the prefix cache copies."""
        return [(cache.k, cache.v) if not cache.quantized else (cache.k, cache.v, cache.k_scale, cache.v_scale)
                for cache in self._full_caches]

    def _prefix_cache_gauges(self) -> dict | None:
        cache = self.prefix_cache
        if cache is None:
            return None
        return {"blocks": cache.num_blocks, "capacity_blocks": cache.capacity_blocks, "bytes": cache.num_bytes,
                "capacity_bytes": cache.capacity_blocks * cache.bytes_per_block, "block_size": cache.block_size}

    def _reuse_prefix(self, slot: _Slot) -> None:
        """Start a new prompt from the longest stored prefix: copy its blocks into the slot's row. At least
        one block is always prefilled, so the prompt's last token gets its logits and the suffix prefill is
        never a few-row product (whose rounding would differ from a full prefill's)."""
        slot.prefix_checked = True
        request = slot.handle.request
        if self.prefix_cache is None or request.prompt_logprobs:  # prompt logprobs need every position's states
            return
        prompt = request.prompt_ids
        keys = self.prefix_cache.lookup(prompt, len(prompt) - self.prefix_block_size, slot.namespace)
        reused_positions = len(keys) * self.prefix_block_size
        if reused_positions > self._full_caches[0].length:  # the pool grows lazily; make room for the copy
            self._grow_pool(min(self.max_seq_len, -(-reused_positions // _POSITION_BUCKET) * _POSITION_BUCKET))
        num_reused = self.prefix_cache.load(keys, self._cache_tensors(), slot.index)
        slot.num_prefilled = slot.num_cached = num_reused
        self.stats["prefix_cache_query_tokens_total"] += len(prompt)
        self.stats["prefix_cache_hit_tokens_total"] += num_reused

    def _store_prefix(self, slot: _Slot) -> None:
        """Keep the full blocks of what has been prefilled of the slot's prompt."""
        if self.prefix_cache is not None:
            self.prefix_cache.store(slot.handle.request.prompt_ids, slot.num_prefilled, self._cache_tensors(),
                                    slot.index, slot.namespace)

    # ----- prefill -----
    def _prefill_step(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens, earliest-admitted prompts first (several short prompts
        share one step's budget); a prompt's last chunk yields its first token."""
        budget = self.prefill_chunk
        while budget > 0:
            waiting = [s for s in self._slots if s is not None and s.prefilling and not s.handle.cancelled]
            if not waiting:
                return
            slot = min(waiting, key=lambda s: s.handle.request_id)
            try:
                if not slot.prefix_checked:
                    self._reuse_prefix(slot)
                size = self._chunk_size(slot, budget)
                if size == 0:
                    return
                budget -= self._prefill_chunk(slot, size)
            except Exception as exc:  # noqa: BLE001 -- one prompt that fails ends alone; the others go on
                self._finish(slot, "error", f"generation failed: {exc}")

    def _chunk_size(self, slot: _Slot, budget: int) -> int:
        """How many prompt tokens of `slot` to prefill now within `budget`; 0: wait for the next step."""
        if self.batch_invariant:
            size = self._invariant_chunk_size(slot)
            return size if size <= budget else 0
        remaining = len(slot.handle.request.prompt_ids) - slot.num_prefilled
        size = min(budget, remaining)
        block = self.prefix_block_size
        if size == remaining or self.prefill_chunk % block or self.prefill_chunk < 2 * block:
            return size  # (a prefix cache requires both, see __init__)
        # Chunks end on block boundaries and none is shorter than a block (nor leaves less than a block
        # behind), with or without a prefix cache: a prompt's rows then come out the same whether its prefix
        # was reused or the cache is off. (The GEMM's rows need not be the same bits at every row count: MKL
        # on AVX-512 with 2 threads rounds a 7-row product differently from a 23-row one.)
        size -= size % block
        if remaining - size < block:
            size -= block
        return max(size, 0)

    def _invariant_chunk_size(self, slot: _Slot) -> int:
        """With `batch_invariant`, a prompt is cut at multiples of `prefill_chunk` whatever else is
        prefilling, so each chunk's matrix shapes (and so its float rounding) belong to the request alone."""
        start = slot.num_prefilled
        return min(self.prefill_chunk - start % self.prefill_chunk, len(slot.handle.request.prompt_ids) - start)

    def _prefill_chunk(self, slot: _Slot, max_tokens: int) -> int:
        """Prefill the next at most `max_tokens` prompt tokens of one slot; returns how many."""
        request = slot.handle.request
        start = slot.num_prefilled
        chunk = request.prompt_ids[start:start + max_tokens]
        tokens = torch.tensor([chunk], device=self.device)  # (1, T)
        positions = torch.arange(start, start + len(chunk), device=self.device).unsqueeze(0)  # (1, T)
        hidden = self._forward(self._window(slot.index, slot.index + 1, start + len(chunk)), tokens, positions,
                               [slot.lora_slot])
        slot.num_prefilled = slot.num_cached = start + len(chunk)
        self.stats["prompt_tokens_total"] += len(chunk)
        self._store_prefix(slot)
        if request.prompt_logprobs:
            self._score_prompt_chunk(slot, hidden[0], start)
        if slot.prefilling:
            return len(chunk)
        if request.prompt_logprobs:
            slot.handle._emit(PromptLogprobsEvent([None] + slot.prompt_logprobs, [None] + slot.prompt_top))
        if request.max_new_tokens == 0:
            self._finish(slot, "length")
        else:
            self._emit_tokens([slot], self.model.logits(hidden[:, -1]))  # (1, V)
        return len(chunk)

    def _score_prompt_chunk(self, slot: _Slot, hidden: torch.Tensor, start: int) -> None:
        """Log-probabilities of prompt tokens start+1 .. start+T (those this chunk's positions predict)."""
        prompt = slot.handle.request.prompt_ids
        k = slot.handle.request.num_logprobs or 0
        num_targets = min(hidden.shape[0], len(prompt) - 1 - start)
        for offset in range(0, num_targets, 64):  # 64 positions at a time bounds the (T, V) logits
            stop = min(offset + 64, num_targets)
            logprobs = self.model.logits(hidden[offset:stop]).log_softmax(-1)  # (t, V)
            targets = torch.tensor(prompt[start + offset + 1:start + stop + 1], device=self.device)
            chosen = logprobs.gather(-1, targets.unsqueeze(1)).squeeze(1).tolist()
            slot.prompt_logprobs.extend(chosen)
            if k:
                values, ids = logprobs.topk(k, dim=-1)
                slot.prompt_top.extend([list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())])
            else:
                slot.prompt_top.extend([[] for _ in chosen])

    # ----- decode -----
    def _decode_step(self) -> None:
        """One token for every running sequence, in one batched forward over the covering window."""
        running = [s for s in self._slots if s is not None and not s.prefilling and s.num_generated > 0]
        if not running:
            return
        # batch_invariant: every step runs all the slots' rows, so the matrix shapes (and with them the kernels
        # and their summation order) never depend on how many sequences are running.
        num_rows = self.num_slots if self.batch_invariant else max(s.index for s in running) + 1
        tokens = torch.zeros(num_rows, 1, dtype=torch.long)
        positions = torch.zeros(num_rows, 1, dtype=torch.long)
        for s in self._slots[:num_rows]:
            # Rows not decoding write a throwaway entry at their first unwritten position, which their own
            # prefill or decode overwrites before anything reads it.
            if s is not None:
                positions[s.index, 0] = s.num_cached
        for s in running:
            tokens[s.index, 0] = s.last_token
        window = self._window(0, num_rows, int(positions.max()) + 1)
        lora_slots = [0 if s is None else s.lora_slot for s in self._slots[:num_rows]]
        hidden = self._forward(window, tokens.to(self.device), positions.to(self.device), lora_slots)  # (n, 1, D)
        for s in running:
            s.num_cached += 1
        rows = torch.tensor([s.index for s in running], device=self.device)
        if self.batch_invariant:
            logits = self.model.logits(hidden[:, -1])[rows]  # (n, V) -> (R, V)
        else:
            logits = self.model.logits(hidden[rows, -1])  # (R, V)
        self._emit_tokens(running, logits)

    def _emit_tokens(self, slots: list[_Slot], logits: torch.Tensor) -> None:
        """Sample one token per slot from logits (R, V), send it, and finish the sequences that end."""
        requests = [s.handle.request for s in slots]
        counts = None
        if any(r.sampling.has_penalties for r in requests):
            if self._token_counts is None:
                self._token_counts = torch.zeros(self.num_slots, self.vocab_size, device=self.device)
            counts = self._token_counts[[s.index for s in slots]]
        constrained = constrain_logits(logits, [r.constraint for r in requests], [r.logit_bias for r in requests])
        next_ids = self._sample(slots, constrained, counts)
        want_logprobs = any(r.num_logprobs is not None for r in requests)
        logprobs = logits.float().log_softmax(-1) if want_logprobs else None  # raw model distribution
        now = time.monotonic()
        for row, (slot, request, token) in enumerate(zip(slots, requests, next_ids)):
            if token is None:  # this row's draw failed and its request has ended
                continue
            event = TokenEvent(token)
            if request.num_logprobs is not None:
                event.logprob = float(logprobs[row, token])
                if request.num_logprobs:
                    values, ids = logprobs[row].topk(request.num_logprobs)
                    event.top_logprobs = list(zip(ids.tolist(), values.tolist()))
            if slot.num_generated == 0:
                slot.handle.first_token_at = now
                self.ttft_hist.observe(now - slot.handle.submitted_at)
            slot.num_generated += 1
            slot.last_token = token
            self.stats["generation_tokens_total"] += 1
            if self._token_counts is not None:
                self._token_counts[slot.index, token] += 1
            if token in request.stop_token_ids:
                event.is_stop = True
                slot.handle._emit(event)
                self._finish(slot, "stop")
                continue
            if not self._advance_constraint(slot, token):
                continue
            slot.handle._emit(event)
            if request.constraint is not None and request.constraint.finished:
                self._finish(slot, "stop")  # the grammar is complete: nothing but a stop token could follow
                continue
            if slot.num_generated >= request.max_new_tokens:
                self._finish(slot, "length")

    def _sample(self, slots: list[_Slot], logits: torch.Tensor, counts: torch.Tensor | None) -> list[int | None]:
        """One token per slot from logits (R, V). Should the batched draw fail (a row whose parameters or
        logits give no valid distribution), each row is drawn alone: a row that fails again ends its own
        request with an error (None in its place) and the other rows keep decoding."""
        params = [s.handle.request.sampling for s in slots]
        generators = [s.generator for s in slots]
        try:
            return sample(logits, params, generator=generators, token_counts=counts).tolist()
        except Exception:  # noqa: BLE001 -- find the failing rows below
            pass
        tokens: list[int | None] = []
        for row, slot in enumerate(slots):
            row_counts = None if counts is None else counts[row:row + 1]
            try:
                tokens.append(int(sample(logits[row:row + 1], params[row], generator=generators[row],
                                         token_counts=row_counts)[0]))
            except Exception as exc:  # noqa: BLE001 -- this request fails alone
                self._finish(slot, "error", f"generation failed: sampling this sequence's next token failed "
                                            f"({exc})")
                tokens.append(None)
        return tokens
