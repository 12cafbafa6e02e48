"""Layers that run on weights kept in ggml's quantized block formats (Q4_0 ... Q6_K), as a GGUF file
stores them, without ever turning the whole matrix into 16- or 32-bit floats.

- `GGMLLinear`: y = x Wᵀ with W as rows of blocks. With the project's kernels, decode steps (fewer than
  `gemv.PROMPT_ROWS` rows of x) go to `llama3::ggml_matmul` (`llama3/kernels/ggml_blocks.cpp`: activations
  rounded to int8 per block of 32, as llama.cpp's products round them). Prompts decode a slice of weight
  rows at a time (`llama3::ggml_dequantize`, 16 MB of floats, never the whole matrix) and multiply it
  with torch's GEMM: a prompt meets every weight hundreds of times, so decoding it once per slice costs
  little and the GEMM runs near the CPU's float peak (measured at the 1B shape on Zen 3: BENCHMARKS.md).
  The slices are float32, or bfloat16 on CPUs with native bf16 products (AVX512-BF16, AMX). Without the
  kernels (no compiler, `LLAMA3_KERNELS=0`) the pure-PyTorch path dequantizes a slice of rows at a time
  with numpy and multiplies in float32.
- `GGMLEmbedding`: the token embeddings; a lookup dequantizes only the rows it reads.
- `GGMLGroupLinear`: several `GGMLLinear` that share their input (q/k/v, gate/up) as one product,
  `llama3::ggml_matmul_group`: x rounded once and one parallel region for all, the weights left where they
  lie (each its own ggml type: a Q4_K_M layer mixes Q4_K and Q6_K). On decoded slices, every part's GEMMs
  write their own columns of one output.
- `repack_for_inference(model)`: at load, the matrices of every block type are rewritten once into the kernels'
  8-row layout (`llama3::ggml_repack`, the same bytes moved: exact), whose products need about a third of
  the instructions (ggml_blocks.cpp); all their rows of x, prompts included, then go to those products,
  except prompts of `REPACKED_PROMPT_ROWS` rows or more on CPUs with native bf16 products, which take
  bf16 slices decoded from the repacked bytes (`llama3::ggml_unrepack`, then as above).
  A GGUF load does it layer by layer (`GGMLLinear.repack`, from `gguf_quantized_model.py`), the scales
  checked for NaN/inf in the same pass; `repack_for_inference` then finds nothing left to do.

The block bytes are a plain attribute (`data`), not a parameter or buffer: they are views of the file's
memory map, so `model.to(dtype)`, the move to huge pages and `state_dict()` leave them alone and the
model's resident memory is the pages of the file the products touch. `dequantize_model` turns such a
model back into an ordinary float one (for writing it to another format).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from . import gemv
from ..checkpoint.gguf_quants import QUANT_TYPES, dequantize

__all__ = ["BadScale", "GGMLEmbedding", "GGMLGroupLinear", "GGMLLinear", "dequantize_model", "first_bad_scale",
           "has_ggml_layers", "repack_for_inference", "require_float_weights"]

_FALLBACK_ROWS = 1024  # weight rows dequantized at a time on the pure-PyTorch path
_REPACKED = 256  # a ggml type number | this: that type in the kernels' 8-row layout (ggml_blocks.cpp)
_REPACK_ROWS = 8
# Prompt rows from which repacked weights on a CPU with native bf16 products go to torch's bf16 GEMM on
# decoded slices instead of their int8 products (see GGMLLinear._product; measured on Zen 5: BENCHMARKS.md)
REPACKED_PROMPT_ROWS = 128

_KINDS = {t.ggml_id: name for name, t in QUANT_TYPES.items()}


def _dequantize_rows(data: torch.Tensor, kind: str) -> torch.Tensor:
    """float32 rows of `data`: the kernel when it is built, else numpy (both equal the gguf package's)."""
    if kernels.available():
        qtype = QUANT_TYPES[kind]
        return _dequantize_op(data.contiguous(), qtype.ggml_id,
                              data.shape[1] // qtype.block_bytes * qtype.block_values, torch.float32)
    return torch.from_numpy(dequantize(data.numpy(), kind))


def _dequantize_op(data: torch.Tensor, ggml_type: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.llama3.ggml_dequantize(data, ggml_type, in_features, dtype)


def _embedding_rows_eager(data: torch.Tensor, ids: torch.Tensor, ggml_type: int, dim: int) -> torch.Tensor:
    """float32 (len(ids), dim): the rows `ids` of a ggml tensor, each distinct row dequantized once."""
    unique, inverse = np.unique(ids.cpu().numpy(), return_inverse=True)
    rows = _dequantize_rows(data[torch.from_numpy(unique)], _KINDS[ggml_type])
    return rows[torch.from_numpy(inverse.reshape(-1))].to(ids.device)


# The same lookup as an operator, so that a compiled decode step (fullgraph) can call it. Eager calls go to
# the plain function: the first call of a `custom_op` imports torch._dynamo (measured 2-4 s of the first
# token on a 2-core machine), which an eager run never needs.
_embedding_rows = torch.library.custom_op("llama3_ggml::embedding_rows", mutates_args=())(_embedding_rows_eager)


@_embedding_rows.register_fake
def _embedding_rows_shape(data, ids, ggml_type, dim):
    return data.new_empty((ids.shape[0], dim), dtype=torch.float32)


class GGMLLinear(nn.Module):
    """y = x Wᵀ for W (out_features, in_features) held as ggml blocks of type `kind`: `data` is uint8
    (out_features, row_bytes). Returns x's dtype."""

    def __init__(self, data: torch.Tensor, kind: str, in_features: int, use_kernel: bool = True):
        super().__init__()
        qtype = QUANT_TYPES[kind]
        row_bytes = in_features // qtype.block_values * qtype.block_bytes
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != row_bytes or in_features % qtype.block_values:
            raise ValueError(f"GGMLLinear: {kind} rows of {in_features} values need uint8 (N, {row_bytes}), "
                             f"got {data.dtype} {tuple(data.shape)}")
        self.data, self.kind, self.ggml_id = data, kind, qtype.ggml_id
        self.in_features, self.out_features = in_features, data.shape[0]
        self.use_kernel = use_kernel and kernels.available()
        # what the kernels multiply: (bytes, type) pieces of the rows, in order; the file's rows until
        # `repack` puts them in the 8-row layout (then `data` stays for dequantize() and export only)
        self.kernel_weights: list[tuple[torch.Tensor, int]] = [(data, qtype.ggml_id)]

    @property
    def repacked(self) -> bool:
        return any(t & _REPACKED for _, t in self.kernel_weights)

    @torch.no_grad()
    def repack(self, allocate=torch.empty, mappings: list[tuple[int, int]] | None = None) -> int:
        """Rewrite the rows, 8 at a time, into the kernels' interleaved layout, in memory from
        `allocate(shape, dtype)`, when the kernels repack this type (every block type on AVX2); a last
        out_features % 8 rows keep the file's layout. The file's pages leave the resident set as they are
        copied (`data` still reads them for `dequantize`; `mappings`, see `mapped.release_file_pages`).
        The scales are checked in the same pass: a NaN or inf one raises `BadScale` (the layer unchanged).
        Returns the bytes written (0: nothing done, nothing checked)."""
        from .mapped import release_file_pages

        group_bytes = _repacked_block_bytes(self.ggml_id) if self.use_kernel else 0
        rows = self.out_features // _REPACK_ROWS * _REPACK_ROWS
        if group_bytes == 0 or rows == 0 or self.repacked:
            return 0
        qtype = QUANT_TYPES[self.kind]
        out = allocate((rows // _REPACK_ROWS, self.in_features // qtype.block_values * group_bytes), dtype=torch.uint8)
        bad = int(torch.ops.llama3.ggml_repack(self.data[:rows], self.ggml_id, self.in_features, out))
        if bad < 0 and rows < self.out_features:  # the tail, kept in the file's layout
            tail = first_bad_scale(self.data[rows:], self.kind)
            bad = tail + rows * (self.in_features // qtype.block_values) if tail >= 0 else -1
        if bad >= 0:
            raise BadScale(bad)
        release_file_pages(self.data[:rows], mappings)
        self.kernel_weights = [(out, self.ggml_id | _REPACKED)]
        if rows < self.out_features:
            self.kernel_weights.append((self.data[rows:], self.ggml_id))
        return out.numel()

    def dequantize(self) -> torch.Tensor:
        """The full float32 weight (out_features, in_features): tests and format conversion only."""
        return _dequantize_rows(self.data, self.kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.use_kernel:
            y = self._product(x2)
        else:
            x32 = x2.float()
            y = torch.cat([F.linear(x32, _dequantize_rows(self.data[i:i + _FALLBACK_ROWS], self.kind))
                           for i in range(0, self.out_features, _FALLBACK_ROWS)], dim=-1)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., N)

    def _product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) · Wᵀ on the kernels: (M, N) in x2's dtype (float32 for other dtypes)."""
        # Prompts on the file's layout: torch's GEMM on dequantized slices. Repacked weights keep prompts on
        # their own int8 products, except where the CPU multiplies bf16 natively: there torch's bf16 GEMM on
        # slices decoded from the repacked bytes (`ggml_unrepack`, so the file's released pages stay out of
        # memory) is ~2x their speed from REPACKED_PROMPT_ROWS rows (measured: BENCHMARKS.md). A compiled
        # (decode) graph keeps the one operator call.
        if self.sliced_prompt(x2.shape[0]):
            return self._sliced_gemm(x2)
        x_in = x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()
        ws, types = zip(*self.kernel_weights)
        return torch.ops.llama3.ggml_matmul_group(x_in, list(ws), list(types), self.in_features)

    def sliced_prompt(self, rows: int) -> bool:
        """Whether `rows` rows of x go to torch's GEMM on decoded slices (`_sliced_gemm`) rather than the
        kernels' products (see `_product`)."""
        return not torch.compiler.is_compiling() and (
            (not self.repacked and rows >= gemv.PROMPT_ROWS)
            or (self.repacked and rows >= REPACKED_PROMPT_ROWS and gemv.native_bf16_products()))

    def _sliced_gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) · Wᵀ through torch's GEMM, W decoded a slice of rows at a time; (M, N) in
        `sliced_dtype()`."""
        dtype = sliced_dtype()
        return gemv.sliced_matmul(x2, self.out_features, lambda n0, n1: self._rows_as(n0, n1, dtype), dtype)

    def _rows_as(self, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows n0:n1 of W in `dtype`, decoded from the bytes the kernels hold: the file's rows, or the repacked
        groups put back in the file's layout first (and a tail of out_features % 8 rows from the file)."""
        packed, packed_type = self.kernel_weights[0]
        if not packed_type & _REPACKED:
            return _dequantize_op(self.data[n0:n1], self.ggml_id, self.in_features, dtype)
        repacked_rows = packed.shape[0] * _REPACK_ROWS
        parts = []
        if n0 < repacked_rows:
            g0, g1 = n0 // _REPACK_ROWS, -(-min(n1, repacked_rows) // _REPACK_ROWS)
            file_rows = torch.ops.llama3.ggml_unrepack(packed[g0:g1], self.ggml_id, self.in_features)
            start = g0 * _REPACK_ROWS
            parts.append(_dequantize_op(file_rows[n0 - start:min(n1, repacked_rows) - start], self.ggml_id,
                                        self.in_features, dtype))
        if n1 > repacked_rows:
            tail = self.kernel_weights[1][0]
            parts.append(_dequantize_op(tail[max(n0, repacked_rows) - repacked_rows:n1 - repacked_rows],
                                        self.ggml_id, self.in_features, dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}" + (
            " (repacked)" if self.repacked else "")


def sliced_dtype() -> torch.dtype:
    """The type the sliced GEMM decodes weights to and multiplies in: bf16 where the CPU multiplies it
    natively, float32 elsewhere."""
    return torch.bfloat16 if gemv.native_bf16_products() else torch.float32


class BadScale(ValueError):
    """A block of a quantized weight has a NaN or infinite scale; `block` is its index, row-major over the
    matrix (the loader, which knows the file and the tensor, turns it into its error)."""

    def __init__(self, block: int):
        super().__init__(f"a NaN or infinite scale in block {block}")
        self.block = block


def first_bad_scale(data: torch.Tensor, kind: str) -> int:
    """The first block of `data` (uint8 rows of ggml blocks of type `kind`) whose scale is NaN or infinite,
    or -1: the kernels' check (the bytes read once, over the threads) when they are built, else numpy's."""
    qtype = QUANT_TYPES[kind]
    if kernels.available():
        values = data.shape[1] // qtype.block_bytes * qtype.block_values
        return int(torch.ops.llama3.ggml_check_scales(data, qtype.ggml_id, values))
    from ..checkpoint.gguf_quants import first_bad_scale_block

    return first_bad_scale_block(kind, data.numpy())


def _repacked_block_bytes(ggml_id: int) -> int:
    """Bytes per 8 rows and block of `ggml_id` in the kernels' repacked layout; 0 where they do not repack it."""
    return int(torch.ops.llama3.ggml_repack_block_bytes(ggml_id))


class GGMLEmbedding(nn.Module):
    """Token embeddings held as ggml blocks: `data` uint8 (vocab, row_bytes). `weight` is an empty tensor
    that only carries the model's dtype and device (code that asks the embeddings for them keeps working)."""

    def __init__(self, data: torch.Tensor, kind: str, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.data, self.kind, self.embedding_dim = data, kind, dim
        self.num_embeddings = data.shape[0]
        self.register_buffer("weight", torch.empty(0, dtype=dtype))

    def dequantize(self) -> torch.Tensor:
        return _dequantize_rows(self.data, self.kind)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lookup = torch.ops.llama3_ggml.embedding_rows if torch.compiler.is_compiling() else _embedding_rows_eager
        rows = lookup(self.data, tokens.reshape(-1), QUANT_TYPES[self.kind].ggml_id, self.embedding_dim)
        return rows.to(self.weight.dtype).view(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.kind}"


class GGMLGroupLinear(nn.Module):
    """[x W_0ᵀ | x W_1ᵀ | ...] for `parts`, GGMLLinear layers with the same in_features: the fused wqkv / w13 of
    a quantized GGUF model. With the kernels, one `ggml_matmul_group` call rounds x to int8 once, as each
    part's own product would, so the outputs equal the parts' run one by one. The parts' bytes are shared,
    not copied (they are views of the file's memory map). Returns x's dtype."""

    def __init__(self, parts: list[GGMLLinear]):
        super().__init__()
        if not parts or len({p.in_features for p in parts}) != 1:
            raise ValueError(f"GGMLGroupLinear needs GGMLLinear parts with one in_features, got "
                             f"{[p.in_features for p in parts]}")
        self.parts = tuple(parts)  # not submodules: the group is the layer the model holds
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.use_kernel = all(p.use_kernel for p in parts)
        self._gather()

    def _gather(self) -> None:
        """The parts' kernel pieces, side by side, as the one group call takes them."""
        self._data = [w for p in self.parts for w, _ in p.kernel_weights]
        self._types = [t for p in self.parts for _, t in p.kernel_weights]

    def repack(self, allocate=torch.empty, mappings: list[tuple[int, int]] | None = None) -> int:
        """`GGMLLinear.repack` for each part; returns the bytes written."""
        written = sum(p.repack(allocate, mappings) for p in self.parts)
        self._gather()
        return written

    def dequantize(self) -> torch.Tensor:
        """The parts' float32 weights stacked (out_features, in_features): tests and format conversion only."""
        return torch.cat([p.dequantize() for p in self.parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_kernel:
            return torch.cat([p(x) for p in self.parts], dim=-1)
        x2 = x.reshape(-1, self.in_features)
        if all(p.sliced_prompt(x2.shape[0]) for p in self.parts):
            # a prompt on decoded slices: x converted once, each part's GEMMs write their columns of one output
            dtype = sliced_dtype()
            y = gemv.sliced_matmul_parts(
                x2, [(p.out_features, lambda n0, n1, p=p: p._rows_as(n0, n1, dtype)) for p in self.parts], dtype)
        elif x2.shape[0] >= gemv.PROMPT_ROWS and not torch.compiler.is_compiling():
            # a prompt: each part the way GGMLLinear takes it (repacked: its products; else GEMM on slices)
            y = torch.cat([p._product(x2) for p in self.parts], dim=-1)
        else:
            x_in = x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()
            y = torch.ops.llama3.ggml_matmul_group(x_in, self._data, self._types, self.in_features)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., ΣN)

    def extra_repr(self) -> str:
        kinds = "+".join(p.kind for p in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, {kinds}"


@torch.no_grad()
def repack_for_inference(model: nn.Module, allocate=torch.empty) -> int:
    """Repack every block-type product weight of `model` (GGMLLinear, grouped or not; not the token
    embeddings, which are read by rows) into the kernels' 8-row layout, matrix by matrix, each file's pages
    leaving the resident set once copied: peak memory grows by one matrix. Inference only: `dequantize()`
    and export keep reading the file. Returns the bytes written."""
    from .mapped import _file_mappings

    mappings = _file_mappings()  # read once: the file's mappings do not change while repacking
    return sum(m.repack(allocate, mappings) for m in model.modules() if isinstance(m, (GGMLLinear, GGMLGroupLinear)))


def has_ggml_layers(model: nn.Module) -> bool:
    return any(isinstance(m, (GGMLLinear, GGMLEmbedding, GGMLGroupLinear)) for m in model.modules())


def require_float_weights(model: nn.Module, path, task: str) -> None:
    """Refuse, with a ValueError that says what to do, a `task` (e.g. "fine-tuning") that needs float
    weights on a model loaded from a quantized GGUF file `path` (its block layers have no gradients)."""
    layers = [m for m in model.modules() if isinstance(m, (GGMLLinear, GGMLEmbedding))]
    layers += [p for m in model.modules() if isinstance(m, GGMLGroupLinear) for p in m.parts]
    kinds = sorted({m.kind for m in layers})
    if kinds:
        raise ValueError(f"{path} is a quantized GGUF file ({', '.join(kinds)}); {task} needs float weights: "
                         f"convert it first (llama3 convert {path} OUT --to hf) and use OUT")


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every GGML layer by an ordinary nn.Linear / nn.Embedding holding its dequantized weight, in
    place (for writing the model to another format). A tied output projection stays tied. Returns the model."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, (GGMLLinear, GGMLEmbedding, GGMLGroupLinear)):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = nn.Parameter(module.dequantize().to(dtype), requires_grad=False)
        if isinstance(module, GGMLEmbedding):
            plain = nn.Embedding(*weight.shape, device="meta")
        else:
            plain = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        plain.weight = weight
        setattr(parent, attr, plain)
    if getattr(model.args, "tie_word_embeddings", False):
        model.output.weight = model.tok_embeddings.weight
    return model
