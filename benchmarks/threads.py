"""Decode speed at 1 and 2 threads, with the machine idle and with one core kept busy: what the default
thread count and OpenMP wait policy of `llama3 generate/chat/serve` should be.

    python benchmarks/threads.py                    # demo-shaped model, eager
    python benchmarks/threads.py --shape 100m --rounds 3

Each configuration (threads x OMP_WAIT_POLICY x background load) runs in its own process (the OpenMP
runtime reads its wait policy once, when torch loads it). "busy" starts one spinning Python process beside
the worker, as another program on a 2-core machine would. Configurations run in alternating rounds and
each is credited with its best round (the machine is shared). Reported: decode tok/s of the best run and
1/median step time, with the CPU model, core count and load average at the start.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llama3.kernels import cpu_description  # the CPU's model and vector features, for reports

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    # `llama3 demo`'s model (recipe "demo"): dim 256, 4 layers, a 4096-rank BPE + 256 specials.
    "demo": {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 64, "vocab_size": 4352},
    # ~100M with the Llama 3 vocabulary (as benchmarks/decode.py)
    "100m": {"dim": 576, "n_layers": 9, "n_heads": 9, "n_kv_heads": 3, "multiple_of": 256, "vocab_size": 128256,
             "tie_word_embeddings": True},
}



def worker(spec: dict) -> dict:
    import torch

    from llama3.config import ModelArgs
    from llama3.inference import Generator, SamplingParams
    from llama3.inference.fast import optimize_for_inference
    from llama3.model import Transformer
    from llama3.tokenizer import Tokenizer

    torch.set_num_threads(spec["threads"])
    args = ModelArgs(**SHAPES[spec["shape"]], max_seq_len=1024)
    # Any byte-level vocabulary of the right size: single bytes, then byte pairs.
    pairs = itertools.islice(itertools.product(range(256), repeat=2), args.vocab_size - 256 - 256)
    ranks = {bytes([i]): i for i in range(256)} | {bytes(p): 256 + i for i, p in enumerate(pairs)}
    tokenizer = Tokenizer(ranks)
    assert tokenizer.n_words == args.vocab_size
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    model = optimize_for_inference(model.to(torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32).eval())
    gen = Generator(model, tokenizer, compile=spec["compile"])
    prompt = list(range(300, 300 + spec["prompt_tokens"]))
    greedy = SamplingParams(temperature=0)
    gen.generate([prompt], max_new_tokens=8, sampling=greedy, stop_ids=[])
    runs, steps = [], []
    for _ in range(spec["repeats"]):
        [result] = gen.generate([prompt], max_new_tokens=spec["new_tokens"], sampling=greedy, stop_ids=[])
        runs.append(result.timing.decode_tokens_per_s)
        steps += result.timing.step_s
    steps.sort()
    return {"decode_tok_s": max(runs), "step_median_tok_s": 1 / statistics.median(steps),
            "step_p10_tok_s": 1 / steps[len(steps) // 10]}


def run_config(spec: dict, policy: str, busy: bool, timeout: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(name, None)
    if policy.startswith("spin="):  # libgomp (torch's OpenMP on Linux): spin this many times, then sleep
        env["GOMP_SPINCOUNT"] = policy.removeprefix("spin=")
    elif policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="demo", choices=list(SHAPES))
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts")
    parser.add_argument("--policies", default="default,PASSIVE",
                        help="OMP_WAIT_POLICY values ('default' = unset) or spin=N (GOMP_SPINCOUNT=N)")
    parser.add_argument("--loads", default="idle,busy", help="idle, busy (one spinning process) or both")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (as `generate`)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    print(f"CPU: {cpu_description()}, {os.cpu_count()} logical cores; load average {os.getloadavg()[0]:.1f} at start; "
          f"shape {args.shape} {args.dtype}, {'compiled' if args.compile else 'eager'}", flush=True)
    configs = list(itertools.product([int(t) for t in args.threads.split(",")], args.policies.split(","),
                                     args.loads.split(",")))
    best: dict[tuple, dict] = {}
    for _ in range(args.rounds):
        for threads, policy, load in configs:
            spec = {"shape": args.shape, "dtype": args.dtype, "threads": threads, "compile": args.compile,
                    "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats}
            result = run_config(spec, policy, load == "busy", args.timeout)
            key = (threads, policy, load)
            print(f"  {key}: {result}", file=sys.stderr, flush=True)
            if key not in best or result.get("decode_tok_s", 0) > best[key].get("decode_tok_s", 0):
                best[key] = result
    print("\n| threads | wait policy | background | decode tok/s (best run) | 1/median step | 1/p10 step |")
    print("|---|---|---|---|---|---|")
    for (threads, policy, load), result in best.items():
        if "error" in result:
            print(f"| {threads} | {policy} | {load} | failed: {result['error'][:60]} | | |")
        else:
            print(f"| {threads} | {policy} | {load} | {result['decode_tok_s']:.0f} | {result['step_median_tok_s']:.0f} "
                  f"| {result['step_p10_tok_s']:.0f} |")
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
