"""A fork server for tests/test_docs.py: the documentation's `llama3 ...` commands and Python blocks run in a
child forked from one process that has already imported torch and the package.

Each of the ~30 documented commands used to start a fresh interpreter and import torch (2-3 s of CPU
each on two busy cores, most of the docs tests' time). Here a command still gets its own process, its own
argv, working directory, environment and standard streams (the caller's file descriptors are passed over
a Unix socket), and its exit status; only the imports are shared.

    python tests/docs_forkserver.py serve SOCKET      # the server (the docs fixture starts it)
    python tests/docs_forkserver.py llama3 ARGS...    # a client: `llama3 ARGS` in a forked child
    python tests/docs_forkserver.py module NAME ARGS  # `python -m NAME ARGS`
    python tests/docs_forkserver.py code SOURCE       # `python -c SOURCE`

The client imports only the standard library, so it starts in tens of milliseconds.
"""

from __future__ import annotations

import json
import os
import socket
import sys

SOCKET_ENV = "LLAMA3_DOCS_FORKSERVER"
_MAX_MESSAGE = 1 << 20


def client(kind: str, args: list[str]) -> int:
    """Send the request with this process's stdin/stdout/stderr; return the command's exit status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(os.environ[SOCKET_ENV])
        request = {"kind": kind, "args": args, "cwd": os.getcwd(), "env": dict(os.environ)}
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        reply = conn.recv(64)
    return int(reply) if reply else 1


def _preload() -> None:
    """What most commands import anyway; children share it copy-on-write."""
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tiktoken  # noqa: F401
    import torch  # noqa: F401

    import llama3.checkpoint.hf  # noqa: F401
    import llama3.checkpoint.load  # noqa: F401
    import llama3.cli.chat  # noqa: F401
    import llama3.cli.generate  # noqa: F401
    import llama3.eval  # noqa: F401
    import llama3.inference.generate  # noqa: F401
    import llama3.train.loop  # noqa: F401


def _run_request(request: dict) -> int:
    """In the forked child: become the command (cwd, env, argv, streams) and run it to its exit status."""
    import runpy
    import traceback

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - the process's own streams
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    kind, args = request["kind"], request["args"]
    try:
        if kind == "llama3":
            from llama3.cli import main

            sys.argv = ["llama3", *args]
            status = main(args)
        elif kind == "module":
            sys.argv = [args[0], *args[1:]]
            runpy.run_module(args[0], run_name="__main__", alter_sys=True)
            status = 0
        else:
            sys.argv = ["-c"]
            exec(compile(args[0], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - a docs block
            status = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:  # as the interpreter would: the traceback on stderr, status 1
        traceback.print_exc()
        status = 1
    return status or 0


def _handle(conn: socket.socket) -> None:
    """In a forked handler: fork the command, wait for it, send its exit status back."""
    message, fds, _, _ = socket.recv_fds(conn, _MAX_MESSAGE, 3)
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        status = _run_request(request)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(status if 0 <= status < 256 else 1)
    for fd in fds:
        os.close(fd)
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    conn.send(str(code if code >= 0 else 128 - code).encode())


def serve(path: str) -> None:
    """Accept requests until killed; each is handled by its own forked process, so commands run at once
    (a pipeline of two commands works)."""
    import signal

    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
        server.bind(path)
        server.listen(16)
        print("ready", flush=True)
        while True:
            conn, _ = server.accept()
            if os.fork() == 0:
                server.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # this handler waits for its command
                try:
                    _handle(conn)
                finally:
                    os._exit(0)
            conn.close()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(client(sys.argv[1], sys.argv[2:]))
