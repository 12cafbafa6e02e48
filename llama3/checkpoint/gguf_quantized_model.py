"""A Transformer whose quantized GGUF tensors stay quantized: each 2-D weight stored as Q4_0 ... Q6_K
becomes a `GGMLLinear` (or, for the token embeddings, a `GGMLEmbedding`) on a view of the file's memory
map; only the float tensors (norms) are read into memory. With the CPU kernels, the matrices their products
repack (Q4_0, Q4_K, Q6_K) are rewritten into the kernels' 8-row layout here, at load, in the one pass over
their bytes that also checks their scales for NaN/inf (`ggml_repack`); the others (token embeddings, the
other types) are checked by a read of their bytes over the threads (`ggml_check_scales`) and stay views of
the file. So a start reads each weight byte once before the first token."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelArgs
from .gguf_quants import FLOAT_TYPES, bad_scale_error

__all__ = ["build_quantized_model", "is_quantized_file"]


def is_quantized_file(tensors) -> bool:
    return any(t.tensor_type.name not in FLOAT_TYPES for t in tensors)


def _byte_rows(info) -> torch.Tensor:
    """The tensor's bytes as uint8 (rows, row_bytes), sharing memory with the file's map."""
    data = info.data.reshape(-1, info.data.shape[-1])
    return torch.from_numpy(data)


def build_quantized_model(args: ModelArgs, tensors: dict, meta_name, path: Path, *,
                          device="cpu", dtype: torch.dtype | None = None, repack: bool = True):
    """Build the model from a GGUF's tensors (name -> tensor info) keeping quantized weights quantized.
    `meta_name` maps a GGUF tensor name to ours (None for tensors outside the model). dtype (default
    float32) is that of the float tensors and of the activations. `repack=False` keeps every matrix in the
    file's layout (checked all the same). A NaN or inf scale is refused naming the file and the tensor."""
    from ..inference.ggml_quant import GGMLEmbedding, GGMLLinear
    from ..model import Transformer

    if torch.device(device).type != "cpu":
        raise ValueError(f"{path}: quantized GGUF weights run on the CPU kernels; load it with device='cpu', "
                         "or convert it to a float format first (`llama3 convert ... --to hf`)")
    dtype = dtype or torch.float32
    model = Transformer.on_meta(args)
    state: dict[str, torch.Tensor] = {}
    quantized = []  # (GGUF name, ggml type, layer): checked (and repacked) once the model is built
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
        module_name = key.removesuffix(".weight")
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if key == "tok_embeddings.weight":
            setattr(parent, attr, GGMLEmbedding(_byte_rows(info), kind, args.dim, dtype))
            if args.tie_word_embeddings:  # the embeddings also serve as the output projection
                model.output = GGMLLinear(_byte_rows(info), kind, args.dim)
                model.output.weight = model.tok_embeddings.weight  # a plain attribute: init_buffers sees it tied
                quantized.append((name, kind, model.output))
            quantized.append((name, kind, model.tok_embeddings))
        else:
            setattr(parent, attr, GGMLLinear(_byte_rows(info), kind, shape[1]))
            quantized.append((name, kind, getattr(parent, attr)))
    model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{path}: missing tensors {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}; "
                         "the file is incomplete")
    _check_and_repack(quantized, path, repack)
    model.init_buffers("cpu")
    return model.eval().requires_grad_(False)


def _check_and_repack(quantized: list, path: Path, repack: bool) -> None:
    """Every quantized weight's scales checked once: the product matrices the kernels repack, in their
    repack (the layers' `repack`, matrix by matrix, the file's pages released as they are copied: peak
    memory grows by one matrix); the rest (embeddings, other types, no kernels) by `first_bad_scale`. The
    tied output projection shares the embeddings' bytes and is checked once."""
    from ..inference.ggml_quant import BadScale, GGMLLinear, first_bad_scale
    from ..inference.mapped import _file_mappings

    mappings = _file_mappings() if repack else None  # read once: the mappings do not change meanwhile
    checked = set()
    for name, kind, layer in sorted(quantized, key=lambda item: not isinstance(item[2], GGMLLinear)):
        if layer.data.data_ptr() in checked:
            continue
        checked.add(layer.data.data_ptr())
        try:
            done = repack and isinstance(layer, GGMLLinear) and layer.repack(mappings=mappings) > 0
        except BadScale as e:
            raise bad_scale_error(path, name, kind, e.block) from None
        if not done and (block := first_bad_scale(layer.data, kind)) >= 0:
            raise bad_scale_error(path, name, kind, block)
