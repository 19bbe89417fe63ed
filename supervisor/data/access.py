"""The data plane's access log: one record per invocation.

Rules:

* Every ``/invoke`` and every HTTP-trigger request the front handles gets
  exactly one record when its answer is over (sent, refused, or cut), also
  when it was refused before reaching a worker (no such function, body too
  large, queue full, draining) or failed on the way (timeout, crash).
  Lifecycle calls (``/initialize``, ``/pre-freeze``, ``/pre-stop``) and
  what the HTTP server answers itself (400, 414, 431, 501) are not
  invocations and get none.
* Fields: ``event: "access"``, ``component: "data-plane"``, ``request_id``,
  ``function`` (null when none matched), ``status`` (the HTTP status sent;
  null when the client left before any), ``outcome`` (the
  ``supervisor_invocations_total`` outcome), ``error_type`` (the contract's
  ``errorType``; null on success), ``duration_ms`` (from the request reaching
  the front to its end) and ``queue_ms`` (waiting for a worker slot), plus
  ``worker`` once a worker was given it, and ``method`` and ``path`` (the
  path only: a query string may hold secrets) for HTTP triggers.
* Cheap: a record is filled in along the request path (``Router`` writes
  the worker and the queue wait into it) and rendered with one call of
  :func:`supervisor.logs.access_line`, the same kind of fast path as a
  worker's lines (about 4 us in isolation, where the same fields through
  structlog's processor chain cost about 8 us; bench/access_log.py).
  Rendered records are handed to the log writer together, at most
  ``FLUSH_S`` after the first of them or once ``FLUSH_BYTES`` are waiting
  (one hand-over, one wake-up of the writer thread and one write per batch
  instead of per invocation), and by :func:`flush` (pre-freeze, pre-stop,
  exit; from any thread): what waits is bounded, and a record is late by at
  most ``FLUSH_S``. ``[supervisor] access_log = false`` turns it off: no record
  is made.
"""

from __future__ import annotations

import asyncio
import threading
import time

from supervisor.data.errors import InvocationError
from supervisor.logs import access_line, write_lines

__all__ = ["FLUSH_BYTES", "FLUSH_S", "AccessRecord", "flush"]

FLUSH_S = 0.01
FLUSH_BYTES = 64 * 1024

_lock = threading.Lock()  # flush() also runs in a thread (the planes' flush_stdio)
_waiting: list[bytes] = []
_waiting_bytes = 0
_timer: asyncio.TimerHandle | None = None  # the loop thread's only


def flush() -> None:
    """Hands every waiting record to the log writer now (any thread)."""
    global _waiting, _waiting_bytes
    with _lock:
        lines, _waiting, _waiting_bytes = _waiting, [], 0
    write_lines(lines)


def _timed_flush() -> None:
    global _timer
    _timer = None
    flush()


def _add(line: bytes) -> None:
    global _waiting_bytes, _timer
    with _lock:
        _waiting.append(line)
        _waiting_bytes += len(line)
        full = _waiting_bytes >= FLUSH_BYTES
    if full:
        flush()
    elif _timer is None:
        try:
            _timer = asyncio.get_running_loop().call_later(FLUSH_S, _timed_flush)
        except RuntimeError:  # no loop (a test): at once
            flush()


class AccessRecord:
    """One invocation's access record, filled in as the request goes (see the module docstring)."""

    __slots__ = ("started", "request_id", "function", "method", "path", "worker", "queue_s", "status",
                 "outcome", "error_type")

    def __init__(self, request_id: str, function: str | None, method: str | None = None,
                 path: str | None = None) -> None:
        self.started = time.perf_counter()
        self.request_id = request_id
        self.function = function
        self.method = method
        self.path = path
        self.worker: str | None = None
        self.queue_s = 0.0
        self.status: int | None = None
        self.outcome = "success"
        self.error_type: str | None = None

    def failed(self, error: InvocationError) -> None:
        """The request's answer is the contract's error ``error``."""
        self.status = error.status
        self.outcome = error.outcome
        self.error_type = error.error_type

    def client_left(self) -> None:
        """The client went away before its answer was complete."""
        self.outcome = "cancelled"

    def emit(self) -> None:
        """The record, to be written with the next batch (see the module docstring)."""
        _add(access_line(
            request_id=self.request_id, function=self.function, status=self.status, outcome=self.outcome,
            error_type=self.error_type, duration_ms=round((time.perf_counter() - self.started) * 1000, 3),
            queue_ms=round(self.queue_s * 1000, 3), worker=self.worker, method=self.method, path=self.path))
