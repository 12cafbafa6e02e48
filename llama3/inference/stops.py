"""Stop strings, written once for the generator (`inference.generate`) and the server (`serve.completions`):
the text is cut before the first stop string found, and while decoding goes on a tail that could still
grow into a stop string is held back, so a streamed piece never shows part of one."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["find_stop", "shown_length"]


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index in `text` of the earliest stop string that begins at or after `start`; -1 when there is none.
    Empty stop strings never match."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def shown_length(text: str, stops: Sequence[str]) -> int:
    """How many characters of `text` can be shown while decoding goes on: all but the longest tail that is
    the beginning of a stop string (it may still become one)."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return len(text) - held
