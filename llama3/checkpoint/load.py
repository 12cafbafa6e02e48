"""`llama3.load` and `llama3.save`: one entry point for every checkpoint format.

The format is detected from the files present:
- a Hugging Face folder: `config.json` + `model.safetensors` (or shards + `model.safetensors.index.json`)
  + `tokenizer.json` or `tokenizer.model`;
- a Meta folder: `params.json` + `consolidated.NN.pth` + `tokenizer.model`;
- one of our training checkpoints (`llama3.checkpoint.native` decides);
- a `.gguf` file (llama.cpp).

Models are built on the meta device (no memory) and the loaded tensors are assigned in place
(`load_state_dict(assign=True)`), so peak memory stays near the size of the weights, not twice it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ..config import ModelArgs
from .safety import check_state_dict, parse_dtype

__all__ = ["check_stored_shapes", "detect_format", "expected_shapes", "load", "materialize_model", "save"]

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


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The shape of every weight `Transformer(args)` holds (Meta names), computed from the config alone:
    cheap even when the config is absurd, unlike building the model."""
    d, hd, f = args.dim, args.head_dim, args.hidden_dim
    per_layer = {"attention.wq.weight": (args.n_heads * hd, d), "attention.wk.weight": (args.n_kv_heads * hd, d),
                 "attention.wv.weight": (args.n_kv_heads * hd, d), "attention.wo.weight": (d, args.n_heads * hd),
                 "feed_forward.w1.weight": (f, d), "feed_forward.w2.weight": (d, f),
                 "feed_forward.w3.weight": (f, d), "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in per_layer.items()})
    if not args.tie_word_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    return shapes


def check_stored_shapes(args: ModelArgs, stored: dict[str, tuple[int, ...]], *, what: str,
                        stored_name=None, sources: dict[str, str] | None = None) -> None:
    """Compare the config against the names and shapes a checkpoint holds (read from file headers) before
    anything is built or allocated: a config declaring 10^6 layers or a 30M-token vocabulary for small
    weights fails in milliseconds with a ValueError naming the difference.

    stored: Meta tensor name -> shape; `stored_name` maps a Meta name to the name the format uses;
    `sources` (Meta name -> file) names the file in a shape error instead of `what`."""
    layer_ids = {int(k.split(".")[1]) for k in stored if k.startswith("layers.") and k.split(".")[1].isdigit()}
    num_stored = max(layer_ids) + 1 if layer_ids else 0
    if num_stored != args.n_layers:
        raise ValueError(f"{what}: the config declares {args.n_layers} layers but the weights hold {num_stored}; "
                         "config and weights do not match")
    shapes = expected_shapes(args)
    for key, shape in stored.items():
        if key in shapes and tuple(shape) != shapes[key]:
            name = stored_name(key) if stored_name else key
            source = (sources or {}).get(key, what)
            raise ValueError(f"{source}: tensor {name!r} has shape {list(shape)} but the config implies "
                             f"{list(shapes[key])}; config and weights do not match")


def materialize_model(args: ModelArgs, tensors: Iterable[tuple[str, torch.Tensor, str]], *,
                      device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      what: str, stored_name=None, progress: bool = False,
                      stored_shapes: dict[str, tuple[int, ...]] | None = None,
                      stored_sources: dict[str, str] | None = None) -> Any:
    """Build a Transformer on the meta device and assign `tensors` (Meta names) to it, one at a time.

    tensors: (meta_name, tensor, source file) triples, read lazily so each is converted to `device`/`dtype`
    right after it is read (peak memory ~ weights + one tensor). `dtype=None` takes the dtype of the first
    floating-point tensor. A tied model ignores a stored `output.weight` (some exports keep the copy).
    Raises ValueError naming the file and tensor for duplicates, missing/unexpected tensors and wrong shapes.
    `stored_shapes` (Meta name -> shape, from the files' headers; `stored_sources`: the file of each) is
    checked against the config first, so a config that does not match fails before the model is built (see
    `check_stored_shapes`).
    """
    from ..model import Transformer

    if stored_shapes is not None:
        check_stored_shapes(args, stored_shapes, what=what, stored_name=stored_name, sources=stored_sources)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("output.weight")
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    bar = tqdm(total=len(expected), desc=f"loading {Path(what).name}", unit="tensor", disable=not progress)
    for key, tensor, source in tensors:
        if key in state:
            raise ValueError(f"{source}: tensor {key!r} appears twice (also in {sources[key]})")
        if args.tie_word_embeddings and key == "output.weight":
            continue
        if key in expected and tuple(tensor.shape) != tuple(expected[key]):
            name = stored_name(key) if stored_name else key
            raise ValueError(f"{source}: tensor {name!r} has shape {list(tensor.shape)} but the config implies "
                             f"{list(expected[key])}; config and weights do not match")
        if dtype is None and tensor.is_floating_point():
            dtype = tensor.dtype
        state[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        sources[key] = source
        bar.update()
    bar.close()
    check_state_dict(state, expected, sources, what=what, stored_name=stored_name)
    model.load_state_dict(state, strict=False, assign=True)  # strict checks done above; tied output is re-tied
    model.init_buffers(device)
    for param in model.parameters():
        param.requires_grad_(True)
    return model.eval()
