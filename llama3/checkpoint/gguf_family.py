"""Llama-architecture derivatives in GGUF: their tokenizer and the config keys Llama 3 does not use.

Config: a head size not tied to the width (`llama.attention.key_length`), linear RoPE scaling
(`llama.rope.scaling.type`/`.factor`) and attention/feed-forward biases (tensors `blk.N.attn_q.bias` ...).

Tokenizer: llama.cpp stores the vocabulary as metadata: `tokenizer.ggml.model` says which algorithm ("gpt2": byte-level
BPE with `merges` and a pre-tokenizer named by `tokenizer.ggml.pre`; "llama": SentencePiece-style BPE whose
merge order comes from the token `scores`, with `<0xNN>` byte tokens), `tokens` and `token_type` list every id,
and the BOS/EOS/EOT/pad ids, `add_bos_token` and `chat_template` travel beside them. Here that becomes the
tokenizer.json the `tokenizers` library runs (`HFTokenizer`), and back. Llama 3's own vocabulary is read by
`gguf.py` onto the exact tiktoken path instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..tokenizer import LLAMA3_SPLIT_PATTERN

__all__ = ["PRE_TOKENIZERS", "add_derivative_metadata", "add_hf_tokenizer", "derivative_args",
           "hf_tokenizer_from_gguf", "is_llama3_vocab"]

# token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre names (as llama.cpp spells them) we can express as a tokenizers pre-tokenizer
PRE_TOKENIZERS: dict[str, list[dict[str, Any]]] = {
    "gpt-2": [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}],
    "llama-bpe": [{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_PATTERN}, "behavior": "Isolated",
                   "invert": False},
                  {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}],
}
_PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe"}  # llama.cpp reads these alike
_SPM_SPACE = "\u2581"


# ----- config -----

def derivative_args(args, fields: dict[str, Any], tensor_names: set[str], path: Path):
    """`args` (read as for Llama 3) completed with a derivative's head size, RoPE scaling and biases."""
    changes: dict[str, Any] = {}
    key_length = fields.get("llama.attention.key_length")
    if key_length is not None and int(key_length) != args.dim // args.n_heads:
        changes["head_dim_override"] = int(key_length)
    value_length = fields.get("llama.attention.value_length")
    if value_length is not None and key_length is not None and int(value_length) != int(key_length):
        raise ValueError(f"{path}: key_length {key_length} differs from value_length {value_length}; Llama "
                         "attention uses one head size for both")
    scaling = fields.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"{path}: rope scaling {scaling!r} (llama.rope.scaling.type) is not supported; "
                             "supported: linear, and Llama 3.1's rope_freqs")
        changes.update(use_scaled_rope=True, rope_scaling_type="linear",
                       rope_scaling_factor=float(fields.get("llama.rope.scaling.factor", 1.0)))
    changes["attention_bias"] = any(n.endswith(".attn_q.bias") for n in tensor_names)
    changes["mlp_bias"] = any(n.endswith(".ffn_up.bias") for n in tensor_names)
    try:
        return args.replace(**changes)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def add_derivative_metadata(writer, args) -> None:
    """The keys a derivative's config needs beyond Llama 3's (nothing for Llama 3 itself)."""
    import gguf

    if args.head_dim_override is not None:
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
    if args.use_scaled_rope and args.rope_scaling_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(args.rope_scaling_factor)
    elif args.use_scaled_rope and args.rope_scaling_type != "llama3":
        raise ValueError(f"GGUF has no {args.rope_scaling_type!r} RoPE scaling that llama.cpp reads like "
                         "transformers; save this model as a Hugging Face folder instead")


def is_llama3_vocab(fields: dict[str, Any]) -> bool:
    """Llama 3's (or our trained) byte-level BPE, which loads on the exact tiktoken path."""
    tokens = fields.get("tokenizer.ggml.tokens") or []
    return (fields.get("tokenizer.ggml.model") == "gpt2"
            and fields.get("tokenizer.ggml.pre", "llama-bpe") == "llama-bpe"
            and {"<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"} <= set(tokens))


# ----- reading the tokenizer -----

def hf_tokenizer_from_gguf(fields: dict[str, Any], path: Path):
    """`HFTokenizer` from a GGUF file's metadata; ValueError naming the file for anything it cannot express."""
    from ..hf_tokenizer import HFTokenizer

    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens in the metadata; the file carries no vocabulary")
    types = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    if kind == "gpt2":
        data = _byte_level_json(fields, tokens, types, path)
    elif kind == "llama":
        data = _sentencepiece_json(fields, tokens, types, path)
    else:
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported; GGUF Llama models use 'gpt2' "
                         "(byte-level BPE) or 'llama' (SentencePiece)")

    def token_at(key: str) -> str | None:
        index = fields.get(f"tokenizer.ggml.{key}")
        if index is None:
            return None
        if not 0 <= int(index) < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key} = {index} is outside the {len(tokens)} tokens")
        return tokens[int(index)]

    stops = [fields.get(f"tokenizer.ggml.{key}") for key in ("eot_token_id", "eom_token_id")]
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = kind == "llama"  # llama.cpp's default: SentencePiece vocabularies start with BOS
    return HFTokenizer(data, where=f"{path} (tokenizer metadata)", bos_token=token_at("bos_token_id"),
                       eos_token=token_at("eos_token_id"), pad_token=token_at("padding_token_id"),
                       unk_token=token_at("unknown_token_id"), add_bos=bool(add_bos),
                       extra_stop_ids=[int(i) for i in stops if i is not None],
                       chat_template=fields.get("tokenizer.chat_template"),
                       chat_template_source=f"{path} (tokenizer.chat_template)")


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict[str, Any]]:
    """CONTROL tokens are special (never produced from text by accident); USER_DEFINED ones are matched
    in text as whole tokens, as llama.cpp does."""
    return [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": kind == CONTROL}
            for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]


def _split_merges(merges: list[str], vocab: dict[str, int], path: Path) -> list[list[str]]:
    pairs = []
    for n, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}: tokenizer.ggml.merges[{n}] = {merge!r} is not two tokens separated by "
                             "a space")
        for piece in (*parts, parts[0] + parts[1]):
            if piece not in vocab:
                raise ValueError(f"{path}: tokenizer.ggml.merges[{n}] = {merge!r} refers to {piece!r}, which is "
                                 "not in tokenizer.ggml.tokens; the vocabulary and merges do not belong together")
        pairs.append(parts)
    return pairs


def _byte_level_json(fields: dict[str, Any], tokens: list[str], types: list[int], path: Path) -> dict[str, Any]:
    pre = fields.get("tokenizer.ggml.pre", "default")
    pre = _PRE_ALIASES.get(pre, pre)
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; known: "
                         f"{', '.join(PRE_TOKENIZERS)}. Its split rules decide how text is cut before BPE, so "
                         "guessing would give wrong ids")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = _split_merges(list(fields.get("tokenizer.ggml.merges") or []), vocab, path)
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(tokens, types),
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": PRE_TOKENIZERS[pre]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  # Llama 3's split comes with whole-word lookup before merging (tiktoken's rule)
                  "ignore_merges": pre == "llama-bpe", "vocab": vocab, "merges": merges},
    }


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """SentencePiece BPE keeps no merge list: a pair merges when the token it makes exists, earlier the
    higher that token's score. Every split of a normal token into two normal tokens is a merge, ordered by
    the merged token's score (ties: longer left piece first, then by id)."""
    normal = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (NORMAL, UNKNOWN, UNUSED)}
    merges: list[tuple[float, int, int, int, str, str]] = []
    for tok, i in normal.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in normal and right in normal:
                merges.append((-scores[i], -len(left), -len(right), i, left, right))
    merges.sort()
    return [[left, right] for *_, left, right in merges]


def _sentencepiece_json(fields: dict[str, Any], tokens: list[str], types: list[int], path: Path) -> dict[str, Any]:
    scores = fields.get("tokenizer.ggml.scores")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if fields.get("tokenizer.ggml.merges"):
        merges = _split_merges(list(fields["tokenizer.ggml.merges"]), vocab, path)
    elif isinstance(scores, list) and len(scores) == len(tokens):
        merges = _merges_from_scores(tokens, [float(s) for s in scores], types)
    else:
        raise ValueError(f"{path}: a 'llama' (SentencePiece) vocabulary needs tokenizer.ggml.scores, one per token")
    unk_id = fields.get("tokenizer.ggml.unknown_token_id")
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    # As transformers reads a GGUF SentencePiece vocabulary: `▁` for spaces and one prepended to the text
    # unless it starts with a space (Metaspace "first"); the decoder drops that space again.
    decoders = [{"type": "Replace", "pattern": {"String": _SPM_SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(tokens, types),
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": _SPM_SPACE,
                          "prepend_scheme": "first" if prefix else "never", "split": False},
        "post_processor": None, "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[int(unk_id)] if unk_id is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


# ----- writing the tokenizer -----

def _pre_tokenizer_name(data: dict[str, Any]) -> str:
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for name, expected in PRE_TOKENIZERS.items():
        if len(steps) == len(expected) and all(
                s.get("type") == e["type"] and s.get("use_regex", e.get("use_regex")) == e.get("use_regex")
                and s.get("pattern") == e.get("pattern") for s, e in zip(steps, expected)):
            return name
    raise ValueError(f"this tokenizer's pre-tokenizer ({[s.get('type') for s in steps]}) has no GGUF name "
                     f"llama.cpp knows among {', '.join(PRE_TOKENIZERS)}; save it as a Hugging Face folder instead")


def add_hf_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Write an `HFTokenizer` as GGUF tokenizer metadata (the inverse of `hf_tokenizer_from_gguf`)."""
    data = tokenizer.to_hf_json()
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer.where}: only BPE tokenizers can be written to GGUF here (this one is "
                         f"{model.get('type')}); save it as a Hugging Face folder instead")
    if tokenizer.n_words > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.n_words} ids but the model only {vocab_size} embeddings")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    id_to_token = {i: tok for tok, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif i in id_to_token:
            token = id_to_token[i]
            tokens.append(token)
            types.append(BYTE if model.get("byte_fallback") and _is_byte_token(token) else NORMAL)
        else:  # embedding rows beyond the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):  # SentencePiece style: llama.cpp reads the merge order from the scores
        writer.add_tokenizer_model("llama")
        rank = {tok: r for r, tok in enumerate(a + b for a, b in (m.split(" ") for m in merges))}
        writer.add_token_scores([-float(rank.get(t, len(rank) + i)) if k == NORMAL else 0.0
                                 for i, (t, k) in enumerate(zip(tokens, types))])
        writer.add_add_space_prefix(True)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, setter in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                         ("eot_id", writer.add_eot_token_id)):
        if getattr(tokenizer, name) is not None:
            setter(getattr(tokenizer, name))
    if tokenizer.unk_token is not None:
        unk_id = tokenizer.special_tokens.get(tokenizer.unk_token, model["vocab"].get(tokenizer.unk_token))
        writer.add_unk_token_id(unk_id)
    if tokenizer.pad_token is not None:
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def _is_byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")
