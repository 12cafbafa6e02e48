"""How the Makefile builds llama-cpp-python: CMAKE_ARGS derived from the CPU's flags (scripts/
llama_cpp_cmake_args.py) for a few real CPUs, and a rebuild exactly when the flags or the pinned version
change (the Makefile's stamp), with pip's wheel cache bypassed."""

from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("llama_cpp_cmake_args", REPO / "scripts" / "llama_cpp_cmake_args.py")
cmake = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cmake)

BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt"
ZEN3 = f"{BASE} avx avx2 fma f16c bmi1 bmi2 sha_ni vaes"  # this machine: AMD EPYC Milan
ZEN4 = f"{ZEN3} avx512f avx512dq avx512cd avx512bw avx512vl avx512vbmi avx512_vnni avx512_bf16"
SAPPHIRE_RAPIDS = f"{ZEN4} avx_vnni avx512_fp16 amx_bf16 amx_tile amx_int8"
SANDY_BRIDGE = f"{BASE} avx"  # AVX without AVX2, FMA, F16C or BMI2
KNIGHTS_LANDING = f"{BASE} avx avx2 fma f16c bmi2 avx512f avx512cd avx512er avx512pf"  # no VL/DQ/BW


def _options(flags: str, machine: str = "x86_64") -> dict[str, str]:
    args = cmake.cmake_args(set(flags.split()), machine)
    assert all(a.startswith("-D") and a.count("=") == 1 for a in args)
    return dict(a[2:].split("=") for a in args)


def _on(options: dict[str, str]) -> set[str]:
    return {name for name, value in options.items() if value == "ON"}


def test_every_feature_is_written_out_and_amx_is_always_off():
    for flags in (ZEN3, ZEN4, SAPPHIRE_RAPIDS, SANDY_BRIDGE, KNIGHTS_LANDING):
        options = _options(flags)
        assert options["GGML_NATIVE"] == "OFF"
        # each x86 option explicitly ON or OFF: with GGML_NATIVE=OFF llama.cpp would turn AVX2 etc. on itself
        assert set(cmake.X86_FEATURES) <= set(options)
        assert options["GGML_AMX_TILE"] == options["GGML_AMX_INT8"] == options["GGML_AMX_BF16"] == "OFF"


@pytest.mark.parametrize(("flags", "expected"), [
    (ZEN3, {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_BMI2", "GGML_FMA", "GGML_F16C"}),
    (ZEN4, {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_BMI2", "GGML_FMA", "GGML_F16C", "GGML_AVX512",
            "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"}),
    (SAPPHIRE_RAPIDS, {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_BMI2", "GGML_FMA", "GGML_F16C", "GGML_AVX_VNNI",
                       "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"}),
    (SANDY_BRIDGE, {"GGML_SSE42", "GGML_AVX"}),
    (KNIGHTS_LANDING, {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_BMI2", "GGML_FMA", "GGML_F16C"}),
], ids=["zen3", "zen4", "sapphire-rapids-amx", "sandy-bridge", "knights-landing"])
def test_features_on_exactly_where_the_cpu_has_them(flags, expected):
    assert _on(_options(flags)) == expected


def test_other_architectures_and_unknown_flags_keep_llama_cpps_default_build(tmp_path):
    assert cmake.cmake_args(set(ZEN4.split()), "aarch64") == []
    assert cmake.cmake_args(set(), "x86_64") == []
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: {ZEN3}\n\nprocessor\t: 1\n"
                       f"flags\t\t: {ZEN3}\n")
    assert cmake.cpu_flags(cpuinfo.read_text()) == set(ZEN3.split())


def _make_llama_cpp(repo, venv, cpuinfo) -> str:
    proc = subprocess.run(["make", "-C", str(repo), f"VENV={venv}", "PY=python3", "PIP=echo PIP",
                           f"CPUINFO={cpuinfo}", f"{venv}/.llama-cpp-done"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return "\n".join(line for line in proc.stdout.splitlines() if line.startswith("PIP "))


def test_make_rebuilds_exactly_when_the_cpu_flags_or_the_pin_change(tmp_path):
    """The Makefile's llama-cpp-python step run with pip replaced by `echo`: built once, not again for the
    same CPU, again for a CPU with other flags and for a new pin."""
    repo, venv = tmp_path / "repo", tmp_path / "venv"
    (repo / "scripts").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "scripts/llama_cpp_cmake_args.py"):
        shutil.copy(REPO / name, repo / name)
    venv.mkdir()
    (venv / ".runtime-done").touch()  # the rest of the setup is not under test
    zen3, zen4 = tmp_path / "zen3", tmp_path / "zen4"
    zen3.write_text(f"flags\t: {ZEN3}\n")
    zen4.write_text(f"flags\t: {ZEN4}\n")

    pyproject = (repo / "pyproject.toml").read_text()
    [pin] = [line.strip().strip('",') for line in pyproject.splitlines() if '"llama-cpp-python==' in line]
    stamp = venv / ".llama-cpp-done"

    install = f"PIP install --no-cache-dir --force-reinstall --no-deps {pin}"

    def expected_stamp(flags: str) -> str:
        return f"{pin} CMAKE_ARGS={' '.join(cmake.cmake_args(set(flags.split()), platform.machine()))}\n"

    assert _make_llama_cpp(repo, venv, zen3) == install
    assert stamp.read_text() == expected_stamp(ZEN3)
    assert _make_llama_cpp(repo, venv, zen3) == ""  # same CPU, same pin: nothing to do
    # another CPU's flags: rebuilt (on x86; elsewhere the flags do not enter the build, so nothing to do)
    assert _make_llama_cpp(repo, venv, zen4) == (install if expected_stamp(ZEN4) != expected_stamp(ZEN3) else "")
    assert stamp.read_text() == expected_stamp(ZEN4)
    (repo / "pyproject.toml").write_text(pyproject.replace(pin, "llama-cpp-python==0.3.99"))
    (venv / ".runtime-done").touch()  # the runtime part (which also depends on pyproject.toml) is not under test
    assert _make_llama_cpp(repo, venv, zen4).endswith("--no-deps llama-cpp-python==0.3.99")
