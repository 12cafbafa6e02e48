"""Training a byte-level BPE vocabulary with Llama 3's split regex, written as a tiktoken-format file.

The result loads with `Tokenizer.from_file` and encodes with tiktoken: ranks 0..255 are the single bytes,
then one rank per learned merge in the order learned; the 256 special tokens follow the ranks (the
`Tokenizer` class appends them), exactly the layout of Meta's `tokenizer.model`.

Algorithm (Sennrich et al. 2016, byte-level as in GPT-2):
1. Split the text with `LLAMA3_SPLIT_PATTERN` and count each distinct pre-token ("chunk"); merges never
   cross chunk boundaries, so the corpus reduces to (chunk bytes, count) pairs. Counting runs over all cores.
2. Count adjacent token pairs over the distinct chunks, weighted by chunk frequency, and keep, for each
   pair, the chunks it occurs in.
3. Repeatedly merge the most frequent pair (ties: the pair of smaller token ids, so training is
   deterministic), rewriting only the chunks that contain it and updating the pair counts by the difference
   between each chunk's pairs before and after; a max-heap with lazy deletion finds the next pair.
"""

from __future__ import annotations

import heapq
import itertools
import multiprocessing as mp
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

__all__ = ["count_chunks", "iter_text_pieces", "train_bpe", "train_tokenizer"]

_PIECE_CHARS = 1 << 20  # texts are counted in pieces of ~1M characters, cut at newlines


def count_chunks(text: str, pattern: str | None = None) -> Counter[str]:
    """Frequencies of the pre-tokens of `text` under the split pattern (Llama 3's by default)."""
    import regex

    from .tokenizer import LLAMA3_SPLIT_PATTERN

    return Counter(regex.findall(pattern or LLAMA3_SPLIT_PATTERN, text))


def iter_text_pieces(paths: Sequence[str | Path], piece_chars: int = _PIECE_CHARS) -> Iterator[str]:
    """The text of `paths` in pieces of about `piece_chars`, cut after a newline (a pre-token never spans one
    except in runs of whitespace, where a cut changes nothing but the run's split)."""
    from .data.pretrain import read_documents

    for path in paths:
        for doc in read_documents(path, text_chunk_chars=0):
            start = 0
            while start < len(doc):
                end = min(len(doc), start + piece_chars)
                if end < len(doc):
                    newline = doc.rfind("\n", start, end)
                    end = newline + 1 if newline > start else end
                yield doc[start:end]
                start = end


def _count_all(pieces: Iterable[str], num_workers: int, progress: bool) -> Counter[str]:
    from tqdm import tqdm

    total: Counter[str] = Counter()
    bar = tqdm(unit="char", unit_scale=True, desc="counting chunks", disable=not progress)
    if num_workers <= 1:
        for piece in pieces:
            total.update(count_chunks(piece))
            bar.update(len(piece))
    else:
        with mp.get_context("spawn").Pool(num_workers) as pool:
            sized = ((p, len(p)) for p in pieces)
            lengths: list[int] = []

            def texts() -> Iterator[str]:
                for piece, n in sized:
                    lengths.append(n)
                    yield piece

            for i, counts in enumerate(pool.imap(count_chunks, texts())):
                total.update(counts)
                bar.update(lengths[i])
    bar.close()
    return total


def train_bpe(chunk_counts: dict[str, int] | Counter[str], num_ranks: int, *,
              progress: bool = False) -> dict[bytes, int]:
    """Learn `num_ranks - 256` merges from chunk frequencies; returns tiktoken mergeable ranks
    {token bytes: rank}. Stops early if no pair occurs more than once."""
    from tqdm import tqdm

    if num_ranks < 256:
        raise ValueError(f"vocab size {num_ranks} is below 256: byte-level BPE needs every single byte")
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    ids_of: dict[bytes, int] = {tok: i for i, tok in enumerate(vocab)}
    words: list[list[int]] = []
    freqs: list[int] = []
    for chunk, n in chunk_counts.items():
        ids = list(chunk.encode("utf-8"))
        if len(ids) > 1:
            words.append(ids)
            freqs.append(n)
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    pair_words: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, ids in enumerate(words):
        for pair in itertools.pairwise(ids):
            pair_counts[pair] += freqs[w]
            pair_words[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    bar = tqdm(total=num_ranks - 256, desc="merging", unit="merge", disable=not progress)
    while len(vocab) < num_ranks and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale entry: the count changed after it was pushed
        if -neg_count < 2:
            break  # nothing left worth merging
        merged = vocab[pair[0]] + vocab[pair[1]]
        new_id = ids_of.get(merged)
        if new_id is None:  # the same bytes can arise from two different splits; keep one rank
            new_id = len(vocab)
            vocab.append(merged)
            ids_of[merged] = new_id
            bar.update(1)
        changed: dict[tuple[int, int], int] = defaultdict(int)
        for w in pair_words.pop(pair):
            ids, n = words[w], freqs[w]
            for old in itertools.pairwise(ids):
                changed[old] -= n
            words[w] = ids = _merge_ids(ids, pair, new_id)
            for new in itertools.pairwise(ids):
                changed[new] += n
                pair_words[new].add(w)
        for p, delta in changed.items():
            if delta == 0:
                continue
            pair_counts[p] += delta
            if pair_counts[p] <= 0:
                del pair_counts[p]
            else:
                heapq.heappush(heap, (-pair_counts[p], p))
        pair_counts.pop(pair, None)
    bar.close()
    return {tok: rank for rank, tok in enumerate(vocab)}


def _merge_ids(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out: list[int] = []
    i, n = 0, len(ids)
    a, b = pair
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_tokenizer(inputs: Sequence[str | Path], vocab_size: int, output: str | Path, *,
                    num_workers: int | None = None, progress: bool = True):
    """Train on text/JSONL/parquet files and write a tiktoken-format `tokenizer.model` to `output`
    (a file path, or a folder to hold tokenizer.model). `vocab_size` counts the BPE ranks (256 bytes +
    merges); the model's vocabulary is that plus 256 special tokens. Returns the `Tokenizer`."""
    from .tokenizer import Tokenizer

    if not inputs:
        raise ValueError("no input files given")
    counts = _count_all(iter_text_pieces(inputs), num_workers or os.cpu_count() or 1, progress)
    if not counts:
        raise ValueError(f"no text found in {', '.join(map(str, inputs))}")
    ranks = train_bpe(counts, vocab_size, progress=progress)
    tokenizer = Tokenizer(ranks)
    output = Path(output)
    if output.is_dir() or output.suffix == "":
        output.mkdir(parents=True, exist_ok=True)
        output = output / "tokenizer.model"
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save_tiktoken(output)
    return tokenizer
