"""Start-up of a bf16 Hugging Face folder: `llama3 generate` against llama.cpp on the same weights as f16
GGUF. Per run, in a fresh process: time to first token (process start to first token: imports, load,
warm-up, prefill), decode tok/s and peak RSS (`ru_maxrss` of the child, from `os.wait4`).

    python benchmarks/lean_start.py --hf ~/.cache/llama3/real-size/1b-hf \\
        --gguf ~/.cache/llama3/real-size/1b-f16.gguf --rounds 2 [--quantize int4] [--tree /path/to/other/checkout]

`--tree` runs ours from another checkout (a before/after comparison); runs alternate ours / llama.cpp
(/ the other tree) so a shared machine's load hits each alike. Ours runs eager (`--no-compile`): the
compiled step's warm-up is reported on its own (`warmup_s`), not hidden in these figures.
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
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
NEW_TOKENS = 17

_LLAMACPP = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
start = float(sys.argv[3])
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=int(sys.argv[2]), n_threads_batch=int(sys.argv[2]), verbose=False)
prompt = llm.tokenize(sys.argv[4].encode(), add_bos=True)
def next_token():
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
llm.eval(prompt); ids = [next_token()]
ttft = time.time() - start
t = time.perf_counter()
while len(ids) < int(sys.argv[5]):
    llm.eval([ids[-1]]); ids.append(next_token())
print(json.dumps({"ttft_s": ttft, "decode_tok_s": (len(ids) - 1) / (time.perf_counter() - t)}))
"""


def ours(hf: Path, tree: Path, quantize: str | None, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "llama3", "generate", "--model", str(hf), "--dtype", "bf16", "--prompt", PROMPT,
           "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0", "--json", "--no-compile",
           "--threads", str(threads), *(["--quantize", quantize] if quantize else [])]
    result, peak, wall = _measured(cmd, env, cwd=tree)  # `-m` imports from the working directory first
    timing = json.loads(result.strip().splitlines()[-1])["timing"]
    return {"ttft_s": wall - timing["decode_s"], "decode_tok_s": timing["decode_tokens_per_s"], "peak_rss_gb": peak,
            "load_s": timing["load_s"], "warmup_s": timing["warmup_s"]}


def llamacpp(gguf: Path, threads: int) -> dict:
    cmd = [sys.executable, "-c", _LLAMACPP, str(gguf), str(threads), str(time.time()), PROMPT, str(NEW_TOKENS)]
    result, peak, _ = _measured(cmd, {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return {**json.loads(result.strip().splitlines()[-1]), "peak_rss_gb": peak}


def _measured(cmd: list[str], env: dict, cwd: Path = REPO) -> tuple[str, float, float]:
    """(stdout, peak RSS in GB, wall seconds from start to exit) of a child; its peak from `os.wait4`."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                            cwd=cwd)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} failed: {err.strip()[-800:]}")
    return out, usage.ru_maxrss * 1024 / 1e9, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", type=Path, required=True, help="a bf16 Hugging Face folder")
    parser.add_argument("--gguf", type=Path, default=None, help="the same weights as f16 GGUF (llama.cpp)")
    parser.add_argument("--tree", type=Path, default=None, help="also run ours from this checkout (before)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    weights = sum(p.stat().st_size for p in args.hf.glob("*.safetensors")) / 1e9
    print(f"CPU: {cpu_description()}; weights {weights:.2f} GB; {args.threads} threads", flush=True)
    rows: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        rows.setdefault("ours", []).append(ours(args.hf, REPO, args.quantize, args.threads))
        print("ours", rows["ours"][-1], flush=True)
        if args.gguf is not None:
            rows.setdefault("llama.cpp f16", []).append(llamacpp(args.gguf, args.threads))
            print("llama.cpp", rows["llama.cpp f16"][-1], flush=True)
        if args.tree is not None:
            rows.setdefault("ours (other tree)", []).append(ours(args.hf, args.tree, args.quantize, args.threads))
            print("other tree", rows["ours (other tree)"][-1], flush=True)
    print("\n| run | first token s | decode tok/s | peak RSS GB | peak / weights |\n|---|---|---|---|---|")
    for name, runs in rows.items():
        best = {k: (max if k == "decode_tok_s" else min)(r[k] for r in runs) for k in ("ttft_s", "decode_tok_s", "peak_rss_gb")}
        print(f"| {name} | {best['ttft_s']:.1f} | {best['decode_tok_s']:.2f} | {best['peak_rss_gb']:.2f} | "
              f"{best['peak_rss_gb'] / weights:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
