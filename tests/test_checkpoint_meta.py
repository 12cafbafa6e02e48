"""Meta folders: round trips through Hugging Face and through model-parallel shards are bit-identical,
and Meta and HF folders of the same weights give the same logits as transformers."""

import json

import pytest
import torch

import llama3
from llama3.checkpoint.meta import load_pth
from llama3.cli.convert import main as convert_main
from tests.conftest import random_model, tiny_args
from tests.test_checkpoint_hf import byte_tokenizer


def _files_state(folder):
    return {p.name: load_pth(p) for p in sorted(folder.glob("consolidated.*.pth"))}


def _assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name, tensors in a.items():
        assert tensors.keys() == b[name].keys(), name
        for key, tensor in tensors.items():
            assert tensor.dtype == b[name][key].dtype, key
            assert torch.equal(tensor, b[name][key]), f"{name}: {key}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["gqa", "rope32"])
def test_meta_to_hf_to_meta_is_bit_identical(tmp_path, name):
    model = random_model(tiny_args(name, vocab_size=512), seed=6, dtype=torch.bfloat16)
    tok = byte_tokenizer()
    meta = llama3.save(model, tok, tmp_path / "meta", format="meta")
    hf_model, hf_tok = llama3.load(meta)
    hf = llama3.save(hf_model, hf_tok, tmp_path / "hf", format="hf")
    back_model, back_tok = llama3.load(hf)
    back = llama3.save(back_model, back_tok, tmp_path / "meta2", format="meta")
    _assert_identical(_files_state(meta), _files_state(back))
    assert json.loads((meta / "params.json").read_text()) == json.loads((back / "params.json").read_text())
    assert (meta / "tokenizer.model").read_bytes() == (back / "tokenizer.model").read_bytes()


@pytest.mark.timeout(60)
def test_one_shard_to_n_shards_and_back_is_bit_identical(tmp_path):
    args = tiny_args("gqa", vocab_size=512)
    model = random_model(args, seed=7)
    tok = byte_tokenizer()
    one = llama3.save(model, tok, tmp_path / "one", format="meta")
    two = llama3.save(llama3.load(one)[0], tok, tmp_path / "two", format="meta", num_shards=2)
    shards = _files_state(two)
    assert sorted(shards) == ["consolidated.00.pth", "consolidated.01.pth"]
    wq, wo = shards["consolidated.01.pth"]["layers.0.attention.wq.weight"], shards["consolidated.01.pth"][
        "layers.0.attention.wo.weight"]
    assert wq.shape == (args.dim // 2, args.dim) and wo.shape == (args.dim, args.dim // 2)  # dim 0 / dim 1 splits
    assert torch.equal(wq, model.layers[0].attention.wq.weight[args.dim // 2:])
    assert torch.equal(shards["consolidated.01.pth"]["norm.weight"], model.norm.weight)  # replicated
    merged, _ = llama3.load(two)
    back = llama3.save(merged, tok, tmp_path / "back", format="meta")
    _assert_identical(_files_state(one), _files_state(back))
    converted, _ = llama3.load(two, dtype="bfloat16")  # merged and converted tensor by tensor
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value.bfloat16()), key


@pytest.mark.timeout(60)
def test_meta_and_hf_of_the_same_weights_give_equal_logits(tmp_path):
    """HF's q/k rows are permuted; a missing (un)permutation would show here as a logit difference."""
    from transformers import AutoModelForCausalLM

    args = tiny_args("gqa", vocab_size=512)
    model = random_model(args, seed=8)
    tok = byte_tokenizer()
    meta = llama3.save(model, tok, tmp_path / "meta", format="meta", num_shards=2)
    assert convert_main([str(meta), str(tmp_path / "hf"), "--to", "hf", "--max-shard-size", "100KB"]) == 0
    from_meta, _ = llama3.load(meta)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = from_meta(tokens), hf(tokens).logits
        assert (ours - ref).abs().max().item() <= 1e-5
        # the comparison is sensitive: swapping q rows the way a missing permutation would changes logits
        from llama3.checkpoint.keymap import permute_qk_to_hf

        for layer in from_meta.layers:
            layer.attention.wq.weight.copy_(permute_qk_to_hf(layer.attention.wq.weight.clone(), args.n_heads))
        assert (from_meta(tokens) - ref).abs().max().item() > 1e-4


@pytest.mark.timeout(60)
def test_meta_without_output_weight_is_tied(tmp_path):
    model = random_model(tiny_args("tied", vocab_size=512), seed=9)
    meta = llama3.save(model, byte_tokenizer(), tmp_path / "meta", format="meta")
    assert "output.weight" not in load_pth(meta / "consolidated.00.pth")
    params = json.loads((meta / "params.json").read_text())
    params.pop("tie_word_embeddings")  # as in Meta's own 3.2 1B params.json
    (meta / "params.json").write_text(json.dumps(params))
    loaded, _ = llama3.load(meta)
    assert loaded.args.tie_word_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
