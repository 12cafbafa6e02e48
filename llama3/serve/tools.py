"""Tool calling in Llama 3.1's JSON format.

Meta's Llama 3.1 prompt format ("JSON based tool calling", as its Hugging Face chat template renders it):
the system message gains `Environment: ipython`, the function definitions go into the first user message
under an instruction to answer with `{"name": function name, "parameters": dictionary of argument name and
its value}`, the model answers with that JSON object (sometimes after `<|python_tag|>`), and tool results
come back as `ipython` messages (OpenAI's `role: tool`). Here we render requests into that layout and turn
the model's JSON answer into OpenAI `tool_calls`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .schema import ChatCompletionRequest

__all__ = ["TOOL_INSTRUCTION", "build_dialog", "forced_prefix", "parse_tool_calls", "tools_active"]

TOOL_INSTRUCTION = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
    "Do not use variables.\n\n"
)


def tools_active(request: ChatCompletionRequest) -> bool:
    return bool(request.tools) and request.tool_choice != "none"


def build_dialog(request: ChatCompletionRequest, *, inline_tools: bool = True) -> list[dict[str, Any]]:
    """OpenAI messages -> the dialog `ChatFormat` encodes, with tool definitions placed as Llama 3.1 expects
    (`inline_tools=False`: without them, for a chat template that renders `tools` itself)."""
    dialog: list[dict[str, Any]] = []
    for message in request.messages:
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": message.text()}
        if message.role == "assistant" and message.tool_calls:
            entry["tool_calls"] = [{"function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for c in message.tool_calls]
        dialog.append(entry)
    if not tools_active(request) or not inline_tools:
        return dialog
    definitions = "\n\n".join(json.dumps(t.model_dump(), indent=4) for t in request.tools)
    if dialog[0]["role"] == "system":
        dialog[0] = {"role": "system", "content": "Environment: ipython\n\n" + dialog[0]["content"]}
    else:
        dialog.insert(0, {"role": "system", "content": "Environment: ipython"})
    first_user = next((i for i, m in enumerate(dialog) if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("tools need at least one user message to attach their definitions to")
    dialog[first_user] = {"role": "user",
                          "content": TOOL_INSTRUCTION + definitions + "\n\n" + dialog[first_user]["content"]}
    return dialog


def forced_prefix(request: ChatCompletionRequest) -> str:
    """Text the assistant's answer is made to start with: a named `tool_choice` fixes the function,
    `required` fixes that the answer is a call. The prefix is part of the prompt and of the parsed answer."""
    if not tools_active(request):
        return ""
    choice = request.tool_choice
    if choice == "required":
        return '{"name": "'
    if choice is not None and not isinstance(choice, str):
        name = choice.function["name"]
        if name not in {t.function.name for t in request.tools}:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools given")
        return '{"name": "' + name + '", "parameters": '
    return ""


def _candidate_objects(text: str) -> list[Any] | None:
    """The JSON value(s) of a tool-call answer: one object, a list of them, or objects separated by ';'."""
    text = text.strip()
    if text.startswith("<tool_call>"):  # the Hermes/ChatML convention of many derivatives' templates
        blocks = [b.split("</tool_call>", 1)[0].strip() for b in text.split("<tool_call>")[1:]]
        try:
            return [json.loads(b) for b in blocks]
        except json.JSONDecodeError:
            return None
    if text.startswith("<|python_tag|>"):
        text = text[len("<|python_tag|>"):].strip()
    if not text.startswith(("{", "[")):
        return None
    try:
        value = json.loads(text)
        return value if isinstance(value, list) else [value]
    except json.JSONDecodeError:
        pass
    try:  # Llama 3.2 may put several calls on one line separated by semicolons
        return [json.loads(part) for part in text.split(";") if part.strip()]
    except json.JSONDecodeError:
        return None


def parse_tool_calls(text: str, request: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """OpenAI `tool_calls` if `text` is a call of offered functions in Llama 3.1's format, else None."""
    objects = _candidate_objects(text)
    if not objects:
        return None
    names = {t.function.name for t in request.tools or []}
    calls = []
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return None
        arguments = obj.get("parameters", obj.get("arguments", {}))
        if not isinstance(arguments, dict):
            return None
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    if not request.parallel_tool_calls:
        calls = calls[:1]
    return calls
