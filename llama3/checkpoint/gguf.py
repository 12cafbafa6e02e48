"""GGUF (llama.cpp, Ollama): single-file models written with llama.cpp's own `gguf` package and read by a
small reader of our own (`_GGUFFile`: the `gguf` package's reader takes ~15 s over Llama 3's vocabulary).

Layout as llama.cpp's converter writes Llama 3: architecture "llama", tensors `token_embd`, `blk.N.attn_q`
... `output`, q/k rows in Meta's interleaved RoPE order (llama.cpp's rope is the interleaved one, so Meta's
weights go in unchanged; the HF converter has to undo its permutation), norms in f32, and for Llama 3.1+
scaled RoPE a `rope_freqs` tensor of per-frequency divisors. The tokenizer travels as "gpt2" BPE metadata
(tokens, types, merges) with `tokenizer.ggml.pre = "llama-bpe"`, which selects Llama 3's split regex.
"""

from __future__ import annotations

import enum
import os
import re
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import ModelArgs
from .gguf_quants import PRESETS, QUANT_TYPES, quantize, tensor_type_for
from .safety import atomic_output_file, parse_dtype

__all__ = ["GGUF_DTYPES", "gguf_tensor_name", "load_gguf", "rope_freq_divisors", "save_gguf"]

# f32/f16/bf16, and llama.cpp's quantization presets (a type per tensor: `gguf_quants.tensor_type_for`)
GGUF_DTYPES = ("f32", "f16", "bf16", *PRESETS)
_TORCH_TO_GGUF = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_LAYER_NAMES = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    # biases: Llama-architecture derivatives only (see gguf_family.py)
    "attention.wq.bias": "attn_q.bias",
    "attention.wk.bias": "attn_k.bias",
    "attention.wv.bias": "attn_v.bias",
    "attention.wo.bias": "attn_output.bias",
    "feed_forward.w1.bias": "ffn_gate.bias",
    "feed_forward.w2.bias": "ffn_down.bias",
    "feed_forward.w3.bias": "ffn_up.bias",
}
_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"}
_LAYER_NAMES_INV = {v: k for k, v in _LAYER_NAMES.items()}
_TOP_NAMES_INV = {v: k for k, v in _TOP_NAMES.items()}


def gguf_tensor_name(meta_key: str) -> str:
    """Meta name -> llama.cpp name, e.g. layers.3.attention.wq.weight -> blk.3.attn_q.weight."""
    if meta_key in _TOP_NAMES:
        return _TOP_NAMES[meta_key]
    layer, rest = re.match(r"^layers\.(\d+)\.(.+)$", meta_key).groups()
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def _meta_name(gguf_key: str) -> str | None:
    if gguf_key in _TOP_NAMES_INV:
        return _TOP_NAMES_INV[gguf_key]
    match = re.match(r"^blk\.(\d+)\.(.+)$", gguf_key)
    if match and match.group(2) in _LAYER_NAMES_INV:
        return f"layers.{match.group(1)}.{_LAYER_NAMES_INV[match.group(2)]}"
    return None


def rope_freq_divisors(args: ModelArgs) -> torch.Tensor:
    """llama.cpp's `rope_freqs` for Llama 3.1 scaling: base frequency / scaled frequency, per pair
    (1 for short wavelengths, `factor` for long ones, interpolated between), as its HF converter writes."""
    from ..model import rope_frequencies

    base = rope_frequencies(args.replace(use_scaled_rope=False))
    return (base / rope_frequencies(args)).float()


def _resolve_dtype(model, dtype) -> str:
    if dtype is None:
        return _TORCH_TO_GGUF.get(model.tok_embeddings.weight.dtype, "f32")
    if isinstance(dtype, str) and dtype.lower() in GGUF_DTYPES:
        return dtype.lower()
    try:
        return _TORCH_TO_GGUF[parse_dtype(dtype)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}") from None


# llama.cpp reads Llama 3.1 scaling only from the rope_freqs tensor; these keys (which llama.cpp ignores)
# keep the exact parameters so a GGUF loads back into the same ModelArgs.
_ROPE_KEY = "llama3.rope_scaling"
_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")


def _add_metadata(writer, args: ModelArgs, file_type: int, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    from .gguf_family import add_derivative_metadata

    add_derivative_metadata(writer, args)
    if args.use_scaled_rope and args.rope_scaling_type == "llama3":
        for field, value in zip(_ROPE_FIELDS, (args.rope_scaling_factor, args.rope_low_freq_factor,
                                               args.rope_high_freq_factor, args.rope_original_max_seq_len)):
            writer.add_float32(f"{_ROPE_KEY}.{field}", float(value))


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Llama 3 BPE as llama.cpp reads it: tokens as byte-level unicode strings, specials as CONTROL,
    merges "left right" in rank order, and the Llama 3 pre-tokenizer."""
    import gguf

    from ..hf_tokenizer import HFTokenizer
    from ..tokenizer import CHAT_TEMPLATE, _bytes_to_hf

    if isinstance(tokenizer, HFTokenizer):  # a derivative's own vocabulary
        from .gguf_family import add_hf_tokenizer

        return add_hf_tokenizer(writer, tokenizer, vocab_size)
    if tokenizer.n_words > vocab_size:
        # Llama 3.2's tokenizer.json lists <|image|> at 128256, past the 128256 embedding rows; like llama.cpp's
        # own converter, keep the ids the model has rows for (a token without a row could never be produced).
        for name, token_id in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("eot", tokenizer.eot_id)):
            if token_id >= vocab_size:
                raise ValueError(f"the tokenizer's {name} token is id {token_id} but the model has only "
                                 f"{vocab_size} embeddings; export a model whose vocab_size covers it")
        print(f"llama3: the tokenizer has {tokenizer.n_words} ids but the model {vocab_size} embeddings; "
              f"writing the first {vocab_size} to the GGUF vocabulary", file=sys.stderr)
    specials = {i: tok for tok, i in tokenizer.special_tokens.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in specials:
            tokens.append(specials[i])
            types.append(gguf.TokenType.CONTROL)
        elif i < tokenizer.n_words:
            tokens.append(_bytes_to_hf(tokenizer.token_bytes(i)))
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows beyond the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    from .hf import tokenizer_hf_json

    merges = [f"{left} {right}" for left, right in tokenizer_hf_json(tokenizer)["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.eot_id)
    if tokenizer.eom_id is not None and tokenizer.eom_id < vocab_size:
        writer.add_eom_token_id(tokenizer.eom_id)
    if tokenizer.special_tokens.get("<|finetune_right_pad_id|>", vocab_size) < vocab_size:
        writer.add_pad_token_id(tokenizer.special_tokens["<|finetune_right_pad_id|>"])
    writer.add_add_bos_token(True)
    writer.add_chat_template(getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE)


def _encode_tensor(tensor: torch.Tensor, qtype) -> np.ndarray:
    """A weight as the numpy array GGUFWriter stores: f32/f16 natively, bf16 and quantized types as raw
    bytes (the quantized ones by our own quantizers, `gguf_quants.quantize`)."""
    import gguf

    data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    if qtype.name in QUANT_TYPES:
        return quantize(data, qtype.name)
    return gguf.quants.quantize(data, qtype)


def _tensor_type(dtype: str, name: str, tensor: torch.Tensor, args: ModelArgs):
    """The ggml type a tensor is written as: norms (1-D) in f32; 2-D weights in `dtype`, or for a
    quantization preset the type llama.cpp's quantizer gives that tensor."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if tensor.dim() != 2:
        return Q.F32
    if dtype in PRESETS:
        return Q[tensor_type_for(dtype, name, tensor.shape[-1], args.n_layers, args.tie_word_embeddings)]
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[dtype]


def save_gguf(model, tokenizer, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
              overwrite: bool = False, progress: bool = False) -> Path:
    """Write a GGUF file llama.cpp and Ollama load. dtype: f32, f16, bf16 or one of llama.cpp's presets
    q4_0, q4_1, q5_0, q5_1, q8_0, q4_k_m, q5_k_m, q6_k (2-D weights, each tensor the type llama.cpp's
    quantizer would give it; rows no quantized type fits are f16); norms and rope_freqs stay f32 as
    llama.cpp expects; default: the model's dtype. Written to a temp file, then renamed.
    Tensors are converted and written one at a time (peak memory ~ weights + one tensor)."""
    import gguf

    args: ModelArgs = model.args
    dtype = _resolve_dtype(model, dtype)
    Q = gguf.GGMLQuantizationType
    file_type = PRESETS[dtype][1] if dtype in PRESETS else {
        "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    state = model.state_dict()
    plan: list[tuple[str, torch.Tensor, object]] = []  # (gguf name, tensor, ggml type)
    if args.use_scaled_rope and args.rope_scaling_type == "llama3":
        plan.append(("rope_freqs.weight", rope_freq_divisors(args), Q.F32))
    for key, tensor in state.items():
        if key == "output.weight" and args.tie_word_embeddings:
            continue  # llama.cpp uses token_embd when output is absent
        name = gguf_tensor_name(key)
        plan.append((name, tensor, _tensor_type(dtype, name, tensor, args)))
    from tqdm.auto import tqdm

    with atomic_output_file(path, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _add_metadata(writer, args, int(file_type), Path(path).stem)
        _add_tokenizer(writer, tokenizer, args.vocab_size)
        for name, tensor, ttype in plan:
            shape = tuple(tensor.shape)
            if ttype in (Q.F32, Q.F16):
                np_dtype = np.float32 if ttype == Q.F32 else np.float16
                writer.add_tensor_info(name, shape, np.dtype(np_dtype), tensor.numel() * np.dtype(np_dtype).itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, ttype)
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=ttype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _name, tensor, ttype in tqdm(plan, desc=f"writing {Path(path).name} ({dtype})", unit="tensor",
                                        disable=not progress):
            writer.write_tensor_data(_encode_tensor(tensor, ttype))
        writer.close()
    return Path(path)


# ----- reading -----

# GGUF metadata value types -> struct format of one value (8 = string, 9 = array are read separately)
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}

# tensor types stored as plain little-endian numbers (the others are blocks of bytes: bf16, quantized)
_PLAIN_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                "I32": np.int32, "I64": np.int64}


class GGMLType(enum.IntEnum):
    """The ggml tensor types this reader runs, numbered as in a GGUF tensor header (equal, as numbers, to the
    `gguf` package's `GGMLQuantizationType`). Any other type is looked up in that package, imported only
    then: importing it (and the YAML parser it pulls in) cost 0.1-0.6 s of every start."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    BF16 = 30


_DEFAULT_ALIGNMENT = 32  # GGUF's, where general.alignment is absent
_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3  # tokenizer.ggml.token_type values
_ELEMENT_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8}


def _ggml_type(number: int):
    """The type a tensor header's number names: ours, else the `gguf` package's (ValueError if neither)."""
    try:
        return GGMLType(number)
    except ValueError:
        import gguf

        return gguf.GGMLQuantizationType(number)


def _block_size(kind) -> tuple[int, int]:
    """(values, bytes) of one block of `kind` (1 value of its size for plain numbers)."""
    if isinstance(kind, GGMLType):
        if kind.name in _ELEMENT_BYTES:
            return 1, _ELEMENT_BYTES[kind.name]
        return QUANT_TYPES[kind.name].block_values, QUANT_TYPES[kind.name].block_bytes
    import gguf

    return gguf.GGML_QUANT_SIZES[kind]


# Read only for a vocabulary that is not Llama 3's own (Llama 3's loads on tiktoken from its tokens alone):
# decoding its 280K merges was a second of every start
_LAZY_FIELDS = frozenset({"tokenizer.ggml.merges"})


def _skip_strings(buf: memoryview, pos: int, count: int) -> int:
    """The position after `count` GGUF strings (u64 length, then the bytes) starting at `pos`."""
    size, length_at = len(buf), _U64.unpack_from
    for _ in range(count):
        pos += 8 + length_at(buf, pos)[0]
        if pos > size:
            raise ValueError("a string runs past the end of the file")
    return pos


def _read_strings(buf: memoryview, pos: int, count: int) -> tuple[list[str], int]:
    """`count` GGUF strings starting at `pos`, and the position after them. Only the lengths are walked one
    by one; the text is decoded in one go: every length field but its last byte dropped, that byte made a
    NUL separator, then one UTF-8 decode and one split (Llama 3's 128K tokens: ~0.1 s against ~0.4 s
    for a decode per string). Strings that hold a NUL themselves are decoded one by one."""
    heads, size, length_at, start = [], len(buf), _U64.unpack_from, pos
    for _ in range(count):
        heads.append(pos)
        pos += 8 + length_at(buf, pos)[0]
        if pos > size:
            raise ValueError("a string runs past the end of the file")
    if count == 0:
        return [], pos
    region = np.frombuffer(buf[start:pos], dtype=np.uint8).copy()
    at = np.asarray(heads, dtype=np.int64) - start
    keep = np.ones(len(region), dtype=bool)
    keep[(at[:, None] + np.arange(7)).ravel()] = False
    region[at + 7] = 0
    items = region[keep].tobytes().decode("utf-8").split("\x00")[1:]
    if len(items) != count:
        items = [str(buf[h + 8:h + 8 + length_at(buf, h)[0]], "utf-8") for h in heads]
    return items, pos


class _StringArray(Sequence):
    """A GGUF string array whose strings are decoded on first use, then kept."""

    def __init__(self, buf: memoryview, pos: int, count: int):
        self._buf, self._pos, self._count = buf, pos, count
        self._items: list[str] | None = None

    def _decoded(self) -> list[str]:
        if self._items is None:
            try:
                items, _ = _read_strings(self._buf, self._pos, self._count)
            except UnicodeDecodeError as e:
                raise ValueError(f"a GGUF string array holds bytes that are not UTF-8 ({e}); the file is "
                                 "corrupt or was written wrongly") from None
            self._items = items
        return self._items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        return self._decoded()[index]

    def __iter__(self):
        return iter(self._decoded())

    def __eq__(self, other) -> bool:  # equal to the list it stands for
        return self._decoded() == (list(other) if isinstance(other, _StringArray) else other)

    __hash__ = None  # like a list


class _TensorInfo:
    """One tensor of a GGUF file: `name`, `shape` (GGUF order, innermost first), `tensor_type`, and `data`
    (a read-only view of the file: numbers for float types, bytes per row for quantized ones)."""

    def __init__(self, name: str, shape: list[int], tensor_type, data: np.ndarray):
        self.name, self.shape, self.tensor_type, self.data = name, shape, tensor_type, data


_U64 = struct.Struct("<Q")


class _GGUFFile:
    """A GGUF file (versions 2 and 3) read straight from the bytes: the metadata into Python values and
    the tensors as views of a memory map.

    The `gguf` package's reader builds numpy views for every part of every metadata string, which takes
    about 15 s for Llama 3's 128K tokens and 280K merges; here each string is one slice and decode (under
    a second). The file is checked as it is read: a truncated or corrupt one raises ValueError."""

    def __init__(self, path: Path):
        # copy-on-write: private pages, read from the file on demand, so tensors can share them without
        # torch's warning about read-only memory (nothing here writes to them)
        self._map = np.memmap(path, dtype=np.uint8, mode="c")
        _read_ahead(path)
        buf = memoryview(self._map)
        pos = 0

        def take(fmt: str):
            nonlocal pos
            values = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize("<" + fmt)
            return values[0] if len(values) == 1 else values

        def string() -> str:
            nonlocal pos
            n = take("Q")
            if pos + n > len(buf):
                raise ValueError("a string runs past the end of the file")
            text = bytes(buf[pos: pos + n]).decode("utf-8")
            pos += n
            return text

        def strings(count: int, lazy: bool = False) -> list[str] | _StringArray:
            """A string array (the vocabulary, the merges: ~400K strings for Llama 3) decoded at once
            (`_read_strings`); string() per item took 1.2 s of every load here. lazy: only step over the
            strings now and decode them when first used (`_StringArray`)."""
            nonlocal pos
            if lazy:
                start, pos = pos, _skip_strings(buf, pos, count)
                return _StringArray(buf, start, count)
            out, pos = _read_strings(buf, pos, count)
            return out

        def value(kind: int, lazy: bool = False):
            nonlocal pos
            if kind == 8:
                return string()
            if kind == 9:
                item_kind, count = take("IQ")
                if item_kind == 8:
                    return strings(count, lazy)
                if item_kind == 9:
                    return [value(item_kind) for _ in range(count)]
                dtype = np.dtype(_NUMPY_DTYPES[item_kind]).newbyteorder("<")
                end = pos + count * dtype.itemsize
                if end > len(buf):
                    raise ValueError("an array runs past the end of the file")
                items = np.frombuffer(buf[pos:end], dtype=dtype).tolist()
                pos = end
                return items
            return take(_SCALAR_FORMATS[kind])

        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic number")
        pos = 4
        version, n_tensors, n_fields = take("IQQ")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; versions 2 and 3 are supported")
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = string()
            self.fields[key] = value(take("I"), lazy=key in _LAZY_FIELDS)
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("I")
            shape = [take("Q") for _ in range(n_dims)]
            kind, offset = take("IQ")
            infos.append((name, shape, _ggml_type(kind), offset))
        alignment = _check_alignment(self.fields.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-pos // alignment) * alignment
        self.tensors: list[_TensorInfo] = []
        spans = []  # (name, offset, size in bytes) in file order, for _check_data_layout
        for name, shape, kind, offset in infos:
            block, block_bytes = _block_size(kind)
            if shape[0] % block:
                raise ValueError(f"tensor {name}: {shape[0]} values per row do not fill {kind.name} blocks")
            row_bytes = shape[0] // block * block_bytes
            rows = int(np.prod(shape[1:], dtype=np.int64))
            start, end = data_start + offset, data_start + offset + rows * row_bytes
            spans.append((name, offset, rows * row_bytes))
            if end > len(buf):
                raise ValueError(f"tensor {name} runs past the end of the file")
            raw = self._map[start:end]
            dims = [int(n) for n in reversed(shape)]
            if kind.name in _PLAIN_TYPES:
                data = raw.view(np.dtype(_PLAIN_TYPES[kind.name]).newbyteorder("<")).reshape(dims)
            else:
                data = raw.reshape(*dims[:-1], row_bytes)  # bytes per row, as gguf.quants.dequantize takes
            self.tensors.append(_TensorInfo(name, shape, kind, data))
        _check_data_layout(spans, alignment)


def _memory_available() -> int:
    """Bytes the kernel reports as available for new data (MemAvailable), 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _read_ahead(path: Path) -> None:
    """Ask the kernel to read the whole file into the page cache in the background (one sequential read at
    the disk's speed), when it fits in half the available memory. Without it a cold start reads the
    weights through the page faults of the first forward pass, a few pages at a time: 48 s against 14 s
    for an 8B Q4_0 file here (BENCHMARKS.md, real size). A thread issues the advice, which may block while
    it queues the reads, so the load goes on meanwhile."""
    import threading

    if not hasattr(os, "posix_fadvise") or path.stat().st_size > _memory_available() // 2:
        return

    def advise() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only advice: a file system that refuses it reads on demand as before
        finally:
            os.close(fd)

    threading.Thread(target=advise, name="gguf-read-ahead", daemon=True).start()


def _check_data_layout(spans: list[tuple[str, int, int]], alignment: int) -> None:
    """Tensor data as llama.cpp lays it out and requires it: in the order the tensors are listed, each at an
    offset that is a multiple of the alignment, right after the previous one's data padded to the alignment.
    A file whose offsets overlap, leave gaps or are misaligned is refused (llama.cpp refuses it too); read
    anyway, overlapping tensors alias each other's bytes and the logits come out non-finite."""
    expected = 0
    for name, offset, size in spans:
        if offset % alignment:
            raise ValueError(f"tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}")
        if offset < expected:
            raise ValueError(f"tensor {name}: data at offset {offset} overlaps the tensor before it (which ends at "
                             f"{expected})")
        if offset != expected:
            raise ValueError(f"tensor {name}: data at offset {offset}, expected {expected} (tensor data must be "
                             "contiguous, in the order the tensors are listed)")
        expected = -(-(offset + size) // alignment) * alignment


def _check_alignment(alignment) -> int:
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment is {alignment!r}; it must be a power of two")
    return alignment


_MIN_CONTEXT = 16  # shorter than a chat header and a word: a corrupt or hostile value, not a model


def _check_required(reader, tensors: dict, path: Path) -> None:
    """What `load_gguf` reads without a default must be there, with the type it needs: the embedding table,
    the vocabulary with one type per token, and a usable context length."""
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight tensor; the file is incomplete or not a Llama model")
    if len(tensors["token_embd.weight"].shape) != 2:
        raise ValueError(f"{path}: token_embd.weight has shape {tensors['token_embd.weight'].shape}; expected "
                         "two dimensions")
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens is missing or not a list of strings")
    if not isinstance(types, list) or len(types) != len(tokens):
        found = "missing" if types is None else f"{len(types) if isinstance(types, list) else type(types).__name__}"
        raise ValueError(f"{path}: tokenizer.ggml.token_type must list one type per token ({len(tokens)}), "
                         f"found {found}")
    _check_context_length(_field(reader, "llama.context_length"), path)


def _check_context_length(value, path: Path) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < _MIN_CONTEXT:
        raise ValueError(f"{path}: llama.context_length is {value!r}; it must be an integer of at least "
                         f"{_MIN_CONTEXT} tokens")


def _stored_shapes(tensors: dict) -> dict[str, tuple[int, ...]]:
    """Meta name -> shape (PyTorch order) of every Llama tensor in the file, from its tensor infos."""
    return {key: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()
            if (key := _meta_name(name)) is not None}


def _field(reader, key: str, default=None):
    return reader.fields.get(key, default)


def load_gguf(path: str | os.PathLike, *, device: str | torch.device = "cpu",
              dtype: str | torch.dtype | None = None, progress: bool = False, dequantize: bool = False,
              repack: bool = True):
    """(model, tokenizer) from a llama-architecture GGUF: Llama 3 (its vocabulary on tiktoken) or a derivative
    (its byte-level BPE or SentencePiece vocabulary on `tokenizers`, see gguf_family.py). Quantized weights
    (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) stay quantized and run on the CPU kernels
    (`llama3.inference.ggml_quant`), unless `dequantize=True` turns them into float tensors. dtype=None
    gives float32 for quantized files, else the stored float type. With the kernels, the Q4_0 / Q4_K / Q6_K
    product matrices are repacked for them here (`repack=False` keeps the file's layout: tests, export)."""
    from .gguf_family import derivative_args
    from .gguf_quantized_model import build_quantized_model, is_quantized_file
    from .gguf_quants import check_quantized_tensor, check_tensor_types

    path = Path(path)
    try:
        reader = _GGUFFile(path)
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e}); it may be truncated or corrupt") from None
    check_tensor_types(path, reader.tensors)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}; only 'llama' GGUF files load here")

    def need(key):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"{path}: missing metadata llama.{key}")
        return value

    tensors = {t.name: t for t in reader.tensors}
    _check_required(reader, tensors, path)
    args = ModelArgs(dim=int(need("embedding_length")), n_layers=int(need("block_count")),
                     n_heads=int(need("attention.head_count")), n_kv_heads=int(need("attention.head_count_kv")),
                     vocab_size=int(tensors["token_embd.weight"].shape[-1]),
                     ffn_hidden_dim=int(need("feed_forward_length")),
                     norm_eps=float(need("attention.layer_norm_rms_epsilon")),
                     rope_theta=float(need("rope.freq_base")), max_seq_len=int(need("context_length")),
                     tie_word_embeddings="output.weight" not in tensors)
    args = derivative_args(args, reader.fields, set(tensors), path)
    if "rope_freqs.weight" in tensors:
        args = _scaled_rope_args(args, reader, torch.from_numpy(np.array(tensors["rope_freqs.weight"].data)), path)
    tokenizer = _gguf_tokenizer(reader, path)

    def items():
        for name, t in tensors.items():
            key = _meta_name(name)
            if key is None:
                if name == "rope_freqs.weight":
                    continue
                raise ValueError(f"{path}: unexpected tensor {name!r}; not part of a Llama model")
            if t.tensor_type.name in QUANT_TYPES:
                check_quantized_tensor(path, name, t.tensor_type.name, t.shape, t.data)
            # plain numbers stay views of the file's (copy-on-write) map: a tensor used as stored costs no
            # copy and no time at load, its pages are read as the model first touches them
            if t.tensor_type.name in _PLAIN_TYPES:
                data = t.data
            else:
                import gguf

                data = gguf.quants.dequantize(t.data, t.tensor_type)
            tensor = torch.from_numpy(data)
            if t.tensor_type == GGMLType.BF16:
                tensor = tensor.to(torch.bfloat16)  # exact: the values were bf16
            yield key, tensor.reshape([int(n) for n in reversed(t.shape)]), f"{path} ({name})"

    if is_quantized_file(reader.tensors) and not dequantize:
        model = build_quantized_model(args, tensors, _meta_name, path, device=device, dtype=parse_dtype(dtype),
                                      repack=repack)
    else:
        from .materialize import materialize_model

        model = materialize_model(args, items(), device=device, dtype=parse_dtype(dtype), what=str(path),
                                  progress=progress, stored_shapes=_stored_shapes(tensors),
                                  stored_name=gguf_tensor_name)
    return model, tokenizer


def _gguf_tokenizer(reader, path: Path):
    """Llama 3's vocabulary on the tiktoken path; a derivative's (another BPE, SentencePiece) on `tokenizers`."""
    from ..tokenizer import Tokenizer, _hf_tokens_to_bytes
    from .gguf_family import hf_tokenizer_from_gguf, is_llama3_vocab

    if not is_llama3_vocab(reader.fields):
        return hf_tokenizer_from_gguf(reader.fields, path)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    normal, control = _TOKEN_NORMAL, _TOKEN_CONTROL  # plain ints: compared 128K times
    ids = [i for i, kind in enumerate(types) if kind == normal]
    ranks = dict(zip(_hf_tokens_to_bytes([tokens[i] for i in ids]), ids))
    specials = [tok for tok, kind in zip(tokens, types) if kind == control]
    from .hf import attach_foreign_template

    return attach_foreign_template(Tokenizer(ranks, special_tokens=specials), _field(reader, "tokenizer.chat_template"),
                                   f"{path} (tokenizer.chat_template)")


def _scaled_rope_args(args: ModelArgs, reader, divisors: torch.Tensor, path: Path) -> ModelArgs:
    """Llama 3.1 scaling parameters from our `llama3.rope_scaling.*` keys (llama.cpp keeps only the
    `rope_freqs` divisors), else the 3.1 defaults; either way they must reproduce the stored divisors."""
    stored = {name: _field(reader, f"{_ROPE_KEY}.{name}") for name in _ROPE_FIELDS}
    if any(v is None for v in stored.values()):
        stored = {"factor": float(divisors.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_context_length": 8192}
    candidate = args.replace(use_scaled_rope=True, rope_scaling_factor=float(stored["factor"]),
                             rope_low_freq_factor=float(stored["low_freq_factor"]),
                             rope_high_freq_factor=float(stored["high_freq_factor"]),
                             rope_original_max_seq_len=int(stored["original_context_length"]))
    if not torch.allclose(rope_freq_divisors(candidate), divisors, rtol=1e-4):
        raise ValueError(f"{path}: rope_freqs matches no Llama 3.1 scaling we can express; cannot load it")
    return candidate
