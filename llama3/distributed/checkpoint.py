"""Sharded training checkpoints with `torch.distributed.checkpoint` (DCP), resumable on another mesh.

Every rank writes only its own shards of the weights and optimizer state, in parallel, into one folder;
DCP records each tensor's global shape and which chunk every file holds, so a later run with a different
world size or mesh (2 ranks FSDP → 1 process, or → 4 ranks FSDP×TP) reads back exactly the chunks it now
owns. A step folder, laid out like the single-process ones of `llama3.checkpoint.native`:

    step-NNNNNNNN/
      .metadata, __R_0.distcp   DCP: "model.*" (weights), "optim.*" (AdamW state), "rankR/*" (RNG per rank)
      train_state.json          step, data-loader position, optimizer hyperparameters, counters (rank 0)
      config.json, model_args.json, tokenizer.model
      COMPLETE                  written last, by rank 0, after every rank has finished writing

All ranks write into `.tmp-step-NNNNNNNN/`, which rank 0 renames into place after the marker: a run killed
mid-save leaves a temp folder, never counted on resume. The folder must be on a filesystem every rank sees.
Nothing is unpickled: tensors go through DCP, the rest through JSON.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoint.native import MARKER, begin_step_folder, commit_step_folder

__all__ = [
    "DCP_METADATA",
    "export_hf",
    "full_state_dict",
    "is_sharded_checkpoint",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
]

DCP_METADATA = ".metadata"  # the file DCP writes once every rank's shards are in place


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _dcp(operation, state: dict[str, Any], path: Path) -> None:
    """dcp.save / dcp.load, also in one process without a process group (resuming or exporting on one
    machine is intended, so DCP's warning about it is silenced)."""
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


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole unsharded state dict on CPU in rank 0 (an empty dict on other ranks). A collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def export_hf(model: torch.nn.Module, tokenizer: Any, path: str | Path, *, dtype: str | torch.dtype | None = None,
              **save_kwargs: Any) -> Path | None:
    """Gather the sharded `model` and write one Hugging Face folder from rank 0 with `llama3.save`.

    All ranks must call it; returns the path on rank 0 and None elsewhere. Rank 0 needs host memory for
    the full model once."""
    from ..checkpoint.load import save
    from ..model import Transformer

    weights = full_state_dict(model)
    path_out = None
    if _rank() == 0:
        with torch.device("meta"):
            plain = Transformer(model.args)
        plain.to_empty(device="cpu")
        plain.load_state_dict(weights, strict=not model.args.tie_word_embeddings)
        plain.init_buffers("cpu")
        path_out = save(plain, tokenizer, path, format="hf", dtype=dtype, **save_kwargs)
    _barrier()
    return path_out
