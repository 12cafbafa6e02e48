"""Where a GGUF start's time goes: import, `llama3.load` (reading, checking and repacking the weights),
`optimize_for_inference`, the first generated token; beside llama.cpp's first token on the same file.

    python benchmarks/start_stages.py /data/1b-q4_0.gguf --rounds 3
    python benchmarks/start_stages.py /data/1b-q4_0.gguf --tree /path/to/other/checkout   # before/after

Each measurement is a fresh process, warm page cache (the file is read once first), the runtimes
alternating (the machine may be shared: compare medians of the same run). "ours" times every stage from
the process's first line (imports included: what real_size.py's first token counts too); `--tree` adds
the same stages run from another checkout of this project (its code first on PYTHONPATH), for a
before/after. llama.cpp (llama-cpp-python) is timed from its import to its first token's logits. Peak RSS
is the worker's VmHWM. Prints a markdown table of medians with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "It is a truth universally acknowledged"

OURS = r"""
import time
t0 = time.perf_counter()
import json, sys
import torch
import llama3
from llama3.inference import Generator, SamplingParams
from llama3.inference.fast import optimize_for_inference
torch.set_num_threads(int(sys.argv[2]))
t1 = time.perf_counter()
model, tok = llama3.load(sys.argv[1])
t2 = time.perf_counter()
optimize_for_inference(model)
t3 = time.perf_counter()
gen = Generator(model, tok, compile=False)
gen.generate([tok.encode(sys.argv[3], bos=True)], max_new_tokens=1, sampling=SamplingParams(temperature=0), stop_ids=[])
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "optimize": t3 - t2, "first": t4 - t3, "total": t4 - t0}))
"""

LLAMA_CPP = r"""
import time
t0 = time.perf_counter()
import json, sys
from llama_cpp import Llama
t1 = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=int(sys.argv[2]), verbose=False)
t2 = time.perf_counter()
llm.eval(llm.tokenize(sys.argv[3].encode(), add_bos=True))
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first": t3 - t2, "total": t3 - t0}))
"""


def run(code: str, file: Path, threads: int, pythonpath: Path | None) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run([sys.executable, "-c", code + _PEAK, str(file), str(threads), PROMPT],
                          capture_output=True, text=True, env=env, cwd=pythonpath or REPO, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(lines) < 2:
        raise RuntimeError(f"worker failed: {proc.stderr.strip()[-2000:]}")
    return {**json.loads(lines[0]), **json.loads(lines[1])}


_PEAK = r"""
with open("/proc/self/status") as f:
    print(json.dumps({"peak_rss_gb": next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 2**20}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", type=Path, help="a GGUF file, or an HF folder (with --no-llama-cpp)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tree", type=Path, help="another checkout of this project, run as 'before'")
    parser.add_argument("--no-llama-cpp", action="store_true")
    args = parser.parse_args(argv)
    for path in sorted(args.file.iterdir()) if args.file.is_dir() else [args.file]:  # warm page cache
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass
    runtimes = {"ours": (OURS, REPO)}
    if args.tree:
        runtimes["before"] = (OURS, args.tree.resolve())
    if not args.no_llama_cpp:
        runtimes["llama.cpp"] = (LLAMA_CPP, REPO)
    results: dict[str, list[dict]] = {name: [] for name in runtimes}
    for i in range(args.rounds):
        for name, (code, tree) in runtimes.items():
            results[name].append(run(code, args.file, args.threads, tree))
            print(f"round {i + 1} {name}: " + " ".join(f"{k} {v:.2f}" for k, v in results[name][-1].items()),
                  file=sys.stderr)
    from llama3.kernels import cpu_description

    stages = ("import", "load", "optimize", "first", "total", "peak_rss_gb")
    print(f"{args.file.name}, {args.threads} threads, {args.rounds} alternating rounds, medians; CPU: {cpu_description()}\n")
    print("| runtime | " + " | ".join(stages) + " | total / llama.cpp |")
    print("|---" * (len(stages) + 2) + "|")
    peer = statistics.median(r["total"] for r in results["llama.cpp"]) if "llama.cpp" in results else None
    for name, runs in results.items():
        cells = [f"{statistics.median(r[s] for r in runs):.2f}" if s in runs[0] else "" for s in stages]
        ratio = f"{statistics.median(r['total'] for r in runs) / peer:.2f}x" if peer else ""
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
