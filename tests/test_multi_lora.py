"""Several LoRA adapters on one base in the engine: rows under different adapters (and none) share decode
steps, and each row's greedy tokens and log-probabilities are those of its adapter merged by peft."""

from __future__ import annotations

import copy

import pytest
import torch

from llama3.inference.engine import Engine, EngineRequest, TokenEvent
from llama3.inference.fast import fuse_projections
from tests.conftest import hf_model_from, random_model, tiny_args

pytestmark = pytest.mark.timeout(180)

PROMPT = (5, 17, 99, 3, 42, 7, 61, 18, 200, 11)
NUM_NEW = 8
ADAPTERS = {  # name -> (rank, alpha, HF target modules)
    "all": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "some": (2, 6, ["k_proj", "v_proj", "up_proj", "down_proj"]),  # another rank, parts of the fused wqkv/w13
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The base model, and per adapter: its PEFT folder and peft's merged model's greedy run."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = random_model(tiny_args("gqa", vocab_size=256, max_seq_len=128), seed=5)
    hf = hf_model_from(base)
    folders, references = {}, {"base": greedy_reference(hf)}
    for i, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(hf), config)
        folders[name] = tmp_path_factory.mktemp(name)
        peft_model.save_pretrained(str(folders[name]))
        merged = PeftModel.from_pretrained(copy.deepcopy(hf), str(folders[name])).merge_and_unload().eval()
        references[name] = greedy_reference(merged)
    return base, folders, references


@torch.no_grad()
def greedy_reference(hf_model) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from full forwards of an HF model."""
    ids, logprobs = list(PROMPT), []
    for _ in range(NUM_NEW):
        step = hf_model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        ids.append(int(step.argmax()))
        logprobs.append(float(step[ids[-1]]))
    return ids[len(PROMPT):], logprobs


def run_together(engine: Engine, adapters: list[str | None]) -> list[list[TokenEvent]]:
    handles = [engine.submit(EngineRequest(PROMPT, NUM_NEW, num_logprobs=2, adapter=a)) for a in adapters]
    return [[e for e in h if isinstance(e, TokenEvent)] for h in handles]


@pytest.mark.parametrize("fused", [True, False])
def test_each_row_equals_its_adapter_merged_by_peft(setup, fused):
    base, folders, references = setup
    model = copy.deepcopy(base)
    if fused:
        fuse_projections(model)
    engine = Engine(model, num_slots=4, prefill_chunk=32)
    for name, folder in folders.items():
        engine.load_lora(name, str(folder))
    engine.start()
    try:
        names = [None, "all", "some", "all"]
        results = run_together(engine, names)  # four rows, three adapters (one of them none), one decode step
    finally:
        engine.stop()
    for name, events in zip(names, results):
        tokens, logprobs = references[name or "base"]
        assert [e.token_id for e in events] == tokens, name
        torch.testing.assert_close(torch.tensor([e.logprob for e in events]), torch.tensor(logprobs),
                                   atol=1e-4, rtol=1e-4)
    assert len({tuple(references[n][0]) for n in references}) == 3  # the adapters do change the output


def test_rows_are_bitwise_the_same_whatever_adapters_share_their_batch(setup):
    base, folders, _ = setup
    engine = Engine(fuse_projections(copy.deepcopy(base)), num_slots=4, prefill_chunk=32, batch_invariant=True,
                    prefix_cache_bytes=1 << 20)
    for name, folder in folders.items():
        engine.load_lora(name, str(folder))
    engine.start()

    def summary(events):
        return [(e.token_id, e.logprob, e.top_logprobs) for e in events]
    try:
        alone = {name: summary(run_together(engine, [name])[0]) for name in (None, "all", "some")}
        mixed = run_together(engine, ["some", None, "all", "some"])
    finally:
        engine.stop()
    for name, events in zip(["some", None, "all", "some"], mixed):
        assert summary(events) == alone[name], name


def test_load_and_unload_while_running(setup, tmp_path):
    base, folders, references = setup
    engine = Engine(fuse_projections(copy.deepcopy(base)), num_slots=2, prefill_chunk=32).start()
    try:
        engine.load_lora("all", str(folders["all"]))
        assert [e.token_id for e in run_together(engine, ["all"])[0]] == references["all"][0]
        with pytest.raises(ValueError, match="already loaded"):
            engine.load_lora("all", str(folders["some"]))
        with pytest.raises(ValueError, match="not a PEFT adapter folder"):
            engine.load_lora("x", str(tmp_path))
        engine.unload_lora("all")
        with pytest.raises(ValueError, match="no LoRA adapter named 'all'"):
            engine.submit(EngineRequest(PROMPT, 2, adapter="all"))
        with pytest.raises(ValueError, match="no LoRA adapter named 'all'"):
            engine.unload_lora("all")
        assert [e.token_id for e in run_together(engine, [None])[0]] == references["base"][0]
    finally:
        engine.stop()


def test_an_adapter_for_another_base_is_refused(setup):
    _, folders, _ = setup
    other = random_model(tiny_args("gqa", vocab_size=256, max_seq_len=128, dim=128), seed=1)
    with pytest.raises(ValueError, match="another base model"):
        Engine(other).load_lora("all", str(folders["all"]))


def test_server_routes_by_model_name_and_loads_and_unloads_adapters(tmp_path, llama3_tokenizer):
    import httpx
    import openai

    from llama3.train.lora import LoRAConfig, apply_lora, merge_lora, save_peft_adapter
    from tests.serve_server import RunningServer

    base = random_model(tiny_args("gqa", vocab_size=llama3_tokenizer.n_words, max_seq_len=128), seed=2)
    adapted = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    save_peft_adapter(adapted, tmp_path / "adapter")
    merged = Engine(merge_lora(adapted), num_slots=1).start()
    try:
        expected = merged.generate(PROMPT, 6)
    finally:
        merged.stop()
    server = RunningServer(Engine(fuse_projections(copy.deepcopy(base)), llama3_tokenizer, num_slots=2),
                           model_name="base", allow_lora_updates=True)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    try:
        load = httpx.post(server.url + "/v1/load_lora_adapter",
                          json={"lora_name": "austen", "lora_path": str(tmp_path / "adapter")})
        assert load.status_code == 200 and "austen" in load.text
        assert [m.id for m in client.models.list().data] == ["base", "austen"]
        card = httpx.get(server.url + "/v1/models/austen").json()
        assert card["parent"] == "base" and card["root"] == str(tmp_path / "adapter")
        reply = client.completions.create(model="austen", prompt=list(PROMPT), max_tokens=6, temperature=0)
        assert reply.model == "austen"
        assert reply.choices[0].text == llama3_tokenizer.decode(expected)
        base_reply = client.completions.create(model="base", prompt=list(PROMPT), max_tokens=6, temperature=0)
        assert base_reply.choices[0].text != reply.choices[0].text
        with pytest.raises(openai.NotFoundError, match="'base', 'austen'"):
            client.completions.create(model="other", prompt=list(PROMPT), max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="base model"):
            client.embeddings.create(model="austen", input="Hi")
        bad = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
        assert bad.status_code == 400 and "not a PEFT adapter folder" in bad.json()["error"]["message"]
        assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "austen"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="austen", prompt=list(PROMPT), max_tokens=1)
        assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "austen"}).status_code == 404
    finally:
        server.stop()


def test_adapter_updates_are_refused_unless_allowed(llama3_tokenizer):
    from fastapi.testclient import TestClient

    from llama3.serve.app import create_app

    engine = Engine(random_model(tiny_args("gqa", vocab_size=llama3_tokenizer.n_words)), llama3_tokenizer).start()
    try:
        client = TestClient(create_app(engine))
        answer = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp"})
        assert answer.status_code == 403 and "--allow-lora-updates" in answer.json()["error"]["message"]
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "a", "lora_int_id": 1}).status_code == 400
    finally:
        engine.stop()
