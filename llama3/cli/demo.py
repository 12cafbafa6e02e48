"""`llama3 demo`: the whole Llama 3 pipeline, end to end, on the bundled Jane Austen corpus.

Trains a BPE tokenizer, prepares token shards, pretrains a small Llama 3 for `--minutes` of wall time, turns
it into a chat assistant by supervised fine-tuning on the bundled chat dialogs (loss on assistant tokens
only), evaluates both models (validation perplexity, and whether answers to held-out questions end their
turn by themselves), exports a base and a chat Hugging Face folder, writes `report.md` with both loss curves
and sample conversations, and prints commands that run verbatim from where it was started.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

HELP = ("the embedded default: tokenizer, pretraining on Austen, chat fine-tuning, evaluation, report, "
        "base and chat HF folders")

PROMPTS = ["It is a truth universally acknowledged, that", "Mr. Darcy", "My dear Emma,", "The ball at Netherfield"]
NUM_HELD_OUT = 20  # chat dialogs kept out of fine-tuning; their first questions are the held-out question set
REPLY_TOKENS = 64  # room for an answer to a held-out question (the bundled answers are 15-40 tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama3 demo", description=HELP)
    parser.add_argument("--minutes", type=float, default=8.0, help="pretraining wall time (default 8)")
    parser.add_argument("--sft-steps", type=int, default=120,
                        help="chat fine-tuning steps (default 120, ~30 s on 2 quiet cores; 0 skips it)")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--corpus", default=None, help="folder of .txt files (default: the bundled Austen)")
    parser.add_argument("--chat-data", default=None, help="chat JSONL for fine-tuning (default: the bundled dialogs)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE ranks of the trained tokenizer")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.sft_steps < 0:
        parser.error("--minutes must be positive and --sft-steps not negative")
    from ..bundled import bundled_path

    corpus = Path(args.corpus) if args.corpus else bundled_path("austen")
    files = sorted(corpus.glob("*.txt"))
    if not files:
        parser.error(f"no .txt files in {corpus}")
    chat_data = Path(args.chat_data) if args.chat_data else bundled_path("chat", "austen_chat.jsonl")
    if not chat_data.is_file():
        parser.error(f"--chat-data {chat_data} is not a file")
    try:
        return run_demo(files, Path(args.out), minutes=args.minutes, sft_steps=args.sft_steps,
                        vocab_size=args.vocab_size, chat_data=chat_data)
    except ValueError as e:
        print(f"llama3 demo: error: {e}", file=sys.stderr)
        return 2


def _calibrate(cfg, data_dir: Path, tokenizer) -> tuple[float, int]:
    """Seconds per optimizer step of this config here, and the CPU thread count that was fastest.

    The machine may be shared: with other processes busy, two OpenMP threads can be slower than one, so
    both are timed on real batches (the training loop's own step, a few each) and the faster is kept."""
    import torch

    from ..data.pretrain import PackedBatches
    from ..train.loop import setup_runtime, time_steps

    runtime = setup_runtime(cfg)
    model_args = cfg.model.model_args(vocab_size=tokenizer.n_words, max_seq_len=cfg.data.seq_len)
    batches = PackedBatches(data_dir, "train", batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len)
    candidates = sorted({1, torch.get_num_threads()}) if runtime.device.type == "cpu" else [torch.get_num_threads()]
    timings = {}
    for threads in candidates:
        torch.set_num_threads(threads)
        timings[threads] = time_steps(cfg, model_args=model_args, train_batches=batches, runtime=runtime)
    threads = min(timings, key=timings.get)
    torch.set_num_threads(threads)
    return timings[threads], threads


def _train_dtype() -> str:
    """bf16 autocast where the CPU multiplies bf16 natively (AVX-512 BF16 or AMX), else fp32. Without those
    instructions bf16 matrix products are emulated: measured on an AVX2-only AMD EPYC (Zen 3), a demo step
    took 70 s in bf16 against 4.4 s in fp32 (the machine busy with other jobs; the ratio is what counts)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return "bf16" if {"avx512_bf16", "amx_bf16"} & set(flags.split()) else "fp32"


def _write_text(path: Path, text: str) -> None:
    """Write a file whole or not at all (a temp file renamed into place)."""
    from ..checkpoint.safety import atomic_output_file

    with atomic_output_file(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished export to its final name (a rename; an older one from a previous demo goes first)."""
    if dst.exists():
        shutil.rmtree(dst)
    src.rename(dst)


def _pretrain(files, out: Path, minutes: float, vocab_size: int, stats: dict):
    """Steps 1-3: tokenizer, shards, pretraining; the base model ends in OUT/base. Returns the run result."""
    from ..bpe import train_tokenizer
    from ..data.pretrain import prepare_dataset
    from ..train.recipes import recipe
    from ..train.pretrain import pretrain

    print(f"[1/6] training a {vocab_size}-rank BPE tokenizer on {len(files)} files in {files[0].parent}")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(files, vocab_size, out / "tokenizer" / "tokenizer.model")
    stats.update(tokenizer_s=time.perf_counter() - t0, vocab_ranks=len(tokenizer.mergeable_ranks),
                 corpus_mb=sum(f.stat().st_size for f in files) / 1e6)

    print("[2/6] tokenizing the corpus into train/val shards")
    t0 = time.perf_counter()
    index = prepare_dataset(files, out / "data", out / "tokenizer" / "tokenizer.model")
    splits = index["splits"]
    stats.update(prepare_s=time.perf_counter() - t0, train_tokens=splits["train"]["num_tokens"],
                 val_tokens=splits["val"]["num_tokens"])
    stats["bytes_per_token"] = stats["corpus_mb"] * 1e6 / (stats["train_tokens"] + stats["val_tokens"])

    cfg = recipe("demo")
    cfg.data.path, cfg.train.out_dir = str(out / "data"), str(out / "pretrain")
    cfg.train.dtype = _train_dtype()
    step_s, threads = _calibrate(cfg, out / "data", tokenizer)
    budget_s = minutes * 60
    cfg.train.steps = max(20, int(budget_s / step_s))
    cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, cfg.train.steps // 10)
    cfg.train.val_interval = max(1, cfg.train.steps // 5)
    cfg.checkpoint.interval = max(1, cfg.train.steps // 3)
    cfg.train.time_budget_s = budget_s * 1.1  # a hard stop if the machine gets busier than calibrated
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    print(f"[3/6] pretraining for ~{minutes:g} min: {cfg.train.steps} steps of {tokens_per_step} tokens "
          f"(calibrated {step_s * 1000:.0f} ms/step on {threads} thread(s); "
          f"{cfg.train.steps * tokens_per_step / stats['train_tokens']:.1f} epochs)")
    t0 = time.perf_counter()
    result = pretrain(cfg, resume=False)
    train_s = time.perf_counter() - t0
    _replace_dir(out / "pretrain" / "hf", out / "base")
    stats.update(params_m=result.model.num_params() / 1e6, steps=result.step, stop_reason=result.stop_reason,
                 tokens_seen=result.step * tokens_per_step, train_s=train_s, threads=threads,
                 tokens_per_s=result.step * tokens_per_step / train_s, model=result.model.args.to_dict(),
                 val_loss_before=result.val_losses[0], val_loss_after=result.val_losses[result.step],
                 final_train_loss=result.history[-1]["loss"], dtype=cfg.train.dtype,
                 batch=f"{cfg.data.batch_size}×{cfg.data.seq_len}", lr=cfg.optim.lr)
    return result


def _split_chat_data(chat_data: Path, out: Path) -> tuple[Path, list[list[dict]]]:
    """Writes the dialogs used for fine-tuning to OUT/chat_data/train.jsonl; returns its path and the
    held-out question prompts (each a held-out dialog up to its first assistant message)."""
    lines = [line for line in chat_data.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = list(range(len(lines)))
    random.Random(0).shuffle(order)
    held_out = set(order[:NUM_HELD_OUT]) if len(lines) > 2 * NUM_HELD_OUT else set()
    train_path = out / "chat_data" / "train.jsonl"
    train_path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(train_path, "".join(line + "\n" for i, line in enumerate(lines) if i not in held_out))
    questions = []
    for i in sorted(held_out):
        messages = json.loads(lines[i])["messages"]
        first_answer = next((k for k, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        prompt = [m for m in messages[:first_answer] if m["role"] in ("system", "user")]
        if prompt and prompt[-1]["role"] == "user":
            questions.append(prompt)
    return train_path, questions


def _fine_tune(out: Path, train_path: Path, steps: int, stats: dict) -> list[dict]:
    """Step 4: chat SFT of OUT/base into OUT/chat; returns the fine-tuning's metrics records."""
    from ..train.finetune import finetune
    from ..train.recipes import finetune_recipe

    cfg = finetune_recipe("sft")
    cfg.finetune.model_path, cfg.data.path, cfg.train.out_dir = str(out / "base"), str(train_path), str(out / "sft")
    # The demo model is tiny and starts from scratch-level chat ability: a pretraining-sized learning rate
    # (the paper's 1e-5 is for 8B+ models) and rows of its own context. A fixed number of steps rather than
    # a time budget: measured, 120 steps (about 15 passes over the dialogs) are what it takes for every
    # held-out answer to end its turn, and a busy machine should take longer, not learn less.
    cfg.optim.lr, cfg.data.seq_len, cfg.data.batch_size = 1e-3, 256, 8
    cfg.train.dtype = _train_dtype()
    cfg.train.steps = steps
    cfg.train.val_interval = max(1, steps // 6)
    cfg.checkpoint.interval = steps
    print(f"[4/6] chat fine-tuning (SFT, loss on assistant tokens): {steps} steps of "
          f"{cfg.data.batch_size}×{cfg.data.seq_len} tokens")
    t0 = time.perf_counter()
    report = finetune(cfg, log=print)
    _replace_dir(out / "sft" / "hf", out / "chat")
    val = {int(k): v for k, v in report["val_loss"].items()}
    stats.update(sft_s=time.perf_counter() - t0, sft_steps=report["steps"],
                 sft_val_loss_before=val.get(0, math.nan), sft_val_loss_after=val[max(val)] if val else math.nan)
    metrics = out / "sft" / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _answers(model_dir: Path, questions: list[list[dict]]) -> list[dict]:
    """Greedy answers to the held-out questions in the chat format; `ended` says whether the model closed its
    turn (<|eot_id|>) by itself within REPLY_TOKENS."""
    from ..checkpoint.load import load
    from ..inference.generate import Generator
    from ..inference.sampling import SamplingParams
    from ..tokenizer import ChatFormat

    model, tokenizer = load(model_dir)
    chat_format = ChatFormat(tokenizer)
    prompts = [chat_format.encode_dialog_prompt(q) for q in questions]
    results = Generator(model.eval(), tokenizer).generate(prompts, max_new_tokens=REPLY_TOKENS,
                                                          sampling=SamplingParams(temperature=0.0))
    return [{"question": q[-1]["content"], "system": q[0]["content"] if q[0]["role"] == "system" else None,
             "answer": r.text, "ended": r.finish_reason == "stop"} for q, r in zip(questions, results)]


def _val_perplexity(model_dir: Path, data_dir: Path) -> float:
    """Packed validation perplexity of a model folder on the prepared shards (the training loop's scheme)."""
    from ..checkpoint.load import load
    from ..eval.perplexity import perplexity_of_shards
    from ..eval.scoring import LogLikelihoodScorer

    model, tokenizer = load(model_dir)
    scorer = LogLikelihoodScorer(model.eval(), max_length=model.args.max_seq_len)
    return perplexity_of_shards(scorer, tokenizer, data_dir, split="val", packed=True).perplexity


def _samples(model_dir: Path, max_new_tokens: int = 60) -> list[tuple[str, str]]:
    """Continuations of the demo prompts by the base model (temperature 0.7, top-k 40, seed i for prompt i:
    reproducible, and each row draws its own random numbers)."""
    from ..checkpoint.load import load
    from ..inference.generate import Generator
    from ..inference.sampling import SamplingParams

    model, tokenizer = load(model_dir)
    params = [SamplingParams(temperature=0.7, top_k=40, seed=i) for i in range(len(PROMPTS))]
    results = Generator(model.eval(), tokenizer).generate(PROMPTS, max_new_tokens=max_new_tokens, sampling=params)
    return [(prompt, r.text) for prompt, r in zip(PROMPTS, results)]


def run_demo(files: list[Path], out: Path, *, minutes: float, vocab_size: int, chat_data: Path,
             sft_steps: int = 120) -> int:
    """The demo pipeline (see the module docstring); returns an exit code."""
    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    result = _pretrain(files, out, minutes, vocab_size, stats)
    train_path, questions = _split_chat_data(chat_data, out)
    sft_history = _fine_tune(out, train_path, sft_steps, stats) if sft_steps > 0 else []

    print("[5/6] evaluating: validation perplexity and answers to held-out questions")
    models = {"base": out / "base"} | ({"chat": out / "chat"} if sft_history else {})
    evaluation = {name: {"val_ppl": _val_perplexity(path, out / "data"), "answers": _answers(path, questions)}
                  for name, path in models.items()}
    for ev in evaluation.values():
        ev["ended_fraction"] = sum(a["ended"] for a in ev["answers"]) / max(len(ev["answers"]), 1)
    samples = _samples(out / "base")

    print("[6/6] writing the report")
    _plot(result.history, result.val_losses, sft_history, out / "loss.png")
    _write_text(out / "report.json", json.dumps({**stats, "evaluation": evaluation, "samples": samples},
                                                       indent=2) + "\n")
    _write_text(out / "report.md", _report(stats, evaluation, samples))
    _print_summary(stats, evaluation, samples, out, time.perf_counter() - t_all)
    return 0


def _print_summary(stats: dict, evaluation: dict, samples, out: Path, total_s: float) -> None:
    print(f"\nbase model: validation perplexity {math.exp(stats['val_loss_before']):.1f} -> "
          f"{evaluation['base']['val_ppl']:.1f} after {stats['steps']} steps, {stats['tokens_seen']:,} tokens, "
          f"{stats['train_s'] / 60:.1f} min")
    for prompt, text in samples[:2]:
        print(f"--- {prompt}{text}\n")
    if "chat" in evaluation:
        chat = evaluation["chat"]
        print(f"chat model: {chat['ended_fraction']:.0%} of {len(chat['answers'])} held-out questions answered "
              f"and closed with <|eot_id|> (base model: {evaluation['base']['ended_fraction']:.0%})")
        for a in chat["answers"][:3]:
            print(f"  Q: {a['question']}\n  A: {a['answer']}")
    print(f"\ndone in {total_s / 60:.1f} min. Report: {out / 'report.md'}")
    print("Try it (from this folder):")
    for line in next_steps(out, chat="chat" in evaluation):
        print(f"  {line}")


def next_steps(out: Path, *, chat: bool) -> list[str]:
    """Commands that run verbatim in a plain shell from the folder the demo was started in."""
    exe = Path(sys.executable).parent / "llama3"
    cmd = _shell_path(exe) if exe.exists() else f"{_shell_path(Path(sys.executable))} -m llama3"
    model = _shell_path(out / ("chat" if chat else "base"))
    return [f"{cmd} chat --model {model}",
            f"{cmd} generate --model {_shell_path(out / 'base')} --prompt \"It is a truth\" --temperature 0.8",
            f"{cmd} serve --model {model}   # OpenAI-compatible API + web chat at http://127.0.0.1:8000/"]


def _shell_path(path: Path) -> str:
    """A path as typed from the current folder: relative when below it, `./` for a program, else absolute."""
    import shlex

    try:
        rel = path.resolve().relative_to(Path.cwd().resolve()) if path.is_absolute() else path
    except ValueError:
        rel = path
    text = str(rel)
    if not rel.is_absolute() and len(rel.parts) == 1 and rel.suffix == "":
        text = f"./{text}"
    return shlex.quote(text)


def _plot(history: list[dict], val_losses: dict[int, float], sft_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [("pretraining on Jane Austen", history, val_losses)]
    if sft_history:
        sft_val = {r["step"]: r["val_loss"] for r in sft_history if "val_loss" in r}
        panels.append(("chat fine-tuning (assistant tokens)", sft_history, sft_val))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, records, val) in zip(axes[0], panels):
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8, label="train")
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], "o-", label="validation")
        ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(s: dict, evaluation: dict, samples: list[tuple[str, str]]) -> str:
    m = s["model"]
    lines = [
        "# llama3 demo report", "",
        (f"Corpus: {s['corpus_mb']:.1f} MB of Jane Austen; BPE tokenizer with {s['vocab_ranks']} ranks "
         f"({s['bytes_per_token']:.2f} bytes/token) trained in {s['tokenizer_s']:.1f} s; "
         f"{s['train_tokens']:,} training and {s['val_tokens']:,} validation tokens (prepared in "
         f"{s['prepare_s']:.1f} s)."), "",
        (f"Model: {s['params_m']:.2f}M parameters (dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} "
         f"heads, {m['n_kv_heads']} kv heads, vocab {m['vocab_size']}, context {m['max_seq_len']}), "
         f"{s['dtype']}, batch {s['batch']}, AdamW lr {s['lr']:g}."), "",
        "| | value |", "|---|---|",
        f"| pretraining steps | {s['steps']} ({s['stop_reason']}) |",
        f"| tokens seen | {s['tokens_seen']:,} |",
        f"| pretraining time | {s['train_s'] / 60:.1f} min ({s['tokens_per_s']:,.0f} tokens/s, {s['threads']} thread(s)) |",
        f"| validation loss | {s['val_loss_before']:.3f} → {s['val_loss_after']:.3f} |",
        f"| validation perplexity | {math.exp(s['val_loss_before']):.1f} → {math.exp(s['val_loss_after']):.1f} |",
    ]
    if "chat" in evaluation:
        lines += [
            f"| chat fine-tuning | {s['sft_steps']} steps in {s['sft_s'] / 60:.1f} min |",
            f"| validation loss on assistant tokens | {s['sft_val_loss_before']:.3f} → {s['sft_val_loss_after']:.3f} |",
        ]
    for name, ev in evaluation.items():
        lines.append(f"| {name} model: Austen validation perplexity | {ev['val_ppl']:.1f} |")
        lines.append(f"| {name} model: held-out answers ending with <\\|eot_id\\|> | "
                     f"{sum(a['ended'] for a in ev['answers'])}/{len(ev['answers'])} |")
    lines += ["", "![loss curves](loss.png)", ""]
    if "chat" in evaluation:
        lines += ["## Sample conversations (chat model, greedy, held-out questions)", ""]
        for a in evaluation["chat"]["answers"][:8]:
            system = f"*system: {a['system']}*  \n" if a["system"] else ""
            end = "" if a["ended"] else " *(no end of turn)*"
            lines += [f"> {system}**user:** {a['question']}  \n**assistant:** {a['answer']}{end}", ""]
    lines += ["## Base model samples (temperature 0.7, top-k 40)", ""]
    for prompt, text in samples:
        lines += [f"> **{prompt}**{text.replace(chr(10), ' ')}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
