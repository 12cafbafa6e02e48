"""Hugging Face folders: transformers' own save_pretrained loads in llama3.load, and our export loads in
transformers (model, tokenizer, chat template) with equal logits and ids."""

import json

import pytest
import torch
from safetensors import safe_open

import llama3
from llama3.tokenizer import ChatFormat, Tokenizer
from tests.conftest import hf_model_from, random_model, tiny_args


def byte_tokenizer() -> Tokenizer:
    """A real (tiny) byte-level BPE: the 256 bytes as ranks, plus Llama 3's 256 special tokens."""
    return Tokenizer({bytes([i]): i for i in range(256)})


def _tokens(vocab_size: int, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, length), generator=g)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,shard", [("gqa", None), ("tied", "60KB"), ("rope31", "60KB")])
def test_transformers_save_pretrained_loads_with_equal_logits(tmp_path, name, shard):
    args = tiny_args(name, vocab_size=512)
    model = random_model(args, seed=3)
    hf = hf_model_from(model)
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, **kwargs)
    byte_tokenizer().save_tiktoken(tmp_path / "tokenizer.model")
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    if name == "rope31":  # transformers 5 writes the new spelling (our export, read below, the released one)
        assert config["rope_parameters"]["rope_type"] == "llama3" and not config.get("rope_scaling")

    loaded, tokenizer = llama3.load(tmp_path)
    assert loaded.args.tie_word_embeddings == args.tie_word_embeddings
    assert loaded.args.use_scaled_rope == args.use_scaled_rope
    tokens = _tokens(args.vocab_size, 100 if args.use_scaled_rope else 24)
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = loaded(tokens)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert tokenizer.encode("hello") == list(b"hello")


@pytest.mark.timeout(120)
def test_our_export_loads_in_transformers(tmp_path, llama3_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = tiny_args("rope31", vocab_size=512)
    model = random_model(args, seed=4)
    out = llama3.save(model, llama3_tokenizer, tmp_path / "hf", format="hf", max_shard_size="60KB")

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["torch_dtype"] == "float32" and config["rope_scaling"]["rope_type"] == "llama3"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [128001, 128008, 128009] and generation["bos_token_id"] == 128000
    tok_json = json.loads((out / "tokenizer.json").read_text())
    assert tok_json["model"]["ignore_merges"] is True
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_config and tok_config["bos_token"] == "<|begin_of_text|>"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1
    with safe_open(str(out / shard_files[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = _tokens(args.vocab_size, 100)
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-5

    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in ["This is a test sentence.", "Xin chào thế giới, ça va? 12345 \n\n  spaces"]:
        assert hf_tok(text)["input_ids"] == llama3_tokenizer.encode(text, bos=True)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    ids = hf_tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == ChatFormat(llama3_tokenizer).encode_dialog_prompt(dialog)

    reloaded, tokenizer = llama3.load(out)
    # the 3.2 file adds <|image|> (128256) after the usual 256 specials
    assert {k: tokenizer.special_tokens[k] for k in llama3_tokenizer.special_tokens} == llama3_tokenizer.special_tokens
    assert tokenizer.mergeable_ranks == llama3_tokenizer.mergeable_ranks
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


@pytest.mark.timeout(60)
def test_bf16_stays_bf16_and_dtype_is_the_callers(tmp_path):
    args = tiny_args("tied", vocab_size=512)
    model = random_model(args, seed=5, dtype=torch.bfloat16)
    out = llama3.save(model, byte_tokenizer(), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _ = llama3.load(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.output.weight is loaded.tok_embeddings.weight  # tied again after loading
    as_fp32, _ = llama3.load(out, dtype="float32")
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert torch.equal(as_fp32.tok_embeddings.weight, model.tok_embeddings.weight.float())
    assert not loaded.training and not as_fp32.training


@pytest.mark.timeout(60)
def test_folder_with_only_the_released_tokenizer_json(tmp_path, llama3_tokenizer):
    """Meta's HF repos ship tokenizer.json (without ignore_merges); our ids still equal tiktoken's."""
    import shutil

    from tests.conftest import llama3_tokenizer_dir

    model = random_model(tiny_args("gqa", vocab_size=512), seed=14)
    hf_model_from(model).save_pretrained(tmp_path)
    shutil.copy(llama3_tokenizer_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    _, tokenizer = llama3.load(tmp_path)
    text = "Xin chào thế giới! This is a test sentence. 12345 <|eot_id|>"
    assert tokenizer.encode(text) == llama3_tokenizer.encode(text)
    # the 3.2 file adds <|image|> (128256) after the usual 256 specials
    assert {k: tokenizer.special_tokens[k] for k in llama3_tokenizer.special_tokens} == llama3_tokenizer.special_tokens
