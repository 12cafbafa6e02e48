"""A Transformer whose quantized GGUF tensors stay quantized: each 2-D weight stored as Q4_0 ... Q6_K
becomes a `GGMLLinear` (or, for the token embeddings, a `GGMLEmbedding`) on a view of the file's memory
map; only the float tensors (norms) are read into memory. Loading therefore costs the metadata, one pass
over the scales (checked for NaN/inf) and no copy of the weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelArgs
from .gguf_quants import FLOAT_TYPES, check_quantized_tensor

__all__ = ["build_quantized_model", "is_quantized_file"]


def is_quantized_file(tensors) -> bool:
    return any(t.tensor_type.name not in FLOAT_TYPES for t in tensors)


def _byte_rows(info) -> torch.Tensor:
    """The tensor's bytes as uint8 (rows, row_bytes), sharing memory with the file's map."""
    data = info.data.reshape(-1, info.data.shape[-1])
    return torch.from_numpy(data)


def build_quantized_model(args: ModelArgs, tensors: dict, meta_name, path: Path, *,
                          device="cpu", dtype: torch.dtype | None = None):
    """Build the model from a GGUF's tensors (name -> tensor info) keeping quantized weights quantized.
    `meta_name` maps a GGUF tensor name to ours (None for tensors outside the model). dtype (default
    float32) is that of the float tensors and of the activations."""
    from ..inference.ggml_quant import GGMLEmbedding, GGMLLinear
    from ..model import Transformer

    if torch.device(device).type != "cpu":
        raise ValueError(f"{path}: quantized GGUF weights run on the CPU kernels; load it with device='cpu', "
                         "or convert it to a float format first (`llama3 convert ... --to hf`)")
    dtype = dtype or torch.float32
    model = Transformer.on_meta(args)
    state: dict[str, torch.Tensor] = {}
    for name, info in tensors.items():
        key = meta_name(name)
        if key is None:
            if name == "rope_freqs.weight":
                continue
            raise ValueError(f"{path}: unexpected tensor {name!r}; not part of a Llama model")
        kind = info.tensor_type.name
        shape = [int(n) for n in reversed(info.shape)]
        expected = list(model.get_parameter(key).shape)
        if shape != expected:
            raise ValueError(f"{path}: tensor {name!r} has shape {shape} but the config implies {expected}; "
                             "config and weights do not match")
        if kind in FLOAT_TYPES:
            tensor = torch.from_numpy(info.data.copy() if kind != "BF16" else info.data.copy().view("<i2"))
            if kind == "BF16":
                tensor = tensor.view(torch.bfloat16)
            state[key] = tensor.reshape(shape).to(dtype)
            continue
        check_quantized_tensor(path, name, kind, info.shape, info.data)
        module_name = key.removesuffix(".weight")
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if key == "tok_embeddings.weight":
            setattr(parent, attr, GGMLEmbedding(_byte_rows(info), kind, args.dim, dtype))
            if args.tie_word_embeddings:  # the embeddings also serve as the output projection
                model.output = GGMLLinear(_byte_rows(info), kind, args.dim)
                model.output.weight = model.tok_embeddings.weight  # a plain attribute: init_buffers sees it tied
        else:
            setattr(parent, attr, GGMLLinear(_byte_rows(info), kind, shape[1]))
    model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{path}: missing tensors {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}; "
                         "the file is incomplete")
    model.init_buffers("cpu")
    return model.eval().requires_grad_(False)
