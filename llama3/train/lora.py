"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as a model transform.

`apply_lora(model, LoRAConfig(...))` swaps chosen projections (`wq`, `wk`, `wv`, `wo`, `w1`, `w2`, `w3` by
default) for `LoRALinear`: y = x Wᵀ + (alpha / r) · dropout(x) Aᵀ Bᵀ, with W frozen, A (r, in) initialized
as nn.Linear's weight (Kaiming-uniform, as PEFT does) and B (out, r) zero, so the adapted model starts
exactly equal to the base. Every other parameter is frozen too; only A and B train.

With `quantize_base=True` (QLoRA-style, after Dettmers et al. 2023, with int8 instead of NF4) each adapted
projection keeps its frozen W as int8 with one absmax scale per output row, a quarter of fp32's memory, and
dequantizes it on the fly; the adapters then learn on top of the rounded base, and merging folds them into
the dequantized W.

`merge_lora(model)` folds W + (alpha / r) · B A back into plain nn.Linear layers for export;
`save_peft_adapter` writes the adapters alone in Hugging Face PEFT's layout (`adapter_config.json` +
`adapter_model.safetensors`), which `peft.PeftModel.from_pretrained` loads onto an HF `LlamaForCausalLM`.

The frozen base weight keeps its Meta name (`layers.N.attention.wq.weight`), so a LoRA model's state dict
is the base's plus `.lora_A` / `.lora_B` entries, and checkpoints of the base still load into it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.keymap import meta_to_hf_key, permute_qk_to_hf, permute_qk_to_meta
from ..checkpoint.safety import atomic_output_dir

__all__ = [
    "DEFAULT_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "load_peft_adapter",
    "read_peft_adapter",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "save_peft_adapter",
]

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# Our projection name -> (the module that holds it, HF's module name), for PEFT's `target_modules`.
_TARGET_PLACES = {"wq": ("attention", "q_proj"), "wk": ("attention", "k_proj"), "wv": ("attention", "v_proj"),
                  "wo": ("attention", "o_proj"), "w1": ("feed_forward", "gate_proj"),
                  "w2": ("feed_forward", "down_proj"), "w3": ("feed_forward", "up_proj")}


@dataclass
class LoRAConfig:
    """rank r, scale alpha (the update is multiplied by alpha / r), dropout on the adapter's input,
    and which projections of every block get adapters."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    quantize_base: bool = False  # keep the frozen W of adapted projections in int8

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.targets) - set(_TARGET_PLACES)
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {sorted(unknown) or '(none)'} unknown; choose from {list(_TARGET_PLACES)}")
        self.targets = tuple(t for t in _TARGET_PLACES if t in self.targets)  # canonical order

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (no bias: Llama has none). The frozen weight is
    `weight` (the base's own tensor), or `weight_int8` and `weight_scale` (out,) with `quantize_base`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, *,
                 quantize_base: bool = False):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free projections only")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_dtype = base.weight.dtype
        if quantize_base:
            w = base.weight.detach().float()  # (out, in)
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,): symmetric absmax per row
            self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("weight_scale", scale)
            self.weight = None
        else:
            self.weight = base.weight
            self.weight.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear initializes its weight (PEFT's default), B zero: the update starts at exactly 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen W (out, in); dequantized into `dtype` (default: the base's dtype) when stored in int8."""
        if self.weight is not None:
            return self.weight
        dtype = dtype or self.base_dtype
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return F.linear(x, self.base_weight(x.dtype)) + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) · B A, computed in fp32: (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + (alpha / r) · B A, in the base's dtype."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False,
                           device=self.lora_A.device, dtype=self.base_dtype)
        with torch.no_grad():
            linear.weight.copy_((self.base_weight(torch.float32).float() + self.delta_weight()).to(self.base_dtype))
        return linear

    def extra_repr(self) -> str:
        base = "int8" if self.weight is None else str(self.base_dtype).removeprefix("torch.")
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, base={base}"


def _targets(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) for every targeted projection in every block."""
    found = []
    for i, layer in enumerate(model.layers):
        for target in targets:
            holder_name, _ = _TARGET_PLACES[target]
            found.append((f"layers.{i}.{holder_name}.{target}", getattr(layer, holder_name), target))
    return found


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze every parameter of `model` and add LoRA adapters to the configured projections, in place.
    Returns the model, whose trainable parameters are then exactly the adapters."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("this model already has LoRA adapters; merge_lora() it first")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, parent, attr in _targets(model, config.targets):
        base = getattr(parent, attr)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"cannot add LoRA to {type(base).__name__}; only nn.Linear projections")
        setattr(parent, attr, LoRALinear(base, config.rank, config.alpha, config.dropout,
                                         quantize_base=config.quantize_base))
    model.lora_config = config  # read back by save_peft_adapter
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by the equivalent plain nn.Linear (W + scaling·BA), in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer should see)."""
    return [p for name, p in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under our names: `layers.N.attention.wq.lora_A` ..."""
    return {name: p.detach() for name, p in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))}


def _peft_key(meta_name: str, which: str) -> str:
    """layers.3.attention.wq.lora_A -> base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"""
    hf_module = meta_to_hf_key(f"{meta_name}.weight").removesuffix(".weight")
    return f"base_model.model.{hf_module}.{which}.weight"


def _peft_config(config: LoRAConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(_TARGET_PLACES[t][1] for t in config.targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def save_peft_adapter(model: nn.Module, path: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> None:
    """Write the adapters alone in PEFT's layout, atomically (temp folder, then rename).

    Keys are HF's module names (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`). HF's
    q/k rows are a permutation P of ours (rotate-half instead of interleaved RoPE pairs): W_hf = P W, so
    (W + BA)_hf = P W + (P B) A, and only lora_B of wq/wk is permuted. Adapters trained with
    `quantize_base` learned against the int8-rounded W; applied to the original W they differ by that rounding."""
    from safetensors.torch import save_file

    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("this model has no LoRA adapters to save (apply_lora first)")
    args = model.args
    tensors = {}
    for name, tensor in lora_state_dict(model).items():
        module_name, which = name.rsplit(".", 1)
        if which == "lora_B" and module_name.endswith(("attention.wq", "attention.wk")):
            n_heads = args.n_heads if module_name.endswith("wq") else args.n_kv_heads
            tensor = permute_qk_to_hf(tensor, n_heads)
        tensors[_peft_key(module_name, which)] = tensor.contiguous().cpu()
    with atomic_output_dir(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(_peft_config(config, base_model_name_or_path), indent=2))


def read_peft_adapter(path: str | os.PathLike, args) -> tuple[LoRAConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read a PEFT LoRA folder (ours or from `peft`) for a base of shape `args` (ModelArgs): its config and,
    per adapted projection under our names (`layers.N.attention.wq`), (A (r, in), B (out, r)), with B of
    wq/wk already in our interleaved RoPE layout. Nothing is applied to a model (see `load_peft_adapter`)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a PEFT adapter folder (adapter_config.json: {e})") from None
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("rank_pattern"):
        raise ValueError(f"{path}: only plain LoRA adapters load (no DoRA, rsLoRA or per-module ranks)")
    hf_to_ours = {hf: ours for ours, (_, hf) in _TARGET_PLACES.items()}
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    unknown = [t for t in targets if t not in hf_to_ours]
    if unknown:
        raise ValueError(f"{path}: adapters on {unknown}; only {sorted(hf_to_ours)} are supported")
    config = LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0)),
                        targets=tuple(hf_to_ours[t] for t in targets))
    tensors = load_file(str(path / "adapter_model.safetensors"))
    pairs = {}
    for i in range(args.n_layers):
        for target in config.targets:
            module_name = f"layers.{i}.{_TARGET_PLACES[target][0]}.{target}"
            keys = [_peft_key(module_name, which) for which in ("lora_A", "lora_B")]
            missing = [key for key in keys if key not in tensors]
            if missing:
                raise ValueError(f"{path}: missing tensor {missing[0]}")
            lora_a, lora_b = (tensors.pop(key) for key in keys)
            if target in ("wq", "wk"):
                lora_b = permute_qk_to_meta(lora_b, args.n_heads if target == "wq" else args.n_kv_heads)
            pairs[module_name] = (lora_a, lora_b)
    if tensors:
        raise ValueError(f"{path}: unexpected tensors {sorted(tensors)[:3]}...")
    return config, pairs


def load_peft_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the adapters of a PEFT LoRA folder (ours or from `peft`) to a base model, in place."""
    config, pairs = read_peft_adapter(path, model.args)
    apply_lora(model, config)
    for module_name, parent, attr in _targets(model, config.targets):
        lora = getattr(parent, attr)
        lora_a, lora_b = pairs[module_name]
        lora.lora_A.data.copy_(lora_a)
        lora.lora_B.data.copy_(lora_b)
    return model
