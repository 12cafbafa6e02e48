"""Llama-architecture derivatives: their own tokenizers (GPT-2-style BPE, SentencePiece-style BPE), their Jinja
chat templates, and config variants (head_dim, biases, linear/dynamic RoPE, tied or not), against transformers:
logits, ids, chat prompts and greedy chat replies; the template sandbox and bad tokenizer files.
GGUF: test_family_gguf.py; serve, generate, eval, finetune: test_family_apps.py."""

from __future__ import annotations

import json

import pytest
import torch

import llama3
from llama3.chat_template import ChatTemplate, TemplateChatFormat, chat_format_for
from llama3.hf_tokenizer import HFTokenizer
from tests.family_fixtures import (  # noqa: F401 (a fixture)
    CHATML,
    DIALOG,
    SAMPLE_TEXTS,
    TOKENIZER_KINDS,
    VARIANTS,
    family_dirs_fixture,
    random_ids,
)


# ----- model numerics -----

@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_folder_logits_equal_transformers(family_dirs, variant):
    folder, hf, _ = family_dirs[variant]
    model, tokenizer = llama3.load(folder)
    assert isinstance(tokenizer, HFTokenizer)
    tokens = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        ours = model(tokens)
        ref = hf(tokens).logits
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    config = hf.config
    assert model.args.head_dim == getattr(config, "head_dim", 16)
    assert (model.layers[0].attention.wq.bias is not None) == bool(config.attention_bias)
    assert (model.layers[0].feed_forward.w1.bias is not None) == bool(config.mlp_bias)


@pytest.mark.timeout(300)
def test_export_of_a_derivative_loads_in_transformers(family_dirs, tmp_path):
    """llama3.save writes the derivative's own tokenizer and config (biases, head_dim, rope) back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, hf, _ = family_dirs["gpt2-headdim-bias-linear"]
    model, tokenizer = llama3.load(folder)
    llama3.save(model, tokenizer, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, hf(tokens).logits, atol=2e-5, rtol=1e-4)
    ref_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert ref_tok.apply_chat_template(DIALOG, tokenize=False) == TemplateChatFormat(tokenizer).render(
        DIALOG, add_generation_prompt=False)


def test_quantizing_a_biased_model_is_refused(family_dirs):
    from llama3.inference.quantize import quantize_model

    model, _ = llama3.load(family_dirs["gpt2-headdim-bias-linear"][0])
    with pytest.raises(ValueError, match="has a bias"):
        quantize_model(model, "int8")


def test_fused_inference_keeps_the_biases(family_dirs):
    from llama3.inference.fast import optimize_for_inference

    folder, hf, _ = family_dirs["gpt2-headdim-bias-linear"]
    model, _ = llama3.load(folder)
    fast = optimize_for_inference(model, kernels=False, huge_pages=False)
    tokens = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)


# ----- tokenizers -----

@pytest.mark.parametrize("variant", ["gpt2-headdim-bias-linear", "spm-tied-dynamic"])
def test_ids_equal_autotokenizer(family_dirs, variant):
    from transformers import AutoTokenizer

    folder, _, kind = family_dirs[variant]
    ours = llama3.load(folder)[1]
    ref = AutoTokenizer.from_pretrained(folder)
    for text in SAMPLE_TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text, bos=True) == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids), text
        stream = ours.stream_decoder()
        assert "".join(stream.feed(i) for i in ids) + stream.flush() == ref.decode(ids), text
    special = "<|im_start|>"
    assert ours.special_tokens[special] not in ours.encode(f"a {special} b")  # text stays text ...
    assert ours.encode(f"a {special} b", allowed_special="all") == ref(f"a {special} b",
                                                                         add_special_tokens=False)["input_ids"]
    assert (ours.bos_id is None) == (kind == "gpt2")


# ----- chat templates -----

@pytest.mark.parametrize("variant", ["gpt2-headdim-bias-linear", "spm-tied-dynamic"])
def test_chat_prompt_equals_apply_chat_template(family_dirs, variant):
    from transformers import AutoTokenizer

    folder, _, _ = family_dirs[variant]
    tokenizer = llama3.load(folder)[1]
    ref = AutoTokenizer.from_pretrained(folder)
    chat = chat_format_for(tokenizer)
    for dialog in (DIALOG[:2], DIALOG):
        expected = ref.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)
        assert chat.render(dialog, add_generation_prompt=True) == expected
        expected_ids = ref(expected, add_special_tokens=False)["input_ids"]
        assert chat.encode_dialog_prompt(dialog) == expected_ids
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert im_end in chat.stop_tokens and tokenizer.eos_id in chat.stop_tokens


def test_sft_mask_covers_assistant_replies_only(family_dirs):
    from llama3.data.sft import encode_chat_record

    tokenizer = llama3.load(family_dirs["spm-tied-dynamic"][0])[1]
    chat = chat_format_for(tokenizer)
    record = {"messages": [*DIALOG, {"role": "assistant", "content": "Witty and kind."}]}
    example = encode_chat_record(record, chat, "mem:1", max_seq_len=512)
    learned = [t for t, m in zip(example.ids, example.loss_mask) if m]
    im_end = tokenizer.special_tokens["<|im_end|>"]
    assert learned.count(im_end) == 2  # each reply learns to stop
    text = tokenizer.decode([t for t in learned if t != im_end])
    assert "proud gentleman of Derbyshire." in text and "Witty and kind." in text
    assert "Darcy" not in text and "assistant" not in text and "helpful" not in text
    weighted = {"messages": [*DIALOG[:2], {**DIALOG[2], "weight": 0}, DIALOG[3],
                             {"role": "assistant", "content": "Witty and kind."}]}
    example = encode_chat_record(weighted, chat, "mem:2", max_seq_len=512)
    assert tokenizer.decode([t for t, m in zip(example.ids, example.loss_mask) if m and t != im_end]).strip() \
        == "Witty and kind."


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", ["gpt2-headdim-bias-linear", "spm-tied-dynamic"])
def test_greedy_chat_reply_equals_transformers(family_dirs, variant):
    from transformers import AutoTokenizer

    from llama3.cli.chat import ChatSession
    from llama3.inference.generate import Generator
    from llama3.inference.sampling import SamplingParams

    folder, hf, _ = family_dirs[variant]
    model, tokenizer = llama3.load(folder)
    session = ChatSession(Generator(model, tokenizer, compile=False), system=DIALOG[0]["content"],
                          max_new_tokens=12, sampling=SamplingParams(temperature=0.0))
    pieces: list[str] = []
    reply = session.reply(DIALOG[1]["content"], pieces.append)
    ref = AutoTokenizer.from_pretrained(folder)
    prompt = ref.apply_chat_template(DIALOG[:2], add_generation_prompt=True, tokenize=False)
    prompt_ids = torch.tensor([ref(prompt, add_special_tokens=False)["input_ids"]])
    stops = sorted(chat_format_for(tokenizer).stop_tokens)
    with torch.no_grad():
        out = hf.generate(prompt_ids, max_new_tokens=12, do_sample=False, eos_token_id=stops,
                          pad_token_id=stops[0])
    new_ids = [t for t in out[0, prompt_ids.shape[1]:].tolist() if t not in stops]
    assert new_ids, "the reference produced nothing to compare"
    assert reply == ref.decode(new_ids)


# ----- the sandbox -----

@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set x = messages.append(1) %}",
    "{{ 'x' * 100000000 }}",
    "{{ 'x' | center(100000000) }}",
    "{{ '%100000000s' % 'x' }}",
    "{{ '{:>100000000}'.format('x') }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
])
def test_template_escapes_and_blowups_are_refused(template):
    chat = ChatTemplate(template, source="evil/tokenizer_config.json", max_chars=10_000)
    with pytest.raises(ValueError, match="evil/tokenizer_config.json"):
        chat.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_template_output_cap_and_no_file_access():
    looping = "{% for m in messages %}{% for i in range(1000) %}{{ m.content }}{% endfor %}{% endfor %}"
    chat = ChatTemplate(looping, source="big/tokenizer_config.json", max_chars=5_000)
    with pytest.raises(ValueError, match="big/tokenizer_config.json.*more than 5000 characters"):
        chat.render([{"role": "user", "content": "0123456789"}], add_generation_prompt=False)
    reading = ChatTemplate("{% include '/etc/passwd' %}", source="inc/tokenizer_config.json")
    with pytest.raises(ValueError, match="inc/tokenizer_config.json"):
        reading.render([], add_generation_prompt=False)
    with pytest.raises(ValueError, match="syn/tokenizer_config.json.*not valid Jinja"):
        ChatTemplate("{% for %}", source="syn/tokenizer_config.json")
    refusing = ChatTemplate("{{ raise_exception('roles must alternate') }}", source="r/tokenizer_config.json")
    with pytest.raises(ValueError, match="r/tokenizer_config.json.*roles must alternate"):
        refusing.render([], add_generation_prompt=False)


# ----- bad tokenizer files -----

def test_unsupported_tokenizer_model_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    with pytest.raises(ValueError, match=r"tokenizer\.json.*WordPiece"):
        HFTokenizer.from_folder(tmp_path)


def test_merges_with_missing_tokens_and_unknown_pre_tokenizer_are_refused(tmp_path):
    data = TOKENIZER_KINDS["gpt2"]["build"](vocab_size=300)
    bad = json.loads(json.dumps(data))
    bad["model"]["merges"].append("zzz qqq" if isinstance(bad["model"]["merges"][0], str) else ["zzz", "qqq"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"{tmp_path}/tokenizer\.json"):
        HFTokenizer.from_folder(tmp_path)
    bad = json.loads(json.dumps(data))
    bad["pre_tokenizer"] = {"type": "NoSuchSplitter"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"{tmp_path}/tokenizer\.json"):
        HFTokenizer.from_folder(tmp_path)


def test_llama3_vocabulary_with_a_chatml_template(tmp_path):
    """A ChatML fine-tune of Llama 3 (reserved specials renamed <|im_start|>/<|im_end|>): the tokenizer stays
    on the tiktoken path, chats in the model's template (equal to apply_chat_template), stops at <|im_end|>,
    and the template survives an export."""
    from transformers import AutoTokenizer

    from llama3.tokenizer import Tokenizer, special_token_names
    from tests.conftest import random_model, tiny_args

    names = special_token_names("3.1")
    names[names.index("<|reserved_special_token_2|>")] = "<|im_start|>"
    names[names.index("<|reserved_special_token_3|>")] = "<|im_end|>"
    tokenizer = Tokenizer({bytes([i]): i for i in range(256)}, special_tokens=names)
    folder = llama3.save(random_model(tiny_args("gqa", vocab_size=512)), tokenizer, tmp_path / "hf")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    model, loaded = llama3.load(folder)
    assert isinstance(loaded, Tokenizer)
    chat = chat_format_for(loaded)
    ref = AutoTokenizer.from_pretrained(folder)
    expected = ref.apply_chat_template(DIALOG, add_generation_prompt=True, tokenize=False)
    assert chat.encode_dialog_prompt(DIALOG) == ref(expected, add_special_tokens=False)["input_ids"]
    assert loaded.special_tokens["<|im_end|>"] in chat.stop_tokens
    again = llama3.load(llama3.save(model, loaded, tmp_path / "again"))[1]
    assert chat_format_for(again).encode_dialog_prompt(DIALOG) == chat.encode_dialog_prompt(DIALOG)
    gguf_tokenizer = llama3.load(llama3.save(model, loaded, tmp_path / "m.gguf", format="gguf"))[1]
    assert chat_format_for(gguf_tokenizer).encode_dialog_prompt(DIALOG) == chat.encode_dialog_prompt(DIALOG)
