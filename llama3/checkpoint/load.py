"""`llama3.load` and `llama3.save`: one entry point for every checkpoint format.

The format is detected from the files present:
- a Hugging Face folder: `config.json` + `model.safetensors` (or shards + `model.safetensors.index.json`)
  + `tokenizer.json` or `tokenizer.model`;
- a Meta folder: `params.json` + `consolidated.NN.pth` + `tokenizer.model`;
- one of our training checkpoints (`llama3.checkpoint.native` decides);
- a `.gguf` file (llama.cpp).

Models are built on the meta device (no memory) and the loaded tensors are assigned in place
(`load_state_dict(assign=True)`, `materialize.py`), so peak memory stays near the size of the weights, not twice it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from .safety import parse_dtype

__all__ = ["detect_format", "load", "save"]

Format = Literal["hf", "meta", "gguf", "training"]


def detect_format(path: str | os.PathLike) -> Format:
    """Which checkpoint format `path` holds, from the files present (never from its name alone)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{path} does not exist; give a model folder (Hugging Face or Meta), a training "
                         "checkpoint or a .gguf file")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise ValueError(f"{path} is a file; give the folder that holds the model (config.json or params.json "
                         "and the weights), or a .gguf file")
    from .native import is_training_checkpoint

    if is_training_checkpoint(path):
        return "training"
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file():
        return "meta"
    raise ValueError(f"{path}: no config.json (Hugging Face), params.json (Meta) or training checkpoint "
                     "marker found; is this a model folder?")


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None, progress: bool = False) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` from a Hugging Face folder, a Meta folder, a training checkpoint or a GGUF
    file. `dtype=None` keeps the stored dtype (bf16 stays bf16). The model is returned in eval mode.
    `progress` shows a progress bar over the tensors (Meta, HF and GGUF)."""
    path = Path(path).expanduser()
    dtype = parse_dtype(dtype)
    fmt = detect_format(path)
    if fmt == "training":
        from .native import load_training_checkpoint

        model, tokenizer = load_training_checkpoint(path, device=device, dtype=dtype)
    elif fmt == "hf":
        from .hf import load_hf

        model, tokenizer = load_hf(path, device=device, dtype=dtype, progress=progress)
    elif fmt == "meta":
        from .meta import load_meta

        model, tokenizer = load_meta(path, device=device, dtype=dtype, progress=progress)
    else:
        from .gguf import load_gguf

        model, tokenizer = load_gguf(path, device=device, dtype=dtype, progress=progress)
    return model.eval(), tokenizer


def save(model: Any, tokenizer: Any, path: str | os.PathLike, *, format: str = "hf",
         dtype: str | torch.dtype | None = None, **kwargs: Any) -> Path:
    """Write `model` and `tokenizer` to `path` as a Hugging Face folder (`format="hf"`, kwargs:
    `max_shard_size`), a Meta folder (`"meta"`, kwargs: `num_shards`) or a GGUF file (`"gguf"`, dtype one of
    f32/f16/bf16 or a quantization preset such as q4_k_m). Common kwargs: `overwrite`, `progress`. Returns the
    path written. A model running quantized GGUF weights must be dequantized first
    (`llama3.inference.ggml_quant.dequantize_model`)."""
    from ..inference.ggml_quant import has_ggml_layers

    if has_ggml_layers(model):
        raise ValueError("this model runs on quantized GGUF weights; dequantize it first "
                         "(llama3.inference.ggml_quant.dequantize_model(model)) to write it in another format")
    if format == "hf":
        from .hf import save_hf

        return save_hf(model, tokenizer, path, dtype=dtype, **kwargs)
    if format == "meta":
        from .meta import save_meta

        return save_meta(model, tokenizer, path, dtype=dtype, **kwargs)
    if format == "gguf":
        from .gguf import save_gguf

        return save_gguf(model, tokenizer, path, dtype=dtype, **kwargs)
    raise ValueError(f"unknown checkpoint format {format!r}; choose hf, meta or gguf")
