"""Benchmark tasks: few-shot prompts, multiple-choice scoring by log-likelihood, and generation with
answer extraction, computed the way lm-evaluation-harness computes them.

Prompt layout (lm-evaluation-harness's plain-text `fewshot_context`):

    description + (shot.prompt + " " + shot.answer + "\\n\\n") * k + example.prompt

Multiple choice: each choice is scored as the continuation " " + choice after that context;
`acc` picks the choice with the highest log-likelihood, `acc_norm` the highest log-likelihood divided by
the choice's length in characters (both exactly as lm-evaluation-harness's `process_results`, ties going
to the first choice). Few-shot examples are the first k of the few-shot pool (its `first_n` sampler), from
the same subject where the examples have one (MMLU); with no separate few-shot file the pool is the task's
own file without the example being asked.

Generation (GSM8K): greedy decoding until a stop string, then each answer extractor (a regex) turns the
text into an answer compared by `exact_match` after normalization; GSM8K reports lm-evaluation-harness's
"strict-match" (`#### <number>`) and "flexible-extract" (the last number) figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bundled import bundled_path
from ..tokenizer import Tokenizer
from .formats import Example, load_examples
from .scoring import LogLikelihoodScorer, encode_pair

__all__ = [
    "BUILTIN_TASKS",
    "SAMPLE_DIR",
    "Extractor",
    "Task",
    "build_context",
    "evaluate_task",
    "extract_answer",
    "generate_texts",
    "multiple_choice_metrics",
    "normalize_answer",
    "resolve_task",
]

# The bundled sample files (small, original questions in each benchmark's published layout).
SAMPLE_DIR = bundled_path("tasks", must_exist=False)

# name -> (format, evaluation file, few-shot file), relative to a data folder laid out like data/tasks.
BUILTIN_TASKS: dict[str, tuple[str, str, str]] = {
    "mmlu": ("mmlu", "mmlu/test.jsonl", "mmlu/dev.jsonl"),
    "hellaswag": ("hellaswag", "hellaswag/validation.jsonl", "hellaswag/train.jsonl"),
    "arc_easy": ("arc", "arc_easy/test.jsonl", "arc_easy/train.jsonl"),
    "gsm8k": ("gsm8k", "gsm8k/test.jsonl", "gsm8k/train.jsonl"),
}


@dataclass(frozen=True)
class Extractor:
    """An answer extractor, lm-evaluation-harness's `regex` filter then `take_first`: the `group_select`-th
    match of `pattern` (a match with several groups gives its first non-empty group), stripped, or
    `fallback` when nothing matches. `pattern=None` takes the whole generation, stripped."""

    pattern: str | None
    group_select: int = 0
    fallback: str = "[invalid]"


# GSM8K's reference answers end in "#### 42"; normalization drops everything up to that marker.
GSM8K_EXTRACTORS = {
    "strict-match": Extractor(r"#### (\-?[0-9\.\,]+)"),
    "flexible-extract": Extractor(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1),
}
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")


@dataclass
class Task:
    """A task ready to run: examples, few-shot pool and how to score."""

    name: str
    format: str
    examples: list[Example]
    fewshot_examples: list[Example] | None = None  # None: draw shots from `examples`, skipping the asked one
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    max_gen_toks: int = 256
    extractors: dict[str, Extractor] = field(default_factory=lambda: {"exact": Extractor(None)})
    ignore_patterns: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "generate_until" if self.examples[0].choices is None else "multiple_choice"


def _task_from_files(name: str, fmt: str | None, path: Path, fewshot_path: Path | None) -> Task:
    fmt, examples = load_examples(path, fmt)
    fewshot = load_examples(fewshot_path, fmt)[1] if fewshot_path is not None else None
    task = Task(name, fmt, examples, fewshot)
    if fmt == "gsm8k":
        task.until = ["Question:", "</s>", "<|im_end|>"]
        task.extractors = dict(GSM8K_EXTRACTORS)
        task.ignore_patterns = GSM8K_IGNORE
    return task


def resolve_task(
    spec: str,
    *,
    fmt: str | None = None,
    fewshot_file: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> Task:
    """A task from a built-in name (`mmlu`, `hellaswag`, `arc_easy`, `gsm8k`: files under `data_dir`,
    default the bundled samples) or from a task file (format detected unless `fmt` is given)."""
    if spec in BUILTIN_TASKS:
        builtin_fmt, test_file, fewshot_name = BUILTIN_TASKS[spec]
        root = Path(data_dir) if data_dir is not None else SAMPLE_DIR
        if not (root / test_file).is_file():
            raise ValueError(
                f"task {spec!r} expects {root / test_file}; lay the data out as data/tasks/ is "
                "(see docs/evaluation.md), or pass the task file itself"
            )
        fewshot_path = Path(fewshot_file) if fewshot_file else root / fewshot_name
        return _task_from_files(
            spec, fmt or builtin_fmt, root / test_file, fewshot_path if fewshot_path.is_file() else None
        )
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"unknown task {spec!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) nor a file"
        )
    return _task_from_files(path.stem, fmt, path, Path(fewshot_file) if fewshot_file else None)


# ----- prompts -----
def _fewshot_shots(task: Task, index: int, num_fewshot: int) -> list[Example]:
    example = task.examples[index]
    own_file = task.fewshot_examples is None
    pool = task.examples if own_file else task.fewshot_examples
    shots = [
        shot
        for i, shot in enumerate(pool)
        if not (own_file and i == index) and (not example.group or shot.group == example.group)
    ]
    if len(shots) < num_fewshot:
        where = f" with group {example.group!r}" if example.group else ""
        raise ValueError(
            f"task {task.name}: {num_fewshot} few-shot examples requested but only {len(shots)} "
            f"are available{where}; lower --num-fewshot or give a larger few-shot file"
        )
    return shots[:num_fewshot]


def build_context(task: Task, index: int, num_fewshot: int = 0) -> str:
    """The prompt for example `index` with `num_fewshot` solved examples before it."""
    example = task.examples[index]
    parts = [example.description]
    for shot in _fewshot_shots(task, index, num_fewshot):
        parts.append(shot.prompt + task.target_delimiter + shot.answer_text + task.fewshot_delimiter)
    parts.append(example.prompt)
    return "".join(parts)


# ----- metrics -----
def _mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n), as lm-evaluation-harness);
    no standard error from a single example."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, as numpy.argmax


def multiple_choice_metrics(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc: argmax of log-likelihoods; acc_norm: argmax of log-likelihood / len(choice in characters)."""
    acc = float(_argmax(logprobs) == gold)
    acc_norm = float(_argmax([lp / len(c) for lp, c in zip(logprobs, choices)]) == gold)
    return {"acc": acc, "acc_norm": acc_norm}


def extract_answer(text: str, extractor: Extractor) -> str:
    """Apply an answer extractor to generated text (lm-evaluation-harness's `RegexFilter` semantics)."""
    if extractor.pattern is None:
        return text.strip()
    matches = re.findall(extractor.pattern, text)
    if not matches:
        return extractor.fallback
    match = matches[extractor.group_select]
    if isinstance(match, tuple):
        non_empty = [m for m in match if m]
        match = non_empty[0] if non_empty else extractor.fallback
    return match.strip()


def normalize_answer(text: str, ignore_patterns: Sequence[str] = (), *, ignore_case: bool = True) -> str:
    """Remove each pattern in turn, then lower-case: `exact_match`'s `regexes_to_ignore` and `ignore_case`."""
    for pattern in ignore_patterns:
        text = re.sub(pattern, "", text)
    return text.lower() if ignore_case else text


# ----- running -----
def generate_texts(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    until: Sequence[str],
    max_gen_toks: int,
    batch_size: int = 8,
    sampling=None,
) -> list[str]:
    """Continuations of token prompts (greedy unless `sampling`, a `SamplingParams`, says otherwise), each
    cut before the first stop string or at a stop token. Prompts longer than the context minus
    `max_gen_toks` keep their last tokens, as lm-evaluation-harness does."""
    from ..inference import Generator, SamplingParams

    sampling = sampling or SamplingParams(temperature=0.0)
    limit = model.args.max_seq_len - max_gen_toks
    if limit < 1:
        raise ValueError(
            f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the model's "
            f"{model.args.max_seq_len}-token context"
        )
    prompts = [list(p)[-limit:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            generator = Generator(model, tokenizer)
            results = generator.generate(
                [prompts[i] for i in batch],
                max_new_tokens=max_gen_toks,
                sampling=sampling,
                stop_strings=list(until),
            )
            for i, result in zip(batch, results):
                texts[i] = result.text
    finally:
        model.clear_caches()  # scoring runs the plain forward, without a cache
    return texts


def _run_multiple_choice(
    task: Task, contexts: list[str], scorer: LogLikelihoodScorer, tokenizer: Tokenizer, progress: bool
) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    requests, owners = [], []
    for i, context in enumerate(contexts):
        for choice in task.examples[i].choices:
            requests.append(encode_pair(tokenizer, context, task.target_delimiter + choice))
            owners.append(i)
    scores = scorer.score(requests, progress=progress, desc=task.name)
    per_example: list[list[float]] = [[] for _ in contexts]
    for owner, (logprob, _) in zip(owners, scores):
        per_example[owner].append(logprob)
    values: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    samples = []
    for i, logprobs in enumerate(per_example):
        example = task.examples[i]
        metrics = multiple_choice_metrics(logprobs, example.choices, example.gold)
        for key, value in metrics.items():
            values[key].append(value)
        samples.append({"index": i, "logprobs": logprobs, "gold": example.gold, **metrics})
    return values, samples


def _run_generation(
    task: Task, contexts: list[str], model, tokenizer: Tokenizer, batch_size: int
) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    prompts = [tokenizer.encode(context, bos=True) for context in contexts]
    generations = generate_texts(
        model, tokenizer, prompts, until=task.until, max_gen_toks=task.max_gen_toks, batch_size=batch_size
    )
    values: dict[str, list[float]] = {f"exact_match,{name}": [] for name in task.extractors}
    samples = []
    for i, text in enumerate(generations):
        reference = normalize_answer(task.examples[i].target or "", task.ignore_patterns)
        sample: dict[str, Any] = {"index": i, "generation": text, "reference": reference}
        for name, extractor in task.extractors.items():
            answer = extract_answer(text, extractor)
            hit = float(normalize_answer(answer, task.ignore_patterns) == reference)
            values[f"exact_match,{name}"].append(hit)
            sample[name] = answer
        samples.append(sample)
    return values, samples


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    task: Task,
    *,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Run a task; returns {"metrics": {name: value, name_stderr: ...}, "num_samples", "num_fewshot",
    "samples": per-example details}."""
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    count = len(task.examples) if limit is None else min(limit, len(task.examples))
    if count < 1:
        raise ValueError(f"task {task.name}: no examples to evaluate (limit={limit})")
    contexts = [build_context(task, i, num_fewshot) for i in range(count)]
    if task.kind == "multiple_choice":
        scorer = LogLikelihoodScorer(model, batch_size=batch_size)
        values, samples = _run_multiple_choice(task, contexts, scorer, tokenizer, progress)
    else:
        values, samples = _run_generation(task, contexts, model, tokenizer, batch_size)
    metrics: dict[str, float | None] = {}
    for name, per_example in values.items():
        metrics[name], metrics[f"{name}_stderr"] = _mean_and_stderr(per_example)
    return {
        "metrics": metrics,
        "num_samples": count,
        "num_fewshot": num_fewshot,
        "format": task.format,
        "samples": samples,
    }
