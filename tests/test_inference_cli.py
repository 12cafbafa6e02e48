"""`llama3 generate` and `llama3 chat` on a tiny random model saved as a Hugging Face folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, random_model, tiny_args


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama3_tokenizer):
    """A tiny model with the full Llama 3 vocabulary (so any text prompt encodes), saved with llama3.save."""
    import llama3

    path = tmp_path_factory.mktemp("tiny") / "model"
    model = random_model(tiny_args("tied", vocab_size=llama3_tokenizer.n_words, max_seq_len=256))
    llama3.save(model, llama3_tokenizer, path)
    return path


def expected_greedy(model_dir, prompt_ids: list[int], n: int) -> list[int]:
    import llama3
    from llama3.inference import Generator, SamplingParams

    model, tokenizer = llama3.load(model_dir)
    [result] = Generator(model, tokenizer).generate([prompt_ids], max_new_tokens=n,
                                                    sampling=SamplingParams(temperature=0))
    return result.token_ids


def test_generate_json(model_dir, llama3_tokenizer, capsys):
    from llama3.cli.generate import main

    prompt = "It is a truth universally acknowledged"
    code = main(["--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0",
                 "--json", "--no-compile"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "token_ids", "timing"}
    assert set(out["timing"]) == {"load_s", "warmup_s", "prefill_s", "decode_s", "num_prompt_tokens",
                                  "num_new_tokens", "decode_tokens_per_s"}
    assert out["timing"]["load_s"] > 0 and out["timing"]["warmup_s"] == 0  # eager: nothing to warm up
    prompt_ids = llama3_tokenizer.encode(prompt, bos=True)
    assert out["timing"]["num_prompt_tokens"] == len(prompt_ids)
    assert out["token_ids"] == expected_greedy(model_dir, prompt_ids, 6)
    assert out["text"] == llama3_tokenizer.decode(out["token_ids"])


def test_generate_kv_cache_formats_report_their_bytes(model_dir, capsys):
    """--kv-cache int8 / bf16 run and --json reports the cache's format and bytes: per position and kv head,
    2 x (16 codes + a 4-byte scale) or 2 x 16 bf16 values instead of 2 x 16 fp32 values."""
    from llama3.cli.generate import main

    sizes, formats = {}, {}
    for flags in ([], ["--kv-cache", "int8"], ["--kv-cache", "bf16"]):
        assert main(["--model", str(model_dir), "--prompt", "Emma", "--max-new-tokens", "6", "--temperature", "0",
                     "--json", "--no-compile", *flags]) == 0
        out = json.loads(capsys.readouterr().out)
        assert len(out["token_ids"]) == 6
        sizes[tuple(flags)], formats[tuple(flags)] = out["kv_cache_bytes"], out["kv_cache"]
    assert sizes[()] == 2 * 2 * 2 * 256 * 16 * 4  # layers x (k, v) x kv heads x positions x head_dim x fp32
    assert sizes[("--kv-cache", "int8")] == sizes[()] * (16 + 4) // (16 * 4)
    assert sizes[("--kv-cache", "bf16")] == sizes[()] // 2
    assert formats == {(): "f32", ("--kv-cache", "int8"): "int8", ("--kv-cache", "bf16"): "bf16"}
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--prompt", "Emma", "--kv-cache", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_generate_plain_prints_only_continuation_and_errors_are_clear(model_dir, capsys):
    from llama3.cli.generate import main

    assert main(["--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "4", "--temperature", "0",
                 "--no-compile", "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "400", "--no-compile"]) == 2
    assert "context length is 256" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_chat_with_piped_stdin(model_dir, llama3_tokenizer):
    from llama3.tokenizer import ChatFormat

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stdin = "Hello there\n/reset\n/help\n/nonsense\nHello there\nAnd then?\n/quit\nnever read\n"
    proc = subprocess.run([sys.executable, "-m", "llama3", "chat", "--model", str(model_dir), "--no-compile",
                           "--temperature", "0", "--max-new-tokens", "5", "--system", "Be brief."],
                          input=stdin, check=False, capture_output=True, text=True, timeout=200, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "[conversation reset]" in proc.stderr
    assert "/reset" in proc.stderr and "unknown command /nonsense" in proc.stderr  # /help, and not sent
    # /reset forgot the first turn: the same question gets the same reply.
    chat = ChatFormat(llama3_tokenizer)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first_ids = expected_greedy(model_dir, chat.encode_dialog_prompt(dialog), 5)
    first = llama3_tokenizer.decode(first_ids)
    # The second turn saw the first one: its prompt holds the reply in the history.
    dialog += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second_ids = expected_greedy(model_dir, chat.encode_dialog_prompt(dialog), 5)
    second = llama3_tokenizer.decode(second_ids)
    assert proc.stdout == f"{first}\n{first}\n{second}\n"


def test_chat_session_survives_interrupt(model_dir):
    """Ctrl-C during a reply ends that reply only; the conversation goes on."""
    import llama3
    from llama3.cli.chat import ChatSession
    from llama3.inference import Generator, SamplingParams

    model, tokenizer = llama3.load(model_dir)
    session = ChatSession(Generator(model, tokenizer), system=None, max_new_tokens=8,
                          sampling=SamplingParams(temperature=0))
    written = []

    def interrupting_write(piece):
        written.append(piece)
        raise KeyboardInterrupt

    partial = session.reply("Hi", interrupting_write)
    assert partial == written[0] and session.messages[-1] == {"role": "assistant", "content": partial}
    full = session.reply("Again", lambda piece: None)
    assert len(session.messages) == 4 and isinstance(full, str)
    assert torch.is_grad_enabled()


def test_generate_with_draft_model_equals_plain_greedy(model_dir, capsys):
    from llama3.cli.generate import main

    common = ["--model", str(model_dir), "--prompt", "Once upon a time", "--max-new-tokens", "6",
              "--temperature", "0", "--no-compile"]
    assert main(common + ["--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(common + ["--json", "--draft-model", str(model_dir), "--num-draft-tokens", "3"]) == 0
    speculative = json.loads(capsys.readouterr().out)
    assert speculative["token_ids"] == plain["token_ids"] and speculative["text"] == plain["text"]
    assert main(common + ["--draft-model", str(model_dir)]) == 0  # streamed through the speculative path
    assert capsys.readouterr().out == plain["text"] + "\n"


def test_generate_default_limit_fits_the_context(model_dir, llama3_tokenizer, tmp_path, capsys, monkeypatch):
    """Without --max-new-tokens, a long prompt gets the room left (with a notice), not an error; the prompt
    can come from a file or from standard input."""
    import io

    from llama3.cli.generate import main

    text = " ".join(["the ball at Netherfield"] * 40)
    num_prompt = len(llama3_tokenizer.encode(text, bos=True))
    assert 0 < 256 - num_prompt < 256
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(text, encoding="utf-8")
    common = ["--model", str(model_dir), "--temperature", "0", "--no-compile", "--json", "--stop", "\x00"]
    assert main(common + ["--prompt-file", str(prompt_file)]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert f"at most {256 - num_prompt} new tokens fit" in captured.err
    assert out["timing"]["num_prompt_tokens"] == num_prompt
    assert out["token_ids"] == expected_greedy(model_dir, llama3_tokenizer.encode(text, bos=True), 256 - num_prompt)
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(common + ["--prompt-file", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == out["token_ids"]
    assert main(common + ["--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read --prompt-file" in capsys.readouterr().err


def test_chat_session_drops_oldest_turns_and_keeps_the_system_prompt(model_dir):
    """A conversation longer than the context keeps going: the oldest turns give way (system prompt kept),
    each reply limit fits the room left, and a notice says so."""
    import llama3
    from llama3.cli.chat import ChatSession
    from llama3.inference import Generator, SamplingParams

    model, tokenizer = llama3.load(model_dir)
    notices: list[str] = []
    session = ChatSession(Generator(model, tokenizer), system="Be brief.", max_new_tokens=None,
                          sampling=SamplingParams(temperature=0), notify=notices.append)
    long_message = " ".join(["Tell me about the ball at Netherfield"] * 8)  # ~60 tokens a turn
    for turn in range(6):
        session.reply(f"{turn}: {long_message}", lambda piece: None)
        prompt_len = len(session.chat_format.encode_dialog_prompt(session.messages[:-1]))
        assert prompt_len < 256
    assert session.messages[0] == {"role": "system", "content": "Be brief."}
    assert session.messages[1]["content"].startswith(("3:", "4:", "5:"))  # early turns are gone
    assert any("dropped the oldest" in n for n in notices)
    assert any("reply limited to" in n for n in notices)
    with pytest.raises(ValueError, match="context is 256"):
        session.reply(" ".join(["word"] * 400), lambda piece: None)
    assert session.messages[-1]["role"] == "assistant"  # the message that cannot fit is not kept


def test_compile_auto_runs_cpu_models_eagerly_and_on_off_force_it():
    """`--compile auto` never compiles a CPU model, however large (its products and decode attention run on
    the project's kernels either way; the warm-up costs more than a reply saves), and `on`/`off` are obeyed."""
    from llama3.cli.generate import COMPILE_MIN_PARAMS, _should_compile

    model = random_model(tiny_args("gqa"))
    big = COMPILE_MIN_PARAMS * 10
    model.num_params = lambda include_embeddings=True: big  # an 8B-sized count on a tiny model
    assert not _should_compile("auto", model)
    assert _should_compile("on", model) and not _should_compile("off", model)
    model.tok_embeddings = torch.nn.Embedding(4, 4, device="meta")  # any device but the CPU
    assert _should_compile("auto", model)
