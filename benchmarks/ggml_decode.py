"""Decode speed on a quantized GGUF file: ours, configuration by configuration, against llama.cpp on the same
file, in alternating runs.

    python benchmarks/ggml_decode.py ~/.cache/llama3/real-size/1b-q4_0.gguf --rounds 3
    python benchmarks/ggml_decode.py FILE --ours unfused:off,grouped:200,repacked:200 --loads idle,busy

Each run is a fresh process (the OpenMP runtime reads its wait policy once; both runtimes get
OMP_WAIT_POLICY=PASSIVE, what our commands set) that loads the file, feeds a 16-token prompt and decodes 48
greedy tokens; it reports 1/median and 1/best step (the machine is shared: the median is the honest
figure, and every configuration is credited with its best round). A configuration of ours is
`PROJECTIONS:SPIN`: PROJECTIONS `repacked` (what `optimize_for_inference` does: q/k/v and gate/up as one
product each, Q4_0 / Q4_K repacked into the kernels' 8-row layout), `grouped` (the same on the file's
layout) or `unfused` (one product per weight, the file's layout), SPIN the `LLAMA3_GGML_SPIN_US` of the
run (`off`: torch's OpenMP pool; N: the products' own pool, its workers spinning N microseconds before they
sleep). "busy" starts one spinning process beside the run, as another program on the machine would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llama3.kernels import cpu_description  # the CPU's model and vector features, for reports

REPO = Path(__file__).resolve().parents[1]
PROMPT = list(range(1000, 1016))
NEW_TOKENS = 48


def worker_ours(spec: dict) -> list[float]:
    import torch

    import llama3
    from llama3.inference import Generator, SamplingParams
    from llama3.inference.fast import optimize_for_inference

    torch.set_num_threads(spec["threads"])
    model, tokenizer = llama3.load(spec["file"])
    optimize_for_inference(model, fuse=spec["projections"] != "unfused", repack=spec["projections"] == "repacked")
    gen = Generator(model, tokenizer, compile=False)
    [result] = gen.generate([PROMPT], max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0),
                            stop_ids=[])
    return list(result.timing.step_s)


def worker_llamacpp(spec: dict) -> list[float]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=spec["file"], n_ctx=128, n_batch=64, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)

    def next_token() -> int:  # greedy, as ours
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    llm.eval(PROMPT)
    token, steps = next_token(), []
    for _ in range(NEW_TOKENS - 1):
        started = time.perf_counter()
        llm.eval([token])
        token = next_token()
        steps.append(time.perf_counter() - started)
    return steps


def run(config: str, spec: dict, busy: bool, timeout: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("LLAMA3_GGML_SPIN_US", None)
    if config != "llama.cpp":
        projections, _, spin = config.partition(":")
        spec = {**spec, "projections": projections}
        env["LLAMA3_GGML_SPIN_US"] = spin
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**spec, "config": config})],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    steps = json.loads(lines[-1])
    return {"median_tok_s": 1 / statistics.median(steps), "best_tok_s": 1 / min(steps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ours", default="grouped:200,repacked:200",
                        help="comma list of PROJECTIONS:SPIN (see above)")
    parser.add_argument("--loads", default="idle", help="idle, busy (one extra spinning process) or both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        steps = worker_llamacpp(spec) if spec["config"] == "llama.cpp" else worker_ours(spec)
        print(json.dumps(steps))
        return 0
    if not args.file or not Path(args.file).is_file():
        parser.error(f"give a GGUF file to decode (got {args.file!r})")
    print(f"CPU: {cpu_description()}, {os.cpu_count()} logical cores; load average {os.getloadavg()[0]:.1f} at "
          f"start; {Path(args.file).name}, {args.threads} threads", flush=True)
    configs = ["llama.cpp", *args.ours.split(",")]
    spec = {"file": str(Path(args.file).resolve()), "threads": args.threads}
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for load in args.loads.split(","):
            for config in configs:
                result = run(config, spec, load == "busy", args.timeout)
                print(f"  {config} {load} (load average {os.getloadavg()[0]:.1f}): {result}", file=sys.stderr,
                      flush=True)
                key = (config, load)
                if key not in best or result.get("median_tok_s", 0) > best[key].get("median_tok_s", 0):
                    best[key] = result
    print("\n| runtime | background | decode tok/s (1/median step) | 1/best step | median vs llama.cpp |")
    print("|---|---|---:|---:|---:|")
    for (config, load), result in best.items():
        name = "llama.cpp" if config == "llama.cpp" else f"ours {config.replace(':', ', spin ')}"
        if "error" in result:
            print(f"| {name} | {load} | failed: {result['error'][:60]} | | |")
            continue
        ref = best.get(("llama.cpp", load), {}).get("median_tok_s")
        ratio = f"{result['median_tok_s'] / ref:.2f}x" if ref else "-"
        print(f"| {name} | {load} | {result['median_tok_s']:.1f} | {result['best_tok_s']:.1f} | {ratio} |")
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
