"""`llama3 serve --model PATH`: loads a saved model folder, prints the URL and a usage snippet, serves it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

import llama3
from llama3.train.lora import LoRAConfig, apply_lora, save_peft_adapter
from llama3.inference.embeddings import embed
from tests.conftest import random_model, tiny_args
from tests.serve_server import free_port

pytestmark = pytest.mark.timeout(180)


def test_serve_command_prints_url_and_serves(tmp_path, llama3_tokenizer):
    model = random_model(tiny_args("gqa", vocab_size=llama3_tokenizer.n_words, max_seq_len=256))
    folder = llama3.save(model, llama3_tokenizer, tmp_path / "tiny-chat")
    prompt = "It is a truth universally acknowledged"
    generated = subprocess.run([sys.executable, "-m", "llama3", "generate", "--model", str(folder), "--prompt", prompt,
                                "--temperature", "0", "--max-new-tokens", "12", "--json", "--no-compile"],
                               check=True, capture_output=True, text=True, timeout=120)
    expected = json.loads(generated.stdout.strip().splitlines()[-1])
    adapted = apply_lora(copy.deepcopy(model), LoRAConfig(rank=2, alpha=4, targets=("wv", "w2")))
    save_peft_adapter(adapted, tmp_path / "adapter")  # B = 0: the adapter's answers are the base's
    port = free_port()
    command = [sys.executable, "-m", "llama3", "serve", "--model", str(folder), "--port", str(port),
               "--num-slots", "2", "--threads", "1", "--batch-invariant", "--embedding-pooling", "last",
               "--kv-cache-gb", "0.01", "--lora", f"zero={tmp_path / 'adapter'}"]
    # The key comes from the environment: on the command line every user of the machine could read it in `ps`.
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "LLAMA3_API_KEY": "s3cret"})
    try:
        banner = []
        while not any("print(reply.choices[0].message.content)" in line for line in banner):
            line = server.stdout.readline()
            assert line, "llama3 serve exited early:\n" + "".join(banner)
            banner.append(line)
        text = "".join(banner)
        url = f"http://127.0.0.1:{port}"
        assert f"tiny-chat at {url}" in text
        assert f"curl {url}/v1/chat/completions -H \"Authorization: Bearer $LLAMA3_API_KEY\"" in text
        assert f'OpenAI(base_url="{url}/v1", api_key=os.environ["LLAMA3_API_KEY"])' in text
        assert "s3cret" not in text  # the key is never printed
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the server never became healthy"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        reply = client.chat.completions.create(model="tiny-chat", max_tokens=5, temperature=0,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert reply.usage.completion_tokens == 5 and reply.model == "tiny-chat"
        # greedy through the server = `llama3 generate` on the same folder
        completion = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0)
        ids = [t for t in expected["token_ids"] if not llama3_tokenizer.is_special(t)]
        assert completion.choices[0].text == llama3_tokenizer.decode(ids)
        assert completion.usage.completion_tokens == len(expected["token_ids"]) == 12
        # --lora: listed, and served by name (a zero update: the same greedy text); --kv-cache-gb: in /metrics
        assert [m.id for m in client.models.list().data] == ["tiny-chat", "zero"]
        adapted = client.completions.create(model="zero", prompt=prompt, max_tokens=12, temperature=0)
        assert adapted.model == "zero" and adapted.choices[0].text == completion.choices[0].text
        metrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer s3cret"}).text
        assert "llama3_prefix_cache_capacity_blocks" in metrics
        # --embedding-pooling last: the last position's final hidden state, normalised
        [vector] = client.embeddings.create(model="tiny-chat", input=prompt).data
        reference = embed(model, [llama3_tokenizer.encode(prompt, bos=True)], pooling="last")[0]
        torch.testing.assert_close(torch.tensor(vector.embedding), reference, atol=1e-5, rtol=0)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("flags, message", [(["--lora", "noequals"], "is not NAME=PATH"),
                                            (["--lora", "nope=a", "--model-name", "nope"], "is taken"),
                                            (["--kv-cache-gb", "-1"], "--kv-cache-gb must be >= 0")])
def test_serve_command_rejects_bad_lora_and_cache_flags(tmp_path, capsys, flags, message):
    from llama3.cli.serve import main

    assert main(["--model", str(tmp_path / "nope"), *flags]) == 2  # refused before any model is loaded
    assert message in capsys.readouterr().err


def test_serve_command_rejects_a_missing_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llama3", "serve", "--model", str(tmp_path / "nope")],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "cannot load" in result.stderr
