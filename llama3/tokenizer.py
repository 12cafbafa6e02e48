"""Llama 3 tokenizer (tiktoken byte-level BPE + 256 special tokens) and the chat format.

`Tokenizer` reads Meta's `tokenizer.model` (lines of `base64(token) rank`) or a Hugging Face
`tokenizer.json` (byte-level BPE), and writes both. `ChatFormat` turns dialogs into ids exactly as Meta's
reference does, with a loss mask for training on assistant tokens only.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import tiktoken

__all__ = ["Tokenizer", "ChatFormat", "StreamDecoder", "LLAMA3_SPLIT_PATTERN", "special_token_names",
           "CHAT_TEMPLATE", "Message", "Dialog"]

# Llama 3's pre-tokenizer split (the `pat_str` of Meta's tokenizer.py): contractions, words with one leading non-letter, numbers of
# at most three digits, punctuation runs, newlines, whitespace.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
# tiktoken's core panics or slows quadratically on huge inputs; Meta's reference encodes in chunks of at most
# 400k characters, each cut further into runs of at most 25k consecutive whitespace / non-whitespace chars.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

Message = dict[str, Any]
Dialog = Sequence[Message]


def special_token_names(version: Literal["3.0", "3.1"] = "3.1") -> list[str]:
    """The 256 special token names, in id order after the BPE ranks.

    3.0 (Meta's llama3 repo): reserved tokens fill every slot but BOS/EOS, the header pair and eot.
    3.1+ (llama-models, as the 3.2 tokenizer.json ships them): adds finetune_right_pad_id (128004),
    step_id (128005), eom_id (128008) and python_tag (128010); reserved numbering shifts accordingly.
    """
    if version == "3.0":
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        first_reserved = 5
    elif version == "3.1":
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        first_reserved = 2
    else:
        raise ValueError(f"unknown special-token version {version!r}; use '3.0' or '3.1'")
    n_rest = NUM_RESERVED_SPECIAL_TOKENS - len(names)
    return names + [f"<|reserved_special_token_{first_reserved + i}|>" for i in range(n_rest)]


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by byte-level BPE vocabularies (tokenizer.json)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _bytes_to_hf(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[int, int]:
    """A str.translate table from byte-level BPE characters to the code point of their byte (so latin-1
    encodes them), and from every other character below 256 to U+0100, which latin-1 refuses."""
    table = {ord(c): b for c, b in _unicode_to_byte().items()}
    table.update({i: 0x100 for i in range(256) if i not in table})
    return table


def _hf_to_bytes(token: str) -> bytes:
    # translate + encode run in C: per character in Python, Llama 3's 128K tokens took over a second to load
    try:
        return token.translate(_byte_level_table()).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"token {token!r} is not byte-level BPE; only byte-level BPE tokenizers load") from None


def _hf_tokens_to_bytes(tokens: list[str]) -> list[bytes]:
    """`_hf_to_bytes` of every token, translated in one pass over them joined by U+FFFF (never a byte-level
    character, and left alone by the table, so it only separates); an invalid token is named by the
    per-token path."""
    joined = "\uffff".join(tokens)
    if joined.count("\uffff") == len(tokens) - 1:
        try:
            return [piece.encode("latin-1") for piece in joined.translate(_byte_level_table()).split("\uffff")] \
                if tokens else []
        except UnicodeEncodeError:
            pass
    return [_hf_to_bytes(token) for token in tokens]


def _split_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut s so that no piece holds more than `max_run` consecutive whitespace or non-whitespace chars."""
    start, run, run_is_space = 0, 0, None
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space == run_is_space:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
        else:
            run_is_space, run = is_space, 1
    yield s[start:]


class StreamDecoder:
    """Incremental detokenizer: feed ids, get text that never ends inside a UTF-8 character.

    Bytes of an incomplete character are held back until the tokens completing it arrive;
    `flush()` returns what is left (invalid bytes as U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._skip_special = skip_special

    def feed(self, ids: int | Iterable[int]) -> str:
        if isinstance(ids, int):
            ids = [ids]
        chunks = []
        for i in ids:
            if self._skip_special and self._tokenizer.is_special(i):
                continue
            chunks.append(self._tokenizer.token_bytes(i))
        return self._decoder.decode(b"".join(chunks))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """The BPE ranks of a tiktoken file (Meta's `tokenizer.model`): one `base64(token) rank` per line.
    Decoded with binascii's strict mode (the C decoder; base64.b64decode's validation is a regex per line,
    a third of a second for Llama 3's 128K lines)."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[binascii.a2b_base64(token_b64, strict_mode=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{path}, line {lineno}: expected 'base64-token rank'; is this a tiktoken "
                "tokenizer.model (a SentencePiece model from Llama 2 will not load)?") from None
    if not ranks:
        raise ValueError(f"{path}: empty tokenizer file")
    return ranks


class Tokenizer:
    """Byte-level BPE on tiktoken with Llama 3's split pattern and special tokens.

    Special tokens get ids `len(mergeable_ranks) + i` (128000.. for Llama 3's 128000 ranks, right after the
    learned ranks for a trained vocab). Special tokens typed in text encode as plain text unless
    `allowed_special` names them.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], *, special_tokens: Sequence[str] | None = None,
                 pattern: str = LLAMA3_SPLIT_PATTERN, name: str = "llama3"):
        if special_tokens is None:
            special_tokens = special_token_names("3.1")
        num_base = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(num_base)):
            raise ValueError("BPE ranks must be exactly 0..N-1 with no gaps or duplicates")
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.special_tokens: dict[str, int] = {tok: num_base + i for i, tok in enumerate(special_tokens)}
        self._special_ids = {i: tok for tok, i in self.special_tokens.items()}
        self.model = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = self.model.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens.get("<|eom_id|>")
        self.python_tag_id = self.special_tokens.get("<|python_tag|>")
        # No pad token in Llama 3; 3.1+ reserves finetune_right_pad_id, older vocabularies pad with EOS.
        self.pad_id = self.special_tokens.get("<|finetune_right_pad_id|>", self.eos_id)
        self.stop_tokens = {self.eos_id, self.eot_id} | ({self.eom_id} if self.eom_id is not None else set())
        self.version = "3.1" if self.eom_id is not None else "3.0"

    # ----- construction from files -----
    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> Tokenizer:
        """Load `tokenizer.model` (tiktoken format) or `tokenizer.json` (HF), or a folder holding either."""
        path = Path(path)
        if path.is_dir():
            for candidate in ("tokenizer.model", "original/tokenizer.model", "tokenizer.json"):
                if (path / candidate).is_file():
                    path = path / candidate
                    break
            else:
                raise ValueError(f"{path}: no tokenizer.model or tokenizer.json in this folder")
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} does not exist")
        if path.suffix == ".json":
            return cls.from_hf_json(path)
        return cls.from_tiktoken_file(path, **kwargs)

    @classmethod
    def from_tiktoken_file(cls, path: str | os.PathLike, *, version: Literal["3.0", "3.1"] = "3.1",
                           special_tokens: Sequence[str] | None = None) -> Tokenizer:
        """Meta's `tokenizer.model`: one `base64(token) rank` per line."""
        ranks = read_tiktoken_ranks(path)
        return cls(ranks, special_tokens=special_tokens or special_token_names(version))

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike) -> Tokenizer:
        """An HF `tokenizer.json` holding a byte-level BPE (Llama 3's own, or one we wrote)."""
        path = Path(path)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            model = data["model"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a tokenizer.json with a 'model' section ({e})") from None
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model type {model.get('type')!r}; only byte-level BPE is supported")
        added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
        vocab = {tok: i for tok, i in model["vocab"].items() if i < (added[0][0] if added else 1 << 62)}
        ranks = dict(zip(_hf_tokens_to_bytes(list(vocab)), vocab.values()))
        num_base = len(ranks)
        specials = [content for i, content in added]
        if [i for i, _ in added] != list(range(num_base, num_base + len(added))):
            raise ValueError(f"{path}: added tokens must follow the BPE vocab with consecutive ids")
        pattern = LLAMA3_SPLIT_PATTERN
        pre = data.get("pre_tokenizer") or {}
        for step in pre.get("pretokenizers", [pre]):
            if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
                pattern = step["pattern"]["Regex"]
        return cls(ranks, special_tokens=specials, pattern=pattern)

    def save_tiktoken(self, path: str | os.PathLike) -> None:
        """Write the ranks as a `tokenizer.model` (specials are implied by order, as in Meta's file)."""
        lines = [f"{base64.b64encode(tok).decode()} {rank}\n"
                 for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
        _atomic_write_text(Path(path), "".join(lines))

    def to_hf_json(self) -> dict[str, Any]:
        """A tokenizer.json equivalent to this tokenizer in HF `tokenizers`.

        `ignore_merges: true` makes HF look a whole pre-token up in the vocab before merging, as tiktoken
        does; without it some words split differently. Merges are every split of a token into two
        vocabulary tokens, ordered by the rank of the token they make."""
        vocab = {_bytes_to_hf(tok): rank for tok, rank in self.mergeable_ranks.items()}
        merges: list[tuple[int, int, int, str, str]] = []
        for tok, rank in self.mergeable_ranks.items():
            for cut in range(1, len(tok)):
                left, right = tok[:cut], tok[cut:]
                left_rank, right_rank = self.mergeable_ranks.get(left), self.mergeable_ranks.get(right)
                if left_rank is not None and right_rank is not None:
                    merges.append((rank, left_rank, right_rank, _bytes_to_hf(left), _bytes_to_hf(right)))
        merges.sort()
        bos = "<|begin_of_text|>"
        added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for tok, i in self.special_tokens.items()]
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": {"type": "Sequence", "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {bos: {"id": bos, "ids": [self.bos_id], "tokens": [bos]}}}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": True, "vocab": vocab,
                      "merges": [[left, right] for *_, left, right in merges]},
        }

    # ----- encode / decode -----
    def encode(self, s: str, *, bos: bool = False, eos: bool = False,
               allowed_special: Literal["all"] | Iterable[str] = (),
               disallowed_special: Literal["all"] | Iterable[str] = ()) -> list[int]:
        """Text -> ids. Special tokens in `s` are plain text unless listed in `allowed_special` (or "all");
        listing them in `disallowed_special` raises instead."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects str, got {type(s).__name__}")
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        disallowed = disallowed_special if disallowed_special == "all" else set(disallowed_special)
        ids: list[int] = [self.bos_id] if bos else []
        for i in range(0, len(s), MAX_ENCODE_CHARS):
            for piece in _split_runs(s[i: i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=disallowed))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False,
                     num_threads: int = 8) -> list[list[int]]:
        """Encode many documents with tiktoken's thread pool (special tokens stay plain text)."""
        short = all(len(t) <= MAX_RUN_CHARS for t in texts)
        if not short:
            return [self.encode(t, bos=bos, eos=eos) for t in texts]
        out = self.model.encode_ordinary_batch(list(texts), num_threads=num_threads)
        head, tail = ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])
        return [head + ids + tail for ids in out]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; bytes that do not form valid UTF-8 become U+FFFD."""
        return self.model.decode(list(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.model.decode_single_token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)


def _atomic_write_text(path: Path, text: str) -> None:
    from .checkpoint.safety import atomic_output_file

    with atomic_output_file(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ----- chat format -----

# Jinja chat template equivalent to ChatFormat (HF `apply_chat_template`): one BOS, each message as
# header + stripped content + <|eot_id|>; tool results travel in the `ipython` role (3.1); assistant tool
# calls are JSON objects {"name", "parameters"}; `add_generation_prompt` opens the assistant header.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] in ['tool', 'ipython'] else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}"
    "{%- if message.get('tool_calls') %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call.get('function') else call %}"
    "{%- set args = fn['arguments'] if fn.get('arguments') is not none else fn.get('parameters', {}) %}"
    "{{- '{\"name\": \"' + fn['name'] + '\", \"parameters\": ' + (args if args is string else args | tojson) + '}' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{%- set content = message['content'] if message['content'] is string else message['content'] | tojson %}"
    "{{- content | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# The roles a message may have (OpenAI style; "tool" is written as Llama 3.1's "ipython").
ROLES = ("system", "user", "assistant", "tool", "ipython")


class ChatFormat:
    """Dialog -> token ids in Llama 3's chat layout (method names as in Meta's reference).

        <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{content}<|eot_id|>...
        <|start_header_id|>assistant<|end_header_id|>\\n\\n

    Messages are dicts {"role", "content"} (OpenAI style); role "tool" is written as 3.1's "ipython";
    an assistant message may carry "tool_calls" [{"function": {"name", "arguments"}}] instead of content.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @property
    def stop_tokens(self) -> set[int]:
        return self.tokenizer.stop_tokens

    @property
    def supports_tools(self) -> bool:
        """Tools travel in Llama 3.1's JSON format (see `llama3.serve.tools`)."""
        return True

    def encode_header(self, message: Message) -> list[int]:
        role = _check_role(message)
        role = "ipython" if role == "tool" else role
        t = self.tokenizer
        return [t.special_tokens["<|start_header_id|>"], *t.encode(role),
                t.special_tokens["<|end_header_id|>"], *t.encode("\n\n")]

    def encode_content(self, message: Message) -> list[int]:
        """The body of a message (without header and end token)."""
        if message.get("tool_calls"):
            return self.tokenizer.encode("".join(_tool_call_json(c) for c in message["tool_calls"]))
        content = message.get("content")
        if content is None:
            raise ValueError(f"message with role {message.get('role')!r} has no content")
        if not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False)
        return self.tokenizer.encode(content.strip())

    def encode_message(self, message: Message) -> list[int]:
        return self.encode_header(message) + self.encode_content(message) + [self.tokenizer.eot_id]

    def encode_dialog_prompt(self, dialog: Dialog, *, add_generation_prompt: bool = True) -> list[int]:
        """Ids for a whole dialog: exactly one BOS, then messages, then (by default) the open assistant header."""
        return self.encode_dialog(dialog, add_generation_prompt=add_generation_prompt)[0]

    def encode_dialog(self, dialog: Dialog, *, add_generation_prompt: bool = False,
                      train_on: Literal["assistant", "all"] = "assistant") -> tuple[list[int], list[bool]]:
        """Ids and a loss mask for training. With train_on="assistant" only the content and end token of
        assistant messages are True (headers never are): the model learns to answer and to stop. A message
        with `weight: 0` contributes nothing to the loss."""
        if not dialog:
            raise ValueError("a dialog needs at least one message")
        ids, mask = [self.tokenizer.bos_id], [False]
        for message in dialog:
            header = self.encode_header(message)
            body = self.encode_content(message) + [self.tokenizer.eot_id]
            learn = (train_on == "all" or message["role"] == "assistant") and message.get("weight", 1) != 0
            ids += header + body
            mask += [False] * len(header) + [learn] * len(body)
        if add_generation_prompt:
            header = self.encode_header({"role": "assistant", "content": ""})
            ids += header
            mask += [False] * len(header)
        return ids, mask


def _check_role(message: Message) -> str:
    if not isinstance(message, dict) or "role" not in message:
        raise ValueError(f"each message must be an object with a 'role', got {message!r}")
    role = message["role"]
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {sorted(ROLES)}")
    return role


def _tool_call_json(call: dict[str, Any]) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string: keep it verbatim
        try:
            json.loads(args)
        except json.JSONDecodeError:
            raise ValueError(f"tool call arguments are not valid JSON: {args!r}") from None
    else:
        args = json.dumps(args, ensure_ascii=False)
    return '{"name": "' + fn["name"] + '", "parameters": ' + args + "}"
