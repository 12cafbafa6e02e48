"""Tokenizers of Llama-architecture derivatives, run by Hugging Face's `tokenizers` library.

Llama 3's own tokenizer stays on the exact tiktoken path (`llama3.tokenizer.Tokenizer`). A derivative ships
its own: byte-level BPE with another vocabulary and pre-tokenizer (GPT-2 style), or SentencePiece-style BPE or
unigram with `▁` for spaces and `<0xNN>` byte fallback (Llama 2 style). `HFTokenizer` wraps the tokenizer.json
(or one rebuilt from GGUF metadata) and offers the interface the rest of the package uses: `encode`, `decode`,
`token_bytes`, `is_special`, `stream_decoder`, the BOS/EOS/pad ids and the stop tokens, plus the model's Jinja
chat template (rendered by `llama3.chat_template`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from .tokenizer import StreamDecoder, _unicode_to_byte

__all__ = ["HFTokenizer", "is_llama3_tokenizer_json"]

# Llama 3's special tokens: a tokenizer.json holding these after its BPE ranks is Llama 3's (or one of ours).
_LLAMA3_MARKERS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPM_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


def is_llama3_tokenizer_json(data: dict[str, Any]) -> bool:
    """Whether a parsed tokenizer.json is Llama 3's layout: byte-level BPE followed by Llama 3's specials."""
    added = {t.get("content") for t in data.get("added_tokens") or [] if isinstance(t, dict)}
    model = data.get("model") or {}
    return model.get("type") == "BPE" and all(m in added for m in _LLAMA3_MARKERS)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _decoder_steps(data: dict[str, Any]) -> list[dict[str, Any]]:
    decoder = data.get("decoder") or {}
    return list(decoder.get("decoders", [decoder])) if decoder.get("type") == "Sequence" else [decoder]


def _token_style(data: dict[str, Any], where: str) -> Literal["byte_level", "sentencepiece"]:
    """How a token's text maps to bytes, read from the decoder: GPT-2's byte-to-unicode table, or `▁` for
    a space with `<0xNN>` byte-fallback tokens. Other tokenizers (WordPiece, ...) are refused."""
    model_type = (data.get("model") or {}).get("type")
    if model_type not in ("BPE", "Unigram"):
        raise ValueError(f"{where}: tokenizer model {model_type!r} is not supported; Llama-architecture models "
                         "use BPE (byte-level or SentencePiece style) or unigram")
    kinds = {step.get("type") for step in _decoder_steps(data)}
    if "ByteLevel" in kinds:
        return "byte_level"
    if kinds & {"Metaspace", "ByteFallback", "Replace"}:
        return "sentencepiece"
    raise ValueError(f"{where}: decoder {sorted(k for k in kinds if k)} is neither byte-level nor "
                     "SentencePiece style; this tokenizer cannot be streamed byte-exactly")


def _strips_leading_space(data: dict[str, Any]) -> bool:
    """SentencePiece decoders drop the space the encoder prepended to the first word (a `Strip` step, or a
    `Metaspace` decoder that prepends); HF's decode of any id list therefore loses one leading space."""
    for step in _decoder_steps(data):
        if step.get("type") == "Strip" and step.get("start", 0) >= 1:
            return True
        if step.get("type") == "Metaspace" and (step.get("prepend_scheme", "always") != "never"
                                                and step.get("add_prefix_space", True)):
            return True
    return False


class _LeadingSpaceStreamDecoder(StreamDecoder):
    """StreamDecoder that drops one leading space of the stream, as SentencePiece decoders do."""

    def __init__(self, tokenizer: HFTokenizer, *, skip_special: bool):
        super().__init__(tokenizer, skip_special=skip_special)
        self._started = False

    def feed(self, ids: int | Iterable[int]) -> str:
        text = super().feed(ids)
        if not self._started and text:
            self._started = True
            text = text[1:] if text.startswith(" ") else text
        return text


class HFTokenizer:
    """A tokenizer.json tokenizer (the `tokenizers` library) with the interface of `llama3.Tokenizer`.

    Special tokens typed in text encode as plain text unless `allowed_special` names them (as for Llama 3);
    a chat template's rendered prompt is encoded with `allowed_special="all"`, as `apply_chat_template` does.
    `encode(bos=True)` adds the BOS token only when the tokenizer's files ask for one (`add_bos_token`, or
    the tokenizer.json post-processor), so prompts start as the model saw in training.
    """

    def __init__(self, data: dict[str, Any], *, where: str, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, unk_token: str | None = None,
                 add_bos: bool | None = None, extra_stop_ids: Iterable[int] = (),
                 chat_template: str | None = None, chat_template_source: str | None = None):
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise ValueError(f"{where}: this model's own tokenizer needs the `tokenizers` package: "
                             "pip install 'llama3[family]'") from None
        self.where = where
        self._style = _token_style(data, where)
        self._strip_first_space = self._style == "sentencepiece" and _strips_leading_space(data)
        text = json.dumps(data, ensure_ascii=False)
        try:
            self._plain = Backend.from_str(text)  # specials in text stay text
            self._with_specials = Backend.from_str(text)  # specials in text become special ids
        except Exception as e:  # the library raises its own untyped exception for every malformed file
            raise ValueError(f"{where}: the tokenizers library cannot build this tokenizer: {e}") from None
        self._plain.encode_special_tokens = True
        self._with_specials.encode_special_tokens = False
        self.data = data
        added = self._plain.get_added_tokens_decoder()
        self.special_tokens: dict[str, int] = {tok.content: i for i, tok in added.items() if tok.special}
        self._special_ids = {i: tok for tok, i in self.special_tokens.items()}
        self._added_contents = {i: tok.content for i, tok in added.items()}
        self.n_words = self._plain.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_id = self._id_of(bos_token, "bos_token")
        self.eos_id = self._id_of(eos_token, "eos_token")
        self.pad_id = self._id_of(pad_token, "pad_token")
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0  # padding is masked out anyway
        self.eot_id = self.eos_id  # the end of a turn, for code written for Llama 3; the template may add others
        self.eom_id = None
        self.python_tag_id = None
        self.add_bos = self._post_processor_adds_bos() if add_bos is None else bool(add_bos)
        self.stop_tokens: set[int] = {i for i in (self.eos_id, *extra_stop_ids) if i is not None}
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source or where
        self.version = "derivative"
        self._bytes_cache: dict[int, bytes] = {}
        self._add_template_stops()

    def _add_template_stops(self) -> None:
        """Make the template's end-of-turn token (ChatML's `<|im_end|>`) a stop token for every generation,
        and the `eot_id` code written for Llama 3 looks for. A template that fails here fails again, with its
        error, when a chat is formatted; plain text generation does not need it."""
        if self.chat_template is None:
            return
        from .chat_template import TemplateChatFormat

        try:
            turn_end = TemplateChatFormat(self).turn_end_tokens
        except ValueError:
            return
        self.stop_tokens |= turn_end
        if turn_end:
            self.eot_id = min(turn_end)

    # ----- construction -----
    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> HFTokenizer:
        """tokenizer.json + tokenizer_config.json (+ generation_config.json, chat_template.jinja) of a folder."""
        from .checkpoint.safety import read_json

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{folder}: no tokenizer.json; this model's tokenizer needs one (save it with "
                             "transformers' AutoTokenizer.save_pretrained)")
        data = read_json(path, what="tokenizer.json")
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path, what="tokenizer_config.json") if config_path.is_file() else {}
        template, template_source = _chat_template(folder, config)
        extra_stops: list[int] = []
        generation_path = folder / "generation_config.json"
        if generation_path.is_file():
            eos = read_json(generation_path, what="generation_config.json").get("eos_token_id")
            extra_stops = [i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]
        add_bos = config.get("add_bos_token")
        return cls(data, where=str(path), bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")), pad_token=_token_text(config.get("pad_token")),
                   unk_token=_token_text(config.get("unk_token")),
                   add_bos=add_bos if isinstance(add_bos, bool) else None, extra_stop_ids=extra_stops,
                   chat_template=template, chat_template_source=template_source)

    def _id_of(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self._plain.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.where}: {field} {token!r} is not in the vocabulary; the tokenizer files "
                             "do not belong together")
        return token_id

    def _post_processor_adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        with_specials = self._plain.encode("a", add_special_tokens=True).ids
        return bool(with_specials) and with_specials[0] == self.bos_id

    # ----- encode / decode -----
    def encode(self, s: str, *, bos: bool = False, eos: bool = False,
               allowed_special: Literal["all"] | Iterable[str] = (),
               disallowed_special: Literal["all"] | Iterable[str] = ()) -> list[int]:
        """Text -> ids (no post-processor: BOS/EOS only as asked). Specials in `s` are plain text unless
        `allowed_special` names them; naming them in `disallowed_special` raises instead."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects str, got {type(s).__name__}")
        disallowed = set(self.special_tokens) if disallowed_special == "all" else set(disallowed_special)
        for token in disallowed:
            if token in s:
                raise ValueError(f"the text contains the special token {token!r}, which is disallowed")
        if allowed_special == "all":
            ids = self._with_specials.encode(s, add_special_tokens=False).ids
        else:
            ids = self._encode_allowing(s, set(allowed_special))
        head = [self.bos_id] if bos and self.add_bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos and self.eos_id is not None else []
        return head + ids + tail

    def _encode_allowing(self, s: str, allowed: set[str]) -> list[int]:
        """Encode with only the `allowed` specials recognised: cut `s` at them, encode the rest as text."""
        allowed &= set(self.special_tokens)
        if not allowed:
            return self._plain.encode(s, add_special_tokens=False).ids
        pattern = "(" + "|".join(re.escape(t) for t in sorted(allowed, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for i, part in enumerate(re.split(pattern, s)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._plain.encode(part, add_special_tokens=False).ids)
        return ids

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                     num_threads: int = 8) -> list[list[int]]:
        """Encode many documents (the library's own thread pool; special tokens stay plain text)."""
        del num_threads  # the library sizes its pool itself (RAYON_NUM_THREADS)
        encoded = self._plain.encode_batch(list(texts), add_special_tokens=False)
        head = [self.bos_id] if bos and self.add_bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos and self.eos_id is not None else []
        return [head + e.ids + tail for e in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text as transformers' `decode` gives it (special tokens kept)."""
        return self._plain.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-fallback token is one byte, maybe half a character)."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._added_contents:
            out = self._added_contents[token_id].encode("utf-8")
        else:
            token = self._plain.id_to_token(token_id)
            if token is None:
                raise ValueError(f"token id {token_id} is outside the vocabulary of {self.n_words}")
            out = self._piece_bytes(token)
        self._bytes_cache[token_id] = out
        return out

    def _piece_bytes(self, token: str) -> bytes:
        if self._style == "byte_level":
            table = _unicode_to_byte()
            return bytes(table[c] for c in token) if all(c in table for c in token) else token.encode("utf-8")
        match = _BYTE_TOKEN.match(token)
        if match:
            return bytes([int(match.group(1), 16)])
        return token.replace(_SPM_SPACE, " ").encode("utf-8")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        """Incremental text of generated ids; SentencePiece style drops the first space as `decode` does."""
        if self._strip_first_space:
            return _LeadingSpaceStreamDecoder(self, skip_special=skip_special)
        return StreamDecoder(self, skip_special=skip_special)

    # ----- writing -----
    def to_hf_json(self) -> dict[str, Any]:
        """The tokenizer.json this tokenizer runs."""
        return json.loads(self._plain.to_str())

    def save_files(self, folder: str | os.PathLike, **config: Any) -> None:
        """Write tokenizer.json and tokenizer_config.json (plus `config` fields) into `folder`, which the
        caller renames into place when complete (as every checkpoint writer here does)."""
        folder = Path(folder)
        (folder / "tokenizer.json").write_text(json.dumps(self.to_hf_json(), ensure_ascii=False), encoding="utf-8")
        config_text = json.dumps({**self.tokenizer_config(), **config}, indent=2, ensure_ascii=False) + "\n"
        (folder / "tokenizer_config.json").write_text(config_text, encoding="utf-8")

    def tokenizer_config(self) -> dict[str, Any]:
        """tokenizer_config.json fields that describe this tokenizer (specials, BOS rule, chat template)."""
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
                                  "add_eos_token": False}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config


def _chat_template(folder: Path, config: dict[str, Any]) -> tuple[str | None, str | None]:
    """The chat template of a folder: tokenizer_config.json's `chat_template` (a string, or a list of named
    templates of which "default" is used), else a chat_template.jinja file."""
    template = config.get("chat_template")
    source = str(folder / "tokenizer_config.json")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise ValueError(f"{source}: chat_template lists {sorted(map(str, named))} but no 'default' template")
    if template is None and (folder / "chat_template.jinja").is_file():
        source = str(folder / "chat_template.jinja")
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{source}: chat_template must be a string of Jinja")
    return template, (source if template is not None else None)
