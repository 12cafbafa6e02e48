"""Hugging Face folders: `config.json` + safetensors (single or sharded) + tokenizer files.

Reading accepts any Llama-architecture folder (both rope spellings, tied embeddings, shards); writing
produces the folder transformers and vLLM expect: config.json with `architectures` and `torch_dtype`,
generation_config.json with the stop ids, safetensors with `{"format": "pt"}` metadata (sharded over
`max_shard_size` with `model.safetensors.index.json`), tokenizer.json (`ignore_merges: true`),
tokenizer_config.json with the chat template, special_tokens_map.json, and a tiktoken `tokenizer.model`.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import ModelArgs
from .keymap import hf_to_meta_key, meta_to_hf_key, meta_to_hf_state_dict, permute_qk_to_meta
from .materialize import materialize_model
from .safety import (
    atomic_output_dir,
    contained_path,
    dtype_name,
    open_safetensors,
    parse_dtype,
    parse_size,
    read_json,
    read_safetensors_tensor,
    write_json,
)

__all__ = ["hf_weight_files", "load_hf", "load_tokenizer", "read_hf_args", "save_hf", "tokenizer_hf_json"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


# ----- reading -----

def read_hf_args(folder: Path) -> ModelArgs:
    """ModelArgs from `folder/config.json`; errors name the file."""
    path = folder / "config.json"
    config = read_json(path, what="config.json")
    try:
        args = ModelArgs.from_hf_config(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if isinstance(config.get("multiple_of"), int) and config["multiple_of"] > 0:
        # Our exports keep Meta's FFN sizing rule beside intermediate_size, so HF -> Meta restores params.json.
        try:
            derived = args.replace(multiple_of=config["multiple_of"], ffn_hidden_dim=None,
                                   ffn_dim_multiplier=config.get("ffn_dim_multiplier"))
        except (ValueError, TypeError):
            derived = None
        if derived is not None and derived.hidden_dim == args.hidden_dim:
            args = derived
    return args


def hf_weight_files(folder: Path) -> list[tuple[Path, list[str] | None]]:
    """The safetensors files of a folder, each with the tensor names the index promises it holds (None
    without an index). Shard names that leave the folder are refused."""
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        index = read_json(index_path, what="safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: no 'weight_map' object mapping tensor names to shard files")
        by_file: dict[Path, list[str]] = {}
        for tensor_name, file_name in weight_map.items():
            by_file.setdefault(contained_path(folder, file_name, source=index_path), []).append(tensor_name)
        for path in by_file:
            if not path.is_file():
                raise ValueError(f"{index_path}: shard {path.name} is listed but missing from {folder}")
        return list(by_file.items())
    single = folder / SINGLE_NAME
    if single.is_file():
        return [(single, None)]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return [(found[0], None)]
    if found:
        raise ValueError(f"{folder}: {len(found)} safetensors files but no {INDEX_NAME} saying which tensor "
                         "is where")
    if list(folder.glob("*.bin")):
        raise ValueError(f"{folder}: only pytorch_model*.bin weights (pickles); convert them to safetensors "
                         "first, we do not unpickle model files")
    raise ValueError(f"{folder}: no model.safetensors or {INDEX_NAME}; the weights are missing")


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _can_map(handle, device, dtype: torch.dtype | None) -> bool:
    """Tensors used as stored (CPU, one dtype, the one asked for) can stay views of the mapped file."""
    if torch.device(device).type != "cpu":
        return False
    names = handle.keys()  # a safe_open handle is not a dict: iterate its key list
    stored = {_SAFETENSORS_DTYPES.get(handle.get_slice(k).get_dtype()) for k in names}
    return len(stored) == 1 and (dtype is None or stored == {dtype})


def _iter_hf_tensors(files: list[tuple[Path, list[str] | None]], args: ModelArgs, index_path: Path, *,
                     device, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(meta_name, tensor, file) for every tensor, read one at a time, q/k rows back in Meta's order.

    Tensors used as stored are zero-copy views of the memory-mapped file; the q/k rows among them are
    permuted straight from the mapped pages into their own memory (one copy), and those pages are released
    at once; tensors that get converted are read (pread) into their own memory instead. Either way a copy
    never sits beside resident pages of its source: peak memory stays near the size of the weights."""
    from ..inference.mapped import release_file_pages

    heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads,
             "attention.wq.bias": args.n_heads, "attention.wk.bias": args.n_kv_heads}
    for path, promised in files:
        with open_safetensors(path, low_memory=False) as mapped, open_safetensors(path) as reader:
            keys = list(mapped.keys())
            if promised is not None:
                absent = sorted(set(promised) - set(keys))
                if absent:
                    raise ValueError(f"{index_path}: tensor {absent[0]!r} is listed in {path.name} but that file "
                                     "does not hold it; the shard is incomplete or the index is stale")
            use_map = _can_map(mapped, device, dtype)
            for key in keys:
                if key.endswith("rotary_emb.inv_freq"):  # a buffer some old exports saved; recomputed here
                    continue
                try:
                    meta_key = hf_to_meta_key(key)
                except KeyError:
                    raise ValueError(f"{path}: unexpected tensor {key!r}; not part of a Llama model") from None
                n_heads = heads.get(meta_key.split(".", 2)[-1])
                tensor = read_safetensors_tensor(mapped if use_map else reader, key, path)
                if n_heads is not None and tensor.dim() in (1, 2) and tensor.shape[0] == n_heads * args.head_dim:
                    stored, tensor = tensor, permute_qk_to_meta(tensor, n_heads)  # wrong shapes: the caller says
                    if use_map:  # the permuted copy was read straight from the mapped pages: drop those
                        release_file_pages(stored)
                yield meta_key, tensor, str(path)


def _stored_shapes(files: list[tuple[Path, list[str] | None]]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(Meta name -> shape, Meta name -> file) of every Llama tensor in the files, from the safetensors
    headers alone."""
    shapes: dict[str, tuple[int, ...]] = {}
    sources: dict[str, str] = {}
    for path, _ in files:
        with open_safetensors(path, low_memory=False) as handle:
            for key in handle.keys():
                try:
                    meta_key = hf_to_meta_key(key)
                except KeyError:  # not a Llama tensor: reported with its file when the tensors are read
                    continue
                shapes[meta_key], sources[meta_key] = tuple(handle.get_slice(key).get_shape()), str(path)
    return shapes, sources


def _stored_name(meta_key: str) -> str:
    try:
        return meta_to_hf_key(meta_key)
    except KeyError:
        return meta_key


def _special_names(tokenizer_json: Path, num_base: int) -> list[str] | None:
    """Special-token names (in id order) from tokenizer.json's added_tokens, if they follow the BPE ranks."""
    if not tokenizer_json.is_file():
        return None
    added = sorted((t["id"], t["content"]) for t in _added_tokens(tokenizer_json)
                   if isinstance(t, dict) and "id" in t and "content" in t)
    if [i for i, _ in added] != list(range(num_base, num_base + len(added))) or not added:
        return None
    return [name for _, name in added]


_ADDED_TOKENS_KEY = re.compile(r'"added_tokens"\s*:\s*')


def _added_tokens(tokenizer_json: Path) -> list:
    """tokenizer.json's `added_tokens` list. Writers put it near the top, before the 128K-entry vocabulary
    and the merges, so it is decoded on its own when found there (a full parse of Llama 3's 9 MB file takes
    about a second); anything unexpected falls back to parsing the whole file."""
    try:
        text = tokenizer_json.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    found = _ADDED_TOKENS_KEY.search(text, 0, 4096)
    if found:
        try:
            value, _ = json.JSONDecoder().raw_decode(text, found.end())
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list):
            return value
    added = read_json(tokenizer_json, what="tokenizer.json").get("added_tokens", [])
    return added if isinstance(added, list) else []


def load_tokenizer(folder: Path):
    """The tokenizer of a folder. Llama 3's (and ours) on the exact tiktoken path: a tiktoken tokenizer.model
    loads fastest, its special-token names from tokenizer.json when both exist (3.0 and 3.1 name the reserved
    ids differently), or the byte-level BPE of a tokenizer.json with Llama 3's special tokens. Any other
    tokenizer.json (a derivative's own vocabulary) runs on the `tokenizers` library with its chat template."""
    from ..hf_tokenizer import HFTokenizer, is_llama3_tokenizer_json
    from ..tokenizer import Tokenizer, read_tiktoken_ranks, special_token_names

    tokenizer_json = folder / "tokenizer.json"
    for name in ("tokenizer.model", "original/tokenizer.model"):
        path = folder / name
        if path.is_file() and _is_tiktoken_file(path):
            try:
                ranks = read_tiktoken_ranks(path)
            except (ValueError, KeyError, TypeError) as e:
                message = str(e) if str(path) in str(e) else f"{path}: {e}"
                raise ValueError(f"{message}; a tiktoken tokenizer.model must be Llama 3 style byte-level BPE") from None
            names = _special_names(tokenizer_json, len(ranks))
            # built once, with its final special tokens (each tiktoken table costs ~0.4 s at 128K)
            tokenizer = Tokenizer(ranks, special_tokens=names or special_token_names("3.1"))
            return attach_foreign_template(tokenizer, *_folder_template(folder))
    json_data = read_json(tokenizer_json, what="tokenizer.json") if tokenizer_json.is_file() else None
    if json_data is not None and is_llama3_tokenizer_json(json_data):
        try:
            tokenizer = Tokenizer.from_hf_json(tokenizer_json)
        except (ValueError, KeyError, TypeError) as e:
            message = str(e) if str(tokenizer_json) in str(e) else f"{tokenizer_json}: {e}"
            raise ValueError(f"{message}; Llama 3's special tokens need Llama 3 style byte-level BPE") from None
        return attach_foreign_template(tokenizer, *_folder_template(folder))
    if json_data is not None:
        return HFTokenizer.from_folder(folder)
    if (folder / "tokenizer.model").is_file():
        raise ValueError(f"{folder / 'tokenizer.model'}: a SentencePiece model without a tokenizer.json; save the "
                         "tokenizer with transformers (AutoTokenizer.from_pretrained(...).save_pretrained(...)) "
                         "to get the tokenizer.json this package reads")
    raise ValueError(f"{folder}: no tokenizer.json or tokenizer.model; copy the model's tokenizer files here")


def _folder_template(folder: Path) -> tuple[str | None, str | None]:
    from ..hf_tokenizer import _chat_template

    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path, what="tokenizer_config.json") if config_path.is_file() else {}
    return _chat_template(folder, config)


def attach_foreign_template(tokenizer, template: str | None, source: str | None):
    """Llama 3's tokenizer with a chat template of another layout (no `<|start_header_id|>`: a ChatML
    fine-tune of Llama 3, say) keeps the tiktoken path but chats in that template (`chat_format_for`)."""
    if template is not None and "<|start_header_id|>" not in template:
        tokenizer.chat_template, tokenizer.chat_template_source = template, source
    return tokenizer


def _is_tiktoken_file(path: Path) -> bool:
    """Meta's tokenizer.model is text lines `base64 rank`; a SentencePiece one is a binary protobuf."""
    with open(path, "rb") as f:
        head = f.read(256).split(b"\n", 1)[0]
    parts = head.split()
    return len(parts) == 2 and parts[1].isdigit()


_HF_JSON_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_hf_json(tokenizer) -> dict[str, Any]:
    """`tokenizer.to_hf_json()`, computed once per tokenizer object (listing the merges of a 128K vocab takes
    seconds, and HF and GGUF exports both need them). Callers must not modify the result."""
    try:
        return _HF_JSON_CACHE[tokenizer]
    except (KeyError, TypeError):
        data = tokenizer.to_hf_json()
        try:
            _HF_JSON_CACHE[tokenizer] = data
        except TypeError:  # not weak-referenceable
            pass
        return data


def load_hf(folder: str | os.PathLike, *, device: str | torch.device = "cpu",
            dtype: str | torch.dtype | None = None, progress: bool = False):
    """(model, tokenizer) from a Hugging Face folder of any Llama-architecture model."""
    folder = Path(folder)
    args = read_hf_args(folder)
    files = hf_weight_files(folder)
    # The tokenizer first: parsing tokenizer.json briefly takes ~100 MB, better before the weights than on top.
    tokenizer = load_tokenizer(folder)
    dtype = parse_dtype(dtype)
    stored_shapes, stored_sources = _stored_shapes(files)
    tensors = _iter_hf_tensors(files, args, folder / INDEX_NAME, device=device, dtype=dtype)
    model = materialize_model(args, tensors, device=device, dtype=dtype, what=str(folder), progress=progress,
                              stored_name=_stored_name, stored_shapes=stored_shapes, stored_sources=stored_sources)
    return model, tokenizer


# ----- writing -----

def _plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy, in order: start a new shard when the next tensor would pass the limit (a tensor larger than
    the limit gets a shard of its own, as transformers does)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _special_token_fields(tokenizer) -> dict[str, Any]:
    ids = {v: k for k, v in tokenizer.special_tokens.items()}
    pad = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in tokenizer.special_tokens else None
    return {"bos_token": ids[tokenizer.bos_id], "eos_token": ids[tokenizer.eos_id], "pad_token": pad}


def write_hf_tokenizer(tokenizer, out: Path, *, max_seq_len: int) -> None:
    """tokenizer.json, tokenizer_config.json (chat template), special_tokens_map.json and tokenizer.model
    (a derivative's tokenizer: its own tokenizer.json and tokenizer_config.json)."""
    from ..hf_tokenizer import HFTokenizer
    from ..tokenizer import CHAT_TEMPLATE

    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save_files(out, model_max_length=max_seq_len)
        return

    specials = _special_token_fields(tokenizer)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_hf_json(tokenizer), ensure_ascii=False), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in specials.items() if v is not None},
        "chat_template": getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_seq_len,
    }
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", {k: v for k, v in specials.items() if v is not None})
    tokenizer.save_tiktoken(out / "tokenizer.model")


def write_hf_configs(args: ModelArgs, tokenizer, out: Path, *, dtype: torch.dtype) -> None:
    stop_ids = sorted(tokenizer.stop_tokens)
    config = args.to_hf_config(torch_dtype=dtype_name(dtype), bos_token_id=tokenizer.bos_id,
                               eos_token_id=tokenizer.eos_id)
    if args.ffn_hidden_dim is None:  # Meta's FFN sizing rule; transformers ignores these two keys
        config["multiple_of"] = args.multiple_of
        if args.ffn_dim_multiplier is not None:
            config["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    write_json(out / "config.json", config)
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stop_ids,
                  # Meta's instruct defaults (llama-models generation.py): temperature 0.6, top_p 0.9.
                  "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    if tokenizer.bos_id is None:
        del generation["bos_token_id"]
    if "<|finetune_right_pad_id|>" in tokenizer.special_tokens:
        generation["pad_token_id"] = tokenizer.special_tokens["<|finetune_right_pad_id|>"]
    write_json(out / "generation_config.json", generation)


def save_hf(model, tokenizer, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
            max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = False) -> Path:
    """Write a Hugging Face folder at `path` (atomically: a temp folder beside it, renamed when complete).

    dtype: weights' dtype in the files (default: the model's). Weights over `max_shard_size` are split into
    `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    args: ModelArgs = model.args
    state = model.state_dict()
    dtype = parse_dtype(dtype) or state["tok_embeddings.weight"].dtype
    names = [k for k in state if not (k == "output.weight" and args.tie_word_embeddings)]
    sizes = {k: state[k].numel() * dtype.itemsize for k in names}
    shards = _plan_shards(sizes, parse_size(max_shard_size))
    with atomic_output_dir(path, overwrite=overwrite) as out:
        bar = tqdm(total=len(names), desc=f"writing {Path(path).name} (hf)", unit="tensor", disable=not progress)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            file_name = SINGLE_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for key in shard:
                tensor = state[key].detach().to(device="cpu", dtype=dtype)
                for hf_key, hf_tensor in meta_to_hf_state_dict({key: tensor}, args).items():
                    tensors[hf_key] = hf_tensor.contiguous()
                    weight_map[hf_key] = file_name
                bar.update()
            save_file(tensors, str(out / file_name), metadata={"format": "pt"})
            del tensors  # one shard's converted copies at a time
        bar.close()
        if len(shards) > 1:
            write_json(out / INDEX_NAME, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
        write_hf_configs(args, tokenizer, out, dtype=dtype)
        write_hf_tokenizer(tokenizer, out, max_seq_len=args.max_seq_len)
    return Path(path)
