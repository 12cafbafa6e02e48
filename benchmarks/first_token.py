"""Time to first token from the command line: `llama3 generate` (eager and compiled) beside llama.cpp
(llama-cpp-python) on the same demo-shaped model, each started as a fresh process.

    python benchmarks/first_token.py                      # builds a demo-shaped model, 3 alternating rounds
    python benchmarks/first_token.py --model runs/demo/chat --rounds 5

What is timed is what a user waits for: from starting the process (interpreter, imports, loading the model,
any compilation or warm-up, the prompt) to the first byte of the continuation on stdout, then to the end of
32 greedy tokens. Our model is the Hugging Face folder; llama.cpp gets the same weights written as GGUF f16 by
`llama3.save`. `ours-compiled-cold` runs with an empty compiler cache (a first run on a machine),
`ours-compiled` with the cache it left. Default model: random weights at the demo's shape (dim 256, 4
layers, GQA 8/4, a 4096-rank BPE tokenizer trained on one bundled novel, 256-token context). Rounds
alternate the runtimes (the machine is shared); the median per runtime and its ratio to llama.cpp are
printed with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama3.kernels import cpu_description  # the CPU's model and vector features, for reports

REPO = Path(__file__).resolve().parents[1]
PROMPT = "It is a truth universally acknowledged, that"
NEW_TOKENS = 32

LLAMA_CPP_WORKER = r"""
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=int(sys.argv[2]), verbose=False)
for chunk in llm(sys.argv[3], max_tokens=int(sys.argv[4]), temperature=0.0, stream=True):
    sys.stdout.write(chunk["choices"][0]["text"])
    sys.stdout.flush()
"""



def build_demo_shaped_model(folder: Path) -> Path:
    """Random weights at the demo's shape with a BPE tokenizer trained on one bundled novel."""
    import llama3
    from llama3.bpe import train_tokenizer
    from llama3.bundled import bundled_path
    from llama3.config import ModelArgs
    from llama3.model import Transformer

    tokenizer = train_tokenizer([bundled_path("austen", "persuasion.txt")], 4096, folder / "tok" / "tokenizer.model")
    args = ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=64, vocab_size=tokenizer.n_words,
                     max_seq_len=256, tie_word_embeddings=False)
    model = Transformer(args)
    model.init_weights()
    llama3.save(model, tokenizer, folder / "hf")
    return folder / "hf"


def timed_process(cmd: list[str], env: dict) -> dict:
    """Seconds from start to the first byte on stdout and to the exit, for one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    first_s = time.perf_counter() - start
    rest, err = proc.communicate(timeout=600)
    total_s = time.perf_counter() - start
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"first_token_s": first_s, "total_s": total_s, "text": (first + rest).decode("utf-8", "replace")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a Hugging Face folder (default: a demo-shaped random model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()

    import llama3

    work = Path(tempfile.mkdtemp(prefix="llama3-first-token-"))
    try:
        model_dir = Path(args.model) if args.model else build_demo_shaped_model(work)
        model, tokenizer = llama3.load(model_dir)
        gguf = work / "model.f16.gguf"
        llama3.save(model, tokenizer, gguf, format="gguf", dtype="f16")
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
        ours = [sys.executable, "-m", "llama3", "generate", "--model", str(model_dir), "--prompt", PROMPT,
                "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0", "--threads", str(args.threads)]
        runtimes = {
            "ours-eager": (ours + ["--compile", "off"], {}),
            "ours-compiled-cold": (ours + ["--compile", "on"], {"cold": True}),
            "ours-compiled": (ours + ["--compile", "on"], {}),
            "llama.cpp-f16": ([sys.executable, "-c", LLAMA_CPP_WORKER, str(gguf), str(args.threads), PROMPT,
                               str(NEW_TOKENS)], {}),
        }
        cache = work / "inductor-cache"
        results: dict[str, list[dict]] = {name: [] for name in runtimes}
        for _ in range(args.rounds):
            for name, (cmd, opts) in runtimes.items():
                if opts.get("cold"):
                    shutil.rmtree(cache, ignore_errors=True)
                run_env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
                results[name].append(timed_process(cmd, run_env))
        summary = {name: {"first_token_s": statistics.median(r["first_token_s"] for r in runs),
                          "total_s": statistics.median(r["total_s"] for r in runs)} for name, runs in results.items()}
        peer = summary["llama.cpp-f16"]["first_token_s"]
        print(f"CPU: {cpu_description()} ({os.cpu_count()} logical CPUs), {args.threads} threads, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print(f"model: {model_dir if args.model else 'demo-shaped random'} ({model.num_params() / 1e6:.1f}M "
              f"parameters); prompt {PROMPT!r}, {NEW_TOKENS} greedy tokens; median of {args.rounds} rounds\n")
        print("| runtime | command → first token (s) | command → 32 tokens done (s) | first token vs llama.cpp |")
        print("|---|---:|---:|---:|")
        for name, s in summary.items():
            print(f"| {name} | {s['first_token_s']:.2f} | {s['total_s']:.2f} | {s['first_token_s'] / peer:.2f}x |")
        if args.json:
            Path(args.json).write_text(json.dumps({"cpu": cpu_description(), "summary": summary}, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
