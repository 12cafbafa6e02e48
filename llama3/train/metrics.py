"""Per-step metrics: one log line, one JSON object in `OUT/metrics.jsonl`, optional TensorBoard scalars.

Also the measurements the line needs: peak matmul FLOP/s of this device (for MFU) and memory in use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsWriter", "format_duration", "measure_peak_flops", "memory_gib"]


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Achieved FLOP/s of a square matmul in `dtype` on `device`: the practical peak MFU is quoted against."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm up (kernel selection, thread pool)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA), else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    except ImportError:  # Windows
        return 0.0


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsWriter:
    """Appends step records to `metrics.jsonl` (and TensorBoard). On resume, records of steps after the
    checkpoint (written before a crash) are dropped, so the file holds each step once."""

    def __init__(self, out_dir: Path, *, resume_step: int | None, tensorboard: bool, enabled: bool = True,
                 log=print):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line, record in self._records(log) if record.get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run; close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("logging.tensorboard=true needs the tensorboard package "
                                 "(pip install tensorboard)") from None
            self._tb = SummaryWriter(str(out_dir / "tensorboard"))

    def _records(self, log) -> list[tuple[str, dict[str, Any]]]:
        """(line, record) for each record of an existing file. A torn last line (the disk filled, or the
        process died, mid-write) is dropped with a notice; a bad line before the end means the file was
        edited or damaged, which is an error naming the file and line."""
        lines = [line for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip()]
        out = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if number == len(lines):
                    log(f"{self.path}: dropping its unreadable last line {number} (a write cut short): {line[:80]!r}")
                    break
                raise ValueError(f"{self.path}: line {number} is not a metrics record ({e}); fix or remove "
                                 "that line, then resume again") from None
            out.append((line, record))
        return out

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
