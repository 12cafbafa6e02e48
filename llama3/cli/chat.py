"""`llama3 chat`: a multi-turn chat REPL in the model's chat format, streaming each reply.

    llama3 chat --model out/hf --system "You are a helpful assistant."
    printf 'Hello\\nHow are you?\\n' | llama3 chat --model out/hf --temperature 0     # piped: one turn a line

Commands: `/help` lists them, `/reset` forgets the conversation (keeps the system prompt), `/quit` or `/exit`
(or end of input) quits. Ctrl-C while a reply streams stops that reply (the part shown stays in the history);
Ctrl-C at the prompt clears the line. Replies go to stdout; prompts and notices go to stderr, so piped output
is just replies. The conversation never outgrows the context: when it no longer fits beside a reply, the
oldest turns give way (the system prompt stays), and a reply limit is shortened to the room left; a one-line
notice says so.
"""

from __future__ import annotations

import argparse
import sys

from .generate import (DEFAULT_MAX_NEW_TOKENS, add_model_options, add_sampling_options, build_generator,
                       context_length, sampling_from_args)

HELP = "chat with a model in the terminal (streams replies; /help, /reset, /quit; works with piped stdin)"

COMMANDS = {"/help": "list these commands", "/reset": "start over (the system prompt stays)",
            "/quit": "leave (also /exit, or end of input)"}


def _notice(text: str) -> None:
    print(f"[{text}]", file=sys.stderr)


class ChatSession:
    """The conversation and the turn loop, separate from terminal I/O so it can be driven by tests.

    `max_new_tokens=None` means up to 256 tokens a reply, or the room left when the context is shorter."""

    def __init__(self, generator, *, system: str | None, max_new_tokens: int | None, sampling, notify=_notice):
        from ..chat_template import chat_format_for

        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        self.generator = generator
        self.chat_format = chat_format_for(generator.tokenizer)  # Llama 3's, or the model's own template
        self.context = context_length(generator)
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.notify = notify
        self.messages: list[dict] = []
        self._told_limit = False
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _reply_reserve(self) -> int:
        """Room kept free for the reply when deciding which turns still fit."""
        if self.max_new_tokens is not None:
            return min(self.max_new_tokens, self.context - 1)
        return min(DEFAULT_MAX_NEW_TOKENS, max(self.context // 4, 1))

    def _prompt_ids(self) -> list[int]:
        """The dialog's ids, after dropping the oldest turns while it does not fit beside a reply."""
        first_turn = 1 if self.system else 0
        alone = self.chat_format.encode_dialog_prompt(self.messages[:first_turn] + self.messages[-1:])
        if len(alone) >= self.context:  # refused before any earlier turn is given up for it
            raise ValueError(f"this message needs {len(alone)} tokens with the conversation's start, and the "
                             f"model's context is {self.context}: shorten it")
        budget = self.context - self._reply_reserve()
        dropped = 0
        while True:
            ids = self.chat_format.encode_dialog_prompt(self.messages)
            users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
            if len(ids) <= budget or len(users) <= 1:
                break
            del self.messages[first_turn:users[1]]  # the oldest user message and what answered it
            dropped += 1
        if dropped:
            turns = "turn" if dropped == 1 else f"{dropped} turns"
            self.notify(f"context full: dropped the oldest {turns} (the model's context is {self.context} tokens)")
        return ids

    def _new_tokens(self, num_prompt: int) -> int:
        """The reply limit for this turn: the one asked for, or less when the context has less room."""
        wanted = self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        room = self.context - num_prompt
        if room < wanted and (self.max_new_tokens is not None or not self._told_limit):
            self.notify(f"reply limited to {room} tokens, the room left in the model's {self.context}-token context")
            self._told_limit = self.max_new_tokens is None  # the default's limit is told once
        return min(wanted, room)

    def reply(self, user_text: str, write) -> str:
        """Add the user's message, stream the reply through `write(piece)`, record and return it.
        A KeyboardInterrupt during streaming ends the reply early instead of propagating; a message that
        cannot fit even alone is a ValueError (and is not kept)."""
        self.messages.append({"role": "user", "content": user_text})
        try:
            prompt = self._prompt_ids()
        except ValueError:
            self.messages.pop()
            raise
        pieces: list[str] = []
        stream = self.generator.stream(prompt, max_new_tokens=self._new_tokens(len(prompt)), sampling=self.sampling,
                                       stop_ids=sorted(self.chat_format.stop_tokens))
        try:
            for piece in stream:
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            stream.close()
            self.notify("stopped")
        text = "".join(pieces)
        self.messages.append({"role": "assistant", "content": text})
        return text


def _read_line(interactive: bool) -> str | None:
    """One line of user input; None at end of input. Ctrl-C at the prompt gives an empty line."""
    try:
        if interactive:
            return input("> ")
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\n")
    except EOFError:
        return None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return ""


def _command(line: str, session: ChatSession) -> bool | None:
    """Runs a /command; True to quit, False when handled, None when the line is a message for the model."""
    word = line.strip()
    if not word.startswith("/") or " " in word:
        return None
    if word in ("/quit", "/exit"):
        return True
    if word == "/reset":
        session.reset()
        _notice("conversation reset")
    elif word == "/help":
        for name, what in COMMANDS.items():
            print(f"  {name:<7} {what}", file=sys.stderr)
        print("  Ctrl-C stops a reply; the conversation keeps the part shown.", file=sys.stderr)
    else:
        _notice(f"unknown command {word}; /help lists the commands")
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama3 chat", description=HELP)
    add_model_options(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_options(parser, temperature=0.6, top_p=0.9)
    args = parser.parse_args(argv)
    interactive = sys.stdin.isatty()
    try:
        # One cache size for the whole conversation, so the compiled step rarely sees a new shape.
        session = ChatSession(build_generator(args, cache_bucket=1024), system=args.system,
                              max_new_tokens=args.max_new_tokens, sampling=sampling_from_args(args))
    except ValueError as e:
        print(f"llama3 chat: {e}", file=sys.stderr)
        return 2
    if interactive:
        print("Chatting; /help lists the commands, /quit leaves, Ctrl-C stops a reply.", file=sys.stderr)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    while True:
        line = _read_line(interactive)
        if line is None:
            return 0
        command = _command(line, session)
        if command:
            return 0
        if command is False or not line.strip():
            continue
        try:
            session.reply(line, write)
        except ValueError as e:
            print(f"llama3 chat: {e}", file=sys.stderr)
            continue
        write("\n")
