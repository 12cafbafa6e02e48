"""Prompt processing (a 512-token prefill) at matched precision: ours against llama.cpp, same run.

    python benchmarks/prefill.py                          # every pair below, 1B shape, 2 threads
    python benchmarks/prefill.py --pairs int4,q4_k_m --rounds 3

Pairs (ours | llama.cpp), on the files `benchmarks/real_size.py` caches in --workdir (the Q8_0 file is
converted there by our writer on first use):

| pair | ours | llama.cpp |
|---|---|---|
| bf16 | the bf16 HF folder (bf16 weights) | the f16 GGUF |
| int8 | the HF folder with `--quantize int8` | the Q8_0 GGUF |
| int4 | the HF folder with `--quantize int4` | the Q4_0 GGUF |
| q4_0, q4_k_m, q8_0 | the GGUF file itself (ggml blocks) | the same file |

Each measurement is a fresh process (ours and llama.cpp's alternating, `--rounds` times) that loads the
model, runs the prompt once to warm up (page cache, allocator, thread pool) and then times `--repeats` more,
reporting the best: prefill tokens per second, as `llama3 generate` or llama-cpp-python (n_batch 512)
reach them. The ratio ours / llama.cpp of the best runs is the figure to read: the machine may be shared.
`--before-after` instead times ours with and without the sliced dequantize-and-GEMM prompt path in one
process, alternating (the same load for both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_size import LONG_PROMPT, REPO, SHAPES, _env  # noqa: E402

PAIRS = {  # name: (our source, our --quantize, our dtype, llama.cpp's file)
    "bf16": ("hf", None, "bfloat16", "f16"),
    "int8": ("hf", "int8", None, "q8_0"),
    "int4": ("hf", "int4", None, "q4_0"),
    "q4_0": ("q4_0", None, None, "q4_0"),
    "q4_k_m": ("q4_k_m", None, None, "q4_k_m"),
    "q8_0": ("q8_0", None, None, "q8_0"),
}


def worker_ours(spec: dict) -> float:
    import torch

    import llama3
    from llama3.inference import Generator, SamplingParams
    from llama3.inference.fast import optimize_for_inference

    torch.set_num_threads(spec["threads"])
    model, tokenizer = llama3.load(spec["file"], dtype=spec["dtype"])
    optimize_for_inference(model, quantize=spec["quantize"])
    gen = Generator(model, tokenizer, compile=False)
    greedy = SamplingParams(temperature=0)
    times = []
    for _ in range(1 + spec["repeats"]):
        [result] = gen.generate([spec["prompt"]], max_new_tokens=1, sampling=greedy, stop_ids=[])
        times.append(result.timing.prefill_s)
    return LONG_PROMPT / min(times[1:])


def worker_before_after(spec: dict) -> dict:
    """One process, one model: prompts with the sliced dequantize-and-GEMM path (after) and without it
    (before: `gemv.PROMPT_ROWS` out of reach, so every row takes the kernels or torch's mixed products),
    alternating `repeats` times after one warm-up each; the best tok/s of each."""
    import torch

    import llama3
    from llama3.inference import Generator, SamplingParams, gemv
    from llama3.inference.fast import optimize_for_inference

    torch.set_num_threads(spec["threads"])
    model, tokenizer = llama3.load(spec["file"], dtype=spec["dtype"])
    optimize_for_inference(model, quantize=spec["quantize"])
    gen = Generator(model, tokenizer, compile=False)
    greedy = SamplingParams(temperature=0)
    threshold, best = gemv.PROMPT_ROWS, {"before": 0.0, "after": 0.0}
    for round_index in range(1 + spec["repeats"]):
        for name, rows in (("after", threshold), ("before", 1 << 30)):
            gemv.PROMPT_ROWS = rows
            [result] = gen.generate([spec["prompt"]], max_new_tokens=1, sampling=greedy, stop_ids=[])
            if round_index:
                best[name] = max(best[name], LONG_PROMPT / result.timing.prefill_s)
    return best


def worker_llamacpp(spec: dict) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=spec["file"], n_ctx=LONG_PROMPT + 16, n_batch=512, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)
    times = []
    for _ in range(1 + spec["repeats"]):
        llm.reset()
        started = time.perf_counter()
        llm.eval(spec["prompt"])
        times.append(time.perf_counter() - started)
    return LONG_PROMPT / min(times[1:])


def measure(spec: dict, timeout: int) -> float | dict | str:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=_env())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return "error: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(lines[-1])["prompt_tok_s"]


def file_for(workdir: Path, shape: str, precision: str, hf: Path) -> Path:
    """The model file of one precision ("hf": the folder `hf`), converting the Q8_0 GGUF from `hf` once."""
    path = workdir / f"{shape}-{precision}.gguf" if precision != "hf" else hf
    if not path.exists():
        if precision != "q8_0":  # the others come from benchmarks/real_size.py
            raise SystemExit(f"{path} is missing: run benchmarks/real_size.py --shape {shape} first")
        subprocess.run([sys.executable, "-m", "llama3", "convert", str(hf), str(path), "--to",
                        "gguf", "--dtype", "q8_0"], check=True, cwd=REPO, env=_env())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="1b", choices=list(SHAPES))
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma list of: " + ", ".join(PAIRS))
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "llama3" / "real-size"))
    parser.add_argument("--q8-workdir", default=None, help="where the Q8_0 file lives (default: --workdir)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before-after", action="store_true",
                        help="ours only: the sliced prompt path against the kernels' in one process, alternating")
    parser.add_argument("--repeats", type=int, default=2, help="timed prompts per process after the warm-up")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per worker")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        workers = {"ours": worker_ours, "llamacpp": worker_llamacpp, "before_after": worker_before_after}
        print(json.dumps({"prompt_tok_s": workers[spec["runtime"]](spec)}))
        return 0
    from llama3.kernels import cpu_description
    from llama3.tokenizer import Tokenizer

    workdir = Path(args.workdir)
    tokenizer = Tokenizer.from_tiktoken_file(workdir / f"{args.shape}-hf" / "tokenizer.model")
    words = next((REPO / "data" / "austen").glob("*.txt")).read_text(encoding="utf-8")
    prompt = tokenizer.encode(words, bos=True)[:LONG_PROMPT]
    q8_dir = Path(args.q8_workdir) if args.q8_workdir else workdir

    def path(precision: str) -> Path:
        return file_for(q8_dir if precision == "q8_0" else workdir, args.shape, precision,
                        workdir / f"{args.shape}-hf")

    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for pair in args.pairs.split(","):
            source, quantize, dtype, peer = PAIRS[pair]
            ours = {"file": str(path(source)), "quantize": quantize, "dtype": dtype}
            runs = {"before_after": ours} if args.before_after else {"ours": ours, "llamacpp": {"file": str(path(peer))}}
            for runtime, job in runs.items():
                tok_s = measure({**job, "runtime": runtime, "threads": args.threads, "repeats": args.repeats,
                                 "prompt": prompt}, args.timeout)
                print(f"{pair} {runtime}: {tok_s}", file=sys.stderr, flush=True)
                if isinstance(tok_s, dict):  # --before-after: both paths of one process
                    for name, value in tok_s.items():
                        best.setdefault(pair, {})[name] = max(value, best.get(pair, {}).get(name, 0.0))
                elif isinstance(tok_s, float):
                    best.setdefault(pair, {})[runtime] = max(tok_s, best.get(pair, {}).get(runtime, 0.0))
    print(f"### prefill {LONG_PROMPT} tokens, {args.shape}, {cpu_description()}, {args.threads} threads\n")
    if args.before_after:
        print("| pair | before tok/s | after tok/s | after / before |\n|---|---|---|---|")
        for pair, r in best.items():
            print(f"| {pair} | {r['before']:.1f} | {r['after']:.1f} | {r['after'] / r['before']:.2f} |")
        return 0
    print("| pair | ours tok/s | llama.cpp tok/s | ours / llama.cpp |\n|---|---|---|---|")
    for pair, r in best.items():
        ratio = f"{r['ours'] / r['llamacpp']:.2f}" if len(r) == 2 else "-"
        print(f"| {pair} | {r.get('ours', 0):.1f} | {r.get('llamacpp', 0):.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
