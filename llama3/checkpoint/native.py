"""Training checkpoints: `RUN/step-NNNNNNNN/` folders that count only once complete.

A step folder holds

    model.safetensors     the weights, Meta names (tied output weight stored once, as tok_embeddings)
    train_state.pt        optimizer state, step, data-loader state, RNG states, skipped-step count
    config.json           the resolved TrainConfig of the run
    model_args.json       the ModelArgs (so the weights load without the training config)
    tokenizer.model       the tokenizer (tiktoken format), or for a derivative its tokenizer.json and
                          tokenizer_config.json
    COMPLETE              the completion marker, written last

It is written into `RUN/.tmp-step-NNNNNNNN/` and renamed into place after the marker, so a crash mid-save
leaves only a temp folder that no reader counts (and the next save removes). Older complete checkpoints
beyond `keep` are deleted only after the new one is in place, so the last good checkpoint always exists.
`train_state.pt` loads with `torch.load(weights_only=True)`: it holds tensors, numbers, strings and lists only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .safety import open_safetensors, os_error_of, read_json, read_safetensors_tensor

__all__ = [
    "MARKER",
    "complete_checkpoints",
    "is_training_checkpoint",
    "latest_checkpoint",
    "load_train_state",
    "load_training_checkpoint",
    "save_training_checkpoint",
]

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d{8})$")


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with a tied output weight dropped (safetensors refuses shared storage)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False):
        state.pop("output.weight", None)
    return state


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step folders of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if _STEP_RE.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete step folder of a run, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_training_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer | None, train_state: dict[str, Any],
                             config_json: str, tokenizer: Any, keep: int = 3) -> Path:
    """Write `run_dir/step-<step>/` atomically and prune older complete checkpoints to the last `keep`."""
    run_dir = Path(run_dir)
    tmp = begin_step_folder(run_dir, step)
    state = dict(train_state)
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    writes = {
        "model.safetensors": lambda p: save_file(_unique_state_dict(model), str(p), metadata={"format": "pt"}),
        "train_state.pt": lambda p: _torch_save(state, p),
        "config.json": lambda p: p.write_text(config_json),
        "model_args.json": lambda p: p.write_text(json.dumps(model.args.to_dict(), indent=2) + "\n"),
    }
    from ..hf_tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):  # a derivative's own tokenizer files (tokenizer.json, ...)
        writes["tokenizer.json"] = lambda p: tokenizer.save_files(p.parent)
    else:
        writes["tokenizer.model"] = tokenizer.save_tiktoken
    try:
        for name, write in writes.items():
            try:
                write(tmp / name)
            except Exception as e:  # safetensors and torch wrap the disk's error in their own types
                os_error = os_error_of(e, tmp / name)
                if os_error is None:
                    raise
                raise os_error from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save (full disk) gives its space back
        raise
    return commit_step_folder(run_dir, step, keep=keep)


def _torch_save(state: dict[str, Any], path: Path) -> None:
    # Through a Python file, so a failed write surfaces as the OSError behind torch's RuntimeError.
    with open(path, "wb") as f:
        torch.save(state, f)


def _step_folders(run_dir: Path, step: int) -> tuple[Path, Path]:
    name = f"step-{step:08d}"
    return run_dir / name, run_dir / f".tmp-{name}"


def begin_step_folder(run_dir: Path, step: int) -> Path:
    """Create the temporary folder a checkpoint is written into (removing any a crash left behind)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = _step_folders(run_dir, step)[1]
    tmp.mkdir()
    return tmp


def commit_step_folder(run_dir: Path, step: int, *, keep: int) -> Path:
    """Make the written temporary folder count: flush its files, write the marker, rename it into place,
    then prune older complete checkpoints to the last `keep` (never the one just written)."""
    final, tmp = _step_folders(run_dir, step)
    _fsync_dir_files(tmp)
    (tmp / MARKER).write_text(f"{step}\n")
    if final.exists():  # a re-save of the same step (e.g. the final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in complete_checkpoints(run_dir)[:-keep]:
            if old != final:
                # The marker goes first: a kill during the removal must not leave a folder that still
                # counts as complete while its files are half gone.
                (old / MARKER).unlink(missing_ok=True)
                shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir_files(folder: Path) -> None:
    """Flush the files to disk before the marker makes them count (a power loss must not leave a
    complete-looking folder with empty files)."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def load_train_state(step_dir: str | Path, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load weights into `model` and optimizer state into `optimizer`; return the rest of train_state."""
    step_dir = Path(step_dir)
    if not (step_dir / MARKER).is_file():
        raise ValueError(f"{step_dir} is not a complete training checkpoint (no {MARKER} marker)")
    if (step_dir / ".metadata").is_file():  # sharded, written by distributed training (any mesh can resume)
        from ..distributed.checkpoint import load_sharded_checkpoint

        return load_sharded_checkpoint(step_dir, model, optimizer)
    _load_weights(model, step_dir)
    state = torch.load(step_dir / "train_state.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(state.pop("optimizer"))
    return state


def _load_weights(model: torch.nn.Module, step_dir: Path) -> None:
    if (step_dir / ".metadata").is_file():  # sharded, written by distributed training
        from ..distributed.checkpoint import load_sharded_checkpoint

        load_sharded_checkpoint(step_dir, model, None)
        return
    path = step_dir / "model.safetensors"
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in _header_shapes(path).items():
        if key in expected and shape != expected[key]:
            raise ValueError(f"{path}: tensor {key!r} has shape {list(shape)} but the model has "
                             f"{list(expected[key])}; was it written with another model config?")
    weights = dict(_read_weights(path))
    device = next(model.parameters()).device
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)
    missing = [k for k in missing if not (k == "output.weight" and model.args.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{step_dir}: checkpoint does not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); was it written with another model config?")


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (nothing is read or allocated)."""
    with open_safetensors(path, low_memory=False) as handle:
        return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}


def _read_weights(path: Path):
    """(name, tensor) pairs of a checkpoint's weights, one at a time; errors are ValueErrors naming the file.
    Weights are floating point: an integer tensor would load as meaningless numbers."""
    with open_safetensors(path) as handle:
        for key in handle.keys():
            tensor = read_safetensors_tensor(handle, key, path)
            if not tensor.is_floating_point():
                raise ValueError(f"{path}: tensor {key!r} holds {str(tensor.dtype).removeprefix('torch.')} values; "
                                 "model weights are floating point, the file is corrupt or not ours")
            yield key, tensor


def _read_model_args(step_dir: Path):
    from ..config import ModelArgs

    path = step_dir / "model_args.json"
    try:
        return ModelArgs.from_dict(read_json(path, what="model_args.json"))
    except (TypeError, ValueError) as e:
        message = str(e)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def _resolve_step_dir(path: Path) -> Path | None:
    if _STEP_RE.match(path.name) and (path / MARKER).is_file():
        return path
    return latest_checkpoint(path) if path.is_dir() else None


def is_training_checkpoint(path: str | Path) -> bool:
    """True for a complete `step-N` folder, or a run folder holding at least one."""
    return _resolve_step_dir(Path(path)) is not None


def load_training_checkpoint(path: str | Path, *, device: str | torch.device = "cpu",
                             dtype: torch.dtype | None = None):
    """(model, tokenizer) from a step folder or a run folder (its newest complete step), in eval mode."""
    from ..model import Transformer
    from ..tokenizer import Tokenizer
    from .load import materialize_model

    step_dir = _resolve_step_dir(Path(path))
    if step_dir is None:
        raise ValueError(f"{path}: no complete training checkpoint (step-NNNNNNNN folder with {MARKER})")
    args = _read_model_args(step_dir)
    if (step_dir / ".metadata").is_file():  # sharded (distributed training): loaded into a built model
        with torch.device("meta"):
            model = Transformer(args)
        model.to_empty(device=device)
        _load_weights(model, step_dir)
        model.init_buffers(device)
        if dtype is not None:
            model.to(dtype)
    else:
        # Shapes from the header are compared with model_args.json before anything is allocated.
        weights = step_dir / "model.safetensors"
        stored = _header_shapes(weights)
        tensors = ((k, t, str(weights)) for k, t in _read_weights(weights))
        model = materialize_model(args, tensors, device=device, dtype=dtype, what=str(step_dir),
                                  stored_shapes=stored)
    if not (step_dir / "tokenizer.model").is_file() and (step_dir / "tokenizer.json").is_file():
        from ..hf_tokenizer import HFTokenizer

        return model.eval(), HFTokenizer.from_folder(step_dir)  # a derivative's own tokenizer
    return model.eval(), Tokenizer.from_file(step_dir / "tokenizer.model")
