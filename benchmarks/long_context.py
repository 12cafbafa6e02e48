"""Decode speed deep into a conversation: ours vs llama.cpp on the same GGUF file, after a prompt of N tokens.

    python benchmarks/long_context.py --file ~/.cache/llama3/real-size/1b-q4_0.gguf --contexts 512,2048,4096

A chat's decode step attends over everything said so far, so its cost grows with the context. Each run is a
fresh process that reads N tokens of the bundled corpus (tokenized with the Llama 3 tokenizer beside
benchmarks/real_size.py's files), then decodes --new-tokens greedy tokens; the figure is decode tokens/s.
Runtimes alternate per context:
- `ours`: `llama3.load` + `optimize_for_inference`, the eager generator (decode attention on the project's
  kernel, `llama3::attend_one_query`);
- `ours-torch`: the same with the decode attention in its PyTorch form (broadcast multiply-and-sum), the
  form the kernel replaced: the before/after in one run;
- `llamacpp`: llama-cpp-python on the same file, n_batch 512.
The table goes to stdout (markdown), with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llama3.kernels import cpu_description

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = ("ours", "ours-torch", "llamacpp")


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    ids, new = spec["prompt"], spec["new_tokens"]
    if spec["runtime"].startswith("ours"):
        import llama3
        from llama3.inference import Generator, SamplingParams
        from llama3.inference.attention import use_decode_kernels
        from llama3.inference.fast import optimize_for_inference

        model, tokenizer = llama3.load(spec["file"])
        optimize_for_inference(model)
        gen = Generator(model, tokenizer, compile=False)
        if spec["runtime"] == "ours-torch":
            use_decode_kernels(model, enabled=False)
        [result] = gen.generate([ids], max_new_tokens=new, sampling=SamplingParams(temperature=0), stop_ids=[])
        return {"decode_tok_s": len(result.timing.step_s) / sum(result.timing.step_s),
                "prefill_s": result.timing.prefill_s, "token_ids": result.token_ids}
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=spec["file"], n_ctx=len(ids) + new + 16, n_batch=512, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    started = time.perf_counter()
    llm.eval(ids)
    out = [next_token()]
    prefill_s = time.perf_counter() - started
    steps = time.perf_counter()
    while len(out) < new:
        llm.eval([out[-1]])
        out.append(next_token())
    return {"decode_tok_s": (new - 1) / (time.perf_counter() - steps), "prefill_s": prefill_s, "token_ids": out}


def measure(spec: dict, timeout: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def corpus_ids(tokenizer_file: Path, count: int) -> list[int]:
    from llama3.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_tiktoken_file(tokenizer_file)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "data" / "austen").glob("*.txt")))
    ids = tokenizer.encode(text, bos=True)
    if len(ids) < count:
        raise SystemExit(f"the bundled corpus has {len(ids)} tokens; --contexts asks for {count}")
    return ids[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--file", default=str(Path.home() / ".cache/llama3/real-size/1b-q4_0.gguf"))
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.model (default: the one in the 1b-hf folder beside --file)")
    parser.add_argument("--contexts", default="512,2048,4096", help="prompt lengths, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma list of: " + ", ".join(RUNTIMES))
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; each figure is the best")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per worker")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    runtimes = [r for r in args.runtimes.split(",") if r]
    if any(r not in RUNTIMES for r in runtimes):
        parser.error(f"--runtimes takes {', '.join(RUNTIMES)}")
    contexts = [int(c) for c in args.contexts.split(",") if c]
    tokenizer = Path(args.tokenizer) if args.tokenizer else Path(args.file).parent / "1b-hf" / "tokenizer.model"
    ids = corpus_ids(tokenizer, max(contexts))
    results = {n: {r: [] for r in runtimes} for n in contexts}
    for _ in range(args.rounds):
        for n in contexts:
            for runtime in runtimes:
                spec = {"runtime": runtime, "file": args.file, "prompt": ids[:n], "new_tokens": args.new_tokens,
                        "threads": args.threads}
                run = measure(spec, args.timeout)
                results[n][runtime].append(run)
                print(f"context {n} {runtime}: {json.dumps({k: v for k, v in run.items() if k != 'token_ids'})}",
                      file=sys.stderr)
    print(f"### {Path(args.file).name}, {cpu_description()}, {args.threads} threads, {args.new_tokens} new tokens\n")
    print("| context (prompt tokens) | runtime | decode tok/s | prefill s | vs llama.cpp |")
    print("|---|---|---:|---:|---:|")
    for n in contexts:
        peer = [r["decode_tok_s"] for r in results[n].get("llamacpp", []) if "error" not in r]
        for runtime in runtimes:
            ok = [r for r in results[n][runtime] if "error" not in r]
            if not ok:
                print(f"| {n} | {runtime} | failed: {results[n][runtime][-1]['error']} | | |")
                continue
            best = max(ok, key=lambda r: r["decode_tok_s"])
            ratio = f"{best['decode_tok_s'] / max(peer):.2f}x" if peer and runtime != "llamacpp" else ""
            print(f"| {n} | {runtime} | {best['decode_tok_s']:.2f} | {best['prefill_s']:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
