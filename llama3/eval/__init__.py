"""Evaluation: `run(model, tasks, ...)` (what `llama3 eval` does, from explicit arguments), perplexity and
bits per byte, benchmark tasks (multiple choice by log-likelihood, generation with answer extraction), and
an lm-evaluation-harness adapter (`llama3.eval.lm_eval`, imported on its own since it needs the `lm-eval`
package).

    from llama3.eval import run
    run("runs/demo/base", "arc_easy,data/austen/persuasion.txt", num_fewshot=2)["results"]

    from llama3.eval import LogLikelihoodScorer, resolve_task, evaluate_task
    task = resolve_task("arc_easy")                       # bundled sample, or a JSONL path
    evaluate_task(model, tokenizer, task, num_fewshot=3)["metrics"]   # {"acc": ..., "acc_norm": ...}
"""

from .formats import Example, load_examples
from .perplexity import PerplexityResult, perplexity_of_documents, perplexity_of_text, rolling_windows
from .scoring import LogLikelihoodScorer, encode_pair
from .runner import run
from .tasks import Task, build_context, evaluate_task, resolve_task

__all__ = [
    "Example",
    "LogLikelihoodScorer",
    "PerplexityResult",
    "Task",
    "build_context",
    "encode_pair",
    "evaluate_task",
    "load_examples",
    "perplexity_of_documents",
    "perplexity_of_text",
    "resolve_task",
    "rolling_windows",
    "run",
]
