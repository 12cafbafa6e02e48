"""Helpers for the server tests: a real uvicorn server on a free port in a background thread, and a
"scripted" model (a real Transformer whose weights make it say a given token sequence)."""

from __future__ import annotations

import socket
import threading
import time

import torch

from llama3.inference.engine import Engine
from llama3.serve.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """`create_app(engine, ...)` served by uvicorn on 127.0.0.1:<free port> until `stop()`."""

    def __init__(self, engine: Engine, **app_kwargs):
        import uvicorn

        self.engine = engine.start()
        self.app = create_app(engine, **app_kwargs)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def metric(self, name: str, headers: dict | None = None) -> float:
        """One sample of /metrics, by its full name with labels (e.g. 'llama3_active_slots')."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", headers=headers or {}).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)

    def wait_for_metric(self, name: str, value: float, headers: dict | None = None, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            current = self.metric(name, headers)
            if current == value or time.monotonic() > deadline:
                return current
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()


def scripted_model(args, tokenizer, script: list[list[int]], seed: int = 0):
    """A Llama 3 Transformer whose greedy output follows `script`: each list [a, b, c, ...] makes token a
    be followed by b, b by c, and so on (a bigram chain; a chain may loop back to one of its own tokens).

    The weights do it honestly through the normal forward pass: attention and feed-forward outputs are
    zero (wo = w2 = 0), so the final hidden state is the normed embedding of the current token; the
    embeddings of chain tokens are random directions, and the output row of each successor is its
    predecessor's direction, so the successor's logit stands far above all others (all other output rows
    are zero). Every token must have one successor across the chains."""
    from tests.conftest import random_model

    model = random_model(args, seed=seed)
    successor: dict[int, int] = {}
    for chain in script:
        for a, b in zip(chain, chain[1:]):
            if successor.setdefault(a, b) != b:
                raise ValueError(f"token {a} would need two successors ({successor[a]} and {b})")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.output.weight.zero_()
        model.norm.weight.fill_(1.0)
        for a, b in successor.items():
            direction = torch.randn(args.dim, generator=g)
            direction /= direction.norm()
            model.tok_embeddings.weight[a] = direction
        for a, b in successor.items():
            model.output.weight[b] += 8.0 * model.tok_embeddings.weight[a]
    return model
