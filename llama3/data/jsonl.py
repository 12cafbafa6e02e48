"""Reading JSONL input files (one JSON object per line) with errors that name the file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl", "read_jsonl_texts"]


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object raises
    `ValueError("FILE:LINE: ...")`. Blank lines are skipped but still counted."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                 "each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl_texts(path: str | os.PathLike, field: str = "text") -> Iterator[str]:
    """The string field `field` of every record (documents for pretraining or perplexity)."""
    for lineno, record in read_jsonl(path):
        if not isinstance(record.get(field), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string field {field!r}")
        yield record[field]
