"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a small draft model, batch 1.

Each round the draft proposes `num_draft_tokens` tokens one by one; the target scores all of them in one
forward pass (T = k + 1 positions), keeps the longest prefix it agrees with, and adds its own next token
(at the first disagreement, or a bonus token when all k were accepted). Under greedy decoding the output is
exactly the target's own greedy output: every kept token is the target's argmax given the same prefix.

Both models keep KV caches that grow with the sequence as the plain generator's do (`Generator.prepare_cache`:
room for the prompt and one bucket first, doubled in place when a round would pass the end), so a long
`max_new_tokens` costs memory only once it is used. Rejected proposals leave entries beyond the accepted
position that the default mask (slot <= position) hides until later tokens overwrite them, so nothing is
copied back.

    spec = SpeculativeGenerator(target_generator, draft_generator, num_draft_tokens=4)
    [result] = spec.generate([prompt], max_new_tokens=64)      # same result type as Generator.generate
    spec.acceptance_rate                                          # of the latest call

The draft must share the tokenizer (vocabulary) with the target. Sampling (temperature > 0) is not
speculative here: ask the plain Generator for it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from .generate import GenerationResult, GenerationTiming, Generator, _Row
from .sampling import GREEDY, SamplingParams

__all__ = ["SpeculativeGenerator"]


class SpeculativeGenerator:
    """Greedy speculative decoding of one prompt at a time; `generate`/`stream` mirror `Generator`."""

    def __init__(self, target: Generator, draft: Generator, *, num_draft_tokens: int = 4):
        if target.model.args.vocab_size != draft.model.args.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.model.args.vocab_size}) differs from the "
                             f"target's ({target.model.args.vocab_size}); use a draft with the same tokenizer")
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be at least 1, got {num_draft_tokens}")
        self.target, self.draft, self.num_draft_tokens = target, draft, num_draft_tokens
        self.tokenizer = target.tokenizer
        self.acceptance_rate = 0.0
        self.last_timing: GenerationTiming | None = None

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                 sampling: SamplingParams = GREEDY, stop_strings: Sequence[str] = (),
                 stop_ids: Sequence[int] | None = None) -> list[GenerationResult]:
        """Like `Generator.generate`, prompt by prompt."""
        results = []
        for prompt in self.target.encode_prompts(prompts):
            row, timing = None, None
            for row, timing in self._run(prompt, max_new_tokens, sampling, stop_strings, stop_ids):  # noqa: B007 - keep the last
                pass
            assert row is not None and timing is not None
            results.append(GenerationResult(row.ids, row.text, row.finish_reason or "length", timing, row.prompt))
        return results

    def stream(self, prompt: str | Sequence[int], *, max_new_tokens: int = 256,
               sampling: SamplingParams = GREEDY, stop_strings: Sequence[str] = (),
               stop_ids: Sequence[int] | None = None) -> Iterator[str]:
        [prompt_ids] = self.target.encode_prompts([prompt])
        for row, timing in self._run(prompt_ids, max_new_tokens, sampling, stop_strings, stop_ids):
            self.last_timing = timing
            piece = row.pending_text()
            if piece:
                yield piece

    def _run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingParams, stop_strings, stop_ids):
        if not sampling.greedy or sampling.has_penalties:
            raise ValueError("speculative decoding here is exact greedy decoding: use temperature 0 without "
                             "penalties, or generate without a draft model")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        k = self.num_draft_tokens
        # The target verifies up to k positions past the last kept token.
        self.target._check_context([prompt], max_new_tokens + k)
        stop_set = set(self.tokenizer.stop_tokens if stop_ids is None else stop_ids)
        row = _Row(self.target, prompt, [stop_strings] if isinstance(stop_strings, str) else stop_strings)
        timing = GenerationTiming(num_prompt_tokens=len(prompt))
        # Room for the prompt and up to one bucket of new tokens (plus a round of drafts); `_grow` adds more.
        timing.compile_s = self._grow(len(prompt) + min(max_new_tokens, self.target.cache_bucket) + k)

        start = time.perf_counter()
        prompt_t = torch.tensor([prompt], device=self.target.device)  # (1, P)
        positions = torch.arange(len(prompt), device=self.target.device).unsqueeze(0)  # (1, P)
        last = torch.tensor([len(prompt) - 1], device=self.target.device)
        first = int(self.target.prefill(prompt_t, positions, last).argmax(-1))
        self.draft.prefill(prompt_t.to(self.draft.device), positions.to(self.draft.device), last.to(self.draft.device))
        timing.prefill_s = time.perf_counter() - start
        row.add(first, stop_set, max_new_tokens)
        timing.num_new_tokens = len(row.ids)
        yield row, timing

        start = time.perf_counter()
        sequence = prompt + [first]  # every kept token; the newest one is not yet in either cache
        draft_len = len(prompt)  # positions the draft cache holds correctly
        proposed = accepted = 0
        while row.finish_reason is None:
            # This round writes positions up to len(sequence) + k - 1 in both caches.
            warm_s = self._grow(len(sequence) + k)
            timing.compile_s += warm_s
            start += warm_s  # warm-up time is not decode time
            drafts = self._propose(sequence, draft_len, k)
            draft_len = len(sequence) + k - 1
            kept = self._verify(sequence, drafts)
            proposed, accepted = proposed + k, accepted + len(kept) - 1
            # Drafts past the first rejection were written to the draft cache at now-wrong positions.
            draft_len = min(draft_len, len(sequence) + len(kept) - 1)
            for token in kept:
                sequence.append(token)
                row.add(token, stop_set, max_new_tokens)
                if row.finish_reason is not None:
                    break
            timing.decode_s = time.perf_counter() - start
            timing.num_new_tokens = len(row.ids)
            yield row, timing
        self.acceptance_rate = accepted / proposed if proposed else 0.0

    def _grow(self, needed_len: int) -> float:
        """Both caches hold `needed_len` positions (grown in place, entries kept); returns warm-up seconds."""
        return self.target.prepare_cache(1, needed_len) + self.draft.prepare_cache(1, needed_len)

    @torch.inference_mode()
    def _propose(self, sequence: list[int], draft_len: int, k: int) -> list[int]:
        """Feed the draft what it has not seen yet, then let it extend greedily to k proposals."""
        device = self.draft.device
        pending = sequence[draft_len:]  # (1 or 2 tokens: the newest kept ones)
        tokens = torch.tensor([pending], device=device)  # (1, n)
        positions = torch.arange(draft_len, len(sequence), device=device).unsqueeze(0)  # (1, n)
        logits = self.draft.prefill(tokens, positions, torch.tensor([len(pending) - 1], device=device))
        drafts = [int(logits.argmax(-1))]
        pos = len(sequence)
        while len(drafts) < k:
            logits = self.draft.decode_step(torch.tensor([[drafts[-1]]], device=device),
                                            torch.tensor([[pos]], device=device))
            drafts.append(int(logits.argmax(-1)))
            pos += 1
        return drafts

    @torch.inference_mode()
    def _verify(self, sequence: list[int], drafts: list[int]) -> list[int]:
        """Target scores [newest kept token, drafts...] at once; returns the accepted drafts plus the target's
        own token after them."""
        device = self.target.device
        start = len(sequence) - 1
        tokens = torch.tensor([[sequence[-1], *drafts]], device=device)  # (1, k+1)
        positions = torch.arange(start, start + len(drafts) + 1, device=device).unsqueeze(0)  # (1, k+1)
        hidden = self.target.model(tokens, input_pos=positions, return_hidden=True)  # (1, k+1, D)
        choices = self.target.model.logits(hidden[0]).argmax(-1).tolist()  # (k+1,) target's greedy picks
        kept = []
        for draft, choice in zip(drafts, choices):
            if draft != choice:
                break
            kept.append(draft)
        kept.append(choices[len(kept)])
        return kept
