"""`llama3 demo`: the embedded default, end to end on the bundled Jane Austen corpus.

Trains a BPE tokenizer, prepares token shards, pretrains a small Llama 3 for `--minutes` of wall time,
reports validation perplexity before and after, writes `report.md` with a loss-curve PNG, exports a Hugging
Face folder, prints samples and the commands to chat with or serve the model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HELP = "the embedded default: tokenizer, data, a few minutes of pretraining on Austen, report, samples, HF export"

PROMPTS = ["It is a truth universally acknowledged, that", "Mr. Darcy", "My dear Emma,", "The ball at Netherfield"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama3 demo", description=HELP)
    parser.add_argument("--minutes", type=float, default=8.0, help="training wall time (default 8)")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--corpus", default=None, help="folder of .txt files (default: the bundled Austen)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE ranks of the trained tokenizer")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    from ..bundled import bundled_path

    corpus = Path(args.corpus) if args.corpus else bundled_path("austen")
    files = sorted(corpus.glob("*.txt"))
    if not files:
        parser.error(f"no .txt files in {corpus}")
    return run_demo(files, Path(args.out), minutes=args.minutes, vocab_size=args.vocab_size)


def _calibrate(cfg, data_dir: Path, tokenizer) -> tuple[float, int]:
    """Seconds per optimizer step of this config here, and the CPU thread count that was fastest.

    The machine may be shared: with other processes busy, two OpenMP threads can be slower than one, so
    both are timed on real batches (a few steps each) and the faster is kept."""
    import torch

    from ..data.pretrain import PackedBatches
    from ..train.loop import build_model, setup_runtime
    from ..train.loss import causal_lm_loss
    from ..train.optim import build_optimizer

    runtime = setup_runtime(cfg)
    model_args = cfg.model.model_args(vocab_size=tokenizer.n_words, max_seq_len=cfg.data.seq_len)
    model = build_model(model_args, cfg, runtime)
    optimizer = build_optimizer(model, cfg.optim, runtime.device.type)
    batches = PackedBatches(data_dir, "train", batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len)
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    candidates = sorted({1, torch.get_num_threads()}) if runtime.device.type == "cpu" else [torch.get_num_threads()]
    timings = {}
    for threads in candidates:
        torch.set_num_threads(threads)
        best = math.inf
        for i in range(3):
            batch = {k: v.to(runtime.device) for k, v in next(batches).items()}
            start = time.perf_counter()
            with torch.autocast(runtime.device.type, dtype=dtype, enabled=cfg.train.dtype == "bf16"):
                causal_lm_loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:  # the first step warms up allocators and kernels
                best = min(best, time.perf_counter() - start)
        timings[threads] = best
    threads = min(timings, key=timings.get)
    torch.set_num_threads(threads)
    return timings[threads], threads


def run_demo(files: list[Path], out: Path, *, minutes: float, vocab_size: int) -> int:
    """The demo pipeline (see the module docstring); returns an exit code."""
    from ..bpe import train_tokenizer
    from ..data.pretrain import prepare_dataset
    from ..train.recipes import recipe
    from .pretrain import run as run_pretraining

    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] training a {vocab_size}-rank BPE tokenizer on {len(files)} files in {files[0].parent}")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(files, vocab_size, out / "tokenizer" / "tokenizer.model")
    tokenizer_s = time.perf_counter() - t0
    corpus_bytes = sum(f.stat().st_size for f in files)

    print("[2/5] tokenizing the corpus into train/val shards")
    t0 = time.perf_counter()
    index = prepare_dataset(files, out / "data", out / "tokenizer" / "tokenizer.model")
    prepare_s = time.perf_counter() - t0
    num_train_tokens = index["splits"]["train"]["num_tokens"]

    cfg = recipe("demo")
    cfg.data.path, cfg.train.out_dir = str(out / "data"), str(out / "run")
    step_s, threads = _calibrate(cfg, out / "data", tokenizer)
    budget_s = minutes * 60
    cfg.train.steps = max(20, int(budget_s / step_s))
    cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, cfg.train.steps // 10)
    cfg.train.val_interval = max(1, cfg.train.steps // 5)
    cfg.checkpoint.interval = max(1, cfg.train.steps // 3)
    cfg.train.time_budget_s = budget_s * 1.1  # a hard stop if the machine gets busier than calibrated
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    print(f"[3/5] pretraining for ~{minutes:g} min: {cfg.train.steps} steps of {tokens_per_step} tokens "
          f"(calibrated {step_s * 1000:.0f} ms/step on {threads} thread(s); "
          f"{cfg.train.steps * tokens_per_step / num_train_tokens:.1f} epochs)")
    t0 = time.perf_counter()
    result = run_pretraining(cfg, resume=False)
    train_s = time.perf_counter() - t0

    print("[4/5] report, loss curve and samples")
    from ..checkpoint.load import load

    model, hf_tokenizer = load(out / "run" / "hf")
    samples = _samples(model, hf_tokenizer)
    val_before, val_after = result.val_losses[0], result.val_losses[result.step]
    stats = {
        "corpus_mb": corpus_bytes / 1e6, "vocab_ranks": len(tokenizer.mergeable_ranks),
        "bytes_per_token": corpus_bytes / (num_train_tokens + index["splits"]["val"]["num_tokens"]),
        "train_tokens": num_train_tokens, "val_tokens": index["splits"]["val"]["num_tokens"],
        "params_m": result.model.num_params() / 1e6, "steps": result.step, "stop_reason": result.stop_reason,
        "tokens_seen": result.step * tokens_per_step, "train_s": train_s, "threads": threads,
        "tokens_per_s": result.step * tokens_per_step / train_s, "tokenizer_s": tokenizer_s,
        "prepare_s": prepare_s, "val_loss_before": val_before, "val_loss_after": val_after,
        "val_ppl_before": math.exp(val_before), "val_ppl_after": math.exp(val_after),
        "final_train_loss": result.history[-1]["loss"], "model": result.model.args.to_dict(),
    }
    _plot(result.history, result.val_losses, out / "loss.png")
    (out / "report.json").write_text(json.dumps({**stats, "samples": samples}, indent=2) + "\n")
    (out / "report.md").write_text(_report(stats, samples, cfg))
    print(f"\nvalidation perplexity {stats['val_ppl_before']:.1f} -> {stats['val_ppl_after']:.1f} "
          f"(loss {val_before:.3f} -> {val_after:.3f}) after {result.step} steps, "
          f"{stats['tokens_seen']:,} tokens, {train_s / 60:.1f} min\n")
    for prompt, text in samples:
        print(f"--- {prompt}{text}\n")
    hf = out / "run" / "hf"
    print(f"[5/5] done in {(time.perf_counter() - t_all) / 60:.1f} min. Report: {out / 'report.md'}\n"
          f"Try it:\n  llama3 generate --model {hf} --prompt \"It is a truth\" --temperature 0.8\n"
          f"  llama3 chat --model {hf}\n  llama3 serve --model {hf}   # OpenAI-compatible API + web chat at /")
    return 0


def _samples(model, tokenizer, max_new_tokens: int = 60) -> list[tuple[str, str]]:
    """Continuations of the demo prompts (temperature 0.7, top-k 40, seed i for prompt i: reproducible, and
    each row draws its own random numbers)."""
    from ..inference.generate import Generator
    from ..inference.sampling import SamplingParams

    generator = Generator(model, tokenizer)
    params = [SamplingParams(temperature=0.7, top_k=40, seed=i) for i in range(len(PROMPTS))]
    results = generator.generate(PROMPTS, max_new_tokens=max_new_tokens, sampling=params)
    return [(prompt, r.text) for prompt, r in zip(PROMPTS, results)]


def _plot(history: list[dict], val_losses: dict[int, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], lw=0.8, label="train")
    steps = sorted(val_losses)
    ax.plot(steps, [val_losses[s] for s in steps], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Llama 3 demo on Jane Austen")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(s: dict, samples: list[tuple[str, str]], cfg) -> str:
    m = s["model"]
    lines = [
        "# llama3 demo report", "",
        (f"Corpus: {s['corpus_mb']:.1f} MB of Jane Austen; BPE tokenizer with {s['vocab_ranks']} ranks "
         f"({s['bytes_per_token']:.2f} bytes/token) trained in {s['tokenizer_s']:.1f} s; "
         f"{s['train_tokens']:,} training and {s['val_tokens']:,} validation tokens (prepared in "
         f"{s['prepare_s']:.1f} s)."), "",
        (f"Model: {s['params_m']:.2f}M parameters (dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} "
         f"heads, {m['n_kv_heads']} kv heads, vocab {m['vocab_size']}), {cfg.train.dtype}, batch "
         f"{cfg.data.batch_size}×{cfg.data.seq_len}, AdamW lr {cfg.optim.lr:g} {cfg.schedule.name}."), "",
        "| | value |", "|---|---|",
        f"| steps | {s['steps']} ({s['stop_reason']}) |",
        f"| tokens seen | {s['tokens_seen']:,} |",
        f"| training time | {s['train_s'] / 60:.1f} min ({s['tokens_per_s']:,.0f} tokens/s, {s['threads']} thread(s)) |",
        f"| validation loss | {s['val_loss_before']:.3f} → {s['val_loss_after']:.3f} |",
        f"| validation perplexity | {s['val_ppl_before']:.1f} → {s['val_ppl_after']:.1f} |",
        f"| final training loss | {s['final_train_loss']:.3f} |", "",
        "![loss curve](loss.png)", "", "## Samples (temperature 0.7, top-k 40)", "",
    ]
    for prompt, text in samples:
        lines += [f"> **{prompt}**{text.replace(chr(10), ' ')}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
