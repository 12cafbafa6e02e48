"""Hand-written CPU kernels, built once per machine and registered as torch operators.

- `gemv.cpp`: `torch.ops.llama3.gemv_bf16`, `gemv_f32`, `gemv_int8`, `gemv_int4`, the decode-time matrix-vector
  products (used by `llama3.inference.gemv` and `quantize`);
- `ggml_blocks.cpp`: `torch.ops.llama3.ggml_matmul`, products with weights in ggml's quantized block formats
  straight from a GGUF file (used by `llama3.inference.ggml_quant`);
- `xent.cpp`: `torch.ops.llama3.xent_rows_`, cross-entropy rows and their logit gradients in place (used by
  the training loss, `llama3.train.loss`).

`available()` builds the files into one library with the system C++ compiler against the installed torch
(about 20 s the first time; the library is cached under `~/.cache/llama3/kernels`, keyed by the sources,
torch's version and the CPU's instruction sets), loads it with `torch.ops.load_library` and returns True.
All operators work under `torch.compile` (shape functions are registered here).

Everything that uses them keeps a pure-PyTorch path: without a compiler, on a non-x86 CPU, or with
`LLAMA3_KERNELS=0` in the environment, `available()` returns False (and says why once on stderr, unless
the kernels were switched off on purpose), and callers use `F.linear` / torch's own kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["available", "build", "cache_dir", "why_unavailable"]

_SOURCES = [Path(__file__).with_name(name) for name in ("gemv.cpp", "xent.cpp", "ggml_blocks.cpp")]
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "why": str


def cache_dir() -> Path:
    root = os.environ.get("LLAMA3_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama3")
    return Path(root) / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "f16c"))))
    except OSError:
        pass
    return platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _command(cxx: str, sources: list[Path], output: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = library_paths()
    return [cxx, "-O3", "-march=native", "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{p}" for p in include_paths()), *map(str, sources), "-o", str(output),
            *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu"]


def build(verbose: bool = False) -> Path:
    """Compile the kernels for this machine (or reuse the cached build) and return the library's path.
    Raises RuntimeError with the compiler's message when the build fails."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    source = b"".join(path.read_bytes() for path in _SOURCES)
    key = hashlib.sha256(source + torch.__version__.encode() + _cpu_flags().encode() + cxx.encode()).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary name in the same folder, then rename: a concurrent process (another rank, a
    # parallel test) never loads a half-written library.
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = _command(cxx, _SOURCES, Path(tmp))
        print(f"llama3: building the CPU kernels for this machine into {target.parent} (once, about 20 s)",
              file=sys.stderr, flush=True)
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building {' + '.join(p.name for p in _SOURCES)} failed ({cxx}):\n{result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _gemv_shape(x, w, *scales):
    return x.new_empty(x.shape[0], w.shape[0])  # (M, N) in x's dtype, for every operator here


def _xent_rows_shape(logits, targets, weights, write_grad):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)  # per-row loss; logits change in place


def _ggml_matmul_shape(x, w, ggml_type, in_features):
    return x.new_empty(x.shape[0], w.shape[0])  # (M, N) in x's dtype


def _register_fakes() -> None:
    for name in ("gemv_bf16", "gemv_f32", "gemv_int8", "gemv_int4"):
        torch.library.register_fake(f"llama3::{name}")(_gemv_shape)
    torch.library.register_fake("llama3::xent_rows_")(_xent_rows_shape)
    torch.library.register_fake("llama3::ggml_matmul")(_ggml_matmul_shape)


def _load() -> tuple[bool, str]:
    if os.environ.get("LLAMA3_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False, "switched off by LLAMA3_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"written for x86-64, this CPU is {platform.machine()}"
    try:
        path = build()
        torch.ops.load_library(str(path))
        _register_fakes()
    except Exception as exc:  # a failed build only costs speed: the callers fall back to torch's kernels
        return False, str(exc)
    return True, ""


def available() -> bool:
    """True once the kernels are built and loaded (building them on the first call)."""
    with _lock:
        if "ok" not in _state:
            ok, why = _load()
            _state["ok"], _state["why"] = ok, why
            if not ok and "LLAMA3_KERNELS" not in why:
                print(f"llama3: fast CPU kernels unavailable, using torch's ({why.splitlines()[0]})", file=sys.stderr)
        return bool(_state["ok"])


def why_unavailable() -> str:
    """The reason `available()` returned False ('' when it returned True or was not called yet)."""
    return str(_state.get("why", ""))
