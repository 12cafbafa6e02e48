"""Running the app on uvicorn with the connection limits a server open to clients needs.

uvicorn alone keeps a connection that never finishes its request headers open for as long as the client
likes, accepts connections until the process runs out of file descriptors, and then logs a traceback for
every failed accept. Here:

- a connection must finish each request's headers within `header_timeout_s` of connecting (or of its
  previous response), else it is closed; a body must keep arriving (`ServerLimits.body_timeout_s`, in the
  app); an idle keep-alive connection closes after `keep_alive_s`;
- at most `max_connections` connections are open at once: one more is closed as soon as it is accepted, so
  the server keeps file descriptors for the connections it serves (default: the descriptor limit less a
  reserve for model files and logs);
- "out of file descriptors" while accepting is one warning line every 10 s, not a traceback per attempt;
- header size stays capped by h11's limit (`max_header_bytes`).

What still belongs to a reverse proxy in front (TLS, per-client rate limits, slow-client buffering, request
logging) is listed in docs/serving.md.

    run_server(build_server(app, host="127.0.0.1", port=8000, limits=ConnectionLimits()))
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from dataclasses import dataclass, field

__all__ = ["ConnectionLimits", "build_server", "default_max_connections", "quiet_accept_errors", "run_server",
           "server_config"]

_log = logging.getLogger("llama3.serve")
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_FD_RESERVE = 64  # descriptors kept free for model files, logs and the engine


def default_max_connections() -> int:
    """The soft descriptor limit less a reserve (at least 16, at most 4096)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1000
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft - _FD_RESERVE))


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection bounds enforced below the app (see the module docstring)."""

    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    max_connections: int = field(default_factory=default_max_connections)
    max_header_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ConnectionLimits.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("max_connections", "max_header_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ConnectionLimits.{name} must be a positive integer, got {getattr(self, name)!r}")


class _Throttled:
    """Log a warning at most once per `interval_s` (a flood of identical failures is one line)."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s, self.last, self.suppressed = interval_s, float("-inf"), 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.suppressed += 1
            return
        extra = f" ({self.suppressed} more since the last notice)" if self.suppressed else ""
        self.last, self.suppressed = now, 0
        _log.warning(message + extra)


def _guarded_protocol(base: type, limits: ConnectionLimits) -> type:
    """A subclass of uvicorn's HTTP protocol `base` with the header timeout and the connection cap."""
    refusals = _Throttled()

    class GuardedProtocol(base):
        _header_timer = None
        _armed_for = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                refusals.warn(f"llama3 serve: {limits.max_connections} connections are open, the limit; "
                              "closing new ones until some end")
                transport.abort()  # frees the descriptor now; connection_lost removes it from the set
                return
            self._arm()

        def data_received(self, data):
            # A new request on a kept-alive connection gets its own header deadline.
            if self._between_requests() and (self._header_timer is None or self._armed_for is not self.cycle):
                self._arm()
            super().data_received(data)

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._armed_for = self.cycle
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            # Still no request under way since the timer was set: the headers never completed.
            if self.cycle is self._armed_for and self._between_requests() and not self.transport.is_closing():
                self.transport.close()

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def _http_protocol_base() -> type:
    """The protocol uvicorn's "auto" would pick: httptools when installed, else h11."""
    try:
        import httptools  # noqa: F401

        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def server_config(app, *, host: str, port: int, limits: ConnectionLimits | None = None,
                  log_level: str = "info"):
    """A `uvicorn.Config` serving `app` with `limits` (defaults when None)."""
    import uvicorn

    limits = limits or ConnectionLimits()
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                          http=_guarded_protocol(_http_protocol_base(), limits),
                          timeout_keep_alive=limits.keep_alive_s,
                          h11_max_incomplete_event_size=limits.max_header_bytes)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, throttle: _Throttled | None = None) -> None:
    """Make running out of descriptors while accepting one throttled warning instead of a traceback each
    time (asyncio retries the accept a second later by itself)."""
    throttle = throttle or _Throttled()

    def handler(loop, context):
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            throttle.warn(f"llama3 serve: cannot accept connections: {exc.strerror}; raise `ulimit -n` or "
                          "lower --max-connections")
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def build_server(app, *, host: str, port: int, limits: ConnectionLimits | None = None,
                 log_level: str = "info"):
    """A `uvicorn.Server` for `app` with `limits`; run it with `run_server`."""
    import uvicorn

    return uvicorn.Server(server_config(app, host=host, port=port, limits=limits, log_level=log_level))


def run_server(server) -> None:
    """Serve until interrupted or `server.should_exit` is set, with accept errors kept quiet."""
    async def serve() -> None:
        quiet_accept_errors(asyncio.get_running_loop())
        await server.serve()

    asyncio.run(serve())
