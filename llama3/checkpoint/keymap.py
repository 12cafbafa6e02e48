"""Meta <-> Hugging Face weight names and the q/k RoPE permutation.

Our modules carry Meta's names, so a Meta state dict is the identity. HF's LlamaForCausalLM renames every
tensor and applies RoPE to the two *halves* of each head (rotate_half) instead of to adjacent pairs, so
HF's converter permutes the rows of wq and wk; we invert it on the way in.
"""

from __future__ import annotations

import re

import torch

from ..config import ModelArgs

__all__ = ["meta_to_hf_key", "hf_to_meta_key", "permute_qk_to_hf", "permute_qk_to_meta",
           "meta_to_hf_state_dict", "hf_to_meta_state_dict"]

_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",  # biases: Llama-architecture derivatives only
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.bias": "mlp.gate_proj.bias",
    "feed_forward.w2.bias": "mlp.down_proj.bias",
    "feed_forward.w3.bias": "mlp.up_proj.bias",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_MAP_INV = {v: k for k, v in _LAYER_MAP.items()}
_TOP_MAP_INV = {v: k for k, v in _TOP_MAP.items()}
_META_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def meta_to_hf_key(key: str) -> str:
    if key in _TOP_MAP:
        return _TOP_MAP[key]
    m = _META_LAYER.match(key)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise KeyError(f"no Hugging Face name for Meta tensor {key!r}")


def hf_to_meta_key(key: str) -> str:
    if key in _TOP_MAP_INV:
        return _TOP_MAP_INV[key]
    m = _HF_LAYER.match(key)
    if m and m.group(2) in _LAYER_MAP_INV:
        return f"layers.{m.group(1)}.{_LAYER_MAP_INV[m.group(2)]}"
    raise KeyError(f"unexpected tensor {key!r} for a Llama model")


def permute_qk_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from interleaved pairs (Meta) to rotate-half order (HF): within each head,
    row 2i+j moves to j·Dh/2 + i. w: (n_heads·Dh, D), or a bias (n_heads·Dh,)."""
    out_dim = w.shape[0]
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def permute_qk_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_qk_to_hf`."""
    out_dim = w.shape[0]
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)


def _needs_permute(meta_key: str) -> int | None:
    """0 for wq (and its bias), 1 for wk: their rows carry RoPE pairs; None for every other tensor."""
    if meta_key.endswith(("attention.wq.weight", "attention.wq.bias")):
        return 0
    if meta_key.endswith(("attention.wk.weight", "attention.wk.bias")):
        return 1
    return None


def meta_to_hf_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta names/layout -> HF names/layout. Tied models keep only the embedding (as HF saves them)."""
    out = {}
    for key, tensor in state_dict.items():
        if key == "output.weight" and args.tie_word_embeddings:
            continue
        which = _needs_permute(key)
        if which is not None:
            tensor = permute_qk_to_hf(tensor, args.n_heads if which == 0 else args.n_kv_heads)
        out[meta_to_hf_key(key)] = tensor
    return out


def hf_to_meta_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF names/layout -> Meta names/layout. Rotary `inv_freq` buffers some old exports carry are dropped."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        meta_key = hf_to_meta_key(key)
        which = _needs_permute(meta_key)
        if which is not None:
            tensor = permute_qk_to_meta(tensor, args.n_heads if which == 0 else args.n_kv_heads)
        out[meta_key] = tensor
    return out
