"""POST /v1/embeddings through the official openai client: OpenAI's shapes, pooling checked against Hugging
Face's LlamaModel hidden states, and a text's vector the same alone or batched with others."""

from __future__ import annotations

import base64
import copy

import httpx
import numpy as np
import openai
import pytest
import torch

from llama3.inference.embeddings import embed
from llama3.inference.engine import Engine
from tests.conftest import hf_model_from, random_model, tiny_args
from tests.serve_server import RunningServer

pytestmark = pytest.mark.timeout(180)

MODEL = "tiny-embed"
TEXTS = ["It is a truth universally acknowledged.", "Mr. Darcy", "Netherfield Park is let at last.", "Mr. Bennet"]


@pytest.fixture(scope="module")
def setup(llama3_tokenizer):
    model = random_model(tiny_args("gqa", vocab_size=llama3_tokenizer.n_words, max_seq_len=256), seed=7)
    hf = hf_model_from(copy.deepcopy(model))
    server = RunningServer(Engine(model, llama3_tokenizer, num_slots=2), model_name=MODEL)
    yield server, hf, llama3_tokenizer
    server.stop()


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup[0].url + "/v1", api_key="unused", max_retries=0)


def hf_embedding(hf, ids: list[int], pooling: str = "mean") -> torch.Tensor:
    with torch.no_grad():
        hidden = hf.model(torch.tensor([ids])).last_hidden_state[0]  # (T, D), after the final norm
    pooled = hidden.mean(0) if pooling == "mean" else hidden[-1]
    return pooled / pooled.norm()


def test_vectors_are_pooled_hidden_states(setup, client):
    _, hf, tok = setup
    reply = client.embeddings.create(model=MODEL, input=TEXTS[0])
    assert reply.object == "list" and reply.model == MODEL and len(reply.data) == 1
    vector = torch.tensor(reply.data[0].embedding)
    ids = tok.encode(TEXTS[0], bos=True)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == len(ids)
    assert vector.shape == (64,) and vector.norm() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(vector, hf_embedding(hf, ids), atol=2e-5, rtol=0)


def test_last_token_pooling_against_hf(setup):
    server, hf, tok = setup
    ids = [tok.encode(t, bos=True) for t in TEXTS]
    future = server.engine.run_on_engine(lambda: embed(server.engine.model, ids, pooling="last"))
    vectors = future.result(timeout=30)
    for row, seq in zip(vectors, ids):
        torch.testing.assert_close(row, hf_embedding(hf, seq, "last"), atol=2e-5, rtol=0)


def test_same_text_same_vector_alone_or_batched(setup, client):
    tok = setup[2]
    batched = client.embeddings.create(model=MODEL, input=TEXTS).data
    assert [d.index for d in batched] == [0, 1, 2, 3]
    for i, text in enumerate(TEXTS):
        alone = client.embeddings.create(model=MODEL, input=[text]).data[0].embedding
        assert alone == batched[i].embedding
    # token ids, one list or several, give the same vectors as the text they encode
    ids = [tok.encode(t, bos=True) for t in TEXTS]
    by_ids = client.embeddings.create(model=MODEL, input=ids).data
    assert [d.embedding for d in by_ids] == [d.embedding for d in batched]
    assert client.embeddings.create(model=MODEL, input=ids[2]).data[0].embedding == batched[2].embedding


def test_formats_and_dimensions(setup, client):
    server = setup[0]
    body = {"model": MODEL, "input": TEXTS[:2]}
    floats = httpx.post(server.url + "/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    packed = httpx.post(server.url + "/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], packed["data"]):
        assert f["object"] == "embedding" and isinstance(f["embedding"], list)
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == pytest.approx(f["embedding"], abs=0)
    short = client.embeddings.create(model=MODEL, input=TEXTS[0], dimensions=16).data[0].embedding
    full = torch.tensor(floats["data"][0]["embedding"])
    assert len(short) == 16
    torch.testing.assert_close(torch.tensor(short), full[:16] / full[:16].norm(), atol=1e-6, rtol=0)


def test_bad_input_is_a_400(client, setup):
    cases = [({"input": ""}, "empty"), ({"input": TEXTS[0], "dimensions": 65}, "at most 64"),
             ({"input": [[5, 10**6]]}, "outside the vocabulary"), ({"input": list(range(300))}, "maximum context"),
             ({"input": TEXTS[0], "encoding_format": "int8"}, "encoding_format"), ({"input": []}, "input")]
    for fields, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            client.embeddings.create(model=MODEL, **fields)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="x")
