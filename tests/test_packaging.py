"""The built wheel carries the bundled data, so an installed package finds it outside the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.mark.timeout(300)
def test_wheel_finds_its_bundled_data_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(REPO)], check=True, capture_output=True, timeout=280)
    [wheel] = (tmp_path / "wheel").glob("llama3-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from llama3.bundled import bundled_path; from llama3.eval.tasks import SAMPLE_DIR; "
            "print(len(list(bundled_path('austen').glob('*.txt'))), bundled_path('chat', 'austen_chat.jsonl'), "
            "(SAMPLE_DIR / 'mmlu' / 'test.jsonl').is_file())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    novels, chat, has_tasks = proc.stdout.split()
    assert novels == "6" and chat.startswith(str(site)) and has_tasks == "True"
