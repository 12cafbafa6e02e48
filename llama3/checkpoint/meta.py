"""Meta's original format: `params.json`, `consolidated.NN.pth` (one per model-parallel rank), `tokenizer.model`.

Our modules carry Meta's names, so a single shard is the identity. Model-parallel shards split each tensor
the way Meta's fairscale layers do (Llama 3 reference model.py): column-parallel wq/wk/wv, w1/w3 and output,
and the vocab-parallel tok_embeddings, along dim 0; row-parallel wo and w2 along dim 1; norms replicated.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ModelArgs
from .materialize import materialize_model
from .safety import atomic_output_dir, parse_dtype, read_json, write_json

__all__ = ["load_meta", "load_pth", "read_meta_args", "save_meta", "shard_paths", "split_dim"]

_SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")
_DIM0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
         "feed_forward.w3.weight", "output.weight", "tok_embeddings.weight")
_DIM1 = ("attention.wo.weight", "feed_forward.w2.weight")
_IGNORED = ("rope.freqs",)  # a RoPE buffer Llama 1/2 checkpoints carry; we recompute it


def split_dim(key: str) -> int | None:
    """The dim a model-parallel shard splits `key` along, None when replicated (norms)."""
    if key.endswith(_DIM0):
        return 0
    if key.endswith(_DIM1):
        return 1
    return None


def read_meta_args(folder: Path) -> ModelArgs:
    path = folder / "params.json"
    params = read_json(path, what="Meta params.json")
    if params.get("use_scaled_rope") and "max_seq_len" not in params:
        # Meta's params.json does not store the context; scaled RoPE is what Llama 3.1+ uses for 128K.
        params["max_seq_len"] = 131072
    try:
        return ModelArgs.from_params_json(params)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def shard_paths(folder: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, checked to be numbered 0..N-1 without gaps."""
    found = {}
    for path in folder.glob("consolidated.*.pth"):
        match = _SHARD_NAME.match(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise ValueError(f"{folder}: no consolidated.NN.pth weight files")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"{folder}: model-parallel shards are numbered {sorted(found)}; expected 0..{len(found) - 1}"
                         " (a shard is missing)")
    return [found[i] for i in range(len(found))]


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only (no arbitrary unpickling) and mmap (no copy into memory)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot read this PyTorch checkpoint ({first_line}); it is truncated, corrupt, "
                         "or holds objects other than tensors (only weights-only loading is allowed)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensor name -> tensor")
    return state


def _file_mappings(paths: list[Path]) -> list[tuple[int, int]]:
    """Address ranges where this process maps any of `paths` (Linux /proc/self/maps; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    names = {str(p.resolve()) for p in paths}
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _drop_mapped_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Tell the kernel we are done with the pages of a tensor memory-mapped from a checkpoint file, once its
    data has been copied (merged or converted), so they leave our resident set instead of doubling peak
    memory. The mapping is private and never written, so touched again the pages would simply be read from
    the file. Acts only on addresses inside `mappings` (the shard files' own mappings): on anonymous memory
    MADV_DONTNEED would zero the data."""
    if sys.platform != "linux" or tensor.device.type != "cpu":
        return
    storage = tensor.untyped_storage()
    page = mmap.PAGESIZE
    start = (storage.data_ptr() + page - 1) // page * page  # whole pages inside this record only
    end = (storage.data_ptr() + storage.nbytes()) // page * page
    if end > start and any(lo <= start and end <= hi for lo, hi in mappings):
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


_MADV_DONTNEED = 4  # Linux


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _merged_tensors(shards: list[dict[str, torch.Tensor]], paths: list[Path], *, device,
                    dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(name, tensor on device in dtype, source) per tensor, merged one at a time. A tensor used as stored
    stays a view of the mapped file; one that is merged or converted is copied, and the mapped pages of
    its pieces are dropped right away, so peak memory stays near the size of the weights."""
    source = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/consolidated.*.pth"
    mappings = _file_mappings(paths)
    for key in shards[0]:
        if key in _IGNORED:
            continue
        pieces = []
        for shard, path in zip(shards, paths):
            if key not in shard:
                raise ValueError(f"{path}: missing tensor {key!r} (present in {paths[0].name})")
            pieces.append(shard[key])
        dim = split_dim(key)
        if len(pieces) == 1 or dim is None:
            pieces = pieces[:1]  # norms are replicated: shard 0's copy
            merged = pieces[0]
        else:
            try:
                merged = torch.cat(pieces, dim=dim)
            except RuntimeError:
                shapes = [list(p.shape) for p in pieces]
                raise ValueError(f"{source}: shards of {key!r} have shapes {shapes} that do not join along "
                                 f"dim {dim}") from None
        result = merged.to(device=device, dtype=dtype if merged.is_floating_point() else None)
        if result is not pieces[0]:
            for piece in pieces:
                _drop_mapped_pages(piece, mappings)
        yield key, result, source


def _merged_shapes(shards: list[dict[str, torch.Tensor]]) -> dict[str, tuple[int, ...]]:
    """The shape each tensor will have once its model-parallel pieces are joined (from the mapped headers).
    Tensors whose pieces are missing or do not join are left out: reading them reports that, naming the shard."""
    shapes = {}
    for key, tensor in shards[0].items():
        pieces = [s.get(key) for s in shards]
        if any(p is None or p.dim() != tensor.dim() for p in pieces):
            continue
        shape = list(tensor.shape)
        dim = split_dim(key)
        if dim is not None and len(shards) > 1 and dim < len(shape):
            shape[dim] = sum(p.shape[dim] for p in pieces)
        shapes[key] = tuple(shape)
    return shapes


def load_meta(folder: str | os.PathLike, *, device: str | torch.device = "cpu",
              dtype: str | torch.dtype | None = None, progress: bool = False):
    """(model, tokenizer) from a Meta folder with any number of model-parallel shards."""
    from ..tokenizer import Tokenizer

    folder = Path(folder)
    args = read_meta_args(folder)
    paths = shard_paths(folder)
    shards = [load_pth(p) for p in paths]
    if "output.weight" not in shards[0] and not args.tie_word_embeddings:
        args = args.replace(tie_word_embeddings=True)  # Meta's 3.2 1B/3B files omit the tied output matrix
    dtype = parse_dtype(dtype) or next(t.dtype for t in shards[0].values() if t.is_floating_point())
    tensors = _merged_tensors(shards, paths, device=device, dtype=dtype)
    model = materialize_model(args, tensors, device=device, dtype=dtype, what=str(folder), progress=progress,
                              stored_shapes=_merged_shapes(shards))
    del shards
    tok_path = folder / "tokenizer.model"
    if not tok_path.is_file():
        raise ValueError(f"{folder}: no tokenizer.model; copy Meta's tokenizer.model beside params.json")
    return model, Tokenizer.from_tiktoken_file(tok_path)


def _check_num_shards(args: ModelArgs, num_shards: int) -> None:
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "FFN hidden size": args.hidden_dim,
             "vocab_size": args.vocab_size}
    for name, size in sizes.items():
        if size % num_shards:
            raise ValueError(f"cannot split into {num_shards} model-parallel shards: {name} = {size} is not "
                             f"divisible by {num_shards}")


def meta_ffn_args(args: ModelArgs) -> ModelArgs:
    """Express an explicit FFN size (from an HF config) as Meta's (multiple_of, ffn_dim_multiplier) rule when one
    of the released pairs reproduces it, so Meta's own loaders (which know only that rule) build the right
    shapes. Otherwise params.json keeps `ffn_hidden_dim`."""
    from ..config import PRESETS

    if args.ffn_hidden_dim is None:
        return args
    pairs = [(p["multiple_of"], p.get("ffn_dim_multiplier")) for p in PRESETS.values()]
    for multiple_of, multiplier in [(args.multiple_of, args.ffn_dim_multiplier), *pairs]:
        candidate = args.replace(multiple_of=multiple_of, ffn_dim_multiplier=multiplier, ffn_hidden_dim=None)
        if candidate.hidden_dim == args.ffn_hidden_dim:
            return candidate
    return args


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """torch.save writes a tensor's whole storage; copy views so a shard holds only its slice."""
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_meta(model, tokenizer, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
              num_shards: int = 1, overwrite: bool = False, progress: bool = False) -> Path:
    """Write a Meta folder: params.json, consolidated.00..N-1.pth, tokenizer.model (atomically).
    Tied models omit output.weight (the embedding is the output matrix)."""
    args: ModelArgs = model.args
    from ..hf_tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):  # a derivative's own tokenizer (tokenizer.json)
        raise ValueError("Meta's format carries Llama 3's tiktoken tokenizer.model; this model has its own "
                         "tokenizer, so save it as a Hugging Face folder or GGUF instead (--to hf / --to gguf)")
    _check_num_shards(args, num_shards)
    state = model.state_dict()
    dtype = parse_dtype(dtype) or state["tok_embeddings.weight"].dtype
    names = [k for k in state if not (k == "output.weight" and args.tie_word_embeddings)]
    with atomic_output_dir(path, overwrite=overwrite) as out:
        bar = tqdm(total=num_shards * len(names), desc=f"writing {Path(path).name} (meta)", unit="tensor",
                   disable=not progress)
        for rank in range(num_shards):
            shard = {}
            for key in names:
                tensor = state[key].detach().to(device="cpu", dtype=dtype)
                dim = split_dim(key)
                if num_shards > 1 and dim is not None:
                    tensor = tensor.chunk(num_shards, dim=dim)[rank]
                shard[key] = _own_storage(tensor)
                bar.update()
            torch.save(shard, out / f"consolidated.{rank:02d}.pth")
            del shard
        bar.close()
        write_json(out / "params.json", meta_ffn_args(args).to_params_json())
        tokenizer.save_tiktoken(out / "tokenizer.model")
    return Path(path)
