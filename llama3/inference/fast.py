"""Load-time transforms that make decoding fast, applied from outside the model file.

- `fuse_projections(model)`: each layer's wq/wk/wv become one `wqkv` and w1/w3 one `w13`, so a decode
  step reads the activations once and launches one matrix-vector product instead of three (or two).
  A state transform: the model's own Attention/FeedForward run with `wqkv`/`w13` when they hold them.
  Quantized GGUF layers (ggml blocks, each tensor its own type) are grouped instead of concatenated
  (`GGMLGroupLinear`): one call rounds x once and multiplies it with the weights where they lie.
- `to_huge_pages(model)`: moves the weights into memory backed by 2 MiB pages. A decode step streams every
  weight once, and with 4 KiB pages a 1B model's 2.5 GB crosses 600K pages per token: the page-table walks
  cost 15-20% of the step here (BENCHMARKS.md).
- `compile_options()`: the inductor settings measured fastest for CPU decode: freezing
  (weights become constants the compiler can prepack) and max-autotune, without CUDA graphs.

All of it is plain PyTorch; without `torch.compile` it is the eager fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import mmap
import sys

import torch
from torch import nn

from ..model import Transformer
from .mapped import release_file_pages

__all__ = [
    "compile_options",
    "fuse_projections",
    "huge_page_empty",
    "is_fused",
    "optimize_for_inference",
    "to_huge_pages",
]


def _fused_linear(parts: list[nn.Linear], allocate=torch.empty) -> nn.Linear:
    """One linear layer computing `parts` side by side: weights (and biases, where a derivative has them)
    stacked along the output dimension, written into `allocate(shape, dtype)`. The parts' pages that came
    from a memory-mapped checkpoint are dropped from our resident set once copied (`release_file_pages`)."""
    first = parts[0].weight
    weight = allocate((sum(p.weight.shape[0] for p in parts), first.shape[1]), dtype=first.dtype)  # (sum of outputs, D)
    torch.cat([p.weight for p in parts], dim=0, out=weight)
    for part in parts:
        release_file_pages(part.weight)
    has_bias = parts[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]).detach(), requires_grad=False)
    return fused


def is_fused(model: Transformer) -> bool:
    return len(model.layers) > 0 and model.layers[0].attention.wqkv is not None


@torch.no_grad()
def fuse_projections(model: Transformer, *, allocate=None, after_layer=None, group: bool = False) -> Transformer:
    """Fuse every layer's wq/wk/wv into one `wqkv` and w1/w3 into one `w13`, in place: a state transform
    (the model's Attention and FeedForward run whichever projections they hold). The unfused weights are
    released as each layer is converted (memory-mapped ones leave the resident set too), so peak memory
    grows by one layer. Returns the model.

    allocate(shape, dtype): where the fused weights are written (default `torch.empty`; `huge_page_empty`
    puts them straight into huge pages). after_layer(layer): called once each layer is fused, so a
    quantizer can convert it before the next layer's fused copies exist. group: 16-bit CPU weights are
    grouped where they lie (`gemv.GemvGroupLinear`, no copy at all) instead of concatenated, where the
    kernels can (`gemv.can_group`); for decoding only, the group has no single weight to quantize.

    The numbers are unchanged: a fused matmul computes the same dot products as the separate ones.
    Call it before quantizing, and only for inference: the fused weights no longer match checkpoint names.
    """
    if is_fused(model):
        return model
    if _all_ggml(model):
        from .ggml_quant import GGMLGroupLinear

        # grouped over the same block bytes (views of the file's memory map): a concatenation would copy
        # them and double resident memory
        combine = GGMLGroupLinear
    elif group and _all_linear(model) and _can_group_all(model):
        from .gemv import GemvGroupLinear

        # the projections' own weights side by side, uncopied: with a memory-mapped checkpoint the start
        # costs nothing here, and resident memory stays the file's pages
        combine = _grouped_linear(GemvGroupLinear)
    elif _all_linear(model):
        combine = functools.partial(_fused_linear, allocate=allocate or torch.empty)
    else:
        return model
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        if attn.kv_cache is not None:
            raise ValueError("fuse_projections must run before caches are set up; call model.clear_caches()")
        attn.wqkv = combine([attn.wq, attn.wk, attn.wv])  # ((H+2K)·Dh, D)
        del attn.wq, attn.wk, attn.wv
        ffn.w13 = combine([ffn.w1, ffn.w3])  # (2·F, D)
        del ffn.w1, ffn.w3
        if after_layer is not None:
            after_layer(layer)
    return model


def _projections(layer) -> tuple[nn.Module, ...]:
    attn, ffn = layer.attention, layer.feed_forward
    return attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3


def _all_ggml(model: Transformer) -> bool:
    from .ggml_quant import GGMLLinear

    return all(type(m) is GGMLLinear for layer in model.layers for m in _projections(layer))


def _is_grouped(model: Transformer) -> bool:
    from .gemv import GemvGroupLinear

    return is_fused(model) and isinstance(model.layers[0].attention.wqkv, GemvGroupLinear)


def _projection_dtype(model: Transformer) -> torch.dtype | None:
    """The dtype of the layers' projection weights (None when they hold none, e.g. quantized layers)."""
    weight = getattr(model.layers[0].attention.wq, "weight", None) if len(model.layers) else None
    return weight.dtype if isinstance(weight, torch.Tensor) else None


def _bf16_activations(model: Transformer) -> None:
    """An f16 model (a GGUF f16 file, as stored) keeps its projection weights in f16, where they lie: the
    kernels widen them exactly. Everything else (the embedding table, the norms) becomes bf16, so the
    activations and the KV cache run in bf16 like a bf16 model's: f16 activations would overflow past
    65504, and torch's f16 CPU operators are slow. A tied output projection follows the embedding."""
    projections = {id(m.weight) for layer in model.layers
                   for m in (*_projections(layer), layer.attention.wo, layer.feed_forward.w2)}
    if model.output.weight is not model.tok_embeddings.weight:
        projections.add(id(model.output.weight))
    for param in model.parameters():
        if param.dtype == torch.float16 and id(param) not in projections:
            source = param.data
            param.data = source.to(torch.bfloat16)
            release_file_pages(source)
    model.init_buffers()


def _can_group_all(model: Transformer) -> bool:
    from .gemv import can_group

    return all(all(m.bias is None for m in part) and can_group([m.weight for m in part])
               for layer in model.layers for part in (_projections(layer)[:3], _projections(layer)[3:]))


def _grouped_linear(cls):
    """A combine step for `fuse_projections`: `cls` over the parts' weights, as they are."""
    return lambda parts: cls([p.weight for p in parts])


def _all_linear(model: Transformer) -> bool:
    return all(type(m) is nn.Linear for layer in model.layers for m in
               (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.feed_forward.w1, layer.feed_forward.w3))


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


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor in a fresh anonymous mapping advised for transparent huge pages (a plain
    `torch.empty` where the platform has no MADV_HUGEPAGE or the tensor is under 2 MiB). The mapping lives
    as long as the tensor (torch.frombuffer keeps a reference to it)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not hasattr(mmap, "MADV_HUGEPAGE") or nbytes < _HUGE_PAGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    length = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
    area = mmap.mmap(-1, length + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(area, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % _HUGE_PAGE  # page-aligned already; align to the huge page
    area.madvise(mmap.MADV_HUGEPAGE, offset, length)
    return raw[offset:offset + nbytes].view(dtype).view(shape)


def _huge_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` in huge pages (`huge_page_empty`); the source's memory-mapped pages, if any, leave
    the resident set once copied."""
    out = huge_page_empty(tuple(tensor.shape), tensor.dtype)
    source, target = tensor.reshape(-1), out.view(-1)
    step = _COPY_CHUNK_BYTES // tensor.element_size()
    for i in range(0, source.numel(), step):  # by chunks, so a big tensor (the embedding) never sits twice
        target[i:i + step].copy_(source[i:i + step])
        release_file_pages(source[i:i + step])
    return out


_COPY_CHUNK_BYTES = 64 * 2**20


@torch.no_grad()
def to_huge_pages(model: nn.Module, *, skip: frozenset[int] = frozenset()) -> int:
    """Move every CPU parameter and buffer of at least 2 MiB into memory advised for transparent huge pages,
    in place; tensors that share storage (a tied output projection) stay shared, and memory-mapped sources
    leave the resident set as they are copied, so the move never doubles resident memory. `skip`: data
    pointers of tensors already there (fused into huge pages). Returns the bytes moved; 0 where the
    platform has no MADV_HUGEPAGE (the model is left as it was)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    moved: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    total = 0
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if (tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous()
                    or tensor.numel() * tensor.element_size() < _HUGE_PAGE_MIN_BYTES or tensor.data_ptr() in skip):
                continue
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
            if key not in moved:
                moved[key] = _huge_page_copy(tensor)
                total += tensor.numel() * tensor.element_size()
                # A tied output projection is the embedding's own Parameter, met again after its move.
                moved[(moved[key].data_ptr(), tensor.dtype, tuple(tensor.shape))] = moved[key]
            if isinstance(tensor, nn.Parameter):
                tensor.data = moved[key]
            else:
                setattr(module, name, moved[key])
    _trim_heap()
    return total


def _trim_heap() -> None:
    """Hand the heap's free pages back to the system: the copies just replaced (tens of MB each, from
    malloc's heap once its mmap threshold has grown) would otherwise stay counted in our resident set."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL(None).malloc_trim(0)


@torch.no_grad()
def optimize_for_inference(model: Transformer, *, dtype: torch.dtype | None = None, fuse: bool = True,
                           quantize: str | None = None, group_size: int = 32, kernels: bool = True,
                           huge_pages: bool = True, repack: bool = True) -> Transformer:
    """The load-time pipeline, in place: cast to `dtype`, fuse projections, then weight-only quantize
    (`"int8"` or `"int4"`, see `quantize.py`), or for a bf16/fp32 CPU model put its linear layers on the
    project's matrix-vector kernels (`gemv.py`; `kernels=False` keeps torch's) and repack a quantized
    GGUF model's block-type matrices for its products (`ggml_quant.repack_for_inference`;
    `repack=False` leaves the layout the model has: `llama3.load` already repacks, and
    `checkpoint.gguf.load_gguf(path, repack=False)` keeps the file's); finally, on the CPU, move the weights to huge pages
    (`to_huge_pages`; `huge_pages=False` skips it). 16-bit weights on the kernels are grouped where they lie
    instead of fused, and then stay there: no copy, no move to huge pages (an f16 model's embedding and
    norms become bf16, see `_bf16_activations`). Returns the model in eval mode without gradients."""
    from .ggml_quant import has_ggml_layers

    if quantize is not None and has_ggml_layers(model):
        raise ValueError(f"this model's weights are already quantized (a quantized GGUF file); drop --quantize "
                         f"{quantize}, or load a float model to quantize it")
    model.clear_caches()
    if dtype is not None:
        model.to(dtype)
        model.init_buffers()  # keep the RoPE table in fp32 and the tied embedding tied
    on_cpu = model.tok_embeddings.weight.device.type == "cpu"
    if quantize is None and kernels and on_cpu and _projection_dtype(model) == torch.float16:
        _bf16_activations(model)
    in_huge_pages: frozenset[int] = frozenset()
    if quantize is not None:
        from .quantize import quantize_model

        # Layer by layer (fused, then quantized at once), so no more than one layer exists in float copies.
        if fuse:
            fuse_projections(model, after_layer=lambda layer: quantize_model(layer, quantize, group_size=group_size))
        quantize_model(model, quantize, group_size=group_size)
    else:
        if fuse and not is_fused(model):
            # Grouped where the kernels can (no copy), else fused straight into huge pages: one copy of
            # those weights, never two.
            fuse_projections(model, allocate=huge_page_empty if huge_pages and on_cpu else None,
                             group=kernels and on_cpu)
            # Grouped, the weights stay where they were loaded (a checkpoint's memory map): no move to
            # huge pages either. Measured at the 1B shape on Zen 3 (BENCHMARKS.md "Zero-copy start"), decode
            # from the mapped file's pages ran as fast as from huge pages, and the copy cost 12-18 s of start.
            huge_pages = huge_pages and not _is_grouped(model)
            if huge_pages and on_cpu and is_fused(model):
                # (a quantized GGUF model's groups hold no float weight: their bytes stay on the file's pages)
                fused = (m for layer in model.layers for m in (layer.attention.wqkv, layer.feed_forward.w13))
                in_huge_pages = frozenset(m.weight.data_ptr() for m in fused if isinstance(m, nn.Linear))
        if kernels:
            from .gemv import use_gemv_kernels

            use_gemv_kernels(model)
            if repack and has_ggml_layers(model):  # rewritten for the kernels' products, matrix by matrix
                from .ggml_quant import repack_for_inference

                # Into ordinary pages: huge pages made decode ~10% faster but tripled the load's cost (1B Q4_0,
                # quiet Zen 3: 1.1-1.3 s -> 3.9 s, the kernel compacting memory on first touch; ~15 s at 8B).
                repack_for_inference(model)
    if quantize is not None:
        # Quantized, the output projection has its own weights and the embedding only serves lookups of a
        # row per token: better left mapped (resident as read) than copied whole.
        in_huge_pages |= {model.tok_embeddings.weight.data_ptr()}
    if huge_pages and on_cpu:
        to_huge_pages(model, skip=in_huge_pages)
    return model.eval().requires_grad_(False)
