"""`llama3` command line: one entry point, one module per command.

Each command lives in `llama3/cli/<name>.py` (dashes become underscores) and defines `HELP` (one line)
and `main(argv=None) -> int`. Commands are found by listing this package, so adding a command is adding
a module; nothing here imports torch until a command runs.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

__all__ = ["main", "commands"]

# Optional dependencies by the module a missing one raises on, and the extra that installs it.
_EXTRAS = {"gguf": "gguf", "fastapi": "serve", "uvicorn": "serve", "matplotlib": "demo", "pyarrow": "demo",
           "lm_eval": "dev", "transformers": "dev", "peft": "dev"}

# The order `llama3 --help` lists them in; modules not named here follow alphabetically.
_ORDER = ["generate", "chat", "serve", "convert", "train-tokenizer", "prepare", "pretrain", "finetune", "eval",
          "demo", "info"]


def commands() -> dict[str, str]:
    """Command name -> module name, for every module in this package."""
    found = {m.name.replace("_", "-"): m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    ordered = [c for c in _ORDER if c in found] + sorted(c for c in found if c not in _ORDER)
    return {c: found[c] for c in ordered}


def _help_line(module_name: str) -> str:
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, "HELP", "")


def _usage() -> str:
    lines = ["usage: llama3 <command> [options]", "", "The Llama 3 system in one package.", "", "commands:"]
    for name, module in commands().items():
        lines.append(f"  {name:<17} {_help_line(module)}")
    lines += ["", "Run `llama3 <command> --help` for a command's options."]
    return "\n".join(lines)


def _passive_openmp_waits() -> None:
    """Let OpenMP threads that wait for the others sleep rather than spin, unless the user chose a policy.

    With libgomp's default (spin first) a 2-thread decode on a 2-core machine that also runs something else
    collapses: a thread spins at every parallel region's barrier while its partner waits for a core, and
    the demo-shaped model decoded at 1.6 tok/s against 116 with OMP_WAIT_POLICY=PASSIVE and ~25 with one
    thread (benchmarks/threads.py; BENCHMARKS.md). OpenMP reads the policy once, when torch loads it, so
    it is set here, before any command imports torch."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _spin_setting_error() -> str | None:
    """What is wrong with LLAMA3_GGML_SPIN_US (read by the kernels when a quantized GGUF model first runs),
    checked here so a bad value stops the command at once with one line rather than a traceback later."""
    text = os.environ.get("LLAMA3_GGML_SPIN_US", "")
    if text in ("", "off") or (text.isdigit() and int(text) <= 1_000_000):
        return None
    return (f"LLAMA3_GGML_SPIN_US={text} is not a number of microseconds from 0 to 1000000 or 'off'; "
            "unset it for the default (200)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"llama3 {version('llama3')}")
        return 0
    table = commands()
    name = argv[0]
    if name not in table:
        print(f"llama3: unknown command {name!r}; choose one of: {', '.join(table)}", file=sys.stderr)
        return 2
    _passive_openmp_waits()
    if (problem := _spin_setting_error()) is not None:
        print(f"llama3 {name}: error: {problem}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{table[name]}")
    try:
        result = module.main(argv[1:])
    except ModuleNotFoundError as e:
        extra = _EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"llama3 {name}: this needs the optional package {e.name!r}, from the `{extra}` extra: run "
              f"pip install -e '.[{extra}]' in the repository (make setup-runtime installs serve, gguf and "
              "demo; make setup installs everything)", file=sys.stderr)
        return 2
    return int(result or 0)
