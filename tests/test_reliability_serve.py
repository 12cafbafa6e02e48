"""Issue 19 on the server: connection limits and read timeouts, request time and `n` limits, hostile sampling
values, lone surrogates echoed back, API keys kept out of `ps` and logs, `tool_choice` without tools, HEAD
/health. Each test drives a real uvicorn server (our guarded protocol) over loopback sockets."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from llama3.cli.serve import API_KEY_ENV, resolve_api_key, usage_banner
from llama3.inference.engine import Engine
from llama3.serve.app import create_app
from llama3.serve.schema import ServerLimits
from llama3.serve.server import ConnectionLimits, build_server, quiet_accept_errors, run_server
from tests.conftest import random_model, tiny_args
from tests.serve_server import free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model(llama3_tokenizer):
    return random_model(tiny_args("gqa", vocab_size=llama3_tokenizer.n_words, max_seq_len=2048), seed=2)


@contextlib.contextmanager
def serving(model, tokenizer, *, limits: ServerLimits | None = None, connections: ConnectionLimits | None = None,
            api_key: str | None = None):
    """The app on our guarded uvicorn server in a thread; yields the base URL."""
    engine = Engine(model, tokenizer, num_slots=4, max_queue=16).start()
    app = create_app(engine, api_key=api_key, model_name="m", limits=limits)
    port = free_port()
    server = build_server(app, host="127.0.0.1", port=port, limits=connections, log_level="warning")
    thread = threading.Thread(target=run_server, args=(server,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()


def _closed_by_server(sock: socket.socket, wait_s: float = 20.0) -> bool:
    """True when the server closes the connection (EOF or reset) within wait_s."""
    sock.settimeout(wait_s)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 answer with a Content-Length, read from a raw socket."""
    sock.settimeout(20)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _metric(url: str, sample: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


# ----- item 4: connections -----

def test_idle_and_half_sent_headers_are_closed_and_half_sent_body_is_a_408(model, llama3_tokenizer):
    with serving(model, llama3_tokenizer, limits=ServerLimits(body_timeout_s=0.5),
                 connections=ConnectionLimits(header_timeout_s=0.5)) as (url, port):
        idle = _connect(port)
        half_headers = _connect(port)
        half_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
        assert _closed_by_server(idle) and _closed_by_server(half_headers)
        half_body = _connect(port)
        half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        status, body = _read_response(half_body)
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        # A kept-alive connection that starts a second request and stalls is closed as well.
        keep = _connect(port)
        keep.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(keep)[0] == 200
        keep.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert _closed_by_server(keep)
        assert httpx.get(url + "/health").status_code == 200
        for s in (idle, half_headers, half_body, keep):
            s.close()


def test_connection_cap_closes_extra_connections_and_health_recovers(model, llama3_tokenizer):
    cap = 6
    # A header timeout far longer than the test: any connection closed here was closed by the cap.
    with serving(model, llama3_tokenizer, connections=ConnectionLimits(header_timeout_s=300.0,
                                                                       max_connections=cap)) as (url, port):
        held = [_connect(port) for _ in range(cap)]
        extra = [_connect(port) for _ in range(5)]
        assert all(_closed_by_server(s) for s in extra)
        for s in held:  # the connections within the cap are still open
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recv(1)
        for s in held + extra:
            s.close()
        deadline = time.monotonic() + 20
        while True:  # the server notices the closed connections, then answers again
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server never answered /health again"
                time.sleep(0.1)


def test_accept_errors_are_one_throttled_line_not_a_traceback_each(caplog):
    loop = asyncio.new_event_loop()
    try:
        quiet_accept_errors(loop)
        with caplog.at_level(logging.WARNING, logger="llama3.serve"):
            for _ in range(500):
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(errno.EMFILE, "Too many open files")})
        records = [r for r in caplog.records if r.name == "llama3.serve"]
        assert len(records) == 1 and "Too many open files" in records[0].getMessage()
        assert records[0].exc_info is None
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            loop.call_exception_handler({"message": "something else", "exception": ValueError("x")})
        assert any("something else" in r.getMessage() for r in caplog.records)  # others are not hidden
    finally:
        loop.close()


def test_request_timeout_and_max_n_are_enforced(model, llama3_tokenizer):
    limits = ServerLimits(request_timeout_s=0.05, max_n=2)
    with serving(model, llama3_tokenizer, limits=limits) as (url, _):
        body = {"prompt": "Once upon", "max_tokens": 2000, "temperature": 0}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_timeout"
        too_many = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 1, "n": 3})
        assert too_many.status_code == 400 and "at most 2" in too_many.json()["error"]["message"]
        # the slots of the stopped requests are free again
        deadline = time.monotonic() + 10
        while _metric(url, "llama3_active_slots") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metric(url, "llama3_active_slots") == 0


# ----- items 1, 6 and 11 through HTTP -----

def test_hostile_sampling_values_through_the_server(model, llama3_tokenizer):
    with serving(model, llama3_tokenizer) as (url, _):
        greedy = {"prompt": "It was", "max_tokens": 12, "temperature": 0}
        expected = httpx.post(url + "/v1/completions", json=greedy).json()["choices"][0]["text"]
        hostile = [{"temperature": 1e-300}, {"temperature": 1e-40}, {"top_p": 1e-320, "temperature": 0.7}]

        async def all_at_once():
            async with httpx.AsyncClient(timeout=60) as client:
                bodies = [greedy] * 3 + [{**greedy, **h} for h in hostile]
                return await asyncio.gather(*[client.post(url + "/v1/completions", json=b) for b in bodies])

        answers = asyncio.run(all_at_once())
        assert [a.status_code for a in answers] == [200] * 6
        assert [a.json()["choices"][0]["text"] for a in answers] == [expected] * 6
        refused = httpx.post(url + "/v1/completions", json={**greedy, "repetition_penalty": 1e-320})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "repetition_penalty"


def test_lone_surrogate_echoed_back_plain_and_streamed(model, llama3_tokenizer):
    raw = '{"prompt": "x\\ud800y", "echo": true, "max_tokens": 2, "temperature": 0%s}'
    headers = {"Content-Type": "application/json"}
    with serving(model, llama3_tokenizer) as (url, _):
        plain = httpx.post(url + "/v1/completions", content=raw % "", headers=headers)
        assert plain.status_code == 200
        assert json.loads(plain.content)["choices"][0]["text"].startswith("x\ud800y")
        with httpx.stream("POST", url + "/v1/completions", content=raw % ', "stream": true',
                          headers=headers) as stream:
            assert stream.status_code == 200
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[0][6:])["choices"][0]["text"] == "x\ud800y"
        assert _metric(url, 'llama3_http_requests_total{path="/v1/completions",status="200"}') == 2
        assert _metric(url, 'llama3_http_requests_total{path="/v1/completions",status="500"}') == 0
        missing_model = httpx.post(url + "/v1/completions", headers=headers,
                                   content='{"model": "\\udfff", "prompt": "a", "max_tokens": 1}')
        # refused by validation or as an unknown model, depending on pydantic; either way a clean 4xx
        assert missing_model.status_code in (400, 404) and "error" in missing_model.json()


def test_tool_choice_without_tools_is_a_400_and_head_health_answers(model, llama3_tokenizer):
    with serving(model, llama3_tokenizer) as (url, _):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tool_choice": "auto"}
        answer = httpx.post(url + "/v1/chat/completions", json=body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "tool_choice"
        head = httpx.head(url + "/health")
        assert head.status_code == 200 and head.content == b""


def test_an_unexpected_failure_is_a_counted_500_in_openai_shape(model, llama3_tokenizer, monkeypatch):
    from llama3.serve import handlers

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(handlers.CompletionService, "model_card", broken)
    with serving(model, llama3_tokenizer) as (url, _):
        answer = httpx.get(url + "/v1/models")
        assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error"
        assert _metric(url, 'llama3_http_requests_total{path="/v1/models",status="500"}') == 1


def _args(**kwargs):
    return argparse.Namespace(**{"api_key": None, "api_key_file": None, **kwargs})


def test_api_key_from_file_env_or_flag_and_never_printed(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("from-file-key\n")
    assert resolve_api_key(_args(api_key_file=str(key_file))) == "from-file-key"
    assert resolve_api_key(_args(api_key="flag-key")) == "flag-key"
    assert resolve_api_key(_args()) is None
    monkeypatch.setenv(API_KEY_ENV, "env-key")
    assert resolve_api_key(_args()) == "env-key"
    with pytest.raises(ValueError, match="given twice"):
        resolve_api_key(_args(api_key="flag-key"))
    monkeypatch.delenv(API_KEY_ENV)
    key_file.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_api_key(_args(api_key_file=str(key_file)))
    with pytest.raises(ValueError, match="cannot read the API key file"):
        resolve_api_key(_args(api_key_file=str(tmp_path / "missing")))
    banner = usage_banner("http://127.0.0.1:8000", "m", "s3cret-key")
    assert "s3cret-key" not in banner and f"${API_KEY_ENV}" in banner and f'os.environ["{API_KEY_ENV}"]' in banner
