"""Decode-time linear layers on the hand-written CPU kernels (`llama3/kernels/gemv.cpp`).

A decode step multiplies a few rows of activations (one per sequence in the batch) by every weight matrix,
so its speed is the speed at which the weights stream from memory. `GemvLinear` sends the rows of a decode
step to `llama3::gemv_bf16` or `llama3::gemv_f32` (measured 1.4-3x torch's linear at one row on this
project's CPU, most on the short rows of a small model's output projection; BENCHMARKS.md) as long as those
rows of activations stay in the core's L1 cache while the weights stream past (`use_kernel`): the kernel
reads every activation row once per weight line, so rows that spill to L2 make it slower than oneDNN's
GEMM (measured: 8 rows x 2048 wide, 1.3x slower; 8 rows x 576 wide, 2x faster). The AVX-512 levels
multiply several bf16 rows in tiles of 2-4 weight rows instead (each vector of x read meets them all), which
keeps up with torch's bf16 GEMM to 8 rows of any width (`bf16_tiles`). Prompts and wide batches go to
`F.linear`, except bf16 weights on a CPU without native bf16 products (no AVX512-BF16 / AMX), where torch's bf16 GEMM widens every element on the fly and runs at a fraction of its fp32 speed (measured on Zen 3:
about 4x slower at 512 rows): there prompts of `GEMM16_ROWS` rows or more go to the project's GEMM for 16-bit
weights (`llama3::gemm16`, kernels/gemm16.cpp: blocks of the weight widened to fp32 per thread, fp32 register
tiles), and shorter ones run on the kernel, a pass over the weight per 8 rows. Where that GEMM only has its
portable C++ build, prompts of `PROMPT_ROWS` rows or more widen the weight a slice of rows at a time
(`sliced_matmul`, 16 MB, never the whole matrix) and multiply in torch's fp32 GEMM. f16 weights (a GGUF
f16 file's, as stored) go the same way with bf16 activations. The int8 counterpart lives in `quantize.Int8WeightOnlyLinear`; the quantized layers use
`sliced_matmul` for their prompts as well.

`GemvGroupLinear` holds a layer's q/k/v (or gate/up) weights side by side as they were loaded, views of the
checkpoint's memory map, and multiplies them in one kernel call (`llama3::gemv_group`): the fused decode
step without a concatenated copy, so a 16-bit model starts without copying a weight.

`use_gemv_kernels(model)` swaps them in, keeping each weight `Parameter` (so a tied output projection stays
tied); it does nothing when the kernels cannot be built (`llama3.kernels.available()`), and the eager and
compiled paths give the same numbers either way up to fp32 summation order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels

__all__ = ["GEMM16_ROWS", "PROMPT_ROWS", "GemvGroupLinear", "bf16_tiles", "gemm16_available", "gemm16_rows", "GemvLinear", "can_group", "native_bf16_products", "sliced_matmul", "sliced_matmul_parts",
           "use_gemv_kernels", "use_kernel"]

MAX_ROWS = 8  # rows the kernels take in one pass over the weights
ROW_BYTES = 16 * 1024  # activation bytes (all rows) that stay in L1 next to the streaming weights
_OPS = {torch.bfloat16: "gemv_bf16", torch.float32: "gemv_f32", torch.float16: "gemv_group"}
_GROUPED = (torch.bfloat16, torch.float16)  # weight types `llama3::gemv_group` multiplies where they lie
# Rows of activations from which a stored weight (quantized, or bf16 without native bf16 products) is widened
# slice by slice for torch's float GEMM rather than multiplied by the kernels or torch's own mixed-type
# products. Measured on Zen 3, 2 threads, 1B-shape matrices (benchmarks/ggml_prefill.py): the GEMM path
# pulls ahead between 32 and 64 rows.
PROMPT_ROWS = 64
# Float bytes of weight rows widened at a time: inside the L3 cache for the GEMM, and enough rows per call for
# its blocking. Measured on Zen 5, 2 threads, 512 rows of bf16 x: 4 MB slices of an 8B down projection (146
# rows of 14336) ran at 390 GFLOP/s, 16 MB (585 rows) at 694-766, the whole matrix at ~790.
SLICE_BYTES = 16 << 20
# Rows of activations from which 16-bit weights that torch cannot multiply natively go to the project's GEMM
# (`llama3::gemm16`, kernels/gemm16.cpp) instead of the matrix-vector kernel: below, the weights' widening
# (once per call) and the tiles' edges cost more than the kernel's passes over the weight. Measured on Zen 3,
# 2 threads, 8192 x 2048 bf16 (busy machine, times gemv / gemm16): 32 rows 0.86, 48 rows 1.10, 64 rows 1.24.
GEMM16_ROWS = 48


def native_bf16_products() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16; AMX CPUs have it too), where torch's bf16 GEMM
    runs 2-4x faster than its fp32 one; elsewhere bf16 is widened to fp32 inside the GEMM and gains nothing."""
    return "avx512bf16" in kernels.supported_isas()


def sliced_matmul(x2: torch.Tensor, out_features: int, weight_rows: Callable[[int, int], torch.Tensor],
                  dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """x2 (M, K) · Wᵀ -> (M, N) in `dtype`, W never whole in float: `weight_rows(n0, n1)` returns rows n0:n1
    of W in `dtype`, asked for `SLICE_BYTES` at a time, and each slice meets all of x2 in one GEMM, written
    straight into its columns of the result (the GEMM takes the row stride): `out`, an (M, N) view in
    `dtype` with unit column stride (a group's columns of one output, so no concatenation follows), or a
    new tensor. Returns it."""
    slice_rows = max(1, SLICE_BYTES // (x2.shape[1] * dtype.itemsize))
    x_d = x2.to(dtype)
    if out is None:
        out = torch.empty(x2.shape[0], out_features, dtype=dtype)
    for n0 in range(0, out_features, slice_rows):
        n1 = min(out_features, n0 + slice_rows)
        torch.mm(x_d, weight_rows(n0, n1).t(), out=out[:, n0:n1])
    return out


def sliced_matmul_parts(x2: torch.Tensor, parts: list[tuple[int, Callable[[int, int], torch.Tensor]]],
                        dtype: torch.dtype) -> torch.Tensor:
    """[x2 · W_0ᵀ | x2 · W_1ᵀ | ...] -> (M, ΣN) in `dtype` for weights that share their input (q/k/v,
    gate/up), each given as (N_i, weight_rows_i) as `sliced_matmul` takes them: x2 converted once, each
    weight's slices written into its own columns of one output (no concatenation)."""
    x_d = x2.to(dtype)
    y = torch.empty(x2.shape[0], sum(n for n, _ in parts), dtype=dtype)
    start = 0
    for n, weight_rows in parts:
        sliced_matmul(x_d, n, weight_rows, dtype, y[:, start:start + n])
        start += n
    return y


@functools.cache
def gemm16_available() -> bool:
    """Whether `llama3::gemm16` runs at a vector level here (the portable build is plain C++, slower than
    torch's GEMM on widened slices, which it then keeps)."""
    return kernels.available() and kernels.loaded_isa() != "portable"


def gemm16_rows(rows: int) -> bool:
    """Whether `rows` rows of activations against 16-bit weights (f16, or bf16 without native bf16
    products) go to `llama3::gemm16`."""
    return rows >= GEMM16_ROWS and gemm16_available()


@functools.cache
def bf16_tiles() -> bool:
    """Whether the loaded kernels multiply several rows of bf16 x in tiles of weight rows (the AVX-512
    levels), each vector of x meeting 2-4 weight rows: there rows of x past L1 no longer slow them down."""
    return kernels.available() and kernels.loaded_isa().startswith("avx512")


def use_kernel(rows: int, in_features: int, bytes_per_value: int, *, widened_prompts: bool = False,
               tiles: bool = False) -> bool:
    """Whether `rows` activation rows of `in_features` values (`bytes_per_value` each, as the kernel reads
    them) go to the matrix-vector kernel rather than torch's GEMM (see the module docstring).
    widened_prompts: the weight's GEMM would be the widened slices (`sliced_matmul`), which the kernel beats
    up to `PROMPT_ROWS` rows even in several passes over the weight (measured on Zen 3, 2048 x 8192 bf16:
    18 rows 38 ms against 103 widened and 110 in torch's bf16 GEMM; 64 rows 132 against 74).
    tiles: bf16 weights on the tiled kernel (`bf16_tiles`), which keeps up with torch's bf16 GEMM to a pass of
    `MAX_ROWS` rows (measured on Zen 5, 2 threads, an 8B layer's five matrices: 4 rows 15 ms against 17-25, 8
    rows 21-24 against 18-30, one row 10-12 against 16-28)."""
    if widened_prompts:
        return rows < PROMPT_ROWS
    if tiles:
        return rows <= MAX_ROWS
    return rows == 1 or (rows <= MAX_ROWS and rows * in_features * bytes_per_value <= ROW_BYTES)


class GemvLinear(nn.Module):
    """y = x Wᵀ for a bf16 or fp32 weight (N, K): decode rows through the project's kernel, prompts and
    wide batches through `F.linear`."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        if weight.dtype not in _OPS or weight.dim() != 2:
            raise ValueError(f"GemvLinear needs a 2-D bfloat16, float16 or float32 weight, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.op = _OPS[weight.dtype]
        # f16 weights (a GGUF f16 file's, kept as stored) meet activations of another type: torch has no
        # mixed-type GEMM, so their prompts always go through widened slices
        self.widen_prompts = weight.dtype == torch.float16 or (weight.dtype == torch.bfloat16
                                                               and not native_bf16_products())
        self.tiles = weight.dtype == torch.bfloat16 and bf16_tiles()  # (read here: compile cannot trace the cache)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features)
        if self.widen_prompts and x.dtype in (torch.bfloat16, torch.float32) and gemm16_rows(rows):
            return torch.ops.llama3.gemm16(x2, [self.weight]).view(*x.shape[:-1], self.out_features)
        if self.weight.dtype == torch.float16:
            if x.dtype in (torch.bfloat16, torch.float32) and use_kernel(rows, self.in_features, 4,
                                                                          widened_prompts=True):
                return torch.ops.llama3.gemv_group(x2, [self.weight]).view(*x.shape[:-1], self.out_features)
        elif x.dtype == self.weight.dtype and use_kernel(
                rows, self.in_features, self.weight.element_size(), widened_prompts=self.widen_prompts,
                tiles=self.tiles):
            y = getattr(torch.ops.llama3, self.op)(x2, self.weight)
            return y.view(*x.shape[:-1], self.out_features)
        if self.widen_prompts and (rows >= PROMPT_ROWS or x.dtype != self.weight.dtype) \
                and not torch.compiler.is_compiling():
            y = sliced_matmul(x2, self.out_features, lambda n0, n1: self.weight[n0:n1].float(), torch.float32)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype))  # a copy only where the types differ (a compiled prompt)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.op}"


def can_group(weights: list[torch.Tensor]) -> bool:
    """Whether `weights` can run side by side, uncopied, as one `GemvGroupLinear`: CPU, contiguous, one
    16-bit type and width, and the kernels built."""
    return (len({(w.dtype, w.shape[1]) for w in weights}) == 1 and weights[0].dtype in _GROUPED
            and all(w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous() for w in weights)
            and kernels.available())


class GemvGroupLinear(nn.Module):
    """[x W_0ᵀ | x W_1ᵀ | ...] for 16-bit weights of one width: a layer's q/k/v (or gate/up) projections
    fused without concatenating them. Each weight stays where it was loaded (a view of the checkpoint's
    memory map), so fusing copies nothing and costs no time at start; a decode step still makes one call
    (`llama3::gemv_group`, one pass of the thread pool). Prompts multiply each weight in widened slices
    (`sliced_matmul`), or with `F.linear` where torch multiplies that type natively. Returns x's dtype."""

    def __init__(self, weights: list[nn.Parameter]):
        super().__init__()
        if not weights or not can_group(list(weights)):
            raise ValueError("GemvGroupLinear needs 2-D contiguous CPU weights of one 16-bit dtype and width "
                             f"(and the kernels built), got {[(w.dtype, tuple(w.shape)) for w in weights]}")
        self.weights = nn.ParameterList(weights)  # the parts' own Parameters: a tied weight stays tied
        self.in_features = weights[0].shape[1]
        self.out_features = sum(w.shape[0] for w in weights)
        dtype = weights[0].dtype
        self.widen_prompts = dtype == torch.float16 or not native_bf16_products()
        self.tiles = dtype == torch.bfloat16 and bf16_tiles()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features)  # (M, K)
        weights = list(self.weights)
        dtype = weights[0].dtype
        x_ok = x.dtype == dtype or (dtype == torch.float16 and x.dtype in (torch.bfloat16, torch.float32))
        if self.widen_prompts and x.dtype in (torch.bfloat16, torch.float32) and gemm16_rows(rows):
            return torch.ops.llama3.gemm16(x2, weights).view(*x.shape[:-1], self.out_features)
        if x_ok and use_kernel(rows, self.in_features, 4 if dtype == torch.float16 else 2,
                               widened_prompts=self.widen_prompts, tiles=self.tiles):
            return torch.ops.llama3.gemv_group(x2, weights).view(*x.shape[:-1], self.out_features)
        if (self.widen_prompts or x.dtype != dtype) and not torch.compiler.is_compiling():
            y = sliced_matmul_parts(x2, [(w.shape[0], lambda n0, n1, w=w: w[n0:n1].float()) for w in weights],
                                    torch.float32)  # (M, ΣN)
        else:
            y = torch.cat([F.linear(x2, w.to(x.dtype)) for w in weights], dim=-1)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        parts = "+".join(str(w.shape[0]) for w in self.weights)
        return f"in_features={self.in_features}, out_features={self.out_features} ({parts}), {self.weights[0].dtype}"


def use_gemv_kernels(model: nn.Module) -> int:
    """Replace the bias-free bf16/fp32 CPU `nn.Linear` layers of `model.layers` and `model.output` by
    `GemvLinear`, in place. Returns how many were replaced (0 when the kernels are unavailable)."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.bias is None and module.weight.dtype in _OPS
               and module.weight.device.type == "cpu" and type(module.weight) in (torch.Tensor, nn.Parameter)
               and (name.startswith("layers.") or name == "output")]
    if not targets or not kernels.available():
        return 0
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, GemvLinear(linear.weight))
    return len(targets)
