"""Log-likelihood scoring: the one primitive behind perplexity, multiple-choice tasks and the
lm-evaluation-harness adapter.

A request is a pair of token lists (context, continuation); its score is the summed log-probability of the
continuation tokens given everything before them, plus whether greedy decoding would have produced the
continuation exactly (lm-evaluation-harness's `(logprob, is_greedy)`). Requests are sorted by length and
run in right-padded batches: with a causal mask, padding after a row's last token cannot change its
logits, so no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tokenizer import Tokenizer

__all__ = ["LogLikelihoodScorer", "encode_pair"]


def encode_pair(
    tokenizer: Tokenizer, context: str, continuation: str, *, add_bos: bool = True
) -> tuple[list[int], list[int]]:
    """Tokenize a (context, continuation) pair the way lm-evaluation-harness does for causal models.

    Trailing whitespace of the context moves to the front of the continuation (" Paris" is one token,
    "Paris" after a space another), then the whole string is encoded and split at the context's length,
    so the continuation gets the tokens it would have in running text. The context starts with
    `<|begin_of_text|>` when `add_bos`, as every Llama 3 training document does; an empty context is
    then just that token."""
    num_spaces = len(context) - len(context.rstrip())
    if num_spaces:
        continuation = context[-num_spaces:] + continuation
        context = context[:-num_spaces]
    whole_ids = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    continuation_ids = whole_ids[len(context_ids) :]
    prefix = tokenizer.encode("", bos=True) if add_bos else []  # BOS where the tokenizer uses one
    return prefix + context_ids, continuation_ids


class LogLikelihoodScorer:
    """Batched log-likelihoods of continuations under a `Transformer`.

    model: our `Transformer` (no KV cache attached); it is only read, in `torch.inference_mode`.
    batch_size: rows per forward pass.
    max_length: the longest input window (default: the model's `max_seq_len`); longer requests keep their
        last `max_length` input tokens, as lm-evaluation-harness does.
    logits_chunk: positions projected to the vocabulary at once, which bounds memory for 128K vocabularies.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        logits_chunk: int = 1024,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length or model.args.max_seq_len
        if self.max_length > model.args.max_seq_len:
            raise ValueError(
                f"max_length {self.max_length} exceeds the model's context ({model.args.max_seq_len})"
            )
        self.logits_chunk = logits_chunk

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @torch.inference_mode()
    def score(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        progress: bool = False,
        desc: str = "scoring",
    ) -> list[tuple[float, bool]]:
        """[(context_ids, continuation_ids)] -> [(sum of continuation log-probs, is_greedy)], in order.

        The context must hold at least one token (a BOS); the continuation at most `max_length` tokens."""
        if getattr(self.model, "cache_len", None) is not None:
            raise ValueError("the model has a KV cache attached; call model.clear_caches() before scoring")
        inputs: list[list[int]] = []
        targets: list[list[int]] = []
        for index, (context, continuation) in enumerate(pairs):
            if len(context) == 0:
                raise ValueError(f"request {index}: empty context; start it with the BOS token")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"request {index}: continuation of {len(continuation)} tokens is longer than "
                    f"the scoring window ({self.max_length}); split it (e.g. rolling windows)"
                )
            window = (list(context) + list(continuation))[-(self.max_length + 1) :]
            inputs.append(window[:-1])
            targets.append(list(continuation))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(inputs)
        # Longest first: the first batch shows at once whether memory suffices, and rows of similar length
        # share a batch so little compute goes to padding.
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            for index, result in zip(
                batch, self._score_batch([inputs[i] for i in batch], [targets[i] for i in batch])
            ):
                results[index] = result
        return results

    def _score_batch(self, inputs: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool]]:
        width = max(len(row) for row in inputs)
        tokens = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, ids in enumerate(inputs):
            tokens[row, : len(ids)] = torch.tensor(ids)
        hidden = self.model(tokens.to(self.device), return_hidden=True)  # (B, T, D)
        out = []
        for row, (ids, target) in enumerate(zip(inputs, targets)):
            if not target:
                out.append((0.0, True))
                continue
            # Position p predicts token p+1: the continuation's k tokens are predicted by the last k inputs.
            end = len(ids)
            hidden_cont = hidden[row, end - len(target) : end]  # (k, D)
            target_ids = torch.tensor(target, device=self.device)
            logprob_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            is_greedy = True
            for start in range(0, len(target), self.logits_chunk):
                logits = self.model.logits(hidden_cont[start : start + self.logits_chunk])  # (c, V) fp32
                chunk_targets = target_ids[start : start + self.logits_chunk]
                logprobs = F.log_softmax(logits.float(), dim=-1)
                logprob_sum += logprobs.gather(-1, chunk_targets.unsqueeze(-1)).double().sum()
                is_greedy = is_greedy and bool((logits.argmax(-1) == chunk_targets).all())
            out.append((float(logprob_sum), is_greedy))
        return out
