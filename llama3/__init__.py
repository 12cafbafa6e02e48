"""llama3: the Llama 3 system in one package.

Public API: `ModelArgs`, `Transformer`, `Tokenizer`, `ChatFormat`, `load`, `save`. Heavy pieces import on
first use, so `import llama3` stays cheap and has no side effects.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ModelArgs", "Transformer", "Tokenizer", "ChatFormat", "load", "save"]

_LAZY = {
    "ModelArgs": ("llama3.config", "ModelArgs"),
    "Transformer": ("llama3.model", "Transformer"),
    "Tokenizer": ("llama3.tokenizer", "Tokenizer"),
    "ChatFormat": ("llama3.tokenizer", "ChatFormat"),
    "load": ("llama3.checkpoint.load", "load"),
    "save": ("llama3.checkpoint.load", "save"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'llama3' has no attribute {name!r}")
