"""The Llama 3 transformer, single-device PyTorch.

Module and parameter names are those of Meta's checkpoints (`tok_embeddings`, `layers.N.attention.wq`,
`feed_forward.w1`, `attention_norm`, `ffn_norm`, `norm`, `output`), so a Meta state dict loads as is and
every other format is a key map (see `llama3.checkpoint`). This file knows nothing of files, processes,
distribution or serving.

Shapes: B batch, T new tokens, S cache length, D dim, H query heads, K kv heads, Dh head dim, V vocab.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs

__all__ = ["Transformer", "TransformerBlock", "Attention", "FeedForward", "RMSNorm", "KVCache",
           "precompute_rope", "apply_rope", "document_causal_mask", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) in fp32, rounded to x's dtype, times weight."""
    x_fp32 = x.float()
    normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 as in Meta's reference."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # The same computation in one operator, when the inference layer installs one (the CPU kernel,
        # llama3.inference.attention.use_decode_kernels): a function (x, weight, eps) -> normed x.
        self.kernel: Callable | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and not torch.compiler.is_compiling():
            return self.kernel(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# ----- rotary position embedding -----

def rope_frequencies(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/Dh), i < Dh/2, with Llama 3.1's frequency-dependent scaling
    (`apply_scaling` in Meta's llama-models): long wavelengths are divided by `factor`, short ones kept,
    and the band between is interpolated smoothly."""
    head_dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    if not args.use_scaled_rope or args.rope_scaling_type == "dynamic":
        # Dynamic NTK scaling only changes the base past the original context, which ModelArgs keeps us within.
        return freqs
    if args.rope_scaling_type == "linear":  # position interpolation (Chen et al. 2023): every angle / factor
        return freqs / args.rope_scaling_factor
    factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old_context = args.rope_original_max_seq_len
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > old_context / low, freqs / factor, interpolated)
    return torch.where(wavelen < old_context / high, freqs, scaled)


def precompute_rope(args: ModelArgs, seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """cos/sin table for positions [0, seq_len): (seq_len, Dh/2, 2), fp32; [..., 0] = cos, [..., 1] = sin."""
    freqs = rope_frequencies(args, device)  # (Dh/2,)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(t, freqs)  # (seq_len, Dh/2)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by angle pos·f_i, Meta's interleaved layout (the complex
    multiplication of `apply_rotary_emb`, written with real numbers so it compiles and runs in any dtype).
    x: (B, T, H, Dh); rope: (B, T, Dh/2, 2) or (T, Dh/2, 2)."""
    x_pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, Dh/2, 2)
    if rope.dim() == 3:
        rope = rope.unsqueeze(0)
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)  # (B, T, 1, Dh/2)
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, T, H, Dh/2, 2)
    return out.flatten(-2).type_as(x)


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Block-causal mask for packed sequences: token i sees token j iff j <= i and both lie in the same
    document (Llama 3 paper §3.2: attention does not cross document boundaries).
    document_ids: (B, T) int -> (B, 1, T, T) bool, True = may attend."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)  # (B, T, T)
    return (same_doc & causal).unsqueeze(1)


# ----- attention -----

class KVCache(nn.Module):
    """Key/value cache of one layer: (B, K, S, Dh) each. Rows are independent sequences; the caller says
    where each new token goes (`cache_pos`, (B, T)), so rows may sit at different lengths. Slot s holds
    position s, so S bounds the positions a row can reach; `grow` makes room (copying what is written).

    With `k_scale`/`v_scale` the entries are int8 with one fp32 scale per (row, head, position): symmetric
    absmax over the head's Dh values, so a cache entry costs Dh + 4 bytes instead of 2·Dh (bf16). They are
    dequantized when read, in the attention's dtype (the decode kernel reads codes and scales as stored)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None):
        super().__init__()
        assert k.shape == v.shape and (k_scale is None) == (v_scale is None)
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)
        self.register_buffer("k_scale", k_scale, persistent=False)
        self.register_buffer("v_scale", v_scale, persistent=False)

    @classmethod
    def allocate(cls, batch_size: int, n_kv_heads: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, *, quantize: str | None = None) -> KVCache:
        """Zeros for `batch_size` rows × `length` positions; `quantize="int8"` stores int8 entries + scales."""
        shape = (batch_size, n_kv_heads, length, head_dim)
        if quantize is None:
            return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        if quantize != "int8":
            raise ValueError(f"KV cache quantization {quantize!r} is not supported; use 'int8' or none")
        scale_shape = (*shape[:-1], 1)
        return cls(torch.zeros(shape, dtype=torch.int8, device=device),
                   torch.zeros(shape, dtype=torch.int8, device=device),
                   torch.zeros(scale_shape, dtype=torch.float32, device=device),
                   torch.zeros(scale_shape, dtype=torch.float32, device=device))

    @property
    def length(self) -> int:
        return self.k.shape[2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def view(self, rows: slice, num_positions: int) -> KVCache:
        """A cache over rows `rows` and positions [0, num_positions) of this one, sharing its memory:
        writes through the view land here (the engine runs each step on the window its sequences need)."""
        return KVCache(*(t[rows, :, :num_positions] for t in (self.k, self.v)),
                       *((None, None) if self.k_scale is None
                         else (t[rows, :, :num_positions] for t in (self.k_scale, self.v_scale))))

    @torch.no_grad()
    def grow(self, length: int) -> None:
        """Reallocate to `length` positions, in place, keeping the entries written so far."""
        if length <= self.length:
            return
        for name in ("k", "v", "k_scale", "v_scale"):
            old = getattr(self, name)
            if old is None:
                continue
            new = old.new_zeros(*old.shape[:2], length, old.shape[3])
            new[:, :, :old.shape[2]] = old
            setattr(self, name, new)

    def write(self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (B, T, K, Dh) at cache_pos (B, T)."""
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)  # (B, 1)
        # Advanced indices around a slice put the indexed dims first: self.k[rows, :, pos] is (B, T, K, Dh).
        if self.k_scale is None:
            self.k[rows, :, cache_pos] = k.to(self.k.dtype)
            self.v[rows, :, cache_pos] = v.to(self.v.dtype)
            return
        for codes, scales, new in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            new = new.float()
            scale = new.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127.0  # (B, T, K, 1)
            codes[rows, :, cache_pos] = torch.round(new / scale).clamp(-127, 127).to(torch.int8)
            scales[rows, :, cache_pos] = scale

    def update(self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, K, Dh) at cache_pos (B, T); return the cache's first `span` slots (default: all)
        (B, K, span, Dh) in k's dtype (converted, or dequantized, over that span only)."""
        self.write(cache_pos, k, v)
        keys, values = self.k[:, :, :span], self.v[:, :, :span]
        if self.k_scale is None:
            return keys.to(k.dtype), values.to(v.dtype)
        return ((keys.float() * self.k_scale[:, :, :span]).to(k.dtype),  # (B, K, span, Dh)
                (values.float() * self.v_scale[:, :, :span]).to(v.dtype))


def _local_rows(linear: nn.Module) -> int:
    """Output rows of a projection as this process holds them: a tensor-parallel shard's local rows (a
    DTensor's `.shape` is the global one), or `out_features` for layers without a float weight."""
    weight = getattr(linear, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]
    return linear.out_features


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): H query heads share K key/value heads.

    After a load-time fusion (`llama3.inference.fast.fuse_projections`) wq/wk/wv are one `wqkv` whose
    output is [q | k | v]; the forward takes whichever is present. H and K are read from the projection
    (and the cache), so a tensor-parallel shard runs its local heads with the same code."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        bias = args.attention_bias  # False for Llama 3; some derivatives have them
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=bias)
        self.wqkv: nn.Module | None = None
        self.kv_cache: KVCache | None = None
        # An eager decode step's attention over the cache, when the inference layer installs one: a function
        # (q (B, 1, H, Dh), cache, mask (B, 1, 1, S)) -> (B, 1, H·Dh) that reads the cache as stored (the
        # CPU kernel, llama3.inference.attention). Without it, `_attend_one_query` below.
        self.cached_attention: Callable | None = None

    _rope = staticmethod(apply_rope)  # a training subclass swaps in a fused kernel (llama3.train.fused)

    def local_kv_heads(self) -> int:
        """K as this process holds it (a tensor-parallel shard holds K / tp)."""
        if self.wqkv is None:
            return _local_rows(self.wk) // self.head_dim
        group = self.n_heads // self.n_kv_heads  # q heads per kv head, unchanged by sharding
        return _local_rows(self.wqkv) // (self.head_dim * (group + 2))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q (B, T, H, Dh), k and v (B, T, K, Dh)."""
        B, T, _ = x.shape
        Dh = self.head_dim
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            qkv = self.wqkv(x)  # (B, T, (H + 2K)·Dh)
            kv_width = qkv.shape[-1] // (self.n_heads // self.n_kv_heads + 2)  # K·Dh
            q, k, v = qkv.split([qkv.shape[-1] - 2 * kv_width, kv_width, kv_width], dim=-1)
        return q.view(B, T, -1, Dh), k.view(B, T, -1, Dh), v.view(B, T, -1, Dh)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._project(x)
        q, k = self._rope(q, rope), self._rope(k, rope)
        if (T == 1 and self.cached_attention is not None and self.kv_cache is not None and mask is not None
                and mask.dim() == 4 and not torch.compiler.is_compiling()):
            self.kv_cache.write(cache_pos, k, v)
            return self.wo(self.cached_attention(q, self.kv_cache, mask))
        if self.kv_cache is not None:
            assert cache_pos is not None, "a model with a KV cache needs cache positions"
            # The mask covers the filled span only; no mask: a fresh prompt, causal over the first T slots
            # (Transformer.forward leaves it out only then).
            span = T if mask is None else mask.shape[-1]
            keys, values = self.kv_cache.update(cache_pos, k, v, span)  # (B, K, span, Dh)
        else:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, T, Dh)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        if T == 1 and mask is not None and mask.dim() == 4:
            out = _attend_one_query(q, keys, values, mask)
        else:
            out = self._attend(q, keys, values, mask)
        return self.wo(out)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return _attend_sdpa(q, keys, values, mask)  # a training subclass runs SDPA's grouped heads (train.fused)


def _attend_one_query(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Decode: one new token per row. Query heads h = j·n_rep + r share kv head j (Meta's repeat_kv order),
    so grouping q as (B, K, n_rep, Dh) lets each kv head serve its group without copying the cache.
    q (B, 1, H, Dh), keys/values (B, K, S, Dh), mask broadcastable to (B, 1, 1, S) -> (B, 1, H·Dh)."""
    B, K, S, Dh = keys.shape
    q = q.view(B, K, -1, Dh)  # (B, K, n_rep, Dh)
    # Written as multiply-and-sum (fp32 accumulation) rather than matmul: compiled, each becomes one fused
    # loop over the cache, where a batched matmul of these tiny shapes costs a library call per layer
    # (measured: 36-130 us each, 9% of a ~100M model's decode step).
    scores = (q.unsqueeze(3).float() * keys.unsqueeze(2).float()).sum(-1) * (1.0 / math.sqrt(Dh))  # (B, K, n_rep, S)
    scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S) broadcasts over K and n_rep
    probs = scores.softmax(-1)
    out = (probs.unsqueeze(-1) * values.unsqueeze(2).float()).sum(3).to(values.dtype)  # (B, K, n_rep, Dh)
    return out.reshape(B, 1, -1)  # (B, 1, H·Dh)


def _attend_sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Prompts and training: q (B, T, H, Dh), keys/values (B, K, S, Dh) -> (B, T, H·Dh) through SDPA."""
    B, T = q.shape[:2]
    q = q.transpose(1, 2)  # (B, H, T, Dh)
    if mask is None and T > 1 and q.device.type == "cpu" and torch.is_grad_enabled():
        # Training on the CPU: torch's flash attention in fp32 (its bf16 backward converts as it goes: 24.5
        # against 17.8 ms at the demo shape, head dim 32, on Zen 5) with the grouped heads read in place
        # (no repeated copies of k and v, nor the sums of their gradients), whatever the autocast asks.
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), is_causal=True,
                                                 enable_gqa=True)
        return out.to(q.dtype).transpose(1, 2).reshape(B, T, -1)
    # Grouped heads: repeat each kv head for its group of query heads (Meta's repeat_kv).
    n_rep = q.shape[1] // keys.shape[1]
    if n_rep > 1:
        keys = keys.repeat_interleave(n_rep, dim=1)
        values = values.repeat_interleave(n_rep, dim=1)
    if mask is None:
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H·Dh)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x). After a load-time fusion w1/w3 are one `w13` whose
    output is [w1 x | w3 x] (one read of x, one product); the forward takes whichever is present."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w13: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = self.w13(x).chunk(2, dim=-1)  # (..., F) each
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache_pos)
        return h + self.feed_forward(self.ffn_norm(h))


@contextlib.contextmanager
def _initializers_skipped():
    """nn.Linear and nn.Embedding run their initializers in __init__; make those no-ops for a while."""
    names = ("uniform_", "normal_", "kaiming_uniform_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


class Transformer(nn.Module):
    """Llama 3. Build it anywhere, on the meta device for big shapes, then call `init_weights()` (training
    from scratch) or load a state dict and call `init_buffers()`.

        with torch.device("meta"):
            model = Transformer(preset("llama3-8b"))   # allocates nothing
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not saved: recomputed from args (init_buffers), so checkpoints hold weights only. Built on the meta
        # device it is a placeholder of the right shape: computing it there would run torch's Python reference
        # ops, whose first use imports ~800 modules (1.5-2 s of every load, measured).
        if torch.empty(0).is_meta:
            rope = torch.empty(args.max_seq_len, args.head_dim // 2, 2)
        else:
            rope = precompute_rope(args, args.max_seq_len)
        self.register_buffer("rope_cache", rope, persistent=False)

    @classmethod
    def on_meta(cls, args: ModelArgs) -> Transformer:
        """The model on the meta device with no initializer run (its tensors have shapes, no values): the
        first step of every load, which then assigns the stored weights and calls `init_buffers()`. Torch's
        initializers on meta tensors go through the same Python reference ops as above."""
        with torch.device("meta"), _initializers_skipped():
            return cls(args)

    # ----- initialization -----
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE table on `device` (default: where the weights are), and restore tied
        embeddings: `to_empty()` after meta-device construction gives each module its own new tensor."""
        if self.args.tie_word_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight
        if device is None:
            device = self.tok_embeddings.weight.device
        self.rope_cache = precompute_rope(self.args, self.args.max_seq_len, device=device)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Initialize every parameter for training from scratch (the torchtitan scheme):

        - token embeddings ~ N(0, 1) (untied) or N(0, 1/dim) (tied, since they also produce logits);
        - wq, wk, wv, w1 ~ truncated N(0, 0.02);
        - wo, w2, w3 ~ truncated N(0, 0.02 / sqrt(2·(layer_id+1))), shrinking deeper residual writes;
        - output ~ truncated N(0, 1/dim), cut at ±3σ, so initial logits have unit scale;
        - norm weights = 1.
        """
        self.init_buffers(buffer_device)
        dim = self.args.dim
        if self.args.tie_word_embeddings:
            nn.init.normal_(self.tok_embeddings.weight, std=dim ** -0.5)
        else:
            nn.init.normal_(self.tok_embeddings.weight, std=1.0)
            std = dim ** -0.5
            nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)
        for layer in self.layers:
            depth_std = 0.02 / math.sqrt(2 * (layer.layer_id + 1))
            attn, ffn = layer.attention, layer.feed_forward
            for lin in (attn.wq, attn.wk, attn.wv, ffn.w1):
                nn.init.trunc_normal_(lin.weight, std=0.02)
            for lin in (attn.wo, ffn.w2, ffn.w3):
                nn.init.trunc_normal_(lin.weight, std=depth_std)
            for lin in (attn.wq, attn.wk, attn.wv, attn.wo, ffn.w1, ffn.w2, ffn.w3):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()

    # ----- KV cache -----
    def setup_caches(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None, *, quantize: str | None = None) -> None:
        """Attach a KV cache of `batch_size` rows × `max_seq_len` positions (default: the model's context) to
        every layer, sized for the kv heads each layer holds (fused, quantized or tensor-parallel layers
        alike). `quantize="int8"` keeps int8 entries with per-position scales (see `KVCache`). Callers that
        do not know the final length start small and `grow_caches` as the sequence gets longer."""
        max_seq_len = max_seq_len or self.args.max_seq_len
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} exceeds the model's context ({self.args.max_seq_len})")
        weight = self.tok_embeddings.weight  # quantized embeddings keep an empty one for dtype and device
        dtype = dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
        device = device or (weight.to_local() if hasattr(weight, "to_local") else weight).device
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache.allocate(batch_size, attn.local_kv_heads(), max_seq_len, attn.head_dim,
                                             dtype, device, quantize=quantize)

    def grow_caches(self, length: int) -> None:
        """Make every layer's cache hold `length` positions (at most the model's context), keeping its entries."""
        if length > self.args.max_seq_len:
            raise ValueError(f"cache length {length} exceeds the model's context ({self.args.max_seq_len})")
        for layer in self.layers:
            layer.attention.kv_cache.grow(length)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    @property
    def cache_len(self) -> int | None:
        cache = self.layers[0].attention.kv_cache if len(self.layers) else None
        return None if cache is None else cache.length

    def cache_bytes(self) -> int:
        """Bytes held by the KV caches of all layers (0 without caches)."""
        return sum(layer.attention.kv_cache.nbytes() for layer in self.layers if layer.attention.kv_cache is not None)

    # ----- forward -----
    def forward(self, tokens: torch.Tensor, *, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V) in fp32, or the final normed hidden states (B, T, D) when
        `return_hidden` (for chunked losses and last-position-only logits; see `logits`).

        input_pos: (T,) or (B, T) positions of the tokens; defaults to 0..T-1. With a KV cache they are
            also the cache slots written, and unless `mask` is given each token attends to cache slots
            0..its position (so rows of a batch may be at different lengths).
        mask: bool, broadcastable to (B, 1, T, S), True = may attend; overrides the default. With a cache,
            S may be shorter than the cache: the tokens attend to its first S slots only.
        document_ids: (B, T) for packed training sequences; attention stays within a document.
        """
        B, T = tokens.shape
        cache_len = self.cache_len
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        if input_pos.dim() == 1:
            input_pos = input_pos.unsqueeze(0).expand(B, T)  # (B, T)
        rope = self.rope_cache[input_pos]  # (B, T, Dh/2, 2)
        if document_ids is not None:
            if cache_len is not None:
                raise ValueError("document_ids is for training without a KV cache")
            mask = document_causal_mask(document_ids)
        if cache_len is not None and mask is None and not self._fresh_prompt(input_pos):
            span = cache_len
            if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
                # Slots past the furthest position are masked for every token: attend over the filled span
                # only (a 16-token prompt in a 272-slot cache). Compiled steps keep one shape per cache.
                span = min(cache_len, int(input_pos.max()) + 1)
            slots = torch.arange(span, device=tokens.device)
            mask = (slots.view(1, 1, 1, -1) <= input_pos.view(B, 1, T, 1))  # (B, 1, T, S)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        cache_pos = input_pos if cache_len is not None else None
        for layer in self.layers:
            h = layer(h, rope, mask, cache_pos)
        h = self.norm(h)
        return h if return_hidden else self.logits(h)

    @staticmethod
    def _fresh_prompt(input_pos: torch.Tensor) -> bool:
        """Whether every row holds positions 0..T-1 (T > 1): a prompt into an empty cache, whose attention is
        plain causal over the first T slots. Left without a mask, the layers run it as such (SDPA's causal
        kernel skips the blocks above the diagonal that an explicit mask would make it compute: 2x faster
        at 2K tokens on the CPU)."""
        T = input_pos.shape[-1]
        if T < 2 or torch.compiler.is_compiling():
            return False
        return bool(torch.equal(input_pos, torch.arange(T, device=input_pos.device).expand_as(input_pos)))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output projection of normed hidden states, in fp32 as Meta's reference returns them."""
        return self.output(h).float()

    # ----- accounting -----
    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Unique parameters (tied embeddings counted once); works on the meta device."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if not include_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (6·N + attention), for MFU; see ModelArgs.flops_per_token."""
        return self.args.flops_per_token(seq_len)
