import json

import pytest
import torch

from llama3.config import PRESETS, ModelArgs, preset
from llama3.model import Transformer


@pytest.mark.parametrize("name,billions", [("llama3-8b", 8.03), ("llama3-70b", 70.6), ("llama3.1-405b", 405.9),
                                            ("llama3.2-1b", 1.24), ("llama3.2-3b", 3.21)])
def test_released_parameter_counts_on_meta_device(name, billions):
    with torch.device("meta"):
        model = Transformer(preset(name))
    assert model.tok_embeddings.weight.is_meta
    n = model.num_params()
    assert n == preset(name).num_params()
    assert round(n / 1e9, 2 if billions < 10 else 1) == billions


def test_exact_8b_and_70b_counts():
    assert preset("llama3-8b").num_params() == 8_030_261_248
    assert preset("llama3-70b").num_params() == 70_553_706_496


@pytest.mark.parametrize("name,hidden", [("llama3-8b", 14336), ("llama3-70b", 28672), ("llama3.1-405b", 53248),
                                         ("llama3.2-1b", 8192), ("llama3.2-3b", 8192)])
def test_ffn_hidden_rounding_matches_meta(name, hidden):
    assert preset(name).hidden_dim == hidden


def test_small_presets_are_trainable_sizes():
    sizes = {name: preset(name).num_params() for name in ("debug", "15m", "100m")}
    assert sizes["debug"] < 1.5e6
    assert 10e6 < sizes["15m"] < 20e6
    assert 80e6 < sizes["100m"] < 120e6


@pytest.mark.parametrize("bad,message", [
    (dict(dim=100, n_heads=3), "divisible by n_heads"),
    (dict(n_heads=8, n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(dim=0), "positive"),
    (dict(vocab_size=-1), "positive"),
    (dict(ffn_hidden_dim=0), "ffn_hidden_dim"),
    (dict(dim=24, n_heads=8), "even"),
])
def test_validation_errors_name_the_problem(bad, message):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256)
    with pytest.raises(ValueError, match=message):
        ModelArgs(**{**base, **bad})


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="llama3-8b"):
        preset("llama9")


def test_params_json_round_trip(tmp_path):
    # Meta's released 3.1-8B params.json
    released = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
                "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                "vocab_size": 128256}
    path = tmp_path / "params.json"
    path.write_text(json.dumps(released))
    args = ModelArgs.from_params_json(path)
    assert args.hidden_dim == 14336 and args.use_scaled_rope and args.rope_scaling_factor == 8.0
    again = ModelArgs.from_params_json(args.to_params_json())
    assert again == args
    for key, value in released.items():
        assert args.to_params_json()[key] == value


def test_params_json_errors(tmp_path):
    path = tmp_path / "params.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="params.json"):
        ModelArgs.from_params_json(path)


def test_hf_config_both_rope_spellings():
    args = preset("llama3.2-1b")
    cfg = args.to_hf_config()
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 32.0
    assert ModelArgs.from_hf_config(cfg).to_hf_config() == cfg
    # transformers 5 spelling
    v5 = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**cfg["rope_scaling"], "rope_theta": 500000.0}
    assert ModelArgs.from_hf_config(v5) == ModelArgs.from_hf_config(cfg)
    # explicit intermediate_size that is not Meta's rounding
    odd = ModelArgs.from_hf_config({**cfg, "intermediate_size": 5000})
    assert odd.hidden_dim == 5000


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unknown rope type 'yarn'"),
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}},
     "dynamic RoPE scaling past the original context"),
])
def test_hf_config_rejects_what_it_cannot_run(change, message):
    cfg = {**preset("debug").to_hf_config(), **change}
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_hf_config(cfg)


def test_flops_per_token_is_6n_plus_attention():
    args = preset("llama3-8b")
    n = args.num_params(include_embeddings=False)
    assert args.flops_per_token(8192) == 6 * n + 12 * 32 * 4096 * 8192
    tied = preset("llama3.2-1b")  # the output projection shares the embedding's table: still a matmul
    assert tied.tie_word_embeddings
    body = tied.num_params(include_embeddings=False)
    assert tied.flops_per_token(8192) == 6 * (body + 128256 * 2048) + 12 * 16 * 2048 * 8192


def test_all_presets_construct():
    for name in PRESETS:
        with torch.device("meta"):
            Transformer(preset(name))


def test_cli_help_lists_commands():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "llama3", "--help"], capture_output=True, text=True, check=True)
    assert "commands:" in out.stdout and "info" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "llama3", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr


def test_public_api():
    import llama3

    assert llama3.ModelArgs is ModelArgs and llama3.Transformer is Transformer
