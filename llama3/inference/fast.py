"""Load-time transforms that make decoding fast, applied from outside the model file.

- `fuse_projections(model)`: each layer's wq/wk/wv become one `wqkv` and w1/w3 one `w13`, so a decode
  step reads the activations once and launches one matrix-vector product instead of three (or two).
  The fused modules keep the block's call signature, so `Transformer.forward` runs them unchanged.
- `FusedAttention` also has a decode path for a single query token: plain matmuls over the cache with the
  query heads grouped by their kv head (no `repeat_interleave` copy of the cache, no SDPA dispatch), which
  compiles into a tight kernel on CPU. Prompts (T > 1) still go through SDPA.
- `setup_caches(model, batch_size, max_seq_len)`: attaches the static KV cache to original and fused
  layers alike (the model's own `setup_caches` reads `wk`, which fusion removes).
- `to_huge_pages(model)`: moves the weights into memory backed by 2 MiB pages. A decode step streams every
  weight once, and with 4 KiB pages a 1B model's 2.5 GB crosses 600K pages per token: the page-table walks
  cost 15-20% of the step here (BENCHMARKS.md).
- `compile_options()`: the inductor settings measured fastest for CPU decode: freezing
  (weights become constants the compiler can prepack) and max-autotune, without CUDA graphs.

All of it is plain PyTorch; without `torch.compile` it is the eager fallback.
"""

from __future__ import annotations

import contextlib
import math
import mmap

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Attention, FeedForward, KVCache, Transformer, apply_rope

__all__ = [
    "FusedAttention",
    "FusedFeedForward",
    "compile_options",
    "fuse_projections",
    "is_fused",
    "optimize_for_inference",
    "setup_caches",
    "to_huge_pages",
]


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One linear layer computing `parts` side by side: weights (and biases, where a derivative has them)
    stacked along the output dimension."""
    weight = torch.cat([p.weight for p in parts], dim=0)  # (sum of outputs, D)
    has_bias = parts[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]).detach(), requires_grad=False)
    return fused


class FusedAttention(nn.Module):
    """Grouped-query attention with one fused q/k/v projection; a drop-in for `model.Attention`."""

    def __init__(self, wqkv: nn.Module, wo: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.wqkv, self.wo = wqkv, wo
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.kv_cache: KVCache | None = None

    @classmethod
    def from_attention(cls, attn: Attention) -> FusedAttention:
        n_heads = attn.wq.weight.shape[0] // attn.head_dim
        n_kv_heads = attn.wk.weight.shape[0] // attn.head_dim
        wqkv = _fused_linear([attn.wq, attn.wk, attn.wv])  # ((H+2K)·Dh, D)
        return cls(wqkv, attn.wo, n_heads, n_kv_heads, attn.head_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * Dh, K * Dh, K * Dh], dim=-1)
        q = apply_rope(q.view(B, T, H, Dh), rope)
        k = apply_rope(k.view(B, T, K, Dh), rope)
        v = v.view(B, T, K, Dh)
        if self.kv_cache is not None:
            assert cache_pos is not None, "a model with a KV cache needs cache positions"
            keys, values = self.kv_cache.update(cache_pos, k, v)  # (B, K, S, Dh)
        else:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, T, Dh)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        if T == 1 and mask is not None:
            out = self._attend_one_query(q, keys, values, mask)
        else:
            out = self._attend_sdpa(q, keys, values, mask)
        return self.wo(out)

    def _attend_one_query(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
        """One new token per row: query heads h = j·n_rep + r share kv head j (Meta's repeat_kv order), so
        grouping q as (B, K, n_rep, Dh) lets each kv head serve its group in one matmul."""
        B, K, S, Dh = keys.shape
        q = q.view(B, K, -1, Dh)  # (B, 1, H, Dh) -> (B, K, n_rep, Dh)
        # Written as multiply-and-sum (fp32 accumulation) rather than matmul: compiled, each becomes one
        # fused loop over the cache, where a batched matmul of these tiny shapes costs a library call per
        # layer (measured: 36-130 us each, 9% of a ~100M model's decode step).
        scores = (q.unsqueeze(3).float() * keys.unsqueeze(2).float()).sum(-1) * (1.0 / math.sqrt(Dh))  # (B, K, n_rep, S)
        scores = scores.masked_fill(~mask.view(B, 1, 1, S), float("-inf"))
        probs = scores.softmax(-1)
        out = (probs.unsqueeze(-1) * values.unsqueeze(2).float()).sum(3).to(values.dtype)  # (B, K, n_rep, Dh)
        return out.reshape(B, 1, -1)  # (B, 1, H·Dh)

    def _attend_sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
        B, T = q.shape[:2]
        q = q.transpose(1, 2)  # (B, H, T, Dh)
        n_rep = q.shape[1] // keys.shape[1]
        if n_rep > 1:
            keys = keys.repeat_interleave(n_rep, dim=1)
            values = values.repeat_interleave(n_rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H·Dh)


class FusedFeedForward(nn.Module):
    """SwiGLU with w1 and w3 in one projection `w13`: w2(silu(a) * b) where [a, b] = w13 x."""

    def __init__(self, w13: nn.Module, w2: nn.Module, hidden_dim: int):
        super().__init__()
        self.w13, self.w2, self.hidden_dim = w13, w2, hidden_dim

    @classmethod
    def from_feed_forward(cls, ffn: FeedForward) -> FusedFeedForward:
        w13 = _fused_linear([ffn.w1, ffn.w3])  # (2·F, D)
        return cls(w13, ffn.w2, ffn.w1.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split([self.hidden_dim, self.hidden_dim], dim=-1)
        return self.w2(F.silu(gate) * up)


def is_fused(model: Transformer) -> bool:
    return len(model.layers) > 0 and isinstance(model.layers[0].attention, FusedAttention)


@torch.no_grad()
def fuse_projections(model: Transformer) -> Transformer:
    """Replace every layer's attention and feed-forward by fused versions, in place (the unfused weights are
    released as each layer is converted, so peak memory grows by one layer). Returns the model.

    The numbers are unchanged: a fused matmul computes the same dot products as the separate ones.
    Call it before quantizing, and only for inference: the fused weights no longer match checkpoint names.
    """
    if is_fused(model) or not _all_linear(model):
        return model  # quantized GGUF layers (ggml blocks, each tensor its own type) stay as they are
    for layer in model.layers:
        if layer.attention.kv_cache is not None:
            raise ValueError("fuse_projections must run before caches are set up; call model.clear_caches()")
        layer.attention = FusedAttention.from_attention(layer.attention)
        layer.feed_forward = FusedFeedForward.from_feed_forward(layer.feed_forward)
    return model


def _all_linear(model: Transformer) -> bool:
    return all(type(m) is nn.Linear for layer in model.layers for m in
               (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.feed_forward.w1, layer.feed_forward.w3))


def _kv_heads(attn: nn.Module) -> int:
    if isinstance(attn, FusedAttention):
        return attn.n_kv_heads
    return attn.wk.out_features // attn.head_dim  # local heads under tensor parallel


def _cache_dtype(model: Transformer) -> torch.dtype:
    dtype = model.tok_embeddings.weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


def setup_caches(model: Transformer, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
    """Attach a static KV cache of `batch_size` rows × `max_seq_len` slots to every layer (fused or not)."""
    if max_seq_len > model.args.max_seq_len:
        raise ValueError(f"cache length {max_seq_len} exceeds the model's context length ({model.args.max_seq_len})")
    dtype = dtype or _cache_dtype(model)
    device = device or model.tok_embeddings.weight.device
    for layer in model.layers:
        attn = layer.attention
        attn.kv_cache = KVCache(batch_size, _kv_heads(attn), max_seq_len, attn.head_dim, dtype, device)


def compile_options(dtype: torch.dtype = torch.bfloat16) -> dict:
    """Inductor options for the decode step on CPU. Half precision: freezing (weights become constants that
    oneDNN prepacks) + max-autotune. fp32: neither; measured here, a frozen fp32 matrix-vector product ran at
    half the speed of the unfrozen one (8.5 vs 16.9 GB/s for 2048 x 8192), so fp32 keeps the MKL kernels."""
    if dtype == torch.float32:
        return {}
    return {"freezing": True, "max_autotune": True, "coordinate_descent_tuning": True,
            "max_autotune_report_choices_stats": False}


@contextlib.contextmanager
def quiet_autotune():
    """Inductor prints a table per autotuned matmul to stderr; a user waiting for a reply needs none of it."""
    from torch._inductor import select_algorithm

    previous = select_algorithm.PRINT_AUTOTUNE
    select_algorithm.PRINT_AUTOTUNE = False
    try:
        yield
    finally:
        select_algorithm.PRINT_AUTOTUNE = previous


_HUGE_PAGE = 2 * 2**20
_HUGE_PAGE_MIN_BYTES = 2 * 2**20  # smaller tensors gain nothing from their own mapping


def _huge_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` in a fresh anonymous mapping advised for transparent huge pages. The mapping
    lives as long as the tensor (torch.frombuffer keeps a reference to it)."""
    nbytes = tensor.numel() * tensor.element_size()
    length = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
    area = mmap.mmap(-1, length + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(area, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % _HUGE_PAGE  # page-aligned already; align to the huge page
    area.madvise(mmap.MADV_HUGEPAGE, offset, length)
    out = raw[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
    out.copy_(tensor)
    return out


@torch.no_grad()
def to_huge_pages(model: nn.Module) -> int:
    """Move every CPU parameter and buffer of at least 2 MiB into memory advised for transparent huge pages,
    in place; tensors that share storage (a tied output projection) stay shared. Returns the bytes moved;
    0 where the platform has no MADV_HUGEPAGE (the model is left as it was)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    moved: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    total = 0
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if (tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous()
                    or tensor.numel() * tensor.element_size() < _HUGE_PAGE_MIN_BYTES):
                continue
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
            if key not in moved:
                moved[key] = _huge_page_copy(tensor)
                total += tensor.numel() * tensor.element_size()
            if isinstance(tensor, nn.Parameter):
                tensor.data = moved[key]
            else:
                setattr(module, name, moved[key])
    return total


@torch.no_grad()
def optimize_for_inference(model: Transformer, *, dtype: torch.dtype | None = None, fuse: bool = True,
                           quantize: str | None = None, group_size: int = 32, kernels: bool = True,
                           huge_pages: bool = True) -> Transformer:
    """The load-time pipeline, in place: cast to `dtype`, fuse projections, then weight-only quantize
    (`"int8"` or `"int4"`, see `quantize.py`), or for a bf16/fp32 CPU model put its linear layers on the
    project's matrix-vector kernels (`gemv.py`; `kernels=False` keeps torch's); finally, on the CPU, move
    the weights to huge pages (`to_huge_pages`). Returns the model in eval mode without gradients."""
    from .ggml_quant import has_ggml_layers

    if quantize is not None and has_ggml_layers(model):
        raise ValueError(f"this model's weights are already quantized (a quantized GGUF file); drop --quantize "
                         f"{quantize}, or load a float model to quantize it")
    model.clear_caches()
    if dtype is not None:
        model.to(dtype)
        model.init_buffers()  # keep the RoPE table in fp32 and the tied embedding tied
    if fuse:
        fuse_projections(model)
    if quantize is not None:
        from .quantize import quantize_model

        quantize_model(model, quantize, group_size=group_size)
    elif kernels:
        from .gemv import use_gemv_kernels

        use_gemv_kernels(model)
    if huge_pages and model.tok_embeddings.weight.device.type == "cpu":
        to_huge_pages(model)
    return model.eval().requires_grad_(False)
