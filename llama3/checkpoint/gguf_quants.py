"""ggml's quantized block formats, as GGUF files store them: what each block holds, our quantizers and
dequantizer (numpy, vectorized over blocks), the per-tensor type mixture of llama.cpp's presets, and the
checks a file's quantized tensors must pass before a model runs on them.

Every type stores a row of K weights as K / block_values blocks of bytes; within a block each weight is
`scale · code + bias` with a small integer code:

| type | values | bytes | per block |
|---|---|---|---|
| Q4_0 | 32 | 18 | f16 d, 16 bytes of 4-bit codes: w = d · (q - 8) |
| Q4_1 | 32 | 20 | f16 d, f16 m, 4-bit codes: w = d · q + m |
| Q5_0 | 32 | 22 | f16 d, 4 bytes of 5th bits, 4-bit low parts: w = d · (q - 16) |
| Q5_1 | 32 | 24 | f16 d, f16 m, 5th bits, low parts: w = d · q + m |
| Q8_0 | 32 | 34 | f16 d, 32 int8 codes: w = d · q |
| Q4_K | 256 | 144 | f16 d, f16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 4-bit codes: per 32 values w = d·sc · q - dmin·m |
| Q5_K | 256 | 176 | as Q4_K with a 5th bit per code (32 bytes) |
| Q6_K | 256 | 210 | 4-bit low parts, 2-bit high parts, sixteen int8 scales, f16 d: per 16 values w = d·sc · (q - 32) |

In the legacy types (32 values) code j sits in the low nibble of byte j and code 16 + j in its high
nibble. In the K-types each 64 values share 32 bytes: codes 0..31 in the low nibbles, 32..63 in the high.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PRESETS", "QUANT_TYPES", "bad_scale_error", "check_quantized_tensor", "check_tensor_types", "dequantize",
           "first_bad_scale_block",
           "preset_file_type", "quantize", "tensor_type_for"]


@dataclass(frozen=True)
class QuantType:
    name: str
    ggml_id: int  # the type number in a GGUF tensor header
    block_values: int
    block_bytes: int
    scale_offsets: tuple[int, ...]  # byte offsets of the block's f16 scale fields (checked for NaN/inf)


QUANT_TYPES = {t.name: t for t in (
    QuantType("Q4_0", 2, 32, 18, (0,)),
    QuantType("Q4_1", 3, 32, 20, (0, 2)),
    QuantType("Q5_0", 6, 32, 22, (0,)),
    QuantType("Q5_1", 7, 32, 24, (0, 2)),
    QuantType("Q8_0", 8, 32, 34, (0,)),
    QuantType("Q4_K", 12, 256, 144, (0, 2)),
    QuantType("Q5_K", 13, 256, 176, (0, 2)),
    QuantType("Q6_K", 14, 256, 210, (208,)),
)}
FLOAT_TYPES = ("F32", "F16", "BF16")


# ----- checks on a file's tensors -----

def check_tensor_types(path: Path, tensors) -> None:
    """Refuse a tensor whose type we cannot run, naming it and the types we read."""
    for t in tensors:
        kind = t.tensor_type.name
        if kind not in FLOAT_TYPES and kind not in QUANT_TYPES:
            raise ValueError(f"{path}: tensor {t.name!r} is stored as {kind}, which this reader does not "
                             f"run; it reads {', '.join((*FLOAT_TYPES, *QUANT_TYPES))}. Re-quantize the model "
                             "to one of these (e.g. `llama3 convert SRC OUT.gguf --to gguf --dtype q4_k_m` "
                             "from its float weights)")


def check_quantized_tensor(path: Path, name: str, kind: str, shape, data: np.ndarray) -> None:
    """A quantized tensor's bytes must be whole blocks per row and its scales finite: a NaN or inf scale
    would make every product with that block NaN, a garbage model rather than an error."""
    qtype = QUANT_TYPES[kind]
    if shape[0] % qtype.block_values:
        raise ValueError(f"{path}: tensor {name!r} has rows of {shape[0]} values, not whole {kind} blocks of "
                         f"{qtype.block_values}; the file is corrupt or was written wrongly")
    block = first_bad_scale_block(kind, data)
    if block >= 0:
        raise bad_scale_error(path, name, kind, block)


def first_bad_scale_block(kind: str, data: np.ndarray) -> int:
    """The first block (row-major) of `kind` blocks in `data` whose f16 scale fields are not all finite, or -1."""
    blocks = data.reshape(-1, QUANT_TYPES[kind].block_bytes)
    bad = np.zeros(len(blocks), dtype=bool)
    for offset in QUANT_TYPES[kind].scale_offsets:
        bad |= ~np.isfinite(blocks[:, offset:offset + 2].copy().view(np.float16).ravel())
    return int(np.flatnonzero(bad)[0]) if bad.any() else -1


def bad_scale_error(path: Path, name: str, kind: str, block: int) -> ValueError:
    """The error for a quantized tensor whose block `block` (row-major over the tensor) has a NaN or inf
    scale, whichever check found it (this one, or the kernels' in the pass that repacks the weights)."""
    return ValueError(f"{path}: tensor {name!r} ({kind}) has a NaN or infinite scale in block {block}; "
                      "the file is corrupt; download or convert it again")


# ----- dequantization (the pure-NumPy reference and fallback) -----

def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32)  # (n, 1)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(n, 16·c) bytes -> (n, 32·c) codes: per 16 (legacy) or 32 (K) bytes, the low nibbles then the high."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _legacy_codes(blocks: np.ndarray, qh_at: int | None, qs_at: int) -> np.ndarray:
    """The 32 codes of each legacy block (4-bit, plus the 5th bit from qh when qh_at is given)."""
    codes = _nibbles(blocks[:, qs_at:qs_at + 16]).astype(np.int32)  # (n, 32)
    if qh_at is not None:
        qh = blocks[:, qh_at:qh_at + 4].copy().view("<u4")  # (n, 1)
        codes |= ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4
    return codes


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins. The first four of each sit in the
    low 6 bits of bytes 0-3 (scales) and 4-7 (mins); the last four have their low 4 bits in bytes 8-11
    (scale low nibble, min high nibble) and their top 2 bits in the spare top bits of bytes 0-3 / 4-7."""
    p = packed.astype(np.int32)
    sc = np.concatenate([p[:, 0:4] & 63, (p[:, 8:12] & 0x0F) | ((p[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([p[:, 4:8] & 63, (p[:, 8:12] >> 4) | ((p[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn  # (n, 8) each


def _k_codes(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 256) 4-bit codes: each 32 bytes hold 64 values, the low nibbles first."""
    n = qs.shape[0]
    return _nibbles(qs.reshape(n, 4, 32)).reshape(n, 256).astype(np.int32)


def _dequantize_blocks(kind: str, b: np.ndarray) -> np.ndarray:
    """(n, block_bytes) uint8 -> (n, block_values) float32."""
    n = b.shape[0]
    if kind == "Q8_0":
        return _f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float32)
    if kind in ("Q4_0", "Q5_0"):
        codes = _legacy_codes(b, 2 if kind == "Q5_0" else None, 6 if kind == "Q5_0" else 2)
        return _f16(b, 0) * (codes - (16 if kind == "Q5_0" else 8)).astype(np.float32)
    if kind in ("Q4_1", "Q5_1"):
        codes = _legacy_codes(b, 4 if kind == "Q5_1" else None, 8 if kind == "Q5_1" else 4)
        return _f16(b, 0) * codes.astype(np.float32) + _f16(b, 2)
    if kind in ("Q4_K", "Q5_K"):
        sc, mn = _k_scales_mins(b[:, 4:16])
        if kind == "Q4_K":
            codes = _k_codes(b[:, 16:144])
        else:
            codes = _k_codes(b[:, 48:176])
            qh = b[:, 16:48].astype(np.int32)  # bit 2c of byte l: value 64c + l; bit 2c + 1: 64c + 32 + l
            high = (qh[:, None, :] >> np.arange(8)[None, :, None]) & 1  # (n, 8 sub-blocks, 32)
            codes += high.reshape(n, 256) << 4
        scale = (_f16(b, 0) * sc)[:, :, None]  # (n, 8, 1)
        low = (_f16(b, 2) * mn)[:, :, None]
        return (scale * codes.reshape(n, 8, 32) - low).reshape(n, 256).astype(np.float32)
    if kind == "Q6_K":
        ql, qh = b[:, :128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 1, 32).astype(np.int32)
        low = _nibbles(ql.reshape(n, 2, 2, 32)).reshape(n, 2, 4, 32).astype(np.int32)  # per half: 4 x 32
        # unpacked per half: values l, 64 + l (ql[l]), 32 + l, 96 + l (ql[32 + l]); put them in order
        low = low[:, :, [0, 2, 1, 3]]
        high = (qh >> (2 * np.arange(4)[None, None, :, None])) & 3  # (n, 2, 4, 32)
        codes = (low | (high << 4)).reshape(n, 16, 16) - 32
        scale = _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
        return (scale[:, :, None] * codes).reshape(n, 256).astype(np.float32)
    raise AssertionError(kind)


def dequantize(data: np.ndarray, kind: str) -> np.ndarray:
    """Rows of quantized bytes (..., row_bytes) -> float32 (..., K)."""
    qtype = QUANT_TYPES[kind]
    rows = np.ascontiguousarray(data).reshape(-1, data.shape[-1])
    values = _dequantize_blocks(kind, rows.reshape(-1, qtype.block_bytes))
    return values.reshape(*data.shape[:-1], data.shape[-1] // qtype.block_bytes * qtype.block_values)


# ----- quantization -----

def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """(n, 1) float -> (n, 2) bytes of its float16."""
    return values.astype(np.float16).view(np.uint8)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _pack_nibbles(codes: np.ndarray, span: int) -> np.ndarray:
    """Inverse of _nibbles per `span` values: value j low nibble, value span/2 + j high nibble."""
    n = codes.shape[0]
    c = codes.astype(np.uint8).reshape(n, -1, 2, span // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, -1)


def _quantize_symmetric(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 (levels 8) / Q5_0 (16): the value of largest magnitude maps to code 0 (-levels), d = it / -levels;
    codes = trunc(x / d + levels + 0.5) with the product in float64, as ggml's reference rounds it."""
    biggest = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)  # (n, 1), signed
    d = (biggest / np.float32(-levels)).astype(np.float32)
    codes = np.trunc((x.astype(np.float64) * _inverse(d).astype(np.float64) + (levels + 0.5)).astype(np.float32))
    return d, np.clip(codes.astype(np.uint8), 0, 2 * levels - 1)


def _quantize_affine(x: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 (top 15) / Q5_1 (31): min .. max over the codes, trunc((x - min) / d + 0.5) in float32."""
    low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = ((high - low) / np.float32(top)).astype(np.float32)
    codes = np.trunc((x - low) * _inverse(d) + np.float32(0.5)).astype(np.uint8)
    return d, low, np.clip(codes, 0, top)


def _high_bits(codes: np.ndarray) -> np.ndarray:
    """The 5th bit of 32 codes as 4 bytes, bit j of the little-endian word = code j."""
    return np.packbits((codes >> 4).astype(np.uint8), axis=1, bitorder="little")


def _round_half_away(v: np.ndarray) -> np.ndarray:
    a = np.abs(v)
    whole = np.floor(a)
    return np.sign(v) * (whole + (a - whole >= 0.5))


def _quantize_legacy(kind: str, x: np.ndarray) -> np.ndarray:
    """(n, 32) float32 blocks -> (n, block_bytes)."""
    if kind == "Q8_0":
        d = (np.abs(x).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
        codes = _round_half_away(x * _inverse(d)).astype(np.int8).view(np.uint8)
        return np.concatenate([_f16_bytes(d), codes], axis=1)
    if kind in ("Q4_0", "Q5_0"):
        d, codes = _quantize_symmetric(x, 8 if kind == "Q4_0" else 16)
        head = [_f16_bytes(d)]
    else:
        d, low, codes = _quantize_affine(x, 15 if kind == "Q4_1" else 31)
        head = [_f16_bytes(d), _f16_bytes(low)]
    if kind in ("Q5_0", "Q5_1"):
        head.append(_high_bits(codes))
    return np.concatenate([*head, _pack_nibbles(codes & 0x0F, 32)], axis=1)


def _quantize_k_affine(x: np.ndarray, top: int) -> list[np.ndarray]:
    """Q4_K (top 15) / Q5_K (31) for (n, 256) blocks: per 32 values a scale and a min (min <= 0, so zero
    stays exact), both as 6-bit multiples of the block's f16 d and dmin; codes chosen for the stored values."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    low = np.minimum(sub.min(axis=2), 0)  # (n, 8)
    scale = (sub.max(axis=2) - low) / np.float32(top)
    d = (scale.max(axis=1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    dmin = (-low.min(axis=1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale * _inverse(d)), 0, 63).astype(np.int32)
    mn = np.clip(np.rint(-low * _inverse(dmin)), 0, 63).astype(np.int32)
    step, offset = d * sc, dmin * mn  # (n, 8): the stored scale and min of each 32 values
    codes = np.clip(np.rint((sub + offset[:, :, None]) * _inverse(step)[:, :, None]), 0, top).astype(np.uint8)
    packed = np.empty((n, 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, :4] | ((sc[:, 4:] >> 4) << 6)).astype(np.uint8)
    packed[:, 4:8] = (mn[:, :4] | ((mn[:, 4:] >> 4) << 6)).astype(np.uint8)
    packed[:, 8:12] = ((sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)).astype(np.uint8)
    codes = codes.reshape(n, 256)
    parts = [_f16_bytes(d), _f16_bytes(dmin), packed]
    if top == 31:  # Q5_K: the 5th bit of value 32·s + l is bit s of byte l
        high = (codes.reshape(n, 8, 32) >> 4).astype(np.uint8)
        parts.append(np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1))
    parts.append(_pack_nibbles(codes & 0x0F, 64))
    return parts


def _quantize_q6_k(x: np.ndarray) -> list[np.ndarray]:
    """Q6_K for (n, 256) blocks: per 16 values the value of largest magnitude maps to code -32, the 16
    scales as int8 multiples of the block's f16 d."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    biggest = np.take_along_axis(sub, np.abs(sub).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]  # (n, 16)
    scale = biggest / np.float32(-32)
    d = (np.abs(scale).max(axis=1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale * _inverse(d)), -128, 127).astype(np.int8)
    step = d * sc.astype(np.float32)  # (n, 16)
    codes = (np.clip(np.rint(sub * _inverse(step)[:, :, None]), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
    low = _pack_nibbles((codes & 0x0F).reshape(n * 2, 128), 128).reshape(n, 128)  # byte l: values l, 64 + l
    high = codes >> 4  # (n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return [low, qh.astype(np.uint8), sc.view(np.uint8), _f16_bytes(d)]


def quantize(values: np.ndarray, kind: str) -> np.ndarray:
    """Float rows (..., K) -> quantized bytes (..., row_bytes) of type `kind` (K a multiple of its block)."""
    qtype = QUANT_TYPES[kind]
    x = np.ascontiguousarray(values, dtype=np.float32)
    if x.shape[-1] % qtype.block_values:
        raise ValueError(f"{kind} needs rows of whole {qtype.block_values}-value blocks, got {x.shape[-1]}")
    blocks = x.reshape(-1, qtype.block_values)
    out = np.empty((blocks.shape[0], qtype.block_bytes), dtype=np.uint8)
    step = _CHUNK_VALUES // qtype.block_values
    for start in range(0, blocks.shape[0], step):  # a slice at a time: the temporaries stay small
        out[start:start + step] = _quantize_blocks(kind, blocks[start:start + step])
    return out.reshape(*x.shape[:-1], x.shape[-1] // qtype.block_values * qtype.block_bytes)


_CHUNK_VALUES = 1 << 22  # values quantized at a time (a few 16 MB temporaries)


def _quantize_blocks(kind: str, blocks: np.ndarray) -> np.ndarray:
    if kind in ("Q4_K", "Q5_K"):
        return np.concatenate(_quantize_k_affine(blocks, 15 if kind == "Q4_K" else 31), axis=1)
    if kind == "Q6_K":
        return np.concatenate(_quantize_q6_k(blocks), axis=1)
    return _quantize_legacy(kind, blocks)


# ----- llama.cpp's presets: which type each tensor gets -----

# preset -> (default type, llama.cpp's LlamaFileType number)
PRESETS = {"q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3), "q5_0": ("Q5_0", 8), "q5_1": ("Q5_1", 9),
           "q8_0": ("Q8_0", 7), "q4_k_m": ("Q4_K", 15), "q5_k_m": ("Q5_K", 17), "q6_k": ("Q6_K", 18)}
# a K-type on rows that are not whole 256-value blocks falls back to a 32-value type of similar size
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def preset_file_type(preset: str) -> int:
    return PRESETS[preset][1]


def _more_bits(layer: int, n_layers: int) -> bool:
    """The layers llama.cpp's _M presets give more bits: the first and last eighth, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type_for(preset: str, name: str, row_values: int, n_layers: int, tied: bool) -> str:
    """The ggml type llama.cpp's quantizer picks for the 2-D tensor `name` (GGUF name) under `preset`, or
    "F16" where no quantized type fits its rows. Rules: the output projection (or the token embeddings of
    a tied model, which serve as it) gets Q6_K unless the preset is q8_0; under q4_k_m / q5_k_m, attn_v
    and ffn_down get Q6_K in the layers `_more_bits` picks; K-types on rows not made of 256-value blocks
    fall back to Q5_0 / Q5_1 / Q8_0."""
    kind = PRESETS[preset][0]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if row_values % QUANT_TYPES[kind].block_values:
            kind = "Q8_0"
        elif kind != "Q8_0":
            kind = "Q6_K"
    elif preset in ("q4_k_m", "q5_k_m") and (".attn_v." in name or ".ffn_down." in name):
        if _more_bits(layer, n_layers):
            kind = "Q6_K"
    if row_values % QUANT_TYPES[kind].block_values:
        kind = _FALLBACK.get(kind, kind)
        if row_values % QUANT_TYPES[kind].block_values:
            kind = "F16"
    return kind
