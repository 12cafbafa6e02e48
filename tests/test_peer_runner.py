"""The out-of-process runner for native references (tests/peer/runner.py): a child that crashes, fails or
hangs fails the calling test with the signal, the command and the file, and the rest of the run goes on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.peer.runner import REPO, IsolatedCallFailed, call_isolated


def child_returns(scale: float) -> dict:
    return {"matrix": np.arange(6, dtype=np.float32).reshape(2, 3) * scale, "ids": [1, 2, 3], "name": "ok"}


def child_segfaults(path: str) -> dict:
    os.kill(os.getpid(), signal.SIGSEGV)
    return {}


def child_raises(path: str) -> dict:
    raise ValueError(f"cannot read {path}")


def child_hangs() -> dict:
    time.sleep(60)
    return {}


def test_result_comes_back_with_arrays_and_plain_values():
    result = call_isolated("tests.test_peer_runner:child_returns", timeout=60, scale=2.0)
    assert result["ids"] == [1, 2, 3] and result["name"] == "ok"
    np.testing.assert_array_equal(result["matrix"], np.arange(6, dtype=np.float32).reshape(2, 3) * 2)
    assert result["matrix"].dtype == np.float32


def test_a_crashing_child_names_the_signal_the_command_and_the_file(tmp_path):
    model = tmp_path / "model-q8_0.gguf"
    with pytest.raises(IsolatedCallFailed) as failure:
        call_isolated("tests.test_peer_runner:child_segfaults", timeout=60, file=model, path=str(model))
    message = str(failure.value)
    assert "tests.test_peer_runner:child_segfaults was killed by signal SIGSEGV (Segmentation fault)" in message
    assert f"command: {sys.executable} -X faulthandler -m tests.peer.runner tests.test_peer_runner:child_segfaults" \
        in message
    assert f"file: {model}" in message
    assert "Fatal Python error: Segmentation fault" in message  # faulthandler's traceback from the child
    assert "child_segfaults" in message.split("stderr:")[1]


def test_a_failing_child_shows_its_error():
    with pytest.raises(IsolatedCallFailed, match=r"exited with status 1(.|\n)*ValueError: cannot read x\.gguf"):
        call_isolated("tests.test_peer_runner:child_raises", timeout=60, file="x.gguf", path="x.gguf")


def test_a_hanging_child_is_killed_at_the_timeout():
    with pytest.raises(IsolatedCallFailed, match=r"child_hangs did not finish within 3 s and was killed"):
        call_isolated("tests.test_peer_runner:child_hangs", timeout=3)


def _run_pytest(folder) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(folder),
                           str(folder)], cwd=folder, env=env, capture_output=True, text=True, timeout=240,
                          check=False)


def test_a_crash_fails_only_its_own_test_and_the_run_goes_on(tmp_path):
    """A pytest run of three tests, the middle one crashing its llama.cpp-like child: one failure that
    names SIGSEGV, two passes."""
    suite = tmp_path / "test_crash_suite.py"
    suite.write_text(textwrap.dedent("""
        from tests.peer.runner import call_isolated

        def test_before():
            assert call_isolated("tests.test_peer_runner:child_returns", timeout=60, scale=1.0)["name"] == "ok"

        def test_crash():
            call_isolated("tests.test_peer_runner:child_segfaults", timeout=60, file="q.gguf", path="q.gguf")

        def test_after():
            assert call_isolated("tests.test_peer_runner:child_returns", timeout=60, scale=1.0)["ids"] == [1, 2, 3]
    """))
    proc = _run_pytest(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 failed, 2 passed" in proc.stdout
    assert "FAILED test_crash_suite.py::test_crash" in proc.stdout
    assert "killed by signal SIGSEGV" in proc.stdout and "file: q.gguf" in proc.stdout


def test_a_test_that_loads_llama_cpp_into_pytest_fails(tmp_path):
    """The suite's guard (tests/conftest.py): a test that imports llama_cpp in the pytest process fails
    (here a stand-in module, so nothing native is loaded); later tests are not blamed for it."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import llama_cpp_stays_out_of_process  # noqa: F401\n")
    (tmp_path / "test_guard_suite.py").write_text(textwrap.dedent("""
        import sys
        import types

        def test_loads_it():
            sys.modules["llama_cpp"] = types.ModuleType("llama_cpp")

        def test_after():
            assert "llama_cpp" in sys.modules
    """))
    proc = _run_pytest(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed, 1 error" in proc.stdout
    assert "ERROR test_guard_suite.py::test_loads_it" in proc.stdout
    assert "this test imported llama_cpp into the pytest process; call llama.cpp through tests.peer.llama_cpp" \
        in proc.stdout
