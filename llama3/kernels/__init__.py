"""Hand-written CPU kernels, built once per machine and registered as torch operators.

- `gemv.cpp`: `torch.ops.llama3.gemv_bf16`, `gemv_f32`, `gemv_group`, `gemv_int8`, `gemv_int4`, the decode-time matrix-vector
  products (used by `llama3.inference.gemv` and `quantize`);
- `gemm16.cpp`: `torch.ops.llama3.gemm16`, prompt-sized products with bf16 or f16 weights where they lie (one
  or several side by side), widened block by block and multiplied in fp32 register tiles (used by
  `llama3.inference.gemv` for prompts);
- `ggml_blocks.cpp`: `torch.ops.llama3.ggml_matmul`, products with weights in ggml's quantized block formats
  straight from a GGUF file, and `ggml_matmul_group` for several such weights sharing one input; `ggml_repack`
  rewrites Q4_0 / Q4_K / Q6_K weights at load into an 8-row layout those products read faster (used by
  `llama3.inference.ggml_quant`);
- `ggml_dequant.cpp`: `torch.ops.llama3.ggml_dequantize`, rows of those block formats back to float32 or
  bfloat16, equal to the `gguf` package's dequantization (prompts and embedding lookups in `ggml_quant`);
- `attend.cpp`: `torch.ops.llama3.attend_one_query`, decode-time attention of one query per sequence over its
  KV cache (float, bf16, fp16 or int8 with scales), without temporaries (used by `llama3.model`);
- `xent.cpp`: `torch.ops.llama3.xent_rows_`, cross-entropy rows and their logit gradients in place (used by
  the training loss, `llama3.train.loss`);
- `train_ops.cpp`: `torch.ops.llama3.train_rms_norm`, `train_swiglu`, `train_rope` and their backwards, the
  training step's element-wise operators fused into one pass each (used by `llama3.train.fused`);
- `norm_rope.cpp`: `torch.ops.llama3.rms_norm` and `rope_`, inference's RMSNorm and RoPE as one operator each
  instead of a dozen (installed by `llama3.inference.attention.use_decode_kernels`).

`available()` builds the sources into one library with the system C++ compiler against the installed torch
(about 20 s the first time; the library is cached under `~/.cache/llama3/kernels`, keyed by the sources,
torch's version, the compiler command and the CPU), loads it with `torch.ops.load_library` and returns True.
All operators work under `torch.compile` (shape functions are registered here).

Instruction-set levels (`ISA_LEVELS`, best first; docs/kernels.md): each is a fixed set of compiler flags that
selects the sources' code paths, so every level can be built, and tested, on purpose. The default is the best
level this CPU runs (`supported_isas()`); `LLAMA3_KERNELS_ISA=<level>` in the environment forces another one.
`build(isa=...)` compiles any level (also one this CPU cannot run, to check that it compiles cleanly) and
`ops(isa)` loads one this CPU runs beside the default, under its own operator namespace (`llama3_<level>`).
Non-x86 CPUs build the portable level.

Everything that uses them keeps a pure-PyTorch path: without a compiler, or with `LLAMA3_KERNELS=0` in the
environment, `available()` returns False (and says why once on stderr, unless the kernels were switched off
on purpose), and callers use `F.linear` / torch's own kernels.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ISA_LEVELS", "available", "build", "build_warnings", "cache_dir", "cpu_description", "loaded_isa", "ops",
           "selected_isa", "supported_isas", "why_unavailable"]

_SOURCES = [Path(__file__).with_name(name) for name in ("gemv.cpp", "gemm16.cpp", "xent.cpp", "ggml_blocks.cpp", "ggml_dequant.cpp",
                                                          "attend.cpp", "train_ops.cpp", "norm_rope.cpp")]
_HEADERS = [Path(__file__).with_name("ops_namespace.h")]  # included by every source (the operator namespace)
# What the compiler is given: one file that includes every source, so torch's headers are parsed once.
_UNIT = Path(__file__).with_name("kernels.cpp")
DEFAULT_NAMESPACE = "llama3"
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "why": str, "isa": str


@dataclass(frozen=True)
class IsaLevel:
    """One instruction-set level: the /proc/cpuinfo flags a CPU needs to run it and the x86 compiler flags
    that turn on the matching code paths in the sources (their #if blocks test the compiler's macros)."""

    name: str
    cpu_flags: tuple[str, ...]
    compiler_flags: tuple[str, ...]


_AVX2 = ("avx2", "fma", "f16c")
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
_LEVELS = (
    # Zen 4, Sapphire Rapids and later: AVX-512 with the bf16 dot product and the VNNI byte dot product
    IsaLevel("avx512bf16", (*_AVX512, "avx512_bf16", *_AVX2),
             ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mavx2", "-mfma", "-mf16c")),
    # Ice Lake, Cascade Lake: AVX-512 with VNNI; bf16 values are widened to fp32
    IsaLevel("avx512", (*_AVX512, *_AVX2),
             ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c")),
    # Alder Lake and later client cores: 256-bit vectors with the VEX-encoded VNNI byte dot product
    IsaLevel("avxvnni", (*_AVX2, "avx_vnni"), ("-mavx2", "-mfma", "-mf16c", "-mavxvnni")),
    # Haswell to Zen 3 (and AVX-512 CPUs without VNNI): 256-bit vectors, byte dot products in two steps
    IsaLevel("avx2", _AVX2, ("-mavx2", "-mfma", "-mf16c")),
    # any CPU: plain C++ that the compiler vectorizes for the baseline instruction set
    IsaLevel("portable", (), ()),
)
ISA_LEVELS = tuple(level.name for level in _LEVELS)


def cache_dir() -> Path:
    root = os.environ.get("LLAMA3_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama3")
    return Path(root) / "kernels"


def _is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_flag_set() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def cpu_description() -> str:
    """The CPU's model name, family/model numbers and vector features, for benchmark reports."""
    info = _cpuinfo()
    features = sorted(f for f in _cpu_flag_set() if f.startswith(("avx", "fma", "f16c", "amx")))
    name = info.get("model name") or platform.processor() or platform.machine()
    family = f" (family {info['cpu family']} model {info['model']})" if "cpu family" in info and "model" in info else ""
    return f"{name}{family}; {platform.machine()} {' '.join(features) or 'no AVX'}"


def supported_isas(machine: str | None = None, cpu_flags: set[str] | None = None) -> list[str]:
    """The levels of `ISA_LEVELS` this CPU runs, best first (only "portable" off x86)."""
    if not _is_x86(machine):
        return ["portable"]
    flags = _cpu_flag_set() if cpu_flags is None else cpu_flags
    return [level.name for level in _LEVELS if set(level.cpu_flags) <= flags]


def selected_isa() -> str:
    """The level `available()` builds: `LLAMA3_KERNELS_ISA` when set, else the best this CPU runs.
    Raises ValueError for a level that does not exist or that this CPU cannot run."""
    forced = os.environ.get("LLAMA3_KERNELS_ISA", "").strip().lower()
    if not forced:
        return supported_isas()[0]
    if forced not in ISA_LEVELS:
        raise ValueError(f"LLAMA3_KERNELS_ISA={forced!r} is not a kernel level; use one of {', '.join(ISA_LEVELS)}")
    if forced not in supported_isas():
        raise ValueError(f"LLAMA3_KERNELS_ISA={forced} needs CPU features this CPU lacks; it runs "
                         f"{', '.join(supported_isas())}")
    return forced


def _selected_or_none() -> str | None:
    try:
        return selected_isa()
    except ValueError:
        return None


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@functools.cache
def _accepts(cxx: str, flag: str) -> bool:
    """Whether the compiler accepts `flag` (compiling an empty file)."""
    try:
        result = subprocess.run([cxx, flag, "-x", "c++", "-c", "-o", os.devnull, "-"], input="", capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def isa_flags(isa: str, cxx: str, machine: str | None = None) -> list[str]:
    """The compiler flags for one level: its fixed x86 feature flags tuned for this CPU, or off x86 (portable
    only) the host's own CPU as the compiler names it (-mcpu=native, else -march=native, else nothing)."""
    if isa not in ISA_LEVELS:
        raise ValueError(f"unknown kernel level {isa!r}; use one of {', '.join(ISA_LEVELS)}")
    if not _is_x86(machine):
        if isa != "portable":
            raise ValueError(f"kernel level {isa} is x86-only; this CPU is {machine or platform.machine()}")
        return next(([flag] for flag in ("-mcpu=native", "-march=native") if _accepts(cxx, flag)), [])
    level = _LEVELS[ISA_LEVELS.index(isa)]
    return [*level.compiler_flags, *(["-mtune=native"] if _accepts(cxx, "-mtune=native") else [])]


def torch_paths() -> tuple[list[str], list[str]]:
    """torch's header folders and library folder, the ones `torch.utils.cpp_extension` names for a CPU
    build (a test checks they agree). Not taken from there: importing it pulls in setuptools, 0.15 s of
    every command's start even when the library is cached."""
    root = Path(torch.__file__).parent
    return [str(root / "include"), str(root / "include" / "torch" / "csrc" / "api" / "include")], [str(root / "lib")]


def _command(cxx: str, sources: list[Path], output: Path, flags: list[str], namespace: str) -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    include_dirs, libs = torch_paths()
    # Warnings on for our code; torch's headers are system headers, so theirs stay quiet.
    return [cxx, "-O3", *flags, "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-Wall", "-Wextra",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DLLAMA3_OPS={namespace}",
            *(f"-isystem{p}" for p in include_dirs), *map(str, sources), "-o", str(output),
            *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu"]


def build(verbose: bool = False, *, isa: str | None = None, namespace: str | None = None) -> Path:
    """Compile the kernels at one instruction-set level (default: `selected_isa()`) into a library whose
    operators live in `torch.ops.<namespace>` (default: "llama3" for the selected level, the library
    `available()` loads, and "llama3_<isa>" for another), or reuse the cached build; return the library's path. Any level compiles on an x86 host, also
    one this CPU cannot run; the compiler's warnings are kept beside the library (`build_warnings`).
    Raises RuntimeError with the compiler's message when the build fails."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    if namespace is None:
        namespace = DEFAULT_NAMESPACE if isa in (None, _selected_or_none()) else f"{DEFAULT_NAMESPACE}_{isa}"
    isa = isa or selected_isa()
    cache = cache_dir()
    command = _command(cxx, [_UNIT], Path("OUTPUT"), isa_flags(isa, cxx), namespace)
    source = b"".join(path.read_bytes() for path in [_UNIT, *_SOURCES, *_HEADERS])
    machine = (torch.__version__ + " ".join(command) + _cpuinfo().get("model name", "") + cpu_description()).encode()
    key = hashlib.sha256(source + machine).hexdigest()[:16]
    target = cache / f"kernels-{isa}-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Build into a temporary name in the same folder, then rename: a concurrent process (another rank, a
    # parallel test) never loads a half-written library.
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=cache)
    os.close(fd)
    try:
        cmd = _command(cxx, [_UNIT], Path(tmp), isa_flags(isa, cxx), namespace)
        print(f"llama3: building the CPU kernels ({isa}) into {cache} (once, about 15 s)", file=sys.stderr, flush=True)
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building {' + '.join(p.name for p in _SOURCES)} ({isa}) failed ({cxx}):\n"
                               f"{result.stderr.strip()[-2000:]}")
        _write_atomic(target.with_suffix(".log"), result.stderr)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".log-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def build_warnings(library: Path) -> str:
    """What the compiler printed while building `library` (a path `build` returned): '' for a clean build."""
    log = Path(library).with_suffix(".log")
    return log.read_text() if log.exists() else ""


def _gemv_shape(x, w, *scales):
    return x.new_empty(x.shape[0], w.shape[0])  # (M, N) in x's dtype, for every operator here


def _xent_rows_shape(logits, targets, weights, write_grad):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)  # per-row loss; logits change in place


def _ggml_matmul_shape(x, w, ggml_type, in_features):
    return x.new_empty(x.shape[0], w.shape[0])  # (M, N) in x's dtype


def _ggml_dequantize_shape(w, ggml_type, in_features, dtype):
    return w.new_empty(w.shape[0], in_features, dtype=dtype)  # (N, K)


def _ggml_matmul_group_shape(x, ws, ggml_types, in_features):
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in ws))  # (M, ΣN) in x's dtype


def _attend_one_query_shape(q, keys, values, k_scale, v_scale, mask, scale):
    return q.new_empty(q.shape, dtype=torch.float32)  # (B, K, R, D)


def _rms_norm_shape(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.numel() // max(weight.numel(), 1))  # y, one rstd per row


def _rms_norm_backward_shape(grad, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _swiglu_shape(gate, up):
    return torch.empty_like(gate)


def _swiglu_backward_shape(grad, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _rope_shape(x, rope, inverse):
    return torch.empty_like(x)


def _infer_rms_norm_shape(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _infer_rope_shape(x, rope):
    return x  # rotated in place


def _gemv_group_shape(x, ws):
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in ws))  # (M, ΣN) in x's dtype


# Each operator's shape function, for torch.compile (the operators' outputs without running them).
_SHAPES = {
    "gemv_bf16": _gemv_shape, "gemv_f32": _gemv_shape, "gemv_int8": _gemv_shape, "gemv_int4": _gemv_shape,
    "gemv_group": _gemv_group_shape, "gemm16": _gemv_group_shape, "xent_rows_": _xent_rows_shape, "ggml_matmul": _ggml_matmul_shape,
    "ggml_dequantize": _ggml_dequantize_shape, "ggml_matmul_group": _ggml_matmul_group_shape,
    "attend_one_query": _attend_one_query_shape, "train_rms_norm": _rms_norm_shape,
    "train_rms_norm_backward": _rms_norm_backward_shape, "train_swiglu": _swiglu_shape,
    "train_swiglu_backward": _swiglu_backward_shape, "train_rope": _rope_shape,
    "rms_norm": _infer_rms_norm_shape, "rope_": _infer_rope_shape,
}


def _register_fakes(namespace: str) -> None:
    for name, shape in _SHAPES.items():
        torch.library.register_fake(f"{namespace}::{name}")(shape)


_SWITCHED_OFF = "switched off by LLAMA3_KERNELS=0"


def _load() -> tuple[bool, str, str]:
    if os.environ.get("LLAMA3_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False, _SWITCHED_OFF, ""
    try:
        isa = selected_isa()
        path = build(isa=isa, namespace=DEFAULT_NAMESPACE)
        torch.ops.load_library(str(path))
        _register_fakes(DEFAULT_NAMESPACE)
    except Exception as exc:  # a failed build only costs speed: the callers fall back to torch's kernels
        return False, str(exc), ""
    return True, "", isa


def available() -> bool:
    """True once the kernels are built and loaded (building them on the first call)."""
    with _lock:
        if "ok" not in _state:
            ok, why, isa = _load()
            _state.update(ok=ok, why=why, isa=isa)
            if not ok and why != _SWITCHED_OFF:
                print(f"llama3: fast CPU kernels unavailable, using torch's ({why.splitlines()[0]})", file=sys.stderr)
        return bool(_state["ok"])


def loaded_isa() -> str:
    """The level of the loaded default library ('' when `available()` returned False or was not called)."""
    return str(_state.get("isa", ""))


def ops(isa: str | None = None):
    """The operator namespace of one level this CPU runs, building and loading it on first use:
    `torch.ops.llama3` for the level `available()` loaded, `torch.ops.llama3_<isa>` for another. Raises
    ValueError for a level this CPU cannot run and RuntimeError when the build fails."""
    if isa is None or (available() and isa == loaded_isa()):
        if not available():
            raise RuntimeError(f"the CPU kernels are unavailable: {why_unavailable()}")
        return getattr(torch.ops, DEFAULT_NAMESPACE)
    if isa not in supported_isas():
        raise ValueError(f"kernel level {isa!r} does not run on this CPU; it runs {', '.join(supported_isas())}")
    namespace = f"{DEFAULT_NAMESPACE}_{isa}"
    with _lock:
        if namespace not in _state:
            torch.ops.load_library(str(build(isa=isa, namespace=namespace)))
            _register_fakes(namespace)
            _state[namespace] = True
    return getattr(torch.ops, namespace)


def why_unavailable() -> str:
    """The reason `available()` returned False ('' when it returned True or was not called yet)."""
    return str(_state.get("why", ""))
