"""Automatic prefix caching: keys and values of prompt prefixes, kept in blocks and shared across requests.

A prompt is cut into blocks of `block_size` tokens. A block's key is the hash of its parent's key and its
own tokens, so a key names the whole prefix up to the end of that block: two prompts that start the same
(a system prompt, few-shot examples, the earlier turns of a chat) share the keys of their common blocks.
The store maps keys to the blocks' keys and values for every layer, and forgets the least recently used
blocks once its byte budget is full.

The store knows nothing of the engine: it copies blocks into and out of one row of per-layer cache tensors
`(k, v)`, each `(rows, K, S, Dh)` (or `(k, v, k_scale, v_scale)` for an int8 cache, the scales
`(rows, K, S, 1)`: any tuple of tensors indexed by row and position the same way). The engine decides what to look up and when to store (engine.py).

Exactness: a block holds exactly what a prefill wrote, so a request that reuses it attends to the same
numbers a full prefill would have made, as long as each row of a prefill's matrix products does not depend
on how many rows the product has. CPU BLAS kernels switch code paths for very few rows (fewer than 8 here),
so the engine never prefills fewer than `block_size` tokens at once when the store is on, and only stores
blocks that a prefill wrote (a decode step is a one-row product: its keys and values differ in the last
bits, so generated tokens are never stored).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

__all__ = ["PrefixCache", "block_bytes"]


def block_bytes(layers: list[tuple[torch.Tensor, ...]], block_size: int) -> int:
    """Bytes one block of `block_size` positions takes, for caches `layers` ((k, v, ...) per layer)."""
    return sum(t[0, :, :block_size].numel() * t.element_size() for tensors in layers for t in tensors)


@dataclass
class _Block:
    parent: int | None
    tokens: tuple[int, ...]
    tensors: list[tuple[torch.Tensor, ...]]  # per layer, (k, v, ...) each (K, block_size, Dh or 1)


class PrefixCache:
    """Blocks of keys and values, keyed by the token prefix they end, with LRU eviction.

    `namespace` (in `lookup` and `store`) separates caches that must never mix although their tokens agree:
    the same prompt under two LoRA adapters has different keys and values.
    """

    def __init__(self, block_size: int, capacity_bytes: int, bytes_per_block: int):
        if block_size < 1:
            raise ValueError(f"the prefix-cache block size must be >= 1, got {block_size}")
        if capacity_bytes < 0:
            raise ValueError(f"the prefix-cache budget must be >= 0 bytes, got {capacity_bytes}")
        self.block_size = block_size
        self.bytes_per_block = bytes_per_block
        self.capacity_blocks = capacity_bytes // bytes_per_block if bytes_per_block else 0
        self._blocks: collections.OrderedDict[int, _Block] = collections.OrderedDict()  # LRU first

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def clear(self) -> None:
        self._blocks.clear()

    # ----- keys -----
    def _key(self, parent: int | None, tokens: tuple[int, ...], namespace) -> int:
        # Python hashes tuples of ints the same in every process (no hash randomisation for them); a
        # collision is caught by comparing the stored tokens and parent in `_get`.
        return hash((parent, namespace if parent is None else None, tokens))

    def _get(self, key: int, parent: int | None, tokens: tuple[int, ...]) -> _Block | None:
        block = self._blocks.get(key)
        if block is None or block.parent != parent or block.tokens != tokens:
            return None
        return block

    def _chain(self, token_ids, num_blocks: int, namespace) -> list[tuple[int, int | None, tuple[int, ...]]]:
        """(key, parent key, tokens) of the first `num_blocks` blocks of `token_ids`."""
        chain, parent, size = [], None, self.block_size
        for b in range(num_blocks):
            tokens = tuple(token_ids[b * size:(b + 1) * size])
            key = self._key(parent, tokens, namespace)
            chain.append((key, parent, tokens))
            parent = key
        return chain

    def _touch(self, keys: list[int]) -> None:
        """Mark a chain used, its root last: eviction then takes leaves before the parents they hang on."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    # ----- lookup and copy in -----
    def lookup(self, token_ids, max_tokens: int, namespace=None) -> list[int]:
        """Keys of the longest run of stored blocks that starts `token_ids`, covering at most `max_tokens`."""
        found = []
        for key, parent, tokens in self._chain(token_ids, max(0, max_tokens) // self.block_size, namespace):
            if self._get(key, parent, tokens) is None:
                break
            found.append(key)
        self._touch(found)
        return found

    def load(self, keys: list[int], layers: list[tuple[torch.Tensor, ...]], row: int) -> int:
        """Copy blocks `keys` (from `lookup`) into positions [0, n·block_size) of cache row `row`; returns
        the number of positions written."""
        size = self.block_size
        for b, key in enumerate(keys):
            block = self._blocks[key]
            for tensors, saved in zip(layers, block.tensors):
                for t, part in zip(tensors, saved):
                    t[row, :, b * size:(b + 1) * size].copy_(part)
        return len(keys) * size

    # ----- copy out -----
    def store(self, token_ids, num_tokens: int, layers: list[tuple[torch.Tensor, ...]], row: int,
              namespace=None) -> int:
        """Keep the full blocks of the first `num_tokens` of `token_ids`, whose keys and values are in cache
        row `row`; blocks already stored are only marked used. Returns the number of new blocks."""
        if self.capacity_blocks == 0:
            return 0
        size, added = self.block_size, 0
        # At most the whole budget, with the blocks already there marked used first, so that making room
        # never evicts a block of this very chain.
        chain = self._chain(token_ids, min(num_tokens // size, self.capacity_blocks), namespace)
        self._touch([key for key, _, _ in chain])
        for b, (key, parent, tokens) in enumerate(chain):
            if self._get(key, parent, tokens) is not None:
                continue
            if key in self._blocks:  # a hash collision with another prefix: keep the one already there
                break
            while len(self._blocks) >= self.capacity_blocks:
                self._blocks.popitem(last=False)
            self._blocks[key] = _Block(parent, tokens, [tuple(t[row, :, b * size:(b + 1) * size].clone()
                                                              for t in tensors) for tensors in layers])
            added += 1
        self._touch([key for key, _, _ in chain])
        return added
