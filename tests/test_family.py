"""Llama-architecture derivatives: their own tokenizers (GPT-2-style BPE, SentencePiece-style BPE), their Jinja
chat templates, and config variants (head_dim, biases, linear/dynamic RoPE, tied or not), against transformers:
logits, ids, chat prompts and greedy chat replies; GGUF through transformers' own GGUF loader."""

from __future__ import annotations

import json

import pytest
import torch

import llama3
from llama3.chat_template import ChatTemplate, TemplateChatFormat, chat_format_for
from llama3.hf_tokenizer import HFTokenizer
from tests.family_fixtures import (
    CHATML,
    SAMPLE_TEXTS,
    TOKENIZER_KINDS,
    vocab_size_of,
    write_hf_model,
    write_tokenizer,
)

# (tokenizer kind, LlamaConfig changes): every config variant the issue lists, spread over the two tokenizers
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


def _special_ids(tok_data: dict, kind: str) -> dict:
    ids = {t["content"]: t["id"] for t in tok_data["added_tokens"]}
    spec = TOKENIZER_KINDS[kind]
    return {"bos_token_id": ids.get(spec["bos"]), "eos_token_id": ids[spec["eos"]]}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
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
        hf = write_hf_model(folder, vocab_size_of(data), **config, **_special_ids(data, kind))
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


def _ids(vocab: int, length: int = 20) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))


# ----- model numerics -----

@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_folder_logits_equal_transformers(family_dirs, variant):
    folder, hf, _ = family_dirs[variant]
    model, tokenizer = llama3.load(folder)
    assert isinstance(tokenizer, HFTokenizer)
    tokens = _ids(hf.config.vocab_size)
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
    tokens = _ids(hf.config.vocab_size)
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
    tokens = _ids(hf.config.vocab_size)
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


# ----- GGUF -----

@pytest.fixture(scope="module")
def gguf_files(family_dirs, tmp_path_factory):
    """Each tokenizer kind in a derivative with plain RoPE (what transformers' GGUF loader reads), written
    to GGUF (f32) by llama3.save from its HF folder; with that HF reference."""
    out = {}
    for variant, kind in (("gpt2-llama3rope", "gpt2"), ("spm-tied-dynamic", "spm")):
        source = family_dirs[variant][0]
        folder = tmp_path_factory.mktemp(f"plain-{kind}")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((source / name).read_bytes())
        data = json.loads((folder / "tokenizer.json").read_text())
        hf = write_hf_model(folder, vocab_size_of(data), seed=5, tie_word_embeddings=kind == "spm",
                            **_special_ids(data, kind))
        model, tokenizer = llama3.load(folder)
        target = tmp_path_factory.mktemp(f"gguf-{kind}") / "model.gguf"
        llama3.save(model, tokenizer, target, format="gguf", dtype="f32")
        out[kind] = (target, hf, folder)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["gpt2", "spm"])
def test_gguf_derivative_equals_transformers_gguf_loader(gguf_files, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, hf, folder = gguf_files[kind]
    model, tokenizer = llama3.load(path)
    assert isinstance(tokenizer, HFTokenizer)
    ref_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokens = _ids(hf.config.vocab_size)
    with torch.no_grad():
        ours = model(tokens)
        torch.testing.assert_close(ours, ref_model(tokens).logits, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours, hf(tokens).logits, atol=2e-5, rtol=1e-4)
    original = llama3.load(folder)[1]
    for text in SAMPLE_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == ref_tok(text, add_special_tokens=False)["input_ids"], text
        assert tokenizer.encode(text, bos=True) == ref_tok(text)["input_ids"], text
        assert tokenizer.decode(ids) == ref_tok.decode(ids), text
        if not text[:1].isspace():  # the vocabulary survives the trip through GGUF metadata (see below)
            assert ids == original.encode(text), text
    chat = chat_format_for(tokenizer)
    expected = ref_tok.apply_chat_template(DIALOG, add_generation_prompt=True, tokenize=False)
    assert chat.render(DIALOG) == expected
    assert chat.encode_dialog_prompt(DIALOG) == ref_tok(expected, add_special_tokens=False)["input_ids"]
    assert chat.stop_tokens == chat_format_for(original).stop_tokens
    if kind == "gpt2":
        assert chat.encode_dialog_prompt(DIALOG) == chat_format_for(original).encode_dialog_prompt(DIALOG)
    # A SentencePiece GGUF reads as transformers reads it: one `▁` prepended to the whole text unless it
    # starts with a space (the "first" scheme), where Llama 2's legacy tokenizer.json prepends to every
    # stretch between special tokens; so text after a special token or a leading space may split differently.


def _gguf_fields(path):
    from llama3.checkpoint.gguf import _GGUFFile

    return dict(_GGUFFile(path).fields)


def test_bad_gguf_vocabularies_are_refused(gguf_files):
    from llama3.checkpoint.gguf_family import hf_tokenizer_from_gguf

    path = gguf_files["gpt2"][0]
    fields = _gguf_fields(path)
    with pytest.raises(ValueError, match=rf"{path}.*pre-tokenizer 'qwen2'"):
        hf_tokenizer_from_gguf({**fields, "tokenizer.ggml.pre": "qwen2"}, path)
    with pytest.raises(ValueError, match=rf"{path}.*tokenizer model 'bert'"):
        hf_tokenizer_from_gguf({**fields, "tokenizer.ggml.model": "bert"}, path)
    merges = [*fields["tokenizer.ggml.merges"], "zz qq"]
    with pytest.raises(ValueError, match=rf"{path}.*merges\[\d+\] = 'zz qq' refers to 'zz'"):
        hf_tokenizer_from_gguf({**fields, "tokenizer.ggml.merges": merges}, path)
    spm = _gguf_fields(gguf_files["spm"][0])
    no_scores = {k: v for k, v in spm.items() if k not in ("tokenizer.ggml.scores", "tokenizer.ggml.merges")}
    with pytest.raises(ValueError, match="needs tokenizer.ggml.scores"):
        hf_tokenizer_from_gguf(no_scores, path)
    # without merges the SentencePiece merge order comes from the scores, and gives the same ids
    from_scores = hf_tokenizer_from_gguf({k: v for k, v in spm.items() if k != "tokenizer.ggml.merges"}, path)
    with_merges = hf_tokenizer_from_gguf(spm, path)
    for text in SAMPLE_TEXTS:
        assert from_scores.encode(text) == with_merges.encode(text), text


# ----- serving -----

@pytest.mark.timeout(300)
def test_server_chat_with_a_derivative_equals_the_chat_session(family_dirs):
    import openai

    from llama3.cli.chat import ChatSession
    from llama3.inference.engine import Engine
    from llama3.inference.generate import Generator
    from llama3.inference.sampling import SamplingParams
    from tests.serve_server import RunningServer

    folder = family_dirs["spm-tied-dynamic"][0]
    model, tokenizer = llama3.load(folder)
    session = ChatSession(Generator(model, tokenizer, compile=False), system=None, max_new_tokens=10,
                          sampling=SamplingParams(temperature=0.0))
    expected = session.reply(DIALOG[1]["content"], lambda piece: None)
    server = RunningServer(Engine(llama3.load(folder)[0], tokenizer, num_slots=2), model_name="derivative")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="derivative", messages=DIALOG[1:2], max_tokens=10,
                                               temperature=0)
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == len(chat_format_for(tokenizer).encode_dialog_prompt(DIALOG[1:2]))
        with pytest.raises(openai.BadRequestError, match="does not render tools"):
            client.chat.completions.create(model="derivative", messages=DIALOG[1:2], max_tokens=4, tools=[
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_template_tools_and_tool_call_answers(family_dirs, tmp_path):
    """A template that reads `tools` renders them itself (the server's prompt is that rendering); a
    `<tool_call>` answer becomes OpenAI tool_calls."""
    import openai

    from llama3.inference.engine import Engine
    from llama3.serve.schema import ChatCompletionRequest
    from llama3.serve.tools import parse_tool_calls
    from tests.family_fixtures import CHATML_TOOLS
    from tests.serve_server import RunningServer

    source = family_dirs["gpt2-llama3rope"][0]
    for name in ("tokenizer.json", "model.safetensors"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    model_config = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**model_config, "max_position_embeddings": 512}))
    config = json.loads((source / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML_TOOLS}))
    model, tokenizer = llama3.load(tmp_path)
    chat = chat_format_for(tokenizer)
    assert chat.supports_tools
    tools = [{"type": "function", "function": {"name": "f", "description": "find", "parameters": {"type": "object"}}}]
    assert '{"type": "function", "function": {"name": "f"' in chat.render(DIALOG[1:2], tools=tools)
    server = RunningServer(Engine(model, tokenizer, num_slots=1), model_name="tools")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="tools", messages=DIALOG[1:2], tools=tools, temperature=0,
                                               max_tokens=2)
        assert reply.usage.prompt_tokens == len(chat.encode_dialog_prompt(DIALOG[1:2], tools=tools))
    finally:
        server.stop()
    request = ChatCompletionRequest(model="tools", messages=DIALOG[1:2], tools=tools)
    answer = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>\n<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    calls = parse_tool_calls(answer, request)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("f", {"x": 1}), ("f", {})]
    assert parse_tool_calls("<tool_call>{not json</tool_call>", request) is None


@pytest.mark.timeout(300)
def test_finetune_a_derivative_with_its_template(family_dirs, tmp_path, capsys):
    """`llama3 finetune` (LoRA SFT) on a SentencePiece/ChatML derivative: the loss falls, the export keeps its
    own tokenizer and template, and the checkpoint reloads with it."""
    from transformers import AutoTokenizer

    from llama3.cli.finetune import main as finetune_main
    from tests.conftest import REPO

    folder = family_dirs["spm-tied-dynamic"][0]
    lines = (REPO / "data" / "chat" / "austen_chat.jsonl").read_text().splitlines(keepends=True)[:48]
    (tmp_path / "tools.jsonl").write_text("".join(lines[:4]))  # line 4 holds a tool call
    assert finetune_main(["--model", str(folder), "--data", str(tmp_path / "tools.jsonl"), "--out",
                          str(tmp_path / "no"), "--data.seq_len=128"]) == 2
    assert f"{tmp_path / 'tools.jsonl'}:4: " in capsys.readouterr().err  # ChatML here renders no tool calls
    lines = [line for line in lines if "tool_calls" not in line]
    (tmp_path / "chat.jsonl").write_text("".join(lines))
    out = tmp_path / "run"
    rc = finetune_main(["--model", str(folder), "--data", str(tmp_path / "chat.jsonl"), "--out", str(out),
                        "--lora-rank", "8", "--train.steps=20", "--optim.lr=1e-2", "--data.batch_size=4",
                        "--finetune.val_fraction=0.1", "--data.seq_len=128", "--train.val_interval=0",
                        "--train.val_batches=4", "--logging.peak_flops=1e11", "--train.device=cpu",
                        "--schedule.warmup_steps=0", "--checkpoint.interval=20"])
    assert rc == 0, capsys.readouterr().err
    val = {int(k): v for k, v in json.loads((out / "finetune_report.json").read_text())["val_loss"].items()}
    assert val[20] < val[0], val
    messages = json.loads(lines[0])["messages"]
    exported = llama3.load(out / "hf")[1]
    assert isinstance(exported, HFTokenizer)
    ref = AutoTokenizer.from_pretrained(out / "hf")
    expected = ref.apply_chat_template(messages, tokenize=False)
    assert chat_format_for(exported).encode_dialog(messages)[0] == ref(expected, add_special_tokens=False)["input_ids"]
    checkpoint_tokenizer = HFTokenizer.from_folder(out / "step-00000020")  # saved beside the weights
    assert checkpoint_tokenizer.encode(SAMPLE_TEXTS[0]) == exported.encode(SAMPLE_TEXTS[0])


def test_training_checkpoint_keeps_a_derivatives_tokenizer(family_dirs, tmp_path):
    from llama3.checkpoint.native import save_training_checkpoint

    folder, hf, _ = family_dirs["gpt2-headdim-bias-linear"]
    model, tokenizer = llama3.load(folder)
    save_training_checkpoint(tmp_path / "run", 3, model=model, optimizer=None, train_state={"step": 3},
                             config_json="{}", tokenizer=tokenizer)
    loaded, loaded_tokenizer = llama3.load(tmp_path / "run")
    assert isinstance(loaded_tokenizer, HFTokenizer)
    assert loaded_tokenizer.encode(SAMPLE_TEXTS[3]) == tokenizer.encode(SAMPLE_TEXTS[3])
    assert chat_format_for(loaded_tokenizer).encode_dialog_prompt(DIALOG) == \
        chat_format_for(tokenizer).encode_dialog_prompt(DIALOG)
    tokens = _ids(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), hf(tokens).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.timeout(300)
def test_generate_chat_flag_uses_the_template(family_dirs, capsys):
    from llama3.cli.chat import ChatSession
    from llama3.cli.generate import main as generate_main
    from llama3.inference.generate import Generator
    from llama3.inference.sampling import SamplingParams

    folder = family_dirs["spm-tied-dynamic"][0]
    model, tokenizer = llama3.load(folder)
    session = ChatSession(Generator(model, tokenizer, compile=False), system=None, max_new_tokens=10,
                          sampling=SamplingParams(temperature=0.0))
    expected = session.reply(DIALOG[1]["content"], lambda piece: None)
    capsys.readouterr()
    assert generate_main(["--model", str(folder), "--prompt", DIALOG[1]["content"], "--chat", "--temperature", "0",
                          "--max-new-tokens", "10", "--no-compile", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == expected


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", ["gpt2-headdim-bias-linear", "spm-tied-dynamic"])
def test_eval_runs_on_a_derivative(family_dirs, tmp_path, variant):
    """Perplexity, multiple choice and generation tasks take the derivative's tokenizer (no BOS for the
    GPT-2-style one); the log-likelihood equals transformers' on the same ids."""
    from llama3.cli.eval import main as eval_main
    from llama3.eval.scoring import encode_pair
    from tests.conftest import REPO

    folder, hf, kind = family_dirs[variant]
    text = tmp_path / "page.txt"
    text.write_text(SAMPLE_TEXTS[0] * 3)
    out = tmp_path / "results.json"
    assert eval_main(["--model", str(folder), "--task", f"{text},{REPO}/data/tasks/custom/multiple_choice.jsonl,"
                      f"{REPO}/data/tasks/custom/generation.jsonl", "--limit", "2", "--output", str(out),
                      "--max-gen-toks", "8", "--quiet"]) == 0
    results = json.loads(out.read_text())["results"]
    tokenizer = llama3.load(folder)[1]
    page = results[str(text)]["metrics"]
    assert page["num_tokens"] == len(tokenizer.encode(text.read_text(), bos=True)) - 1  # every predicted token
    assert 1 < page["perplexity"] < float("inf")
    assert len(results) == 3 and all(r.get("num_samples", 2) == 2 for r in results.values())
    context, continuation = encode_pair(tokenizer, "It is a truth", " universally acknowledged")
    assert (context[:1] == [tokenizer.bos_id]) == (kind == "spm")
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        ours = torch.log_softmax(llama3.load(folder)[0](ids)[0], -1)
        ref = torch.log_softmax(hf(ids).logits[0], -1)
    positions = range(len(context), ids.shape[1])
    assert sum(ours[t - 1, ids[0, t]] for t in positions) == pytest.approx(
        sum(ref[t - 1, ids[0, t]] for t in positions).item(), abs=1e-4)


_LLAMA_CPP_SCRIPT = """
import json, sys
from llama_cpp import Llama
path, texts, ids = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
llm = Llama(model_path=path, n_ctx=128, logits_all=True, verbose=False, n_threads=1, seed=0)
tokens = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]
llm.eval(ids)
print(json.dumps({"tokens": tokens, "logits": [list(map(float, row)) for row in llm.scores[: len(ids)]],
                  "bos": llm.token_bos(), "eos": llm.token_eos()}))
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["gpt2", "spm"])
def test_llama_cpp_runs_a_derivative_gguf(gguf_files, kind):
    """llama.cpp (in a subprocess: a native crash fails this test only) loads the derivative GGUF we write:
    equal logits, and for the byte-level vocabulary the same ids for every sample text."""
    import subprocess
    import sys

    path, hf, _ = gguf_files[kind]
    model, tokenizer = llama3.load(path)
    texts = [t for t in SAMPLE_TEXTS if t]
    ids = _ids(hf.config.vocab_size)[0].tolist()
    run = subprocess.run([sys.executable, "-c", _LLAMA_CPP_SCRIPT, str(path), json.dumps(texts), json.dumps(ids)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    assert (torch.tensor(result["logits"]) - ours).abs().max() < 1e-3
    assert result["eos"] == tokenizer.eos_id
    if kind == "gpt2":
        assert result["tokens"] == [tokenizer.encode(t) for t in texts]
    else:  # llama.cpp's SentencePiece prepends a space to every text, as SentencePiece itself does
        assert result["bos"] == tokenizer.bos_id
        assert result["tokens"][0] == tokenizer.encode(texts[0])


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
