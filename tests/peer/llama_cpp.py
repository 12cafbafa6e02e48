"""llama.cpp (llama-cpp-python) as the GGUF reference. These functions run in a child process through
``tests.peer.runner.call_isolated`` (see ``evaluate`` below); never call them in the pytest process."""

from __future__ import annotations

import numpy as np

from tests.peer.runner import call_isolated

TIMEOUT_S = 120


def evaluate(path, ids, *, num_new: int = 0, text: str | None = None, num_ctx: int = 128,
             timeout: float = TIMEOUT_S) -> dict:
    """Run llama.cpp on the GGUF file ``path`` in a child process: evaluate ``ids``, then ``num_new`` greedy
    tokens. Returns ``ids`` (prompt + greedy), ``logits`` (one row per evaluated position), ``tokens``
    (llama.cpp's tokenization of ``text`` with BOS, when given), ``bos``, ``eos`` and ``n_vocab``."""
    return call_isolated("tests.peer.llama_cpp:_evaluate_in_child", timeout=timeout, file=path, path=str(path),
                         ids=[int(i) for i in ids], num_new=num_new, text=text, num_ctx=num_ctx)


def _evaluate_in_child(path: str, ids: list[int], num_new: int, text: str | None, num_ctx: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=num_ctx, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        ids = list(ids)
        llm.eval(ids)
        for _ in range(num_new):
            ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([ids[-1]])
        return {"ids": ids, "logits": np.array(llm.scores[: llm.n_tokens], dtype=np.float32),
                "tokens": llm.tokenize(text.encode(), add_bos=True, special=True) if text is not None else None,
                "bos": llm.token_bos(), "eos": llm.token_eos(), "n_vocab": llm.n_vocab()}
    finally:
        llm.close()
