"""Model configuration: `ModelArgs` with Meta's params.json field names, presets, and HF config mapping.

Field names follow Meta's `params.json` verbatim (dim, n_layers, n_heads, ...), so a Meta folder's
params.json loads as `ModelArgs(**params)`. Fields Meta leaves implicit get explicit names here:
`ffn_hidden_dim` (HF's `intermediate_size`, for checkpoints whose FFN size is not Meta's rounding),
the RoPE scaling factors (Meta's reference hard-codes them), `max_seq_len` and `tie_word_embeddings`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MAX_SEQ_LEN", "ModelArgs", "PRESETS", "ROPE_SCALING_TYPES", "preset", "preset_names"]

ROPE_SCALING_TYPES = ("llama3", "linear", "dynamic")
# The longest context a config may declare: 2M positions, 16x Llama 3.1's 128K (long-context derivatives
# reach 1M). The RoPE table is built eagerly for the whole context (max_seq_len × head_dim fp32 values,
# 1 GiB at 2M and head_dim 128), so a config claiming 10^9 positions, or a head_dim in the millions, must
# fail here in microseconds instead of allocating hundreds of gigabytes.
MAX_SEQ_LEN = 1 << 21
_MAX_ROPE_VALUES = MAX_SEQ_LEN * 256


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means n_heads (multi-head attention)
    vocab_size: int = 128256
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # explicit FFN size; overrides the multiple_of rounding when set
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # RoPE scaling on (of kind `rope_scaling_type`)
    # "llama3": Llama 3.1+ frequency-dependent scaling; "linear": positions divided by the factor (all
    # frequencies / factor); "dynamic": NTK scaling that transformers applies only past
    # rope_original_max_seq_len, so within the context we run (max_seq_len <= that) it is plain RoPE.
    rope_scaling_type: str = "llama3"
    rope_scaling_factor: float = 8.0  # 3.1: 8, 3.2 1B/3B: 32
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 8192  # run-time context length (not in Meta's params.json)
    tie_word_embeddings: bool = False
    # Llama-architecture derivatives (HF config.json): a head size not tied to dim / n_heads, and biases on
    # the attention projections (q, k, v, o) or the feed-forward ones (w1, w2, w3). Llama 3 has neither.
    head_dim_override: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    # Extra params.json keys we do not use (e.g. "rope_scaling" of later Meta releases) are kept here so a
    # round trip through params.json loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.max_seq_len > MAX_SEQ_LEN:
            raise ValueError(f"ModelArgs.max_seq_len={self.max_seq_len} is over the limit of {MAX_SEQ_LEN} positions "
                             "(its RoPE table alone would not fit in memory); set a smaller context length")
        self._check_finite()
        if self.head_dim_override is not None:
            if not isinstance(self.head_dim_override, int) or self.head_dim_override <= 0:
                raise ValueError(f"ModelArgs.head_dim_override must be a positive integer, got "
                                 f"{self.head_dim_override!r}")
        elif self.dim % self.n_heads != 0:
            raise ValueError(
                f"ModelArgs.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}); "
                "pick n_heads so that head_dim = dim / n_heads is a whole number"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.max_seq_len * self.head_dim > _MAX_ROPE_VALUES:
            raise ValueError(f"ModelArgs: a RoPE table of max_seq_len × head_dim = {self.max_seq_len} × "
                             f"{self.head_dim} values is over the limit of {_MAX_ROPE_VALUES}; the dimensions "
                             "are implausible (a corrupt config?) or the context length must be set smaller")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelArgs.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}) "
                "for grouped-query attention"
            )
        if self.ffn_hidden_dim is not None and self.ffn_hidden_dim <= 0:
            raise ValueError(f"ModelArgs.ffn_hidden_dim must be positive, got {self.ffn_hidden_dim}")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ValueError(f"ModelArgs.ffn_dim_multiplier must be positive, got {self.ffn_dim_multiplier}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("ModelArgs.norm_eps and rope_theta must be positive")
        if self.use_scaled_rope:
            if self.rope_scaling_type not in ROPE_SCALING_TYPES:
                raise ValueError(f"unknown rope_scaling_type {self.rope_scaling_type!r}; supported: "
                                 f"{', '.join(ROPE_SCALING_TYPES)}")
            if self.rope_scaling_factor <= 0:
                raise ValueError(f"rope_scaling_factor must be positive, got {self.rope_scaling_factor}")
            if self.rope_scaling_type == "dynamic" and self.max_seq_len > self.rope_original_max_seq_len:
                raise ValueError(
                    f"dynamic RoPE scaling past the original context ({self.rope_original_max_seq_len}) changes "
                    f"the frequencies with the sequence length; run with max_seq_len <= "
                    f"{self.rope_original_max_seq_len} (got {self.max_seq_len})")
            if self.rope_scaling_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
                raise ValueError(
                    f"rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed "
                    f"rope_low_freq_factor ({self.rope_low_freq_factor})"
                )

    def _check_finite(self) -> None:
        """Float fields must be finite numbers: a NaN rope_theta or an infinite norm_eps passes every
        comparison below (NaN <= 0 is False) and would only show as NaN logits."""
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scaling_factor",
                     "rope_low_freq_factor", "rope_high_freq_factor"):
            value = getattr(self, name)
            if value is None and name == "ffn_dim_multiplier":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ModelArgs.{name} must be a finite number, got {value!r}")
        value = self.rope_original_max_seq_len
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"ModelArgs.rope_original_max_seq_len must be a positive integer, got {value!r}")

    # ----- derived sizes -----
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """FFN hidden size, as Meta's model.py computes it (8B: 10922 -> 14198 -> 14336)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelArgs fields: {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**d)

    # ----- Meta params.json -----
    @classmethod
    def from_params_json(cls, source: str | Path | dict[str, Any], **overrides: Any) -> ModelArgs:
        """Build from Meta's params.json (a path or an already parsed dict).

        Unknown keys are kept in `extra`. Later Meta releases may carry `rope_scaling_factor` /
        `rope_high_freq_factor` (llama-models) or a `rope_scaling` dict; both are honoured.
        """
        if isinstance(source, dict):
            params = dict(source)
        else:
            path = Path(source)
            try:
                params = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e}); is this a Meta params.json?") from None
            if not isinstance(params, dict):
                raise ValueError(f"{path}: expected a JSON object of model parameters")
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for key, value in params.items():
            if key in known:
                kwargs[key] = value
            elif key == "rope_scaling" and isinstance(value, dict):
                _apply_hf_rope_scaling(kwargs, value, source="params.json")
            else:
                extra[key] = value
        kwargs.update(overrides)
        return cls(**kwargs, extra=extra)

    def to_params_json(self) -> dict[str, Any]:
        """The params.json dict Meta's loaders read (plus our explicit extras where they differ from defaults)."""
        params: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of,
            "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "use_scaled_rope": self.use_scaled_rope,
        }
        if self.ffn_dim_multiplier is None:
            del params["ffn_dim_multiplier"]
        if self.use_scaled_rope:
            params["rope_scaling_factor"] = self.rope_scaling_factor
            params["rope_low_freq_factor"] = self.rope_low_freq_factor
            params["rope_high_freq_factor"] = self.rope_high_freq_factor
            params["rope_original_max_seq_len"] = self.rope_original_max_seq_len
        if self.ffn_hidden_dim is not None:
            params["ffn_hidden_dim"] = self.ffn_hidden_dim
        if self.tie_word_embeddings:
            params["tie_word_embeddings"] = True
        if self.use_scaled_rope and self.rope_scaling_type != "llama3":
            params["rope_scaling_type"] = self.rope_scaling_type
        for name in ("head_dim_override", "attention_bias", "mlp_bias"):  # derivatives only
            if getattr(self, name):
                params[name] = getattr(self, name)
        params["max_seq_len"] = self.max_seq_len
        params.update(self.extra)
        return params

    # ----- Hugging Face config.json -----
    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, **overrides: Any) -> ModelArgs:
        """Build from an HF `LlamaConfig` dict (config.json). Accepts both rope spellings:
        `rope_theta` + `rope_scaling` (released checkpoints) and `rope_parameters` (transformers 5)."""
        if not isinstance(config, dict):
            path = Path(config)
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config.json has model_type {model_type!r}; only Llama-architecture models load")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json has hidden_act {act!r}; Llama uses 'silu' (SwiGLU)")
        try:
            dim = config["hidden_size"]
            n_heads = config["num_attention_heads"]
            kwargs: dict[str, Any] = dict(
                dim=dim,
                n_layers=config["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=config.get("num_key_value_heads") or n_heads,
                vocab_size=config["vocab_size"],
                ffn_hidden_dim=config["intermediate_size"],
            )
        except KeyError as e:
            raise ValueError(f"config.json is missing the required field {e.args[0]!r}") from None
        head_dim = config.get("head_dim")
        if head_dim is not None and (dim % n_heads or head_dim != dim // n_heads):
            kwargs["head_dim_override"] = head_dim  # a derivative with its own head size
        kwargs["attention_bias"] = bool(config.get("attention_bias", False))
        kwargs["mlp_bias"] = bool(config.get("mlp_bias", False))
        kwargs["norm_eps"] = config.get("rms_norm_eps", 1e-5)
        kwargs["max_seq_len"] = config.get("max_position_embeddings", 8192)
        kwargs["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
        rope = config.get("rope_parameters")
        if rope is None:
            rope = dict(config.get("rope_scaling") or {})
            if "rope_theta" in config:
                rope["rope_theta"] = config["rope_theta"]
        kwargs["rope_theta"] = float(rope.get("rope_theta", 10000.0))
        _apply_hf_rope_scaling(kwargs, rope, source="config.json")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self, torch_dtype: str = "bfloat16", *, bos_token_id: int = 128000,
                     eos_token_id: int | list[int] = 128001) -> dict[str, Any]:
        """The config.json transformers' LlamaForCausalLM expects (released-checkpoint spelling)."""
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": True,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "torch_dtype": torch_dtype,
        }
        if self.use_scaled_rope and self.rope_scaling_type != "llama3":
            cfg["rope_scaling"] = {"rope_type": self.rope_scaling_type, "factor": float(self.rope_scaling_factor)}
            if self.rope_scaling_type == "dynamic":
                cfg["rope_scaling"]["original_max_position_embeddings"] = int(self.rope_original_max_seq_len)
        elif self.use_scaled_rope:
            cfg["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": float(self.rope_scaling_factor),
                "low_freq_factor": float(self.rope_low_freq_factor),
                "high_freq_factor": float(self.rope_high_freq_factor),
                "original_max_position_embeddings": int(self.rope_original_max_seq_len),
            }
        return cfg

    # ----- cost model -----
    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Exact parameter count from the shapes (no model needed)."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2  # wq, wo, wk, wv
        if self.attention_bias:
            attn += self.n_heads * hd + 2 * self.n_kv_heads * hd + d
        ffn = 3 * d * self.hidden_dim + (2 * self.hidden_dim + d if self.mlp_bias else 0)
        per_layer = attn + ffn + 2 * d  # + two RMSNorm weights
        embed = self.vocab_size * d
        total = self.n_layers * per_layer + d + embed  # + final norm + output
        if not self.tie_word_embeddings:
            total += embed
        if not include_embeddings:
            total -= embed
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6·N for the weight matmuls (embedding lookup excluded,
        output projection included, also when it shares the embedding's table) plus 12·L·d·T for attention
        scores and values (PaLM appendix B)."""
        seq_len = seq_len or self.max_seq_len
        n = self.num_params(include_embeddings=False)
        if self.tie_word_embeddings:  # the one table was subtracted, but it is still the output matmul
            n += self.vocab_size * self.dim
        return 6 * n + 12 * self.n_layers * self.dim * seq_len


def _apply_hf_rope_scaling(kwargs: dict[str, Any], rope: dict[str, Any], *, source: str) -> None:
    """RoPE scaling from an HF `rope_scaling` dict: llama3 (3.1+), linear and dynamic (NTK), as transformers
    defines them; any other kind is refused (its positions would be computed differently)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        kwargs["use_scaled_rope"] = False
        return
    if rope_type not in ROPE_SCALING_TYPES:
        raise ValueError(
            f"{source}: unknown rope type {rope_type!r}; supported: 'default', 'llama3' (Llama 3.1+ frequency "
            "scaling), 'linear' and 'dynamic'"
        )
    try:
        kwargs.update(use_scaled_rope=True, rope_scaling_type=rope_type, rope_scaling_factor=float(rope["factor"]))
        if rope_type == "llama3":
            kwargs.update(
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type == "dynamic":  # transformers: the original context defaults to max_position_embeddings
            original = rope.get("original_max_position_embeddings", kwargs.get("max_seq_len"))
            kwargs["rope_original_max_seq_len"] = int(original if original is not None else 8192)
    except KeyError as e:
        raise ValueError(f"{source}: {rope_type} rope scaling is missing {e.args[0]!r}") from None


# ----- presets -----
# Released shapes (the params.json files Meta publishes with each model). 3.1 and 3.2 use scaled RoPE; 3.2 1B/3B use factor 32 (Meta's reference
# hard-coded 8 for them, a known bug) and tie input and output embeddings.
_LLAMA31 = dict(use_scaled_rope=True, rope_scaling_factor=8.0, max_seq_len=131072)
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3),
    "llama3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                        ffn_dim_multiplier=1.3, **_LLAMA31),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                         ffn_dim_multiplier=1.3, **_LLAMA31),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                          ffn_dim_multiplier=1.2, **_LLAMA31),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5,
                        tie_word_embeddings=True, **{**_LLAMA31, "rope_scaling_factor": 32.0}),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0,
                        tie_word_embeddings=True, **{**_LLAMA31, "rope_scaling_factor": 32.0}),
    # Small trainable shapes for CPUs. Their vocab is that of a small trained BPE tokenizer; training sets
    # vocab_size from the tokenizer actually used.
    "debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4352, multiple_of=32,
                  max_seq_len=256, tie_word_embeddings=True),  # ~0.4M
    "15m": dict(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, vocab_size=8448, multiple_of=32,
                max_seq_len=512, tie_word_embeddings=True),  # ~15M
    "100m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32768, multiple_of=256,
                 max_seq_len=1024, tie_word_embeddings=True),  # ~100M
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset(name: str, **overrides: Any) -> ModelArgs:
    """A named shape, e.g. `preset("llama3-8b")` or `preset("debug", vocab_size=512)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})

