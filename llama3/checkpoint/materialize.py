"""Building a model from stored tensors: the shape checks every format runs on its file headers before
anything is allocated, and `materialize_model`, which assigns tensors to a meta-device Transformer one at a
time. Every format reader (hf, meta, gguf, native) uses it; `load.py` only picks the reader."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import ModelArgs
from .safety import check_state_dict

__all__ = ["check_stored_shapes", "expected_shapes", "materialize_model"]


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
    model = Transformer.on_meta(args)
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
