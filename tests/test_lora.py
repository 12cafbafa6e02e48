"""LoRA: zero B changes nothing, only adapters train, merged equals adapted, and HF peft loading our saved
adapters onto an HF LlamaForCausalLM reproduces our logits."""

import json

import pytest
import torch

from llama3.train.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_peft_adapter,
    lora_parameters,
    merge_lora,
    save_peft_adapter,
)
from tests.conftest import hf_model_from, random_model, tiny_args

TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))



def _randomize_adapters(model, seed=1):
    """Non-zero B everywhere, so every adapter changes the output (a missing permutation would show)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_zero_b_gives_the_base_logits():
    base = random_model(tiny_args("gqa"))
    expected = base(TOKENS)
    model = apply_lora(base, LoRAConfig(rank=4, alpha=8))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 7
    assert torch.equal(model(TOKENS), expected)


def test_training_moves_only_adapters_and_merge_is_exact():
    model = apply_lora(random_model(tiny_args("gqa")), LoRAConfig(rank=4, alpha=8, dropout=0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    for _ in range(3):
        logits = model(TOKENS[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in trainable), name
    adapted = model(TOKENS)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(random_model(tiny_args("gqa")).state_dict())
    torch.testing.assert_close(merged(TOKENS), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("config", ["gqa", "tied"])
def test_peft_loads_our_adapters(tmp_path, config):
    from peft import PeftModel

    base = random_model(tiny_args(config))
    hf = hf_model_from(base)
    model = apply_lora(base, LoRAConfig(rank=4, alpha=8, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3")))
    _randomize_adapters(model)
    ours = model(TOKENS)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and "q_proj" in cfg["target_modules"]
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(TOKENS).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    # and peft's merge agrees with ours
    with torch.no_grad():
        theirs_merged = peft_model.merge_and_unload()(TOKENS).logits
    torch.testing.assert_close(theirs_merged, merge_lora(model)(TOKENS), atol=1e-4, rtol=1e-4)


def test_adapter_folder_round_trip(tmp_path):
    model = apply_lora(random_model(tiny_args("gqa")), LoRAConfig(rank=2, alpha=4, targets=("wq", "wk", "w2")))
    _randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "a")
    reloaded = load_peft_adapter(random_model(tiny_args("gqa")), tmp_path / "a")
    assert reloaded.lora_config == model.lora_config
    assert torch.equal(reloaded(TOKENS), model(TOKENS))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_bad_configs():
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="targets .*'q_proj'.* unknown"):
        LoRAConfig(targets=("q_proj",))
    model = apply_lora(random_model(tiny_args("gqa")), LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        save_peft_adapter(random_model(tiny_args("gqa")), "/nonexistent/x")


def test_int8_base_qlora_style():
    base = random_model(tiny_args("gqa"))
    expected = base(TOKENS)
    # The reference: the same model with each projection's weight rounded to int8 and back, by hand.
    rounded = random_model(tiny_args("gqa"))
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight",
                              "w3.weight")):
                scale = p.abs().amax(dim=1, keepdim=True) / 127.0
                p.copy_(torch.round(p / scale) * scale)
    model = apply_lora(base, LoRAConfig(rank=4, alpha=8, quantize_base=True))
    state = model.state_dict()
    assert state["layers.0.attention.wq.weight_int8"].dtype == torch.int8
    assert "layers.0.attention.wq.weight" not in state
    assert all(n.endswith((".lora_A", ".lora_B")) for n, p in model.named_parameters() if p.requires_grad)
    zero_b = model(TOKENS)
    torch.testing.assert_close(zero_b, rounded(TOKENS), atol=1e-5, rtol=1e-5)
    assert (zero_b - expected).abs().max() < 0.05 * expected.abs().max()  # int8 rounding, small but not zero
    _randomize_adapters(model)
    adapted = model(TOKENS)
    merged = merge_lora(model)
    assert merged.layers[0].attention.wq.weight.dtype == torch.float32
    torch.testing.assert_close(merged(TOKENS), adapted, atol=1e-5, rtol=1e-5)
