"""Chat fine-tuning data: OpenAI-style `messages` JSONL and DPO preference pairs -> ids, labels, masks.

Each line of a chat file is one dialog, as in OpenAI's fine-tuning format:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

Roles: system, user, assistant, tool (written as Llama 3.1's `ipython`). An assistant message may carry
`tool_calls` ([{"type": "function", "function": {"name", "arguments"}}]) instead of content, and
`weight: 0` to keep that reply out of the loss. Dialogs are encoded with the model's chat format
(`ChatFormat.encode_dialog` for Llama 3, its Jinja template for a derivative), so the
ids are exactly what `llama3 chat`/`serve` and HF's `apply_chat_template` produce at inference time.

Each line of a preference file is one DPO pair:

    {"prompt": "text" | [messages], "chosen": "text" | message | [messages], "rejected": ...}

Every malformed line raises `ValueError("FILE:LINE: what is wrong ...")`; nothing is skipped quietly.

Batches are what the training loop takes: `inputs = ids[:-1]` and `targets = ids[1:]` (B, T), a target
being `IGNORE_INDEX` wherever the loss mask of the predicted token is False (prompts, headers, padding);
packed rows add `document_ids` and `input_pos` (B, T).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from ..chat_template import ChatFormatLike
from ..tokenizer import ROLES
from . import IGNORE_INDEX
from .jsonl import read_jsonl

__all__ = [
    "IGNORE_INDEX",
    "ChatExample",
    "PreferenceBatches",
    "PreferenceExample",
    "SFTBatches",
    "encode_chat_record",
    "encode_preference_record",
    "load_chat_jsonl",
    "load_preference_jsonl",
    "pack_batch",
    "pad_batch",
    "preference_batch",
    "read_jsonl",
    "split_train_val",
    "validate_messages",
    "with_reference_logps",
]

_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "weight"}


@dataclass(frozen=True)
class ChatExample:
    """One encoded dialog: ids and the per-token loss mask (True = the model learns to produce it)."""
    ids: list[int]
    loss_mask: list[bool]
    source: str  # "file:line", for error messages and logs
    truncated: bool = False

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask[1:])  # the first token is never a target


@dataclass(frozen=True)
class PreferenceExample:
    """One DPO pair sharing a prompt. Masks cover the response tokens scored by the DPO loss;
    `ref_*_logp` hold the reference model's sequence log-probs once precomputed."""
    chosen_ids: list[int]
    chosen_mask: list[bool]
    rejected_ids: list[int]
    rejected_mask: list[bool]
    source: str
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None


# ----- reading and validation -----

def _text_content(content: Any, where: str) -> str:
    """OpenAI content is a string or a list of parts [{"type": "text", "text": ...}]."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}: content parts must be {{'type': 'text', 'text': str}}; "
                                 f"got {part!r} (images and audio are not supported)")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where}: 'content' must be a string or a list of text parts, got {type(content).__name__}")


def _validate_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"{where}: 'tool_calls' must be a non-empty list")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}: tool_calls[{j}] needs a 'function' object with a 'name' string")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise ValueError(f"{where}: tool_calls[{j}].function.arguments is not valid JSON: {args!r}") from None
        if not isinstance(args, dict):
            raise ValueError(f"{where}: tool_calls[{j}].function.arguments must be a JSON object")
    return calls


def validate_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    """Check an OpenAI `messages` list and return it normalized (text content, known keys only).

    Raises ValueError naming `where` (e.g. "chat.jsonl:12") and the message index on any problem."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of message objects")
    normalized = []
    for i, message in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{at}: expected an object with 'role' and 'content', got {type(message).__name__}")
        unknown = set(message) - _MESSAGE_KEYS
        if unknown:
            raise ValueError(f"{at}: unknown keys {sorted(unknown)}; allowed: {sorted(_MESSAGE_KEYS)}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{at}: role {role!r} is not one of {list(ROLES)}")
        if role == "system" and i != 0:
            raise ValueError(f"{at}: a system message may only come first")
        out: dict[str, Any] = {"role": role}
        if message.get("tool_calls") is not None:
            if role != "assistant":
                raise ValueError(f"{at}: only assistant messages may have 'tool_calls'")
            if message.get("content"):
                raise ValueError(f"{at}: an assistant message has either 'content' or 'tool_calls', not both")
            out["tool_calls"] = _validate_tool_calls(message["tool_calls"], at)
        else:
            if "content" not in message or message["content"] is None:
                raise ValueError(f"{at}: missing 'content'")
            text = _text_content(message["content"], at)
            if role == "assistant" and not text.strip():
                raise ValueError(f"{at}: empty assistant reply; the model would learn to say nothing")
            out["content"] = text
        if "weight" in message:
            if role != "assistant" or message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                raise ValueError(f"{at}: 'weight' must be 0 or 1 and only on assistant messages")
            out["weight"] = message["weight"]
        normalized.append(out)
    return normalized


# ----- encoding -----

def encode_chat_record(record: dict[str, Any], chat_format: ChatFormatLike, where: str, *, max_seq_len: int,
                       train_on: Literal["assistant", "all"] = "assistant",
                       overlong: Literal["truncate", "error"] = "truncate") -> ChatExample:
    """One JSONL record -> ChatExample, truncated to `max_seq_len` + 1 ids (inputs and targets overlap by one).

    A record must leave at least one token in the loss after truncation; otherwise it is an error, since
    such a line would only waste compute (or, worse, hide a data bug)."""
    unknown = set(record) - {"messages"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; a chat line holds only 'messages' "
                         "(tool definitions belong in the system message)")
    if "messages" not in record:
        raise ValueError(f"{where}: missing 'messages'")
    messages = validate_messages(record["messages"], where)
    if train_on == "assistant" and not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise ValueError(f"{where}: no assistant reply to learn from (add one, or use train_on='all')")
    try:
        ids, mask = chat_format.encode_dialog(messages, train_on=train_on)  # weight-0 replies stay out
    except ValueError as e:  # e.g. a derivative's template that cannot render this dialog
        raise ValueError(f"{where}: {e}") from None
    truncated = len(ids) > max_seq_len + 1
    if truncated:
        if overlong == "error":
            raise ValueError(f"{where}: dialog is {len(ids)} tokens, longer than max_seq_len + 1 = "
                             f"{max_seq_len + 1}; shorten it or raise max_seq_len")
        ids, mask = ids[: max_seq_len + 1], mask[: max_seq_len + 1]
    example = ChatExample(ids, mask, where, truncated)
    if example.num_loss_tokens == 0:
        raise ValueError(f"{where}: no trainable token is left within max_seq_len={max_seq_len}; "
                         "shorten the prompt or raise max_seq_len")
    return example


def _as_messages(value: Any, where: str, field_name: str, default_role: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        value = [{"role": default_role, "content": value}]
    elif isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{where}: '{field_name}' must be a string, a message or a list of messages")
    return validate_messages(value, f"{where}: {field_name}")


def _response_mask(chat_format: ChatFormatLike, prompt: list[dict[str, Any]], response: list[dict[str, Any]],
                   mask_formatting: bool) -> tuple[list[int], list[bool]]:
    """Ids of prompt + response with a mask over the response's assistant content. With `mask_formatting`
    the end-of-turn tokens are left out as well as the headers (Llama 3 paper §4.1.4: formatting tokens are
    masked in DPO because they appear in both responses and destabilize the loss)."""
    ids, mask = chat_format.encode_dialog(prompt + response)
    num_prompt = len(chat_format.encode_dialog(prompt)[0])
    mask = [False] * num_prompt + mask[num_prompt:]
    if mask_formatting:
        enders = chat_format.stop_tokens
        mask = [m and tok not in enders for tok, m in zip(ids, mask)]
    return ids, mask


def encode_preference_record(record: dict[str, Any], chat_format: ChatFormatLike, where: str, *,
                             max_seq_len: int, mask_formatting: bool = True) -> PreferenceExample:
    """One `prompt`/`chosen`/`rejected` record -> PreferenceExample (both sequences truncated alike)."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise ValueError(f"{where}: missing '{key}'; a preference line needs prompt, chosen and rejected")
    unknown = set(record) - {"prompt", "chosen", "rejected"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: prompt, chosen, rejected")
    prompt = _as_messages(record["prompt"], where, "prompt", "user")
    if prompt[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the prompt must end with a user or tool message, not an assistant reply")
    responses = {}
    for key in ("chosen", "rejected"):
        response = _as_messages(record[key], where, key, "assistant")
        if response[0]["role"] != "assistant":
            raise ValueError(f"{where}: '{key}' must start with an assistant message")
        responses[key] = response
    if responses["chosen"] == responses["rejected"]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are identical; the pair teaches nothing")
    encoded = {}
    for key, response in responses.items():
        ids, mask = _response_mask(chat_format, prompt, response, mask_formatting)
        ids, mask = ids[: max_seq_len + 1], mask[: max_seq_len + 1]
        if not any(mask[1:]):
            raise ValueError(f"{where}: the '{key}' response does not fit in max_seq_len={max_seq_len}; "
                             "shorten the prompt or raise max_seq_len")
        encoded[key] = (ids, mask)
    return PreferenceExample(*encoded["chosen"], *encoded["rejected"], source=where)


def load_chat_jsonl(path: str | os.PathLike, chat_format: ChatFormatLike, *, max_seq_len: int,
                    train_on: Literal["assistant", "all"] = "assistant",
                    overlong: Literal["truncate", "error"] = "truncate") -> list[ChatExample]:
    """Every dialog of a chat JSONL file, encoded; the first malformed line raises."""
    if train_on not in ("assistant", "all"):
        raise ValueError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
    examples = [encode_chat_record(record, chat_format, f"{path}:{lineno}", max_seq_len=max_seq_len,
                                   train_on=train_on, overlong=overlong)
                for lineno, record in read_jsonl(path)]
    if not examples:
        raise ValueError(f"{path}: no dialogs in this file")
    return examples


def load_preference_jsonl(path: str | os.PathLike, chat_format: ChatFormatLike, *, max_seq_len: int,
                          mask_formatting: bool = True) -> list[PreferenceExample]:
    """Every pair of a preference JSONL file, encoded; the first malformed line raises."""
    examples = [encode_preference_record(record, chat_format, f"{path}:{lineno}", max_seq_len=max_seq_len,
                                         mask_formatting=mask_formatting)
                for lineno, record in read_jsonl(path)]
    if not examples:
        raise ValueError(f"{path}: no preference pairs in this file")
    return examples


def split_train_val(examples: Sequence[Any], val_fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Seeded random split; with a positive fraction and at least two examples, validation gets >= 1."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    num_val = round(len(examples) * val_fraction)
    if val_fraction > 0 and len(examples) >= 2:
        num_val = max(num_val, 1)
    val_idx = set(order[:num_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


# ----- batching -----

def _inputs_and_labels(ids: list[int], mask: list[bool]) -> tuple[list[int], list[int]]:
    """Next-token targets: predict ids[t+1] from ids[:t+1]; untrained targets become IGNORE_INDEX."""
    labels = [tok if learn else IGNORE_INDEX for tok, learn in zip(ids[1:], mask[1:])]
    return ids[:-1], labels


def pad_batch(examples: Sequence[ChatExample], pad_id: int, *, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """One row per dialog, right-padded to the longest (or `seq_len`): inputs and targets (B, T).
    Right padding needs no attention mask: causal attention never looks ahead at the pads."""
    rows = [_inputs_and_labels(e.ids, e.loss_mask) for e in examples]
    T = seq_len or max(len(tokens) for tokens, _ in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, (row_tokens, row_labels) in enumerate(rows):
        assert len(row_tokens) <= T, "examples are truncated to max_seq_len when loaded"
        tokens[b, : len(row_tokens)] = torch.tensor(row_tokens)
        labels[b, : len(row_labels)] = torch.tensor(row_labels)
    return {"inputs": tokens, "targets": labels}


def pack_batch(rows: Sequence[Sequence[ChatExample]], pad_id: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Each row's dialogs laid end to end in `seq_len` positions, with `document_ids` so attention stays
    inside each dialog and `input_pos` restarting at 0 per dialog, as if each were alone. The tail of a row
    is padding with its own document id and no labels. rows: B lists of dialogs -> tensors (B, seq_len)."""
    B = len(rows)
    out = {"inputs": torch.full((B, seq_len), pad_id, dtype=torch.long),
           "targets": torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long),
           "document_ids": torch.zeros((B, seq_len), dtype=torch.long),
           "input_pos": torch.zeros((B, seq_len), dtype=torch.long)}
    for b, row in enumerate(rows):
        start = 0
        for doc, example in enumerate(row):
            tokens, labels = _inputs_and_labels(example.ids, example.loss_mask)
            end = start + len(tokens)
            if end > seq_len:
                raise ValueError(f"row {b} holds {end} tokens, more than seq_len={seq_len}")
            out["inputs"][b, start:end] = torch.tensor(tokens)
            out["targets"][b, start:end] = torch.tensor(labels)
            out["document_ids"][b, start:end] = doc
            out["input_pos"][b, start:end] = torch.arange(len(tokens))
            start = end
        out["document_ids"][b, start:] = len(row)  # padding is a document of its own
        out["input_pos"][b, start:] = torch.arange(seq_len - start)
    return out


def preference_batch(examples: Sequence[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, (2B, T) right-padded, so one forward scores both; plus the
    precomputed reference log-probs (B,) each when every example carries them."""
    chosen = [ChatExample(e.chosen_ids, e.chosen_mask, e.source) for e in examples]
    rejected = [ChatExample(e.rejected_ids, e.rejected_mask, e.source) for e in examples]
    batch = pad_batch(chosen + rejected, pad_id)
    if all(e.ref_chosen_logp is not None and e.ref_rejected_logp is not None for e in examples):
        batch["ref_chosen_logps"] = torch.tensor([e.ref_chosen_logp for e in examples], dtype=torch.float64)
        batch["ref_rejected_logps"] = torch.tensor([e.ref_rejected_logp for e in examples], dtype=torch.float64)
    return batch


@dataclass
class SFTBatches:
    """Resumable batches of dialogs: a seeded shuffle per epoch, then `pack_batch` (rows of `seq_len`,
    attention kept within each dialog) or `pad_batch`. Endless unless `num_epochs` is set, in which case
    the last batch may be short. `state_dict()` records where it is."""
    examples: Sequence[ChatExample]
    batch_size: int
    pad_id: int
    seq_len: int
    pack: bool = True
    seed: int = 0
    shuffle: bool = True  # False: the examples' own order every epoch (validation)
    num_epochs: int | None = None  # stop after this many passes (validation: 1); None = endless
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError("no examples to batch")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.pack:
            too_long = next((e for e in self.examples if len(e.ids) - 1 > self.seq_len), None)
            if too_long is not None:
                raise ValueError(f"{too_long.source}: {len(too_long.ids) - 1} tokens do not fit a packed row of "
                                 f"{self.seq_len}; load the data with max_seq_len <= seq_len")
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _peek(self) -> Any | None:
        """The next example without consuming it; None once `num_epochs` passes are done."""
        if self.position >= len(self._order):
            if self.num_epochs is not None and self.epoch + 1 >= self.num_epochs:
                return None
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        return self.examples[self._order[self.position]]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.pack:
            chosen = []
            while len(chosen) < self.batch_size and (example := self._peek()) is not None:
                chosen.append(example)
                self.position += 1
            if not chosen:
                raise StopIteration
            return self._collate(chosen)
        # Packing: fill `batch_size` rows in stream order; a dialog that does not fit in the current row
        # starts the next one (and stays unconsumed if the batch is full, so resuming loses nothing).
        rows: list[list[ChatExample]] = [[]]
        used = 0
        while (example := self._peek()) is not None:
            length = len(example.ids) - 1
            if used + length <= self.seq_len:
                rows[-1].append(example)
                used += length
                self.position += 1
            elif len(rows) == self.batch_size:
                break
            else:
                rows.append([])
                used = 0
        rows = [row for row in rows if row]
        if not rows:
            raise StopIteration
        return pack_batch(rows, self.pad_id, self.seq_len)

    def _collate(self, chosen: list[Any]) -> dict[str, torch.Tensor]:
        return pad_batch(chosen, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)


@dataclass
class PreferenceBatches(SFTBatches):
    """Endless, resumable batches of preference pairs (see `preference_batch`); `seq_len` is unused."""
    seq_len: int = 0
    pack: bool = False

    def _collate(self, chosen: list[Any]) -> dict[str, torch.Tensor]:
        return preference_batch(chosen, self.pad_id)


def with_reference_logps(examples: Sequence[PreferenceExample],
                         logps: Sequence[tuple[float, float]]) -> list[PreferenceExample]:
    """Attach precomputed reference (chosen, rejected) sequence log-probs to each pair."""
    if len(logps) != len(examples):
        raise ValueError(f"{len(logps)} reference log-prob pairs for {len(examples)} examples")
    return [replace(e, ref_chosen_logp=float(c), ref_rejected_logp=float(r)) for e, (c, r) in zip(examples, logps)]
