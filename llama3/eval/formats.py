"""Readers for benchmark files in their published layouts, each record turned into an `Example`.

Supported layouts (field names as published; `detect_format` picks one from the first record):

- mmlu: `{"question", "subject", "choices": [4 strings], "answer": 0-3 or "A"-"D"}` (the Hugging Face
  `cais/mmlu` layout), or `{"input", "A", "B", "C", "D", "target": "A"-"D"}` (the column layout of the
  original CSVs as published in JSON), or the original header-less CSV rows `question,A,B,C,D,answer`.
- hellaswag: `{"activity_label", "ctx_a", "ctx_b", "endings": [4 strings], "label": 0-3 or "0"-"3"}`.
- arc: `{"question": str, "choices": {"text": [...], "label": [...]}, "answerKey"}` (Hugging Face
  `allenai/ai2_arc`) or `{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}` (AI2's JSONL).
- gsm8k: `{"question", "answer"}` with the answer's last line `#### <number>`.
- custom: `{"query", "choices": [...], "gold": index}` (multiple choice) or `{"query", "target"}`
  (generation); an optional `"description"` string is put before the few-shot examples.

Prompts are those of lm-evaluation-harness's tasks of the same names, so scores are comparable.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.jsonl import read_jsonl

__all__ = ["FORMATS", "Example", "detect_format", "load_examples", "read_records"]


@dataclass
class Example:
    """One evaluation item.

    prompt: the question as the model sees it, without the answer ("...\\nAnswer:").
    choices: multiple-choice continuations (each scored after the target delimiter " "), or None.
    gold: index of the right choice.
    target: for generation tasks, the reference answer text (also the few-shot answer).
    description: text put once before the few-shot examples (MMLU's subject line).
    group: few-shot examples are drawn from the same group (MMLU's subject); "" means any.
    """

    prompt: str
    choices: list[str] | None = None
    gold: int | None = None
    target: str | None = None
    description: str = ""
    group: str = ""
    fields: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def answer_text(self) -> str:
        """What follows the prompt in a few-shot example."""
        if self.choices is not None:
            return self.choices[self.gold]
        return self.target or ""


class RecordError(ValueError):
    """A record lacks a field or has the wrong type; the reader adds the file and line."""


def _get(record: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in record:
        raise RecordError(f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RecordError(f"field {name!r} must be {names}, got {type(value).__name__}")
    return value


def _string_list(record: dict[str, Any], name: str) -> list[str]:
    value = _get(record, name, list)
    if not value or not all(isinstance(v, str) for v in value):
        raise RecordError(f"field {name!r} must be a non-empty list of strings")
    return value


def _index(value: Any, labels: list[str], name: str) -> int:
    """An answer given as an index (int or digit string) or as one of `labels` (e.g. "A".."D")."""
    if isinstance(value, str) and value.strip() in labels:
        return labels.index(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) < len(labels):
        return int(value)
    raise RecordError(f"field {name!r} = {value!r} is not one of {labels} or an index below {len(labels)}")


# ----- MMLU -----
MMLU_LETTERS = ["A", "B", "C", "D"]


def _mmlu(record: dict[str, Any]) -> Example:
    if "input" in record and "question" not in record:  # the CSV column layout
        question = _get(record, "input", str)
        choices = [_get(record, letter, (str, int, float)) for letter in MMLU_LETTERS]
        answer = _index(_get(record, "target", (str, int)), MMLU_LETTERS, "target")
    else:
        question = _get(record, "question", str)
        choices = _get(record, "choices", list)
        answer = _index(_get(record, "answer", (str, int)), MMLU_LETTERS, "answer")
    if len(choices) != 4:
        raise RecordError(f"MMLU items have 4 choices, this one has {len(choices)}")
    subject = str(record.get("subject", ""))
    choices = [str(c) for c in choices]
    prompt = (
        f"{question.strip()}\n"
        + "".join(f"{letter}. {text}\n" for letter, text in zip(MMLU_LETTERS, choices))
        + "Answer:"
    )
    description = (
        (f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n")
        if subject
        else ""
    )
    return Example(prompt, choices=list(MMLU_LETTERS), gold=answer, description=description, group=subject)


# ----- HellaSwag -----
def _hellaswag_clean(text: str) -> str:
    """WikiHow artifacts out, as lm-evaluation-harness's hellaswag `preprocess`."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(record: dict[str, Any]) -> Example:
    context = _get(record, "ctx_a", str) + " " + _get(record, "ctx_b", str).capitalize()
    endings = _string_list(record, "endings")
    label = _index(_get(record, "label", (str, int)), [str(i) for i in range(len(endings))], "label")
    return Example(
        _hellaswag_clean(_get(record, "activity_label", str) + ": " + context),
        choices=[_hellaswag_clean(e) for e in endings],
        gold=label,
    )


# ----- ARC -----
def _arc(record: dict[str, Any]) -> Example:
    question = _get(record, "question", (str, dict))
    if isinstance(question, dict):  # AI2's JSONL: question.stem, question.choices[{text, label}]
        stem = _get(question, "stem", str)
        items = _get(question, "choices", list)
        if not all(isinstance(c, dict) and "text" in c and "label" in c for c in items):
            raise RecordError('question.choices must be a list of {"text", "label"} objects')
        texts, labels = [str(c["text"]) for c in items], [str(c["label"]) for c in items]
    else:
        stem = question
        choices = _get(record, "choices", dict)
        texts, labels = _string_list(choices, "text"), [str(x) for x in _get(choices, "label", list)]
        if len(texts) != len(labels):
            raise RecordError("choices.text and choices.label differ in length")
    answer_key = str(_get(record, "answerKey", (str, int))).strip()
    if answer_key not in labels:
        raise RecordError(f"answerKey {answer_key!r} is not one of the choice labels {labels}")
    return Example(f"Question: {stem}\nAnswer:", choices=texts, gold=labels.index(answer_key))


# ----- GSM8K -----
def _gsm8k(record: dict[str, Any]) -> Example:
    answer = _get(record, "answer", str)
    if "####" not in answer:
        raise RecordError("GSM8K answers end with a line '#### <number>'; this one has no '####'")
    return Example(f"Question: {_get(record, 'question', str)}\nAnswer:", target=answer)


# ----- custom -----
def _custom(record: dict[str, Any]) -> Example:
    query = _get(record, "query", str)
    description = record.get("description", "")
    if not isinstance(description, str):
        raise RecordError("field 'description' must be a string")
    if "choices" in record:
        choices = _string_list(record, "choices")
        gold = _index(_get(record, "gold", (int, str)), [str(i) for i in range(len(choices))], "gold")
        return Example(query, choices=choices, gold=gold, description=description)
    if "target" in record:
        return Example(query, target=str(_get(record, "target", (str, int, float))), description=description)
    raise RecordError('a custom record needs "choices" and "gold" (multiple choice) or "target" (generation)')


FORMATS: dict[str, Callable[[dict[str, Any]], Example]] = {
    "mmlu": _mmlu,
    "hellaswag": _hellaswag,
    "arc": _arc,
    "gsm8k": _gsm8k,
    "custom": _custom,
}


def detect_format(record: dict[str, Any]) -> str:
    """Name the layout of a record from its field names."""
    keys = set(record)
    if {"ctx_a", "ctx_b", "endings"} <= keys:
        return "hellaswag"
    if "answerKey" in keys:
        return "arc"
    if {"question", "choices", "answer"} <= keys or {"input", "A", "B", "C", "D", "target"} <= keys:
        return "mmlu"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if "query" in keys:
        return "custom"
    raise ValueError(
        f"cannot tell the task format from the fields {sorted(keys)}; give the format explicitly "
        f'(one of {", ".join(FORMATS)}) or use the custom layout {{"query", "choices", "gold"}}'
    )


def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs from a .jsonl file, a .json list, or a header-less MMLU .csv."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task file {path} does not exist")
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        out = []
        for lineno, row in enumerate(rows, 1):
            if len(row) != 6:
                raise ValueError(
                    f"{path}, line {lineno}: MMLU CSV rows are question,A,B,C,D,answer "
                    f"(6 columns), this one has {len(row)}"
                )
            out.append((lineno, {"input": row[0], **dict(zip(MMLU_LETTERS, row[1:5])), "target": row[5]}))
        return out
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not valid JSON ({e.msg} at line {e.lineno}); use one record per "
                "line in a .jsonl file, or a JSON list"
            ) from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: a .json task file must hold a list of objects")
        return list(enumerate(data, 1))
    return list(read_jsonl(path))


def load_examples(path: str | Path, fmt: str | None = None) -> tuple[str, list[Example]]:
    """Read a task file; returns (format name, examples). `fmt` None detects it from the first record."""
    records = read_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    if fmt is None:
        try:
            fmt = detect_format(records[0][1])
        except ValueError as e:
            raise ValueError(f"{path}, line {records[0][0]}: {e}") from None
    if fmt not in FORMATS:
        raise ValueError(f"unknown task format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    reader = FORMATS[fmt]
    examples = []
    for lineno, record in records:
        try:
            example = reader(record)
        except RecordError as e:
            raise ValueError(f"{path}, line {lineno}: {e} (reading it as {fmt})") from None
        example.fields = record
        examples.append(example)
    kinds = {e.choices is None for e in examples}
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes multiple-choice and generation records; put them in separate files")
    return fmt, examples
