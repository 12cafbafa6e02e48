"""Tool calling as Llama 3.1 does it: JSON function calls and Meta's built-in tools.

Meta's Llama 3.1 prompt format:

- Any tool turns on `Environment: ipython` in the system message. The built-in tools `brave_search` and
  `wolfram_alpha` are named on a `Tools:` line after it (`code_interpreter` needs no line: the environment
  is the interpreter).
- Other functions ("JSON based tool calling", as Meta's Hugging Face chat template renders it) are written
  into the first user message, under an instruction to answer with `{"name": function name, "parameters":
  dictionary of argument name and its value}`; the model answers with that object and `<|eot_id|>`.
- A built-in call is `<|python_tag|>brave_search.call(query="...")<|eom_id|>` (likewise wolfram_alpha);
  for code_interpreter the model writes Python code after `<|python_tag|>`, ending with `<|eom_id|>`.
- Results come back as `ipython` messages (OpenAI's `role: tool`).

An OpenAI client offers a built-in tool as a function named `brave_search`, `wolfram_alpha` or
`code_interpreter`; its call arrives as a tool call with arguments `{"query": ...}` (or `{"code": ...}`), and
goes back into the prompt in Meta's form. `tool_choice`: `none` leaves the tools out of the prompt, `auto`
lets the model choose, `required` and a named function make the answer a call: for JSON functions by a
grammar (the answer is a call of an offered function with arguments valid under its parameters schema, even
from a weak model), for a built-in by starting the answer with its `<|python_tag|>` opening.
`parallel_tool_calls: false` keeps the first call only.

Streaming (`ToolCallStream`) follows OpenAI: text that may still become a call is held back, never sent as
content; once a call's name is known, a tool-call delta carries its id and name, and its arguments follow
as they are generated.
"""

from __future__ import annotations

import ast
import json
import uuid
from dataclasses import dataclass
from typing import Any

import regex

from .schema import ChatCompletionRequest

__all__ = ["BUILTIN_TOOLS", "TOOL_INSTRUCTION", "ToolCallStream", "ToolPlan", "build_dialog", "encode_prompt",
           "parse_tool_calls", "plan_tools", "tools_active"]

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
TOOL_INSTRUCTION = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
    "Do not use variables.\n\n"
)
# The opening of a JSON call, up to its arguments object; `regex` (not `re`) for partial matches while
# the text is still arriving.
_CALL_HEAD = regex.compile(r'\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"(?:parameters|arguments)"\s*:\s*')
_SPACE = " \t\r\n"


def tools_active(request: ChatCompletionRequest) -> bool:
    return bool(request.tools) and request.tool_choice != "none"


def _names(request: ChatCompletionRequest) -> set[str]:
    return {t.function.name for t in request.tools or []}


def _builtin_names(request: ChatCompletionRequest) -> list[str]:
    return [t.function.name for t in request.tools or [] if t.function.name in BUILTIN_TOOLS]


# ----- the prompt -----
def build_dialog(request: ChatCompletionRequest, *, inline_tools: bool = True) -> list[dict[str, Any]]:
    """OpenAI messages -> the dialog to encode, with tools placed as Llama 3.1 expects (`inline_tools=False`:
    without them, for a derivative's chat template that renders `tools` itself). An assistant turn that
    called a built-in tool carries `python_call` (the text after `<|python_tag|>`); see `encode_prompt`."""
    dialog = [_dialog_message(m) for m in request.messages]
    if not tools_active(request) or not inline_tools:
        return dialog
    builtins = [n for n in _builtin_names(request) if n != "code_interpreter"]
    environment = "Environment: ipython\n" + (f"Tools: {', '.join(builtins)}\n" if builtins else "") + "\n"
    if dialog[0]["role"] == "system":
        dialog[0] = {"role": "system", "content": environment + dialog[0]["content"]}
    else:
        dialog.insert(0, {"role": "system", "content": environment})
    functions = [t for t in request.tools if t.function.name not in BUILTIN_TOOLS]
    if not functions:
        return dialog
    first_user = next((i for i, m in enumerate(dialog) if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("tools need at least one user message to attach their definitions to")
    definitions = "\n\n".join(json.dumps(t.model_dump(), indent=4) for t in functions)
    dialog[first_user] = {"role": "user",
                          "content": TOOL_INSTRUCTION + definitions + "\n\n" + dialog[first_user]["content"]}
    return dialog


def _dialog_message(message) -> dict[str, Any]:
    role = "system" if message.role == "developer" else message.role
    entry: dict[str, Any] = {"role": role, "content": message.text()}
    if message.role == "assistant" and message.tool_calls:
        calls = message.tool_calls
        if len(calls) == 1 and calls[0].function.name in BUILTIN_TOOLS:
            entry["python_call"] = _builtin_call_text(calls[0].function.name, calls[0].function.arguments)
        else:
            entry["tool_calls"] = [{"function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for c in calls]
    return entry


def _builtin_call_text(name: str, arguments: str) -> str:
    """A built-in call as Meta's format writes it after <|python_tag|>."""
    try:
        args = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        raise ValueError(f"the arguments of the {name} call are not valid JSON: {arguments!r}") from None
    if not isinstance(args, dict):
        raise ValueError(f"the arguments of the {name} call must be a JSON object")
    if name == "code_interpreter":
        if not isinstance(args.get("code"), str):
            raise ValueError('a code_interpreter call needs {"code": "<python source>"} as its arguments')
        return args["code"]
    keywords = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items())
    return f"{name}.call({keywords})"


def encode_prompt(chat_format, dialog: list[dict[str, Any]]) -> list[int]:
    """The dialog's ids, as `ChatFormat.encode_dialog_prompt` writes them, except that a built-in call is
    `<|python_tag|>{call}<|eom_id|>` (Meta's layout; the tags are special tokens, not text)."""
    tokenizer = chat_format.tokenizer
    if not any("python_call" in m for m in dialog):
        return chat_format.encode_dialog_prompt(dialog)
    _require_python_tag(tokenizer)
    ids = [tokenizer.bos_id]
    for message in dialog:
        if "python_call" in message:
            ids += (chat_format.encode_header(message) + [tokenizer.python_tag_id]
                    + tokenizer.encode(message["python_call"]) + [tokenizer.eom_id])
        else:
            ids += chat_format.encode_message(message)
    return ids + chat_format.encode_header({"role": "assistant", "content": ""})


def _require_python_tag(tokenizer) -> None:
    if getattr(tokenizer, "python_tag_id", None) is None or getattr(tokenizer, "eom_id", None) is None:
        raise ValueError("built-in tools need Llama 3.1's <|python_tag|> and <|eom_id|> tokens, which this "
                         "model's tokenizer lacks")


# ----- tool_choice: how the answer is made a call -----
@dataclass
class ToolPlan:
    """What tool_choice asks of the answer: ids to start it with (`prefix_ids`, whose text `prefix_text` is
    part of the parsed answer), whether it starts with <|python_tag|>, and a JSON schema it must follow."""

    prefix_ids: list[int]
    prefix_text: str = ""
    python_tag: bool = False
    schema: dict[str, Any] | None = None


def plan_tools(request: ChatCompletionRequest, tokenizer) -> ToolPlan:
    """The answer's fixed opening or grammar for `required` / a named function; nothing for auto / none."""
    if not tools_active(request) or request.tool_choice in (None, "auto"):
        return ToolPlan([])
    if _builtin_names(request):
        _require_python_tag(tokenizer)
    if request.tool_choice == "required":
        functions = [t.function for t in request.tools if t.function.name not in BUILTIN_TOOLS]
        if not functions:  # built-ins only: the answer opens with the python tag, the model picks the tool
            return ToolPlan([tokenizer.python_tag_id], python_tag=True)
        return ToolPlan([], schema=_calls_schema(functions))
    name = request.tool_choice.function["name"]
    if name not in _names(request):
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools given")
    if name == "code_interpreter":
        return ToolPlan([tokenizer.python_tag_id], python_tag=True)
    if name in BUILTIN_TOOLS:
        opening = f"{name}.call("
        return ToolPlan([tokenizer.python_tag_id] + tokenizer.encode(opening), opening, python_tag=True)
    [function] = [t.function for t in request.tools if t.function.name == name]
    return ToolPlan([], schema=_calls_schema([function]))


def _calls_schema(functions) -> dict[str, Any]:
    """One call, in Llama 3.1's JSON form, of one of `functions` with arguments valid for it."""
    options = [{"type": "object", "properties": {"name": {"const": f.name}, "parameters": f.parameters},
                "required": ["name", "parameters"], "additionalProperties": False} for f in functions]
    return options[0] if len(options) == 1 else {"anyOf": options}


# ----- reading the answer -----
def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _SPACE:
        pos += 1
    return pos


def _object_end(text: str, start: int) -> int | None:
    """The index just past the JSON object opening at `start`, or None if the text ends inside it."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def split_json_calls(text: str, names: set[str]) -> list[tuple[str, str, bool]] | None:
    """The calls in a (possibly unfinished) answer of JSON calls: [(name, arguments text so far, complete)].
    None when the text cannot be, or become, calls of `names`: one object, a list of them, or objects
    separated by ';' (Llama 3.2 puts several calls on one line that way)."""
    pos = _skip_space(text, 0)
    in_list = text.startswith("[", pos)
    pos = _skip_space(text, pos + in_list)
    calls: list[tuple[str, str, bool]] = []
    while pos < len(text):
        head = _CALL_HEAD.match(text, pos, partial=True)
        if head is None:
            return None
        if head.partial:
            return calls
        if head.group(1) not in names:
            return None
        start = head.end()
        if start == len(text):
            calls.append((head.group(1), "", False))
            return calls
        if text[start] != "{":
            return None
        end = _object_end(text, start)
        calls.append((head.group(1), text[start:end], end is not None))
        if end is None:
            return calls
        pos = _skip_space(text, end)
        if pos == len(text):
            return calls
        if text[pos] != "}":
            return None
        pos = _skip_space(text, pos + 1)
        if pos < len(text) and text[pos] in ";,":
            pos = _skip_space(text, pos + 1)
        elif in_list and text.startswith("]", pos):
            return calls if _skip_space(text, pos + 1) == len(text) else None
        elif pos < len(text):
            return None
    return calls


def _builtin_call(text: str, names: set[str]) -> tuple[str, str] | None:
    """`brave_search.call(query="...")` -> (name, JSON arguments); other text is code for code_interpreter.
    Parsed with `ast` (never evaluated): only literal keyword arguments are accepted."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        node = None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call"
            and isinstance(node.func.value, ast.Name) and node.func.value.id in names and not node.args):
        try:
            args = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
        except ValueError:
            return None
        return node.func.value.id, json.dumps(args, ensure_ascii=False)
    if "code_interpreter" in names and text.strip():
        return "code_interpreter", json.dumps({"code": text.strip()}, ensure_ascii=False)
    return None


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def parse_tool_calls(text: str, request: ChatCompletionRequest, python_tag: bool = False) -> list[dict] | None:
    """OpenAI `tool_calls` if the finished answer `text` is a call (or calls) of offered functions, else None.
    `python_tag`: the answer opened with <|python_tag|> (a built-in call, or JSON after the tag)."""
    names = _names(request)
    text = _unwrap_tool_call_tags(text)
    calls = split_json_calls(text, names) if text.strip() else None
    if calls and all(complete for _, _, complete in calls) and all(_is_object(args) for _, args, _ in calls):
        out = [_call(name, args) for name, args, _ in calls]
    elif python_tag and (builtin := _builtin_call(text, names & set(BUILTIN_TOOLS))) is not None:
        out = [_call(*builtin)]
    else:
        return None
    return out if request.parallel_tool_calls else out[:1]


def _unwrap_tool_call_tags(text: str) -> str:
    """`<tool_call>{...}</tool_call>` blocks (the Hermes/ChatML convention of many derivatives' templates) as
    the ';'-separated JSON calls `split_json_calls` reads; any other text unchanged."""
    if not text.lstrip().startswith("<tool_call>"):
        return text
    blocks = [b.split("</tool_call>", 1)[0].strip() for b in text.split("<tool_call>")[1:]]
    return "; ".join(blocks)


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


class ToolCallStream:
    """One streamed choice of a request with tools: answer text in, chat-completion deltas out.

    Until the answer is known not to be a call, its text is held back. JSON calls are sent as soon as their
    name is complete (a delta with index, id, type and name, arguments ""), then their arguments as they grow;
    a built-in call (after <|python_tag|>) goes out whole once the answer ends. `calls_sent` tells the caller
    to finish with "tool_calls"."""

    def __init__(self, request: ChatCompletionRequest, prefix: str = "", python_tag: bool = False):
        self.request, self.names = request, _names(request)
        self.buffer, self.python_tag = prefix, python_tag
        self.mode = "undecided"  # -> "content" or "calls"
        self.ids: list[str] = []
        self.args_sent: list[int] = []

    @property
    def calls_sent(self) -> bool:
        return bool(self.ids)

    def feed(self, text: str, *, python_tag: bool = False, final: bool = False) -> list[dict[str, Any]]:
        """Deltas for this piece of answer text (`python_tag`: the answer's first token was the tag)."""
        self.python_tag = self.python_tag or python_tag
        if self.mode == "content":
            return [{"content": text}] if text else []
        self.buffer += text
        if final:
            return self._finish()
        if self.python_tag:
            return []  # a built-in call is parsed whole at the end
        calls = split_json_calls(self.buffer, self.names) if self.buffer.strip() else []
        if calls is None:
            return self._give_up()
        if not self.request.parallel_tool_calls:
            calls = calls[:1]
        if calls:
            self.mode = "calls"
        return self._deltas(calls)

    def _finish(self) -> list[dict[str, Any]]:
        if self.mode == "calls" or self.python_tag:
            calls = split_json_calls(self.buffer, self.names) if self.buffer.strip() else None
            if calls:
                return self._deltas(calls if self.request.parallel_tool_calls else calls[:1])
            builtin = _builtin_call(self.buffer, self.names & set(BUILTIN_TOOLS)) if self.python_tag else None
            if builtin is not None and not self.ids:
                return self._deltas([(builtin[0], builtin[1], True)])
            if self.mode == "calls":
                return []  # the text after the calls is not a call: dropped, as it cannot follow them
        return self._give_up()

    def _give_up(self) -> list[dict[str, Any]]:
        """Not a call after all: everything held goes out as content."""
        if self.mode == "calls":
            return []
        self.mode = "content"
        text, self.buffer = self.buffer, ""
        return [{"content": text}] if text else []

    def _deltas(self, calls: list[tuple[str, str, bool]]) -> list[dict[str, Any]]:
        out = []
        for index, (name, arguments, _) in enumerate(calls):
            if index == len(self.ids):
                call = _call(name, "")
                self.ids.append(call["id"])
                self.args_sent.append(0)
                out.append({"tool_calls": [{"index": index, **call}]})
            fresh = arguments[self.args_sent[index]:]
            if fresh:
                self.args_sent[index] = len(arguments)
                out.append({"tool_calls": [{"index": index, "function": {"arguments": fresh}}]})
        return out
