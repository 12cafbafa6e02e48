"""Commands run with OpenMP threads that sleep while they wait (OMP_WAIT_POLICY=PASSIVE), so decode does
not collapse when another program shares the cores; a policy the user set is kept. OMP_DISPLAY_ENV makes
torch's OpenMP runtime print the policy it actually read when it loaded."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

# A command that does not itself import torch, then torch loaded afterwards: the policy must already be set.
SCRIPT = ("import sys; from llama3.cli import main; main(['info']); assert 'torch' not in sys.modules; "
          "import torch; torch.ones(64, 64) @ torch.ones(64, 64)")


def _policy_read_by_openmp(**env_extra: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"OMP_DISPLAY_ENV": "TRUE", **env_extra}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if "OMP_WAIT_POLICY" in line]


def test_commands_make_openmp_waits_passive():
    assert _policy_read_by_openmp() == ["OMP_WAIT_POLICY = 'PASSIVE'"]


def test_a_policy_the_user_set_is_kept():
    assert _policy_read_by_openmp(OMP_WAIT_POLICY="ACTIVE") == ["OMP_WAIT_POLICY = 'ACTIVE'"]


def test_a_bad_spin_setting_stops_a_command_with_one_line(monkeypatch, capsys):
    """LLAMA3_GGML_SPIN_US (the GGUF products' thread pool) is checked before the command runs: a value that
    is not a number of microseconds or 'off' is refused in one line naming it; good ones pass."""
    from llama3.cli import main

    monkeypatch.setenv("LLAMA3_GGML_SPIN_US", "fast")
    assert main(["generate", "--model", "missing"]) == 2
    assert capsys.readouterr().err.strip() == ("llama3 generate: error: LLAMA3_GGML_SPIN_US=fast is not a number of "
                                               "microseconds from 0 to 1000000 or 'off'; unset it for the default (200)")
    for good in ("0", "200", "off"):
        monkeypatch.setenv("LLAMA3_GGML_SPIN_US", good)
        assert main(["info"]) == 0
