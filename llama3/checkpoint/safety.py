"""Guards shared by every checkpoint format: JSON reading, path containment, state-dict checks against the
config, safetensors reading with clear errors, and atomic output folders.

Every error a user can cause (a truncated download, a hand-edited index, a config that does not match the
weights) is a `ValueError` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_output_dir",
    "atomic_output_file",
    "check_state_dict",
    "contained_path",
    "dtype_name",
    "open_safetensors",
    "os_error_of",
    "parse_dtype",
    "parse_size",
    "read_json",
    "read_safetensors_tensor",
    "write_json",
    "WriteFailed",
]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None stays None (keep the stored dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (decimal units as Hugging Face's `max_shard_size`)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():  # noqa: B007 - factor is used after the loop
        if text.endswith(unit):
            number = text[: -len(unit)]
            break
    else:
        number, factor = text, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"cannot read size {size!r}; write e.g. 5GB, 500MB or a number of bytes") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> dict[str, Any]:
    """Parse a JSON object from `path`, or raise a ValueError naming the file and what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e}); the file may be truncated or corrupt") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must hold a JSON object, found {type(data).__name__}")  # noqa: TRY004
    return data


def os_error_of(exc: BaseException, path: os.PathLike | str | None = None) -> OSError | None:
    """The operating-system error behind `exc` (a full disk, say), or None when there is none: `exc` itself,
    an OSError it was raised from or while handling (torch.save writing to a Python file), or the
    "os error N" safetensors quotes in its own exception's message. `path` fills in a missing file name."""
    found, seen = None, exc
    while seen is not None and found is None:
        if isinstance(seen, OSError):
            found = seen
        seen = seen.__cause__ or seen.__context__
    if found is None and (match := re.search(r"os error (\d+)", str(exc))):
        code = int(match.group(1))
        found = OSError(code, os.strerror(code))
    if found is not None and found.filename is None and path is not None:
        found = OSError(found.errno, found.strerror, str(path))
    return found


class WriteFailed(OSError):
    """A write to disk failed (full disk, no permission, ...). The message is one line: the path, the
    system's reason ("No space left on device") and, for training, the last complete checkpoint."""

    @classmethod
    def from_os_error(cls, exc: OSError, what: str, *, fallback_path: os.PathLike | str | None = None,
                      training: bool = False, last_checkpoint: os.PathLike | str | None = None) -> WriteFailed:
        """One line from an OSError; `training` adds the checkpoint a `--resume` would continue from."""
        path = exc.filename or fallback_path or "?"
        reason = exc.strerror or str(exc) or type(exc).__name__
        message = f"{path}: cannot write {what}: {reason}"
        if training:
            message += (f"; last complete checkpoint: {last_checkpoint or 'none yet'} "
                        "(free some space, then continue with --resume)")
        return cls(message)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def contained_path(folder: Path, name: str, *, source: Path) -> Path:
    """`folder / name` for a shard name an index file lists, refusing names that leave `folder`: absolute
    names, drive or backslash names, and `..` parts. The check is on the name as written, not on where a
    symlink leads, because the Hugging Face hub cache keeps every file of a snapshot folder as a link into
    `../../blobs/<hash>`: those links are how the download is laid out, and opening them is intended.
    An index file is data, and data must not make us read arbitrary files; the links are the user's own."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name or ":" in name:
        raise ValueError(f"{source}: refusing file name {name!r}; shard names must be plain relative names")
    parts = Path(name).parts
    if any(part in ("..", "") for part in parts):
        raise ValueError(f"{source}: refusing file name {name!r}; it points outside {folder}")
    return folder / name


def check_state_dict(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Size],
                     sources: dict[str, str], *, what: str, stored_name=None) -> None:
    """Every expected tensor present with the expected shape, nothing unexpected.

    sources: tensor name -> the file it came from (for the message); `what` names the checkpoint;
    `stored_name` maps our tensor name to the name the format stores it under (for the message)."""
    missing = [k for k in expected if k not in state_dict]
    if missing:
        name = stored_name(missing[0]) if stored_name else missing[0]
        raise ValueError(f"{what}: missing tensor {name!r}" + (f" (and {len(missing) - 1} more)"
                         if len(missing) > 1 else "") + "; the checkpoint is incomplete or for another model")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        k = unexpected[0]
        raise ValueError(f"{sources.get(k, what)}: unexpected tensor {k!r}; it does not belong to a Llama model "
                         "of this configuration")
    for key, shape in expected.items():
        got = tuple(state_dict[key].shape)
        if got != tuple(shape):
            raise ValueError(f"{sources.get(key, what)}: tensor {key!r} has shape {list(got)} but the config "
                             f"implies {list(shape)}; config and weights do not match")


def open_safetensors(path: Path, *, low_memory: bool = True):
    """safe_open with errors as ValueError naming the file. `low_memory` reads tensors with pread into their
    own memory instead of mapping the file, so converting dtypes does not keep the source pages resident."""
    from safetensors import SafetensorError, safe_open

    try:
        try:
            return safe_open(str(path), framework="pt", backend="pread" if low_memory else "mmap")
        except TypeError:  # safetensors < 0.8 has no backend argument
            return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise ValueError(f"{path}: weights file not found") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e}); the download may be truncated or "
                         "corrupt, fetch it again") from None


def read_safetensors_tensor(handle, key: str, path: Path) -> torch.Tensor:
    from safetensors import SafetensorError

    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read tensor {key!r} ({e}); the file may be truncated or corrupt") from None


def _prepare_destination(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; choose a new output path or pass overwrite=True (--overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)


@contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; on success it is renamed to `path` (replacing an old one when
    `overwrite`), on failure it is deleted, so a folder at `path` is always complete."""
    path = Path(path)
    _prepare_destination(path, overwrite)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_output_file(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Like `atomic_output_dir` for a single file."""
    path = Path(path)
    _prepare_destination(path, overwrite)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name for the output")
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
