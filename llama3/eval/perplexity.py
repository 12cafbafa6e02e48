"""Perplexity and bits per byte over text files, JSONL documents or prepared token shards.

A document longer than the model's window is scored in sliding windows: every token is predicted exactly
once, and each window after the first predicts only its last `stride` tokens, so every prediction sees at
least `window - stride` tokens of context (`stride == window` gives lm-evaluation-harness's rolling
log-likelihood; a smaller stride gives more context at more compute). The final window is always a full
one. Token 0 of a document (its `<|begin_of_text|>`) is context only, never predicted.

    perplexity    = exp(total NLL / predicted tokens)
    bits_per_byte = total NLL / (ln 2 · UTF-8 bytes of the predicted text)

Bits per byte does not depend on the tokenizer, so it compares models with different vocabularies.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.jsonl import read_jsonl_texts
from ..tokenizer import Tokenizer
from .scoring import LogLikelihoodScorer

__all__ = [
    "PerplexityResult",
    "packed_window_requests",
    "perplexity_of_documents",
    "perplexity_of_shards",
    "perplexity_of_text",
    "read_text_documents",
    "rolling_windows",
    "shard_documents",
]


def rolling_windows(
    token_ids: Sequence[int], window: int, stride: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Split one document into (context_ids, continuation_ids) scoring requests.

    token_ids[0] is the prefix (BOS) and is never predicted; every later token is predicted exactly once.
    Each request's context + continuation (minus its last token) fits in `window` input tokens. The first
    request predicts up to `window` tokens; each later one predicts up to `stride` new tokens with the
    window filled by the tokens before them."""
    stride = window if stride is None else stride
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    requests = []
    next_target = 1
    while next_target < len(token_ids):
        span = window if next_target == 1 else stride
        last = min(next_target + span - 1, len(token_ids) - 1)  # index of the last token this window predicts
        start = max(0, last - window)  # the input ids[start:last] predicts ids[start+1 : last+1]
        requests.append((list(token_ids[start:next_target]), list(token_ids[next_target : last + 1])))
        next_target = last + 1
    return requests


@dataclass
class PerplexityResult:
    """Totals over a corpus; the ratios are properties so results can be summed first."""

    nll_sum: float  # nats, summed over predicted tokens
    num_tokens: int  # predicted tokens
    num_bytes: int  # UTF-8 bytes of the predicted tokens
    num_documents: int

    @property
    def token_nll(self) -> float:
        """Mean negative log-likelihood per token (nats): the training loop's cross-entropy loss."""
        return self.nll_sum / max(self.num_tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.token_nll)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / (math.log(2) * max(self.num_bytes, 1))

    def to_dict(self) -> dict[str, float | int]:
        return {
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "token_nll": self.token_nll,
            "num_tokens": self.num_tokens,
            "num_bytes": self.num_bytes,
            "num_documents": self.num_documents,
        }


def _predicted_bytes(tokenizer: Tokenizer, token_ids: Sequence[int]) -> int:
    """UTF-8 bytes that the predicted tokens (all but the first) stand for; special tokens count zero."""
    return sum(len(tokenizer.token_bytes(t)) for t in token_ids[1:] if not tokenizer.is_special(t))


def perplexity_of_documents(
    scorer: LogLikelihoodScorer,
    tokenizer: Tokenizer,
    documents: Iterable[Sequence[int]],
    *,
    stride: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of token documents, each starting with its BOS and scored separately (no context flows
    from one document into the next)."""
    requests: list[tuple[list[int], list[int]]] = []
    num_tokens = num_bytes = num_documents = 0
    for ids in documents:
        if len(ids) < 2:
            continue  # a lone BOS predicts nothing
        requests.extend(rolling_windows(ids, scorer.max_length, stride))
        num_tokens += len(ids) - 1
        num_bytes += _predicted_bytes(tokenizer, ids)
        num_documents += 1
    if not requests:
        raise ValueError("nothing to score: every document is empty")
    scores = scorer.score(requests, progress=progress, desc="perplexity")
    return PerplexityResult(-sum(logprob for logprob, _ in scores), num_tokens, num_bytes, num_documents)


def read_text_documents(path: str | Path) -> list[str]:
    """A `.txt` file is one document; a `.jsonl` file holds one document per line in its "text" field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    return list(read_jsonl_texts(path))


def perplexity_of_text(
    scorer: LogLikelihoodScorer,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    stride: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of text documents, each encoded with a leading `<|begin_of_text|>`."""
    documents = [tokenizer.encode(text, bos=True) for text in texts]
    return perplexity_of_documents(scorer, tokenizer, documents, stride=stride, progress=progress)


# ----- prepared shards (`llama3 prepare` output) -----
def shard_documents(data_dir: str | Path, split: str = "val") -> Iterator[np.ndarray]:
    """The documents of one split of a prepared dataset, each from its BOS up to (not including) the next."""
    from ..data.pretrain import load_index

    data_dir = Path(data_dir)
    index = load_index(data_dir)
    if split not in index["splits"]:
        raise ValueError(f"{data_dir}: no split {split!r}; available: {sorted(index['splits'])}")
    shards = [
        np.memmap(data_dir / shard["file"], dtype=index["dtype"], mode="r")
        for shard in index["splits"][split]["shards"]
    ]
    tokens = np.concatenate(shards) if len(shards) > 1 else shards[0]
    starts = np.flatnonzero(tokens == index["bos_id"]).tolist() + [len(tokens)]
    if starts[0] != 0:
        raise ValueError(
            f"{data_dir} split {split!r} does not start with a BOS token; re-run `llama3 prepare`"
        )
    for begin, end in itertools.pairwise(starts):
        yield np.asarray(tokens[begin:end], dtype=np.int64)


def packed_window_requests(
    data_dir: str | Path,
    split: str,
    window: int,
    *,
    max_windows: int | None = None,
    document_mask: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """Scoring requests that reproduce the training loop's validation loss exactly.

    Training validation reads the split as consecutive windows of `window + 1` tokens (inputs and shifted
    targets, `PackedBatches` in file order) with attention kept inside each document. Within a window the
    inputs of one document form a segment that sees nothing else, so each segment is one request: its first
    token is the context and the targets after it the continuation (the last one may be the next
    document's BOS, which training also predicts). RoPE depends only on relative positions, so a segment
    scored from position 0 gives the logits it had mid-window. With `document_mask=False` (a run trained
    with `data.document_mask=false`) the whole window is one request."""
    from ..data.pretrain import PackedBatches

    batches = PackedBatches(data_dir, split, batch_size=1, seq_len=window, shuffle=False, document_mask=False)
    requests = []
    num_windows = batches.num_windows if max_windows is None else min(max_windows, batches.num_windows)
    for _ in range(num_windows):
        batch = next(batches)
        inputs, targets = batch["inputs"][0].tolist(), batch["targets"][0].tolist()
        bos_positions = {i for i, t in enumerate(inputs) if t == batches.bos_id} if document_mask else set()
        starts = sorted({0} | bos_positions) + [len(inputs)]
        for begin, end in itertools.pairwise(starts):
            requests.append((inputs[begin : begin + 1], targets[begin:end]))
    return requests


def perplexity_of_shards(
    scorer: LogLikelihoodScorer,
    tokenizer: Tokenizer,
    data_dir: str | Path,
    *,
    split: str = "val",
    stride: int | None = None,
    packed: bool = False,
    document_mask: bool = True,
    limit: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a prepared dataset split.

    Default: each document scored on its own with sliding windows (`limit`: the first N documents).
    `packed=True`: the training loop's validation scheme (`packed_window_requests`, windows of the scorer's
    `max_length`; `limit`: the first N windows), whose `token_nll` equals the validation loss."""
    if not packed:
        documents = list(shard_documents(data_dir, split))[:limit]
        return perplexity_of_documents(scorer, tokenizer, documents, stride=stride, progress=progress)
    requests = packed_window_requests(
        data_dir, split, scorer.max_length, max_windows=limit, document_mask=document_mask
    )
    scores = scorer.score(requests, progress=progress, desc="perplexity")
    num_tokens = sum(len(continuation) for _, continuation in requests)
    num_bytes = sum(
        len(tokenizer.token_bytes(t))
        for _, continuation in requests
        for t in continuation
        if not tokenizer.is_special(t)
    )
    return PerplexityResult(
        -sum(logprob for logprob, _ in scores),
        num_tokens,
        num_bytes,
        sum(1 for context, _ in requests if context[0] == tokenizer.bos_id),
    )
