"""Every documented command runs: the shell and Python blocks marked `<!-- test -->` in README.md and docs/*.md
are run, verbatim and in order, from a folder laid out like the repository after `make demo` (the bundled
`data/`, and `runs/demo/` holding a tokenizer, shards, a training run and `base`/`chat` Hugging Face folders),
with a tiny model of the demo's shape (256-token context) so they finish in seconds. `llama3`,
`llama3-lm-eval`, `python` and `.venv/bin/llama3` run this checkout. Every other block must say why it is
not run (`<!-- not run: ... -->`), so a new example cannot be left out by accident.

The `llama3` commands and the Python blocks run in processes forked from one that has imported torch and
the package already (tests/docs_forkserver.py): each still has its own argv, folder, environment, streams
and exit status, but the ~30 interpreter starts no longer import torch each."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FORKSERVER = Path(__file__).with_name("docs_forkserver.py")
FENCE = re.compile(r"^```(bash|sh|python)\s*$")
MARK = re.compile(r"^<!-- (test|not run: .+) -->$")


def code_blocks(path: Path) -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, marker) for each bash/sh/python block; the marker is the comment just above."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence:
            end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
            mark = MARK.match(lines[i - 1]) if i else None
            blocks.append((i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n", mark.group(1) if mark else None))
            i = end
        i += 1
    return blocks


ALL_BLOCKS = [(doc, *block) for doc in DOCUMENTS for block in code_blocks(doc)]
TESTED = [b for b in ALL_BLOCKS if b[4] == "test"]


def test_every_block_is_run_or_says_why_not():
    unmarked = [f"{doc.relative_to(REPO)}:{line}" for doc, line, _, _, mark in ALL_BLOCKS if mark is None]
    assert not unmarked, f"mark these blocks <!-- test --> or <!-- not run: reason -->: {unmarked}"
    assert len(TESTED) >= 15  # the extraction itself works


def _shim(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" {target} "$@"\n')
    path.chmod(0o755)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A folder like the repository after `make demo`, with a tiny model of the demo's shape."""
    from llama3.bpe import train_tokenizer
    from llama3.train.pretrain import pretrain
    from llama3.data.pretrain import prepare_dataset
    from llama3.train.recipes import recipe

    root = tmp_path_factory.mktemp("docs")
    (root / "data").symlink_to(REPO / "data")
    demo = root / "runs" / "demo"
    novel = REPO / "data" / "austen" / "persuasion.txt"
    train_tokenizer([novel], 512, demo / "tokenizer" / "tokenizer.model", progress=False)
    prepare_dataset([novel], demo / "data", demo / "tokenizer" / "tokenizer.model", num_workers=1, progress=False)
    cfg = recipe("demo")
    cfg.model.overrides.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)
    cfg.data.path, cfg.train.out_dir, cfg.data.batch_size = str(demo / "data"), str(demo / "pretrain"), 2
    cfg.train.steps, cfg.train.val_interval, cfg.train.val_batches, cfg.checkpoint.interval = 2, 0, 1, 2
    cfg.logging.progress_bar = False
    pretrain(cfg)
    (demo / "pretrain" / "hf").rename(demo / "base")
    shutil.copytree(demo / "base", demo / "chat")
    bin_dir = root / ".bin"
    _shim(bin_dir / "llama3", f"{FORKSERVER} llama3")
    _shim(bin_dir / "llama3-lm-eval", f"{FORKSERVER} module llama3.eval.lm_eval")
    _shim(bin_dir / "python", "")
    _shim(root / ".venv" / "bin" / "llama3", f"{FORKSERVER} llama3")
    env = _block_env(root)
    server = subprocess.Popen([sys.executable, str(FORKSERVER), "serve", env["LLAMA3_DOCS_FORKSERVER"]],
                              env=env, cwd=root, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert server.stdout.readline().strip() == "ready", "the docs fork server did not start"
        yield root
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and any command still running
        server.wait()


def _block_env(root: Path) -> dict[str, str]:
    """The environment the documented commands (and the fork server) run in."""
    socket_path = root / ".bin" / "fork.sock"
    assert len(str(socket_path)) < 100, f"{socket_path}: too long for a Unix socket; use a shorter --basetemp"
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "PATH": f"{root / '.bin'}:{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LLAMA3_DOCS_FORKSERVER": str(socket_path)}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("doc,line,language,code,mark", TESTED,
                         ids=[f"{b[0].relative_to(REPO)}:{b[1]}" for b in TESTED])
def test_documented_block_runs(demo_root, doc, line, language, code, mark):
    env = _block_env(demo_root)
    if language == "python":
        cmd = [sys.executable, str(FORKSERVER), "code", code]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    proc = subprocess.run(cmd, cwd=demo_root, env=env, capture_output=True, text=True, timeout=850,
                          stdin=subprocess.DEVNULL, check=False)
    where = f"{doc.relative_to(REPO)}:{line}"
    assert proc.returncode == 0, f"{where} failed:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, f"{where}:\n{proc.stderr[-4000:]}"
