"""Files shipped inside the package: the Jane Austen corpus, the chat fine-tuning data and the task samples.

They live in `llama3/assets/` (the repository's `data/` is a link to it), so an installed wheel carries them
and they are found through `importlib.resources` rather than by walking up from a source file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def bundled_path(*parts: str, must_exist: bool = True) -> Path:
    """The path of a bundled file or folder, e.g. `bundled_path("austen")` or `bundled_path("chat",
    "austen_chat.jsonl")`. With `must_exist`, a FileNotFoundError says so when the installation lacks it."""
    root = resources.files("llama3").joinpath("assets", *parts)
    path = Path(str(root))  # package data installed as plain files (wheel, editable or checkout)
    if must_exist and not path.exists():
        raise FileNotFoundError(f"bundled data {'/'.join(parts)} is missing from this installation ({path}); "
                                "reinstall the package (pip install -e .)")
    return path
