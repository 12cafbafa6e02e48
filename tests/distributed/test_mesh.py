"""Mesh degrees from the parallel config: -1 takes the rest; bad combinations are clear errors."""

from __future__ import annotations

import pytest

from llama3.config import preset
from llama3.distributed import check_tp_shapes, launched_by_torchrun, resolve_degrees


@pytest.mark.parametrize("degrees, world, expected", [
    ((1, -1, 1), 8, (1, 8, 1)),
    ((1, -1, 2), 8, (1, 4, 2)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((-1, 2, 1), 8, (4, 2, 1)),
    ((1, 1, -1), 4, (1, 1, 4)),
    ((1, -1, 1), 1, (1, 1, 1)),
])
def test_resolve_degrees(degrees, world, expected):
    dims = resolve_degrees(*degrees, world_size=world)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp) == expected
    assert dims.world_size == world and dims.dp == expected[0] * expected[1]


@pytest.mark.parametrize("degrees, world, message", [
    ((1, -1, 3), 8, "not divisible"),
    ((-1, -1, 1), 8, "only one of"),
    ((1, 2, 2), 8, "multiply to 4"),
    ((1, 0, 1), 2, "positive integer or -1"),
])
def test_resolve_degrees_errors(degrees, world, message):
    with pytest.raises(ValueError, match=message):
        resolve_degrees(*degrees, world_size=world)


def test_tp_shape_checks():
    check_tp_shapes(preset("llama3-8b"), 8, seq_len=8192)  # 32 heads, 8 kv heads, 14336, 128256
    with pytest.raises(ValueError, match="n_kv_heads=8"):
        check_tp_shapes(preset("llama3-8b"), 16)
    with pytest.raises(ValueError, match="seq_len"):
        check_tp_shapes(preset("llama3-8b"), 2, seq_len=33)


def test_launch_detection(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not launched_by_torchrun()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_by_torchrun()
