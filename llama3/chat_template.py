"""Chat formats: one interface for Llama 3's `ChatFormat` and a derivative's Jinja chat template.

A Llama-architecture derivative carries its chat layout as a Jinja template (tokenizer_config.json's
`chat_template`, or GGUF's `tokenizer.chat_template`): ChatML's `<|im_start|>`, Llama 2's `[INST]`, Zephyr's
`<|user|>` and many more. `TemplateChatFormat` renders it the way transformers' `apply_chat_template` does
(same variables, `trim_blocks`/`lstrip_blocks`, `tojson`, `raise_exception`, `strftime_now`), but inside
`jinja2.sandbox.ImmutableSandboxedEnvironment`, because a template is code that came with a download:

- no access to Python internals (the sandbox refuses `__class__`, `__globals__`, mutating methods ...);
- no file or network access (no loader: `include`/`import`/`extends` find nothing);
- bounded work: output over `max_chars` stops the render, `range` has a budget per render, and repetition
  (`'x' * n`, padding filters and methods, `%`/`format` widths) may not exceed the output cap.

`chat_format_for(tokenizer)` picks the format; both satisfy `ChatFormatLike`, which chat, serve, generate,
eval and SFT use.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Literal, Protocol

from .tokenizer import ChatFormat, Dialog

__all__ = ["ChatFormatLike", "ChatTemplate", "MAX_TEMPLATE_CHARS", "TemplateChatFormat", "chat_format_for"]

MAX_TEMPLATE_CHARS = 4_000_000  # ~1M tokens of prompt; more than any context we run
_RANGE_BUDGET = 100_000  # total items all `range` calls of one render may produce
_WIDE_FORMAT = re.compile(r"\d{7,}")  # a width of a million or more in a format string


class ChatFormatLike(Protocol):
    """What chat, serve, generate, eval and SFT need from a chat format."""

    tokenizer: Any

    @property
    def stop_tokens(self) -> set[int]: ...

    @property
    def supports_tools(self) -> bool: ...

    def encode_dialog_prompt(self, dialog: Dialog, *, add_generation_prompt: bool = True) -> list[int]: ...

    def encode_dialog(self, dialog: Dialog, *, add_generation_prompt: bool = False,
                      train_on: Literal["assistant", "all"] = "assistant") -> tuple[list[int], list[bool]]: ...


def chat_format_for(tokenizer: Any) -> ChatFormatLike:
    """Llama 3's exact `ChatFormat` for its own tokenizer; the model's Jinja template for a derivative's."""
    # A derivative's tokenizer (`hf_tokenizer.HFTokenizer`) says so in `version`; asked by attribute because
    # hf_tokenizer imports this module (its template's end-of-turn tokens become stop tokens).
    if getattr(tokenizer, "version", None) != "derivative":
        # A Llama 3 vocabulary keeps ChatFormat unless its files bring a template of another layout
        # (a ChatML fine-tune of Llama 3, say), which `load` attaches as `chat_template`.
        if getattr(tokenizer, "chat_template", None) is None:
            return ChatFormat(tokenizer)
        return TemplateChatFormat(tokenizer)
    if tokenizer.chat_template is None:
        raise ValueError(f"{tokenizer.where}: this model has no chat template (a base model?); continue text "
                         "with `llama3 generate` or /v1/completions, or add a chat_template to tokenizer_config.json")
    return TemplateChatFormat(tokenizer)


# ----- the sandbox -----

class _RenderBudget:
    """The `range` of one render: all its calls together hand out at most _RANGE_BUDGET items, so nested
    loops cannot spin for hours without writing anything (the output cap catches loops that do write)."""

    def __init__(self):
        self.range_left = _RANGE_BUDGET

    def range(self, *args: int) -> range:
        items = range(*args)
        self.range_left -= len(items)
        if self.range_left < 0:
            raise _security_error(f"the template asked for more than {_RANGE_BUDGET} loop items")
        return items


def _security_error(message: str) -> Exception:
    from jinja2.sandbox import SecurityError

    return SecurityError(message)


def _make_environment(max_chars: int):
    """An ImmutableSandboxedEnvironment configured as transformers renders chat templates, hardened against
    memory blow-ups the stock sandbox allows."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def check_size(value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > max_chars:
            raise _security_error(f"the number {value} exceeds the output cap of {max_chars} characters")

    class ChatSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise _security_error(f"the power {right} is too large")
            if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
                check_size(len(left) * right)
            if operator == "*" and isinstance(right, (str, list, tuple)) and isinstance(left, int):
                check_size(len(right) * left)
            if operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
                raise _security_error("a format width over a million characters")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
            for value in (*args, *kwargs.values()):
                check_size(value)  # 'x'.ljust(n), 'x'.zfill(n), range(n) ...
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):  # '...'.format / format_map, checked when looked up
            text = getattr(value, "__self__", None)
            if getattr(value, "__name__", "") in ("format", "format_map") and isinstance(text, str) \
                    and _WIDE_FORMAT.search(text):
                raise _security_error("a format width over a million characters")
            return super().wrap_str_format(value)

    env = ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], autoescape=False)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: no HTML escaping (jinja's own escapes <, > and &, which would change prompts)
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def guarded(name: str):
        original = env.filters[name]

        def run(value, *args, **kwargs):
            for arg in (*args, *kwargs.values()):
                check_size(arg)
            return original(value, *args, **kwargs)

        return run

    for name in ("center", "indent", "wordwrap", "truncate"):
        env.filters[name] = guarded(name)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class TemplateRaised(Exception):
    """`raise_exception(message)` called by a template (e.g. roles that do not alternate)."""


def _raise_exception(message: str):
    raise TemplateRaised(message)


class ChatTemplate:
    """A Jinja chat template compiled in the sandbox. `source` names its file in every error."""

    def __init__(self, template: str, *, source: str, special_tokens: dict[str, str | None] | None = None,
                 max_chars: int = MAX_TEMPLATE_CHARS):
        try:
            from jinja2 import TemplateSyntaxError, meta
        except ImportError:
            raise ValueError(f"{source}: rendering this model's chat template needs jinja2: "
                             "pip install 'llama3[family]'") from None
        if not isinstance(template, str):
            raise ValueError(f"{source}: chat_template must be a string")
        self.source, self.max_chars = source, max_chars
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items()}
        self._env = _make_environment(max_chars)
        try:
            parsed = self._env.parse(template)
            self._template = self._env.from_string(template)
        except TemplateSyntaxError as e:
            raise ValueError(f"{source}: the chat template is not valid Jinja "
                             f"(line {e.lineno}: {e.message})") from None
        self.variables = meta.find_undeclared_variables(parsed)

    @property
    def supports_tools(self) -> bool:
        """Whether the template renders tool definitions (it reads the `tools` variable)."""
        return "tools" in self.variables

    def render(self, messages: Dialog, *, add_generation_prompt: bool, tools: list[dict] | None = None,
               **extra: Any) -> str:
        """The prompt text; ValueError naming the template's file for anything the template refuses or
        any attempt to leave the sandbox or exceed the output cap."""
        from jinja2 import TemplateError
        from jinja2.sandbox import SecurityError

        budget = _RenderBudget()
        variables = {**self.special_tokens, **extra, "messages": [_template_message(m) for m in messages],
                     "tools": tools, "add_generation_prompt": add_generation_prompt, "range": budget.range}
        pieces, size = [], 0
        try:
            for piece in self._template.generate(**variables):
                size += len(piece)
                if size > self.max_chars:
                    raise ValueError(f"{self.source}: the chat template rendered more than {self.max_chars} "
                                     "characters; the dialog is too long or the template is broken")
                pieces.append(piece)
        except SecurityError as e:
            raise ValueError(f"{self.source}: the chat template was stopped by the sandbox: {e}") from None
        except TemplateRaised as e:
            raise ValueError(f"{self.source}: the chat template refused this dialog: {e}") from None
        except (TemplateError, TypeError, KeyError, IndexError, AttributeError, RecursionError,
                OverflowError, MemoryError) as e:
            raise ValueError(f"{self.source}: the chat template failed on this dialog "
                             f"({type(e).__name__}: {e})") from None
        return "".join(pieces)


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A dialog message as templates expect it (transformers' convention): tool-call arguments as a dict,
    not the JSON string OpenAI sends; our own `weight` key (SFT) left out."""
    out = {k: v for k, v in message.items() if k != "weight"}
    calls = []
    for call in message.get("tool_calls") or []:
        fn = dict(call.get("function", call))
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                raise ValueError(f"tool call arguments are not valid JSON: {fn['arguments']!r}") from None
        calls.append({"type": "function", "function": fn})
    if calls:
        out["tool_calls"] = calls
    return out


# ----- the chat format -----

def _special_token_texts(tokenizer: Any) -> dict[str, str | None]:
    """bos_token, eos_token ... as the template sees them: the tokenizer's own, or (Llama 3's tiktoken
    tokenizer) the names of its BOS/EOS/pad ids."""
    names = {i: token for token, i in tokenizer.special_tokens.items()}
    out = {}
    for name, id_name in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id"),
                          ("unk_token", None)):
        text = getattr(tokenizer, name, None)
        if text is None and id_name is not None:
            text = names.get(getattr(tokenizer, id_name, None))
        out[name] = text
    return out


class TemplateChatFormat:
    """Dialog -> ids through a derivative's Jinja chat template, with the stop tokens it implies and the
    assistant-only loss mask for fine-tuning.

    Stop tokens: the tokenizer's (EOS, generation_config's or GGUF's EOT/EOM ids) plus the special token the
    template writes right after an assistant message (ChatML's `<|im_end|>`).
    Masks: rendering a dialog's first i messages must give a prefix of the whole dialog's ids (true of
    every template that only appends); the ids an assistant message adds after its generation prompt, up to
    and including its stop token, are the ones learned.
    """

    def __init__(self, tokenizer: Any, *, template: str | None = None, max_chars: int = MAX_TEMPLATE_CHARS):
        self.tokenizer = tokenizer
        text = template if template is not None else tokenizer.chat_template
        source = tokenizer.chat_template_source if template is None else "chat template"
        specials = _special_token_texts(tokenizer)
        self.template = ChatTemplate(text, source=source, special_tokens=specials, max_chars=max_chars)
        self.turn_end_tokens = self._turn_end_tokens()
        self._stop_tokens = set(tokenizer.stop_tokens) | self.turn_end_tokens

    @property
    def stop_tokens(self) -> set[int]:
        return self._stop_tokens

    @property
    def supports_tools(self) -> bool:
        return self.template.supports_tools

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special="all")

    def _turn_end_tokens(self) -> set[int]:
        """The special token the template puts right after an assistant reply, if any."""
        marker = "\u2063reply\u2063"
        try:
            dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
            text = self.template.render(dialog, add_generation_prompt=False)
        except ValueError:
            return set()  # a template that cannot render this minimal dialog gets no extra stop token
        after = text[text.find(marker) + len(marker):] if marker in text else ""
        for token, token_id in sorted(self.tokenizer.special_tokens.items(), key=lambda kv: -len(kv[0])):
            if after.lstrip(" ").startswith(token):
                return {token_id}
        return set()

    def render(self, dialog: Dialog, *, add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        return self.template.render(dialog, add_generation_prompt=add_generation_prompt, tools=tools)

    def encode_dialog_prompt(self, dialog: Dialog, *, add_generation_prompt: bool = True,
                             tools: list[dict] | None = None) -> list[int]:
        """Ids of the rendered dialog, equal to `apply_chat_template(..., tokenize=True)`."""
        if not dialog:
            raise ValueError("a dialog needs at least one message")
        return self._encode_text(self.render(dialog, add_generation_prompt=add_generation_prompt, tools=tools))

    def encode_dialog(self, dialog: Dialog, *, add_generation_prompt: bool = False,
                      train_on: Literal["assistant", "all"] = "assistant") -> tuple[list[int], list[bool]]:
        """Ids and a loss mask. train_on="assistant": each assistant reply (weight 1) from after its
        generation prompt through its stop token; "all": every message's ids (templates do not separate a
        header from its content)."""
        if not dialog:
            raise ValueError("a dialog needs at least one message")
        ids = self.encode_dialog_prompt(dialog, add_generation_prompt=add_generation_prompt)
        mask = [False] * len(ids)
        for i, message in enumerate(dialog):
            learn = train_on == "all" or message.get("role") == "assistant"
            if not learn or message.get("weight", 1) == 0:
                continue
            start = self._prefix_length(dialog[:i], ids, open_reply=message.get("role") == "assistant")
            end = self._prefix_length(dialog[: i + 1], ids, open_reply=False)
            if message.get("role") == "assistant":
                end = self._through_stop(ids, start, end)
            mask[start:end] = [True] * (end - start)
        return ids, mask

    def _prefix_length(self, head: Dialog, ids: list[int], *, open_reply: bool) -> int:
        if not head and not open_reply:
            return 0
        try:
            prefix = self._encode_text(self.render(head, add_generation_prompt=open_reply)) if head else []
        except ValueError:
            prefix = []  # templates that refuse an empty or partial dialog: count from the start
        if ids[: len(prefix)] != prefix:
            raise ValueError(f"{self.template.source}: rendering the first messages of a dialog does not give a "
                             "prefix of the whole dialog, so the assistant replies cannot be located for the "
                             "loss mask; fine-tune with a template that only appends")
        return len(prefix)

    def _through_stop(self, ids: list[int], start: int, end: int) -> int:
        for j in range(start, end):
            if ids[j] in self._stop_tokens:
                return j + 1
        return end
