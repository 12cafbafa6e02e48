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

Distributed training writes the same folders sharded (`save_sharded_checkpoint`, at the end of this file);
every reader here accepts both layouts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .safety import open_safetensors, os_error_of, read_json, read_safetensors_tensor

__all__ = [
    "DCP_METADATA",
    "MARKER",
    "complete_checkpoints",
    "is_sharded_checkpoint",
    "is_training_checkpoint",
    "latest_checkpoint",
    "load_sharded_checkpoint",
    "load_train_state",
    "load_training_checkpoint",
    "save_sharded_checkpoint",
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
        return load_sharded_checkpoint(step_dir, model, optimizer)
    _load_weights(model, step_dir)
    state = torch.load(step_dir / "train_state.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(state.pop("optimizer"))
    return state


def _load_weights(model: torch.nn.Module, step_dir: Path) -> None:
    if (step_dir / ".metadata").is_file():  # sharded, written by distributed training
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
    from .materialize import materialize_model

    step_dir = _resolve_step_dir(Path(path))
    if step_dir is None:
        raise ValueError(f"{path}: no complete training checkpoint (step-NNNNNNNN folder with {MARKER})")
    args = _read_model_args(step_dir)
    if (step_dir / ".metadata").is_file():  # sharded (distributed training): loaded into a built model
        model = Transformer.on_meta(args)
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


# ----- sharded checkpoints (distributed training) -----
#
# Sharded training checkpoints with `torch.distributed.checkpoint` (DCP), resumable on another mesh.
#
# Every rank writes only its own shards of the weights and optimizer state, in parallel, into one folder;
# DCP records each tensor's global shape and which chunk every file holds, so a later run with a different
# world size or mesh (2 ranks FSDP → 1 process, or → 4 ranks FSDP×TP) reads back exactly the chunks it now
# owns. A step folder, laid out like the single-process ones above:
#
#     step-NNNNNNNN/
#       .metadata, __R_0.distcp   DCP: "model.*" (weights), "optim.*" (AdamW state), "rankR/*" (RNG per rank)
#       train_state.json          step, data-loader position, optimizer hyperparameters, counters (rank 0)
#       config.json, model_args.json, tokenizer.model
#       COMPLETE                  written last, by rank 0, after every rank has finished writing
#
# All ranks write into `.tmp-step-NNNNNNNN/`, which rank 0 renames into place after the marker: a run killed
# mid-save leaves a temp folder, never counted on resume. The folder must be on a filesystem every rank sees.
# Nothing is unpickled: tensors go through DCP, the rest through JSON.

DCP_METADATA = ".metadata"  # the file DCP writes once every rank's shards are in place


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _dcp(operation, state: dict[str, Any], path: Path) -> None:
    """dcp.save / dcp.load, also in one process without a process group (resuming or exporting on one
    machine is intended, so DCP's warning about it is silenced)."""
    import torch.distributed as dist

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        operation(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())


def is_sharded_checkpoint(step_dir: str | Path) -> bool:
    """True for a complete step folder written by `save_sharded_checkpoint`."""
    step_dir = Path(step_dir)
    return (step_dir / MARKER).is_file() and (step_dir / DCP_METADATA).is_file()


def _optimizer_hparams(optim_state: dict[str, Any]) -> list[dict[str, Any]]:
    """The param groups' hyperparameters (lr, betas, ...) as JSON values; the per-parameter tensors travel
    through DCP."""
    groups = []
    for group in optim_state.get("param_groups", []):
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"})
    return groups


def _rank_key(rank: int, name: str) -> str:
    return f"rank{rank}/{name}"


def save_sharded_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer | None, train_state: dict[str, Any],
                            config_json: str, tokenizer: Any, keep: int = 3) -> Path:
    """Write `run_dir/step-<step>/` from every rank (a collective: all ranks must call it). Same signature
    as `llama3.checkpoint.native.save_training_checkpoint`.

    `train_state`: tensor values (RNG states) are saved per rank; the other values must be JSON and equal on
    every rank (step, data-loader position, counters): rank 0's copy is written. Keeps the last `keep`
    complete checkpoints."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    run_dir = Path(run_dir)
    tmp = run_dir / f".tmp-step-{step:08d}"
    if _rank() == 0:
        begin_step_folder(run_dir, step)
    _barrier()
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    hparams: list[dict[str, Any]] = []
    if optimizer is not None:
        optim_state = get_optimizer_state_dict(model, optimizer)
        state["optim"] = {"state": optim_state["state"]}
        hparams = _optimizer_hparams(optim_state)
    shared = {}
    for key, value in train_state.items():
        if isinstance(value, torch.Tensor):
            state[_rank_key(_rank(), key)] = value
        else:
            shared[key] = value
    _dcp(dcp.save, state, tmp)  # a collective; rank 0 writes .metadata once every rank's shards are written
    if _rank() == 0:
        meta = {**shared, "step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "optimizer_param_groups": hparams}
        (tmp / "train_state.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "config.json").write_text(config_json)
        (tmp / "model_args.json").write_text(json.dumps(model.args.to_dict(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_tiktoken(tmp / "tokenizer.model")
        commit_step_folder(run_dir, step, keep=keep)
    _barrier()
    return run_dir / f"step-{step:08d}"


def load_sharded_checkpoint(step_dir: str | Path, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load a step folder into `model` (and `optimizer`), resharding to this run's mesh, and return the
    train state. Same signature as `llama3.checkpoint.native.load_train_state`; works with any world size,
    also in a single process without a process group.

    Per-rank tensors (RNG states) come from the saved rank with this rank's number modulo the saved world
    size, so a job with more ranks than the saver still gets a state for each."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    step_dir = Path(step_dir)
    if not is_sharded_checkpoint(step_dir):
        raise ValueError(f"{step_dir} is not a complete sharded checkpoint (needs {MARKER} and {DCP_METADATA})")
    saved = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    meta = json.loads((step_dir / "train_state.json").read_text())
    if optimizer is None and any(p.is_meta for p in model.parameters()):
        return meta  # a shapes-only model (meta device) has nowhere to put weights
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    optim_state = None
    if optimizer is not None:
        if not any(k.startswith("optim.") for k in saved):
            raise ValueError(f"{step_dir} holds no optimizer state; it cannot resume training")
        # A fresh optimizer gets its moments created here (a zero-lr step), sharded like the parameters.
        optim_state = get_optimizer_state_dict(model, optimizer)
        state["optim"] = {"state": optim_state["state"]}
    source_prefix = _rank_key(_rank() % int(meta.get("world_size", 1)), "")
    per_rank = {}
    for key, item in saved.items():
        if key.startswith(source_prefix):
            per_rank[key[len(source_prefix):]] = state[key] = torch.empty(
                tuple(item.size), dtype=item.properties.dtype)
    _dcp(dcp.load, state, step_dir)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        optim_state["state"] = state["optim"]["state"]
        for group, saved_group in zip(optim_state["param_groups"], meta.get("optimizer_param_groups", [])):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved_group.items()})
        set_optimizer_state_dict(model, optimizer, optim_state)
    result = {k: v for k, v in meta.items() if k not in ("optimizer_param_groups", "world_size")}
    result.update(per_rank)  # dcp.load filled these tensors in place
    return result
