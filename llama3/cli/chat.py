"""`llama3 chat`: a multi-turn chat REPL in the model's chat format, streaming each reply.

    llama3 chat --model out/hf --system "You are a helpful assistant."
    printf 'Hello\\nHow are you?\\n' | llama3 chat --model out/hf --temperature 0     # piped: one turn a line

Commands: `/reset` forgets the conversation (keeps the system prompt), `/exit` (or end of input) quits.
Ctrl-C while a reply streams stops that reply (the part shown stays in the history); Ctrl-C at the prompt
clears the line. Replies go to stdout; prompts and notices go to stderr, so piped output is just replies.
When the conversation outgrows the context, the oldest turns are dropped (a notice says so).
"""

from __future__ import annotations

import argparse
import sys

from .generate import add_model_options, add_sampling_options, build_generator, sampling_from_args

HELP = "chat with a model in the terminal (streams replies; /reset, /exit; works with piped stdin)"


class ChatSession:
    """The conversation and the turn loop, separate from terminal I/O so it can be driven by tests."""

    def __init__(self, generator, *, system: str | None, max_new_tokens: int, sampling):
        from ..chat_template import chat_format_for

        self.generator = generator
        self.chat_format = chat_format_for(generator.tokenizer)  # Llama 3's, or the model's own template
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_ids(self) -> list[int]:
        """The dialog's ids; drops the oldest turns while it does not fit beside a full reply."""
        limit = self.generator.target.model.args.max_seq_len if hasattr(self.generator, "target") \
            else self.generator.model.args.max_seq_len
        budget = limit - self.max_new_tokens
        first_turn = 1 if self.system else 0
        while True:
            ids = self.chat_format.encode_dialog_prompt(self.messages)
            if len(ids) <= budget or len(self.messages) - first_turn <= 1:
                return ids
            del self.messages[first_turn:first_turn + 2]  # oldest user message and its reply
            print("[context full: dropped the oldest turn]", file=sys.stderr)

    def reply(self, user_text: str, write) -> str:
        """Add the user's message, stream the reply through `write(piece)`, record and return it.
        A KeyboardInterrupt during streaming ends the reply early instead of propagating."""
        self.messages.append({"role": "user", "content": user_text})
        pieces: list[str] = []
        stream = self.generator.stream(self._prompt_ids(), max_new_tokens=self.max_new_tokens,
                                       sampling=self.sampling, stop_ids=sorted(self.chat_format.stop_tokens))
        try:
            for piece in stream:
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            stream.close()
            print("\n[stopped]", file=sys.stderr)
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
        print("Chatting; /reset starts over, /exit quits, Ctrl-C stops a reply.", file=sys.stderr)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    while True:
        line = _read_line(interactive)
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            session.reset()
            print("[conversation reset]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            session.reply(line, write)
        except ValueError as e:
            print(f"llama3 chat: {e}", file=sys.stderr)
            session.messages.pop()  # the user message that could not be answered
            continue
        write("\n")
