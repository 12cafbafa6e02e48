"""Run one function in a child Python process, so that native code that crashes (llama.cpp has segfaulted
on quantized files on some CPUs) or hangs fails the one test that called it, not the whole pytest run.

    result = call_isolated("tests.peer.llama_cpp:greedy", timeout=120, file=gguf_path, path=gguf_path, ...)

The child runs ``python -X faulthandler -m tests.peer.runner MODULE:FUNCTION KWARGS.json OUT_DIR``: it calls
``FUNCTION(**kwargs)``, which returns a dict; numpy arrays in it come back through an ``.npz`` (read without
pickle) and everything else through JSON. A child that dies by a signal, exits non-zero, or runs past the
timeout raises ``IsolatedCallFailed`` naming the signal, the command and the file it was working on, with the
end of its stderr (faulthandler's traceback of a crash included).
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
STDERR_TAIL_LINES = 25


class IsolatedCallFailed(RuntimeError):
    """A child process died, failed or timed out; the message says how, with the command and the file."""


def _describe_exit(returncode: int) -> str:
    if returncode < 0:  # subprocess reports death by signal N as -N
        sig = signal.Signals(-returncode)
        return f"was killed by signal {sig.name} ({signal.strsignal(sig) or 'unknown'})"
    return f"exited with status {returncode}"


def _stderr_tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = (text or "").strip().splitlines()[-STDERR_TAIL_LINES:]
    return "\n".join("    " + line for line in lines) or "    (nothing)"


def call_isolated(target: str, *, timeout: float, file: str | os.PathLike | None = None, **kwargs) -> dict:
    """Call ``target`` ("package.module:function") with JSON-able ``kwargs`` in a child process and return its
    dict. ``file`` is the input the child works on, named in the failure message."""
    with tempfile.TemporaryDirectory(prefix="llama3-isolated-") as tmp:
        out_dir = Path(tmp)
        (out_dir / "kwargs.json").write_text(json.dumps(kwargs))
        cmd = [sys.executable, "-X", "faulthandler", "-m", "tests.peer.runner", target,
               str(out_dir / "kwargs.json"), str(out_dir)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        where = f"\n  command: {shlex.join(cmd)}\n  file: {file if file is not None else '(none)'}\n  stderr:\n"
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired as e:
            raise IsolatedCallFailed(f"{target} did not finish within {timeout:g} s and was killed"
                                     f"{where}{_stderr_tail(e.stderr)}") from None
        if proc.returncode != 0 or not (out_dir / "result.json").exists():
            raise IsolatedCallFailed(f"{target} {_describe_exit(proc.returncode)}{where}{_stderr_tail(proc.stderr)}")
        result = json.loads((out_dir / "result.json").read_text())
        with np.load(out_dir / "arrays.npz", allow_pickle=False) as arrays:
            result.update({name: arrays[name] for name in arrays.files})
    return result


def _child(target: str, kwargs_path: str, out_dir: str) -> None:
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(**json.loads(Path(kwargs_path).read_text()))
    arrays = {k: v for k, v in result.items() if isinstance(v, np.ndarray)}
    np.savez(Path(out_dir) / "arrays.npz", **arrays)
    # result.json last: its presence means the call returned
    (Path(out_dir) / "result.json").write_text(json.dumps({k: v for k, v in result.items() if k not in arrays}))


if __name__ == "__main__":
    _child(*sys.argv[1:])
