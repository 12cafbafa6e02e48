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


def scripted_model(vocab_size: int, scripts: list[list[int]], *, context_len: int, max_seq_len: int = 1024):
    """A real Llama 3 Transformer whose greedy continuation follows `scripts`, for end-to-end tests that
    need a model to say something specific (a tool call, HTML to be escaped, an endless stream).

    Each script is a token list: its first `context_len` (>= 3) tokens end a prompt, the rest is what the
    model says after them. The weights implement a trigram table through the ordinary forward pass:
    - every script token has a one-hot direction in subspace A of the residual stream, all other tokens
      share one more (so every residual has the same norm), and every token has a constant "bias"
      coordinate that drives the attention queries and keys;
    - layer 0's heads attend exactly one position back (RoPE turns a fixed query/key pair into a score
      peaked at offset 1) and copy the previous token's direction into subspace B; layer 1 does the same
      from B into C, so C holds the token two back;
    - layer 1's feed-forward has one SwiGLU unit per rule that fires only when A, B and C all match its
      context (a conjunction a linear map could not make), writing a one-hot into subspace R;
    - the output row of each rule's next token reads its R coordinate.
    The result is checked by running it: a script it cannot say raises."""
    from llama3.config import ModelArgs
    from llama3.model import Transformer

    rules: dict[tuple[int, int, int], int] = {}
    for script in scripts:
        for k in range(context_len, len(script)):
            key = tuple(script[k - 3:k])
            if rules.setdefault(key, script[k]) != script[k]:
                raise ValueError(f"context {key} would need two continuations")
    tokens = sorted({t for key in rules for t in key})
    dim, space = 128, 28  # residual: [A | B | C | bias | R (one coordinate per rule)]
    A, B, C, BIAS, R = 0, space, 2 * space, 3 * space, 3 * space + 1
    if len(tokens) >= space or len(rules) > dim - R:
        raise ValueError(f"a script set may use at most {space - 1} distinct context tokens and {dim - R} rules")
    slot = {t: i + 1 for i, t in enumerate(tokens)}  # slot 0: every other token (keeps all norms equal)
    args = ModelArgs(dim=dim, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=vocab_size, multiple_of=16,
                     rope_theta=10000.0, max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = Transformer(args)  # allocates nothing; every weight is set below
    model.to_empty(device="cpu")
    head_dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (Dh/2,)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.zero_()
        model.tok_embeddings.weight[:, BIAS] = 1.0
        model.tok_embeddings.weight[:, A] = 1.0
        for t, i in slot.items():
            model.tok_embeddings.weight[t, A] = 0.0
            model.tok_embeddings.weight[t, A + i] = 1.0
        # Query = key rotated back by one position's angle: score(m, n) = r² Σ_i cos((m - n - 1)·θ_i).
        r = 30.0
        query = torch.stack([torch.cos(freqs), -torch.sin(freqs)], dim=-1).flatten() * r  # (Dh,)
        key = torch.stack([torch.ones_like(freqs), torch.zeros_like(freqs)], dim=-1).flatten() * r
        for layer, (src, dst, num_units) in zip(model.layers, [(A, B, 2), (B, C, 3)]):
            attn = layer.attention
            norm_scale = (num_units / dim) ** 0.5  # undoes attention_norm over num_units unit entries
            for h in range(args.n_heads):
                attn.wq.weight[h * head_dim:(h + 1) * head_dim, BIAS] = query * norm_scale
                attn.wk.weight[h * head_dim:(h + 1) * head_dim, BIAS] = key * norm_scale
            for i in range(space):
                attn.wv.weight[i, src + i] = 1.0
                attn.wo.weight[dst + i, i] = norm_scale
        ffn, norm_scale, sharpness = model.layers[1].feed_forward, (4 / dim) ** 0.5, 20.0
        for n, ((t2, t1, t0), nxt) in enumerate(rules.items()):
            # silu(20·(matches - 2.5)): ≈ 10 when all three match, ≈ 0 otherwise.
            for sub, t in ((A, t0), (B, t1), (C, t2)):
                ffn.w1.weight[n, sub + slot[t]] = sharpness * norm_scale
            ffn.w1.weight[n, BIAS] = -2.5 * sharpness * norm_scale
            ffn.w3.weight[n, BIAS] = norm_scale
            ffn.w2.weight[R + n, n] = 0.1
            model.output.weight[nxt, R + n] = 10.0
    model.init_buffers()
    model.eval()
    for script in scripts:  # prove it says each script
        ids = list(script[:context_len])
        with torch.no_grad():
            for _ in range(len(script) - context_len):
                hidden = model(torch.tensor([ids]), return_hidden=True)  # (1, T, D)
                ids.append(int(model.logits(hidden[:, -1]).argmax()))
        if ids != list(script):
            raise ValueError(f"the scripted model says {ids} instead of {script}")
    return model

