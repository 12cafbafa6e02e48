"""Resuming a run from its own saved config.

A checkpoint folder holds the config the run was trained with (`config.json`). `--resume` starts from that
config, not from the recipe's defaults, so a run started with `--optim.lr=1e-3` goes on at 1e-3 without the
flag being repeated; a flag given on resume still applies, and `config_changes` lists what it changed so
the command can say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import native
from .config import TrainConfig

__all__ = ["config_changes", "saved_run_config"]


def saved_run_config(out_dir: str | Path) -> TrainConfig | None:
    """The config of the newest complete checkpoint in `out_dir`, or None when there is no checkpoint."""
    step_dir = native.latest_checkpoint(out_dir)
    if step_dir is None or not (step_dir / "config.json").is_file():
        return None
    return TrainConfig.from_json(step_dir / "config.json")


def _flat(cfg: TrainConfig) -> dict[str, Any]:
    flat = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def config_changes(saved: TrainConfig, new: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(section.key, saved value, new value) for every field that differs, in config order."""
    old_flat, new_flat = _flat(saved), _flat(new)
    return [(key, old_flat[key], value) for key, value in new_flat.items() if old_flat.get(key) != value]
