"""Tiny Llama-architecture derivatives for the family tests: synthetic tokenizers built with the `tokenizers`
library (a GPT-2-style byte-level BPE and a SentencePiece-style BPE with byte fallback), a ChatML template,
and random transformers `LlamaForCausalLM` weights saved as Hugging Face folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import AUSTEN

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML with tool definitions in the system turn and <tool_call> answers (the Hermes convention)
CHATML_TOOLS = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools:\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "Answer with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.tool_calls %}<|im_start|>assistant\n"
    "{%- for call in message.tool_calls %}<tool_call>{{ call.function | tojson }}</tool_call>{%- endfor %}"
    "<|im_end|>\n"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SAMPLE_TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "def f(x):\n    return {'a': [x ** 2, x >> 1]}  # comment\n",
    "東京は日本の首都です。北京欢迎你",
    "emoji 👍🏽 and 🦙🦙 family 👨‍👩‍👧",
    "spaces   and\ttabs\n\n\n   trailing   ",
    " leading space, ünïcödé, 1234567 numbers",
    "",
]


def _corpus(chars: int = 150_000) -> list[str]:
    text = (AUSTEN / "prideprejudice.txt").read_text(encoding="utf-8")[:chars]
    return text.split("\n\n")


def gpt2_tokenizer_json(vocab_size: int = 700) -> dict:
    """GPT-2-style byte-level BPE (GPT-2's split regex), with ChatML specials after the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return json.loads(tok.to_str())


def spm_tokenizer_json(vocab_size: int = 600) -> dict:
    """SentencePiece-style BPE as Llama 2's tokenizer.json: <unk> <s> </s>, 256 <0xNN> byte-fallback tokens,
    `▁` for spaces (prepended to the text), merges learned within words; ChatML specials added at the end."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    # newlines stay <0x0A> byte tokens, as in Llama 2's vocabulary (never merged with letters)
    trainer_tok.train_from_iterator([p.replace("\n", " ") for p in _corpus()], trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if t not in pieces]
    vocab = {t: i for i, t in enumerate(pieces)}
    chatml = {"<|im_start|>": len(vocab), "<|im_end|>": len(vocab) + 1}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in [*((s, vocab[s]) for s in specials), *chatml.items()]]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                           {"type": "Replace", "pattern": {"String": " "},
                                                            "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": learned["merges"]},
    }


TOKENIZER_KINDS = {
    "gpt2": dict(build=gpt2_tokenizer_json, bos=None, eos="<|endoftext|>", add_bos=False),
    "spm": dict(build=spm_tokenizer_json, bos="<s>", eos="</s>", add_bos=True),
}


def write_tokenizer(folder: Path, kind: str, *, template: str = CHATML) -> dict:
    """tokenizer.json + tokenizer_config.json (specials, chat template) as transformers saves them."""
    spec = TOKENIZER_KINDS[kind]
    data = spec["build"]()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": spec["eos"], "chat_template": template,
              "add_bos_token": spec["add_bos"], "add_eos_token": False, "model_max_length": 256}
    if spec["bos"]:
        config["bos_token"] = spec["bos"]
        config["unk_token"] = "<unk>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return data


def vocab_size_of(data: dict) -> int:
    return max([*data["model"]["vocab"].values(), *(t["id"] for t in data["added_tokens"])]) + 1


def write_hf_model(folder: Path, vocab_size: int, *, seed: int = 0, **config) -> torch.nn.Module:
    """A random transformers LlamaForCausalLM (dim 64, 2 layers) saved into `folder` (fp32 safetensors);
    biases and norms get noise so that they matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**base, **config})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif "embed" in name or "lm_head" in name:
                param.normal_(0, 0.5)  # logits far enough apart that greedy choices are stable
    model.save_pretrained(folder)
    return model


# ----- the derivatives the family tests share -----

VARIANTS = {
    "gpt2-headdim-bias-linear": ("gpt2", dict(head_dim=32, attention_bias=True, mlp_bias=True,
                                              rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "spm-tied-dynamic": ("spm", dict(tie_word_embeddings=True,
                                     rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "gpt2-llama3rope": ("gpt2", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 32})),
}
DIALOG = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Who is Mr. Darcy?"},
          {"role": "assistant", "content": "A proud gentleman of Derbyshire."},
          {"role": "user", "content": "And Elizabeth? 東京 👍"}]


def special_ids(tok_data: dict, kind: str) -> dict:
    ids = {t["content"]: t["id"] for t in tok_data["added_tokens"]}
    spec = TOKENIZER_KINDS[kind]
    return {"bos_token_id": ids.get(spec["bos"]), "eos_token_id": ids[spec["eos"]]}


@pytest.fixture(scope="module", name="family_dirs")
def family_dirs_fixture(tmp_path_factory):
    """One HF folder per variant (tokenizers trained once per kind)."""
    built = {}
    tokenizers = {}
    for name, (kind, config) in VARIANTS.items():
        folder = tmp_path_factory.mktemp(name)
        if kind not in tokenizers:
            tokenizers[kind] = write_tokenizer(folder, kind)
        else:
            write_tokenizer_copy(tokenizers[kind], folder, kind)
        data = tokenizers[kind]
        hf = write_hf_model(folder, vocab_size_of(data), **config, **special_ids(data, kind))
        built[name] = (folder, hf, kind)
    return built


def write_tokenizer_copy(data: dict, folder, kind: str) -> None:
    spec = TOKENIZER_KINDS[kind]
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": spec["eos"], "chat_template": CHATML,
              "add_bos_token": spec["add_bos"], "add_eos_token": False}
    if spec["bos"]:
        config.update(bos_token=spec["bos"], unk_token="<unk>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def random_ids(vocab: int, length: int = 20) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))
