"""The OpenAI-compatible HTTP server and the web chat page (`create_app`), over the batching engine."""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":  # imported on use: FastAPI is an optional dependency
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'llama3.serve' has no attribute {name!r}")
