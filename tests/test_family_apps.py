"""Derivatives through the applications: the server (chat completions, template tools), `generate --chat`,
`eval`, `finetune` with the model's template, and training checkpoints keeping its tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

import llama3
from llama3.chat_template import chat_format_for
from llama3.hf_tokenizer import HFTokenizer
from tests.family_fixtures import (  # noqa: F401 (a fixture)
    DIALOG,
    SAMPLE_TEXTS,
    family_dirs_fixture,
    random_ids,
)


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
    tokens = random_ids(hf.config.vocab_size)
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
