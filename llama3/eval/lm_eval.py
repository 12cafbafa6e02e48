"""An lm-evaluation-harness model backed by this package: `Llama3LM`, registered as `llama3`.

lm-evaluation-harness 0.4.x finds models only in its own registry (it does not read Python entry points),
so the name `llama3` exists once this module is imported. Three ways in:

    # the harness's command line, with this package's model registered first
    python -m llama3.eval.lm_eval --model llama3 --model_args model=PATH --tasks arc_easy
    llama3-lm-eval --model llama3 --model_args model=PATH --tasks my_task --include_path data/tasks/lm_eval

    # Python
    import llama3.eval.lm_eval                     # registers "llama3"
    lm_eval.simple_evaluate(model="llama3", model_args="model=PATH", tasks=[...])
    lm_eval.simple_evaluate(model=Llama3LM.from_model(model, tokenizer), tasks=[...])

`model_args`: model (or pretrained) = a path `llama3.load` understands; dtype; device; max_length;
max_gen_toks; add_bos (default true: contexts start with `<|begin_of_text|>` as in training).
Scoring is this package's own (`llama3.eval.scoring`), shared with `llama3 eval`, so both give the same
log-likelihoods for the same prompt.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import LM
from tqdm.auto import tqdm

from .perplexity import rolling_windows
from .scoring import LogLikelihoodScorer, encode_pair

__all__ = ["Llama3LM", "cli_main", "register"]

logger = logging.getLogger(__name__)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return bool(value)


def _pick_device(device: str | None) -> str:
    """The harness's command line defaults to "cuda:0"; on a machine without CUDA use the CPU instead."""
    if not device:
        return "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %s requested but CUDA is not available; running on the CPU", device)
        return "cpu"
    return str(device)


class Llama3LM(LM):
    """lm-evaluation-harness's three request types on a Llama 3 model of this package."""

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        *,
        batch_size: int | str | None = 8,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos: bool | str = True,
        **unused: Any,
    ):
        super().__init__()
        path = model or pretrained
        if path is None:
            raise ValueError("give the model folder: --model_args model=PATH")
        if unused:
            logger.warning("Llama3LM ignores these arguments: %s", ", ".join(sorted(unused)))
        from ..checkpoint.load import load

        loaded_model, tokenizer = load(path, device=_pick_device(device), dtype=dtype)
        self._setup(
            loaded_model,
            tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            max_gen_toks=max_gen_toks,
            add_bos=add_bos,
        )
        self._name = str(path)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, **kwargs: Any) -> Llama3LM:
        """Wrap a model already in memory (our `Transformer` and `Tokenizer`)."""
        self = cls.__new__(cls)
        LM.__init__(self)
        self._setup(model, tokenizer, **kwargs)
        self._name = "in-memory"
        return self

    def _setup(
        self,
        model,
        tokenizer,
        *,
        batch_size: int | str | None = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos: bool | str = True,
    ) -> None:
        # "auto" (the harness's automatic batch size search) is not supported: use a fixed size instead.
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 8
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos = _as_bool(add_bos)
        self.scorer = LogLikelihoodScorer(
            model, batch_size=self.batch_size, max_length=int(max_length) if max_length else None
        )
        self._device = model.tok_embeddings.weight.device

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return f"llama3-{self.tokenizer.n_words}"

    # ----- requests -----
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(context, continuation) -> (log P(continuation | context), is_greedy)."""
        pairs = [
            encode_pair(self.tokenizer, context, continuation, add_bos=self.add_bos)
            for context, continuation in (request.args for request in requests)
        ]
        if not self.add_bos and any(not context for context, _ in pairs):
            raise ValueError("an empty context needs a BOS token to condition on; use add_bos=true")
        results = self.scorer.score(pairs, progress=not disable_tqdm, desc="loglikelihood")
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string given only BOS, in disjoint windows of `max_length` tokens
        where the last window is a full one (the harness's rolling scheme)."""
        out = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            ids = self.tokenizer.encode(text, bos=True)
            windows = rolling_windows(ids, self.max_length)
            logprob = sum(score for score, _ in self.scorer.score(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), logprob)
            out.append(logprob)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuations cut before the first `until` string."""
        from ..inference import SamplingParams
        from .tasks import generate_texts

        outputs: list[str] = [""] * len(requests)
        groups: dict[tuple, list[int]] = {}
        settings: dict[tuple, tuple[list[str], int, SamplingParams]] = {}
        for index, request in enumerate(requests):
            _context, gen_kwargs = request.args
            until, max_gen_toks, sampling = self._generation_settings(dict(gen_kwargs))
            key = (tuple(until), max_gen_toks, sampling)
            groups.setdefault(key, []).append(index)
            settings[key] = (until, max_gen_toks, sampling)
        for key, indices in tqdm(groups.items(), desc="generate_until", disable=disable_tqdm):
            until, max_gen_toks, sampling = settings[key]
            prompts = [
                self.tokenizer.encode(requests[i].args[0], bos=self.add_bos)
                for i in indices
            ]
            texts = generate_texts(
                self.model,
                self.tokenizer,
                prompts,
                until=until,
                max_gen_toks=max_gen_toks,
                batch_size=self.batch_size,
                sampling=sampling,
            )
            for i, text in zip(indices, texts):
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    def _generation_settings(self, gen_kwargs: dict[str, Any]):
        from ..inference import SamplingParams

        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen_toks = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = _as_bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 0.0))
        top_p = float(gen_kwargs.pop("top_p", 1.0) or 1.0)
        top_k = int(gen_kwargs.pop("top_k", 0) or 0)
        if gen_kwargs:
            logger.warning(
                "generate_until ignores these generation arguments: %s", ", ".join(sorted(gen_kwargs))
            )
        if not do_sample or temperature == 0:
            return until, max_gen_toks, SamplingParams(temperature=0.0)
        return until, max_gen_toks, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)


def register() -> None:
    """Make `llama3` a model name in lm-evaluation-harness's registry (idempotent).

    The harness fills its registry with its own models only when the registry is empty at first lookup, so
    they are loaded first; otherwise registering ours would hide theirs."""
    import lm_eval.models  # noqa: F401  (registers the built-in models)
    from lm_eval.api.registry import model_registry

    if "llama3" not in model_registry:
        model_registry.register("llama3", target="llama3.eval.lm_eval:Llama3LM")


def cli_main() -> None:
    """lm-evaluation-harness's own command line (`lm_eval ...`), with `llama3` registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


register()

if __name__ == "__main__":
    cli_main()
