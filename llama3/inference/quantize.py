"""Weight-only quantization for decoding: weights stored in int8 or int4, products computed in bf16.

Decode at batch 1 is bound by the bytes of weights read per token, so halving (int8 vs bf16) or quartering
(int4) them raises the ceiling. The products run on the project's kernels where they help, else on torch's:

- int8: one symmetric scale per output channel. The few rows of a decode step (`gemv.use_kernel`) go to
  the project's VNNI kernel `llama3::gemv_int8` (activations rounded to int8 per block of 32, as llama.cpp's
  q8_0 products do; `llama3/kernels/gemv.cpp`), longer ones and machines without the kernel to torch's
  `aten._weight_int8pack_mm(x, w_int8 (N, K), scales (N,))`, except prompts (`gemv.PROMPT_ROWS` rows or
  more) on a CPU without native bf16 products: there that kernel widens bf16 on the fly (measured 2.5x
  slower than fp32 GEMM on Zen 3), so the weight is dequantized a slice of rows at a time to fp32 for
  torch's GEMM (`gemv.sliced_matmul`: 16 MB, never the whole matrix).
- int4: asymmetric groups of `group_size` input channels, value = low + q · scale with q in [0, 15]. With
  the project's kernels, codes two per byte and fp16 scale/low, multiplied by `llama3::gemv_int4` (VNNI,
  activations rounded to int8 per block of 32) for every row count (a prompt dequantized a slice at a time
  for torch's GEMM measured 0.91x the kernel at the 1B shape on Zen 3: BENCHMARKS.md); otherwise packed by
  `aten._convert_weight_to_int4pack_for_cpu` for `aten._weight_int4pack_mm_for_cpu` (bf16 scale and zero).

On a CPU whose kernels have no byte dot-product instructions (the "avx2" level: no VNNI), both modes store
their weights as GGUF blocks instead, in the kernels' 8-row interleaved layout (`llama3::ggml_repack`),
and multiply them on the block products (`llama3::ggml_matmul`), which read 8 weight rows per activation
block without horizontal sums: measured ~2x `gemv_int4`/`gemv_int8`'s AVX2 form per product on Zen 3.
int4 becomes Q4_1 blocks, which hold exactly its values (an fp16 scale and low per 32 weights, 4-bit
codes); int8 becomes Q8_0 (an fp16 scale per 32 weights instead of one per row: closer to the float
weights). Weights are quantized and repacked a chunk of rows at a time, so no second copy is ever whole.

Each module also has a pure-PyTorch path (`use_kernel=False`: dequantize, then `F.linear`), used as the
reference in tests. `quantize_model(model, "int8" | "int4")` replaces every linear layer of the blocks and
the output projection in place (token embeddings stay as they are: a lookup reads one row per token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from . import gemv
from .mapped import release_file_pages

__all__ = ["QUANT_MODES", "Int4WeightOnlyLinear", "Int8WeightOnlyLinear", "blocks_preferred", "pack_int4_codes",
           "q4_1_blocks", "q8_0_blocks", "quantize_model"]

QUANT_MODES = ("int8", "int4")

_BLOCK_VALUES = 32  # weights per Q4_1 / Q8_0 block
_Q4_1, _Q8_0, _REPACKED = 3, 8, 256  # ggml type numbers; | _REPACKED: in the kernels' 8-row layout


def blocks_preferred(ggml_type: int, rows: int, cols: int) -> bool:
    """Whether runtime-quantized weights of `ggml_type` go on the GGUF block kernels (see the module
    docstring): kernels built at the level without byte dot products, which repack this type, and a shape
    of whole 8-row groups and 32-value blocks."""
    return (kernels.available() and kernels.loaded_isa() == "avx2" and rows % 8 == 0 and cols % _BLOCK_VALUES == 0
            and int(torch.ops.llama3.ggml_repack_block_bytes(ggml_type)) > 0)


def _block_rows(bytes_of_rows, ggml_type: int, rows: int, cols: int, source: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(weight, type) for the block products: the repacked (rows / 8, ...) uint8 weight and `ggml_type` |
    the repacked flag, or where this build does not repack the type, the blocks in the file layout and
    `ggml_type`; built a chunk of rows at a time (`bytes_of_rows(slice)`: those rows as file-layout blocks)."""
    group_bytes = int(torch.ops.llama3.ggml_repack_block_bytes(ggml_type))
    if group_bytes == 0 or rows % 8:
        out = torch.cat([bytes_of_rows(chunk) for chunk in _row_chunks(rows, cols)])
        _release_file_pages(source)
        return out, ggml_type
    out = torch.empty(rows // 8, cols // _BLOCK_VALUES * group_bytes, dtype=torch.uint8)
    for chunk in _row_chunks(rows, cols, multiple=8):
        torch.ops.llama3.ggml_repack(bytes_of_rows(chunk), ggml_type, cols, out[chunk.start // 8:chunk.stop // 8])
        _release_file_pages(source[chunk])
    return out, ggml_type | _REPACKED


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(..., 1) float -> (..., 2) uint8: the fp16 bit pattern, little-endian as ggml stores it."""
    return values.half().contiguous().view(torch.uint8)


def q8_0_blocks(weight: torch.Tensor) -> torch.Tensor:
    """(n, K) float -> (n, K / 32 * 34) uint8 Q8_0 blocks: an fp16 scale absmax / 127 per 32 weights, then
    the 32 codes round(w / scale) as int8 (chosen against the stored fp16 scale)."""
    n, K = weight.shape
    blocks = weight.detach().float().reshape(n, K // _BLOCK_VALUES, _BLOCK_VALUES)
    scale = (blocks.abs().amax(-1, keepdim=True) / 127.0).half().float()  # the stored value
    codes = torch.round(blocks / scale.clamp(min=2.0 ** -24)).clamp(-127, 127).to(torch.int8)
    return torch.cat([_fp16_bytes(scale), codes.view(torch.uint8)], dim=-1).reshape(n, -1)


def q4_1_blocks(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """int4 codes (n, K) in [0, 15] with their fp16-exact scale and low per 32, (n, K / 32, 1) each -> (n,
    K / 32 * 20) uint8 Q4_1 blocks: scale and low as fp16, then byte j holds code j low and code 16 + j high."""
    n, K = codes.shape
    c = codes.reshape(n, K // _BLOCK_VALUES, 2, _BLOCK_VALUES // 2)
    nibbles = c[:, :, 0] | (c[:, :, 1] << 4)  # (n, G, 16)
    return torch.cat([_fp16_bytes(scale), _fp16_bytes(low), nibbles], dim=-1).reshape(n, -1)


class Int8WeightOnlyLinear(nn.Module):
    """y = x Wᵀ with W ≈ scales[:, None] · W_int8 (per-output-channel absmax scaling)."""

    def __init__(self, weight: torch.Tensor, use_kernel: bool = True, blocks: bool | None = None):
        super().__init__()
        N, K = weight.shape
        self.in_features, self.out_features = K, N
        self.use_kernel = use_kernel
        # Q8_0 blocks on the block kernels: where preferred (None), or as asked (tests take both routes)
        self.blocks = use_kernel and (blocks_preferred(_Q8_0, N, K) if blocks is None else blocks)
        if self.blocks:
            blocks_, self.block_type = _block_rows(lambda rows: q8_0_blocks(weight[rows]), _Q8_0, N, K, weight)
            self.register_buffer("weight_blocks", blocks_)
            self.use_gemv = False
            return
        w_int8 = torch.empty(N, K, dtype=torch.int8)
        scales = torch.empty(N)
        for rows in _row_chunks(N, K):  # fp32 temporaries of a few MB, not of the whole weight
            w = weight[rows].detach().float()  # (n, K)
            scales[rows] = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            w_int8[rows] = torch.round(w / scales[rows, None]).clamp(-127, 127).to(torch.int8)
            _release_file_pages(weight[rows])
        self.register_buffer("weight_int8", w_int8)
        # torch's CPU kernel is fast only with bf16 activations (measured: 12.6 GB/s of int8 weights vs 0.3
        # for fp16/fp32 at 2048 x 8192), so the product runs in bf16 whatever the model's dtype.
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.use_gemv = use_kernel and kernels.available()
        # fp32 copy of the (bf16-rounded) scales for the project's kernel
        self.register_buffer("scales_f32", self.scales.float() if self.use_gemv else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks:
            return _block_product(x, self.weight_blocks, self.block_type, self.out_features)
        rows = x.numel() // self.in_features
        # the kernel keeps each row as int8 codes plus a scale and an offset per 4 values: ~3 bytes a value
        if self.use_gemv and gemv.use_kernel(rows, self.in_features, 3):
            x_in = x if x.dtype in (torch.bfloat16, torch.float32) else x.float()
            y = torch.ops.llama3.gemv_int8(x_in.reshape(rows, self.in_features), self.weight_int8, self.scales_f32)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.use_kernel and _sliced_prompt(rows) and not gemv.native_bf16_products():
            scales = self.scales.float()
            y = gemv.sliced_matmul(x.reshape(rows, self.in_features), self.out_features,
                                   lambda n0, n1: self.weight_int8[n0:n1].float() * scales[n0:n1, None],
                                   torch.float32)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        x_bf16 = x.to(torch.bfloat16)
        if not self.use_kernel:
            return (F.linear(x_bf16, self.weight_int8.to(torch.bfloat16)) * self.scales).to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x_bf16.reshape(-1, self.in_features), self.weight_int8, self.scales)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)  # (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8" + (
            " (Q8_0 blocks)" if self.blocks else "")


class Int4WeightOnlyLinear(nn.Module):
    """y = x Wᵀ with W stored as 4-bit groups along the input dimension, one (scale, low) per group:
    w ≈ low + code · scale, code in [0, 15].

    Three storage layouts, chosen at construction:
    - Q4_1 blocks in the block kernels' 8-row layout, where `blocks_preferred` (module docstring): the
      same values (group_size 32);
    - the project's (`llama3::gemv_int4`, when the kernels are available, in_features is a multiple of 64
      and group_size a multiple of 32): codes two per byte in chunks of 128 (`pack_int4_codes`), scale and
      low in fp16 (N, G) each. Every product, decode or prompt, runs on the kernel (in passes of 8 rows:
      faster than torch's int4 kernel at every row count measured here);
    - torch's (`aten._convert_weight_to_int4pack_for_cpu` / `_weight_int4pack_mm_for_cpu`, bf16 scale and
      zero), otherwise."""

    def __init__(self, weight: torch.Tensor, group_size: int = 32, use_kernel: bool = True,
                 blocks: bool | None = None):
        super().__init__()
        N, K = weight.shape
        if K % group_size != 0:
            raise ValueError(f"int4 needs in_features ({K}) divisible by group_size ({group_size})")
        self.in_features, self.out_features, self.group_size = K, N, group_size
        self.use_kernel = use_kernel
        # Q4_1 blocks on the block kernels: where preferred (None), or as asked (tests take both routes)
        self.blocks = use_kernel and group_size == _BLOCK_VALUES and (
            blocks_preferred(_Q4_1, N, K) if blocks is None else blocks)
        if self.blocks:
            def q4_1(rows: slice) -> torch.Tensor:
                return q4_1_blocks(*self._codes(weight[rows], group_size, fp16_params=True))

            blocks_, self.block_type = _block_rows(q4_1, _Q4_1, N, K, weight)
            self.register_buffer("weight_blocks", blocks_)
            self.use_gemv, self.scale_zero = False, None
            self.register_buffer("codes", None)
            return
        self.use_gemv = use_kernel and K % 64 == 0 and group_size % 32 == 0 and kernels.available()
        # The project's layout is packed chunk by chunk (never a whole-weight byte per code); torch's packer
        # takes the whole code matrix.
        q = None if self.use_gemv else torch.empty(N, K, dtype=torch.uint8)
        packed = torch.empty(N, K // 2, dtype=torch.uint8) if self.use_gemv else None
        scale, low = torch.empty(N, K // group_size, 1), torch.empty(N, K // group_size, 1)
        for rows in _row_chunks(N, K):  # fp32 temporaries of a few MB, not of the whole weight
            codes, scale[rows], low[rows] = self._codes(weight[rows], group_size, fp16_params=self.use_gemv)
            if packed is not None:
                packed[rows] = pack_int4_codes(codes)
            else:
                q[rows] = codes
            _release_file_pages(weight[rows])
        self.register_buffer("codes", q if not use_kernel else None)  # unpacked: the pure-PyTorch path only
        if self.use_gemv:
            self.register_buffer("weight_int4", packed)
            self.register_buffer("scales_f16", scale.squeeze(-1).half())
            self.register_buffer("lows_f16", low.squeeze(-1).half())
            self.scale_zero = None
            return
        zero = low + 8 * scale  # so that (q - 8)·scale + zero = low + q·scale
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        scale_zero = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1)  # (N, G, 2)
        # bf16 whatever the model's dtype: the kernel is ~90x slower with fp16/fp32 activations (measured here).
        self.register_buffer("scale_zero", scale_zero.transpose(0, 1).contiguous().to(torch.bfloat16))  # (G, N, 2)

    @staticmethod
    def _codes(weight: torch.Tensor, group_size: int, *, fp16_params: bool):
        """(codes (n, K) uint8, scale (n, G, 1), low (n, G, 1)) of some rows of a weight."""
        n, K = weight.shape
        groups = weight.detach().float().reshape(n, K // group_size, group_size)  # (n, G, group)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-8) / 15.0  # (n, G, 1)
        if fp16_params:
            # round scale and low to their stored fp16 first, so the codes are chosen for the stored values
            scale, low = scale.half().float().clamp(min=2.0 ** -24), low.half().float()
        q = torch.round((groups - low) / scale).clamp(0, 15).reshape(n, K).to(torch.uint8)
        return q, scale, low

    def dequantize(self) -> torch.Tensor:
        assert self.codes is not None, "built with use_kernel=True; the codes live only in the packed buffer"
        N, K, g = self.out_features, self.in_features, self.group_size
        if self.use_gemv:
            scale, low = self.scales_f16.float(), self.lows_f16.float()
            q = self.codes.view(N, K // g, g).float()
            return (low.unsqueeze(-1) + q * scale.unsqueeze(-1)).reshape(N, K)
        scale, zero = self.scale_zero.transpose(0, 1).unbind(-1)  # (N, G) each
        q = self.codes.view(N, K // g, g).to(scale.dtype)
        return ((q - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks:
            return _block_product(x, self.weight_blocks, self.block_type, self.out_features)
        if not self.use_kernel:
            return F.linear(x.to(torch.bfloat16), self.dequantize().to(torch.bfloat16)).to(x.dtype)
        if self.use_gemv:
            x_in = x if x.dtype in (torch.bfloat16, torch.float32) else x.float()
            y = torch.ops.llama3.gemv_int4(x_in.reshape(-1, self.in_features), self.weight_int4, self.scales_f16,
                                           self.lows_f16, self.group_size)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).reshape(-1, self.in_features),
                                                        self.weight_int4, self.group_size, self.scale_zero)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)  # (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{self.group_size}" + (
            " (Q4_1 blocks)" if self.blocks else "")


def _block_product(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, out_features: int) -> torch.Tensor:
    """x (..., K) · Wᵀ for W blocks of `ggml_type` (| the repacked flag: in the 8-row layout) on the block
    kernels, every row count (prompts too, in int8 products) -> (..., out_features) in x's dtype."""
    K = x.shape[-1]
    x_in = x.reshape(-1, K)
    x_in = x_in if x_in.dtype in (torch.float32, torch.bfloat16) else x_in.float()
    y = torch.ops.llama3.ggml_matmul(x_in, blocks, ggml_type, K)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def _sliced_prompt(rows: int) -> bool:
    """Whether `rows` activation rows take the dequantize-a-slice-and-GEMM path (`gemv.sliced_matmul`); a
    compiled graph (the decode step) keeps the kernels' one call."""
    return rows >= gemv.PROMPT_ROWS and not torch.compiler.is_compiling()


def pack_int4_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15], K a multiple of 64 -> (N, K / 2) uint8 in `gemv_int4`'s layout: per
    chunk of 128 values, byte j holds value j in its low nibble and value 64 + j in its high nibble; a last
    64 values (when K is an odd multiple of 64) likewise as value j and 32 + j."""
    N, K = codes.shape
    full = K // 128 * 128

    def pack(part: torch.Tensor, span: int) -> torch.Tensor:
        chunks = part.reshape(N, -1, 2, span // 2)
        return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(N, -1)

    return torch.cat([pack(codes[:, :full], 128), pack(codes[:, full:], 64)], dim=1).contiguous()


_CHUNK_VALUES = 1 << 22  # 16 MB of fp32 per chunk: as fast as whole weights here (4 MB: 30% slower)


def _release_file_pages(rows: torch.Tensor) -> None:
    """Quantized rows of a memory-mapped weight need not stay resident (`mapped.release_file_pages`)."""
    release_file_pages(rows)


def _row_chunks(rows: int, cols: int, multiple: int = 1) -> list[slice]:
    """Row ranges of about `_CHUNK_VALUES` values (starting at multiples of `multiple` rows), so quantizing a
    weight never needs fp32 copies of it whole (at 8B the output projection alone would take 2 GB in fp32,
    several times over for the temporaries)."""
    # at most an eighth of the weight a chunk, so the temporaries stay small beside a small weight too
    step = max(1, min(_CHUNK_VALUES, rows * cols // 8) // max(cols, 1))
    step = max(multiple, step // multiple * multiple)
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _quantized(linear: nn.Linear, mode: str, group_size: int, use_kernel: bool) -> nn.Module:
    if mode == "int4" and linear.in_features % group_size == 0:
        return Int4WeightOnlyLinear(linear.weight, group_size, use_kernel)
    # int4 falls back to int8 for a layer whose width does not split into groups.
    return Int8WeightOnlyLinear(linear.weight, use_kernel)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, *, group_size: int = 32, use_kernel: bool = True) -> nn.Module:
    """Replace the nn.Linear layers inside `model.layers` and `model.output` by weight-only quantized ones,
    in place (given one block instead of a Transformer: every linear layer of the block, which is how the
    load path quantizes block by block). Layers already quantized are left as they are. Each weight is
    quantized in row chunks and released as soon as its replacement exists (memory-mapped pages leave the
    resident set too), so peak memory is the quantized model plus about one float weight. The products
    run in bf16 (torch's int8/int4 CPU kernels are fast only there) and return the model's dtype. Returns
    the model. Inference only."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of: {', '.join(QUANT_MODES)}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("weight-only quantization here uses torch's CPU kernels; quantize a CPU model")
    whole_model = hasattr(model, "tok_embeddings")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear)
               and (not whole_model or name.startswith("layers.") or name == "output")]
    biased = [name for name, module in targets if module.bias is not None]
    if biased:  # the quantized layers hold a weight only; a bias would be lost
        raise ValueError(f"{biased[0]} has a bias (a Llama-architecture derivative); weight-only quantization "
                         "here takes bias-free projections: run this model without --quantize")
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _quantized(linear, mode, group_size, use_kernel))
    return model
