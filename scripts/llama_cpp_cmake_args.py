"""Print the CMAKE_ARGS that build llama-cpp-python for the CPU this runs on.

llama.cpp's default build (GGML_NATIVE=ON) compiles with ``-march=native``, which on Intel Xeons with AMX also
turns on its AMX path; llama-cpp-python 0.3.36 built that way crashes on every quantized file (Q8_0, Q4_0,
Q4_K) on such a machine, while f16/f32 files run. Building with GGML_NATIVE=OFF, the AMX path off and each
x86 feature switched on only when ``/proc/cpuinfo`` lists it gives a library that runs quantized files on
every x86 CPU we have met and loses no speed where both builds run (see BENCHMARKS.md).

With GGML_NATIVE=OFF llama.cpp turns SSE4.2/AVX/AVX2/BMI2/FMA/F16C on by default, so every feature is
written out explicitly, ON or OFF: a CPU without AVX2 must get ``-DGGML_AVX2=OFF``, not the default.

On other architectures (ARM, RISC-V...) the AMX problem cannot occur and llama.cpp's native build picks the
right features itself, so nothing is printed and the default build is used.

Usage: ``CMAKE_ARGS="$(python scripts/llama_cpp_cmake_args.py)" pip install llama-cpp-python==...``
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

# llama.cpp CMake option -> the /proc/cpuinfo flag that says the CPU has the feature.
X86_FEATURES = {
    "GGML_SSE42": "sse4_2",
    "GGML_AVX": "avx",
    "GGML_AVX2": "avx2",
    "GGML_BMI2": "bmi2",
    "GGML_FMA": "fma",
    "GGML_F16C": "f16c",
    "GGML_AVX_VNNI": "avx_vnni",
    "GGML_AVX512": "avx512f",
    "GGML_AVX512_VBMI": "avx512vbmi",
    "GGML_AVX512_VNNI": "avx512_vnni",
    "GGML_AVX512_BF16": "avx512_bf16",
}
# GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw together, so it needs all five (every AVX-512 CPU since
# Skylake-SP has them; Knights Landing has F and CD only and must not get it).
AVX512_BASE = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
# The AMX path is what crashes; it stays off even where the CPU has AMX.
ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
X86_MACHINES = {"x86_64", "amd64", "i386", "i686"}


def cpu_flags(cpuinfo_text: str) -> set[str]:
    """The feature flags of the first processor listed in ``/proc/cpuinfo`` text."""
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cmake_args(flags: set[str], machine: str) -> list[str]:
    """The ``-D`` options for a CPU with these ``/proc/cpuinfo`` flags; empty when not x86 or flags unknown."""
    if machine.lower() not in X86_MACHINES or not flags:
        return []
    args = ["-DGGML_NATIVE=OFF"]
    for option, flag in X86_FEATURES.items():
        has = flag in flags
        if option == "GGML_AVX512":
            has = all(f in flags for f in AVX512_BASE)
        elif option.startswith("GGML_AVX512_"):
            # the extensions are compiled together with the base AVX-512 flags
            has = has and all(f in flags for f in AVX512_BASE)
        args.append(f"-D{option}={'ON' if has else 'OFF'}")
    args += [f"-D{option}=OFF" for option in ALWAYS_OFF]
    return args


def main(argv: list[str] | None = None) -> int:
    """Print the CMAKE_ARGS for this machine (or for the cpuinfo file given as the only argument)."""
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "/proc/cpuinfo")
    text = path.read_text() if path.exists() else ""
    if not text:
        print(f"note: {path} not readable; llama.cpp's default build is used", file=sys.stderr)
    print(" ".join(cmake_args(cpu_flags(text), platform.machine())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
