"""A WSGI server (PEP 3333, the server's side) over the worker's HTTP exchange.

``HttpAppHost`` serves ``interface = "wsgi"`` functions with it: standard
library only, no ASGI adapter in between.

Rules and invariants:

- The app runs in the function's pool of ``concurrency`` threads, in a copy
  of the request's context (its request id, so what it prints is
  attributed to it). One ``WsgiCall`` is one request.
- ``wsgi.input`` streams the request body: a read that needs more than it
  holds blocks the app's thread until the next chunk arrives (one hop to
  the event loop per chunk, never a whole body). The exchange acknowledges
  each chunk as it is taken, so the data plane never has more than
  ``STREAM_WINDOW`` in flight; the input holds at most the unread rest of
  one chunk. ``wsgi.input_terminated`` is true: reading until ``b""`` is
  how a body without ``Content-Length`` (chunked) is read.
- ``start_response(status, headers, exc_info=None)``: ``status`` is
  ``"NNN reason"``, ``headers`` a list of ``(name, value)`` native strings
  (latin-1); names are sent lowercased, as from an ASGI app. A second call
  needs ``exc_info``: before the head has been sent it replaces status and
  headers, after it re-raises ``exc_info``. It returns ``write``.
- The head is sent with the first non-empty body chunk (or at the end): an
  app that fails before that still gets the contract's error answer.
- Each non-empty chunk the app yields (or passes to ``write``) is sent
  before the next one is asked for, waiting for the stream's window: a slow
  client slows the app down, nothing buffers a response. A ``list`` or
  ``tuple`` (``return [body]``, the common case) is sent by the event loop
  once the app has returned: no hop per chunk.
- The iterable's ``close()`` is called however the response ends (PEP
  3333), in the app's thread.
- Once the client is gone, the app's next read of ``wsgi.input``, its next
  chunk and its ``write`` raise ``ClientDisconnected`` (an ``OSError``) in
  its thread, and its iterable is closed: a WSGI server's socket error.
- ``/invoke`` (``invoke``) is ``POST /invoke`` with the event as its body;
  the response is collected in the app's thread up to ``max_body``: past
  it, ``ResponseTooLarge`` is raised into the app (its iterable closed) and
  the result is ``ResultTooLargeError``.
- Whatever the app raises (``SystemExit`` and the other ``BaseException``
  subclasses too) is carried back to the event loop as the request's
  failure, never raised in the pool's thread machinery.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

from worker.host import HttpExchange, header_pairs

T = TypeVar("T")
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
_SPECIAL_HEADERS = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}


class ResponseTooLarge(OSError):
    """The app's answer to ``/invoke`` passed ``max_body``; it cannot be delivered."""


def build_environ(scope: dict[str, Any], body: WsgiInput) -> dict[str, Any]:
    """The PEP 3333 ``environ`` of a request (the HTTP scope ``HttpAppHost`` builds)."""
    raw_path: bytes = scope["raw_path"]
    path = unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path
    server = scope.get("server") or ("localhost", 80)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": "",
        "PATH_INFO": path.decode("latin-1"),  # WSGI's "bytes as latin-1" strings
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope["scheme"],
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    }
    client = scope.get("client")
    if client is not None:
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = client[0], str(client[1])
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        key = _SPECIAL_HEADERS.get(name) or "HTTP_" + name.upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


class WsgiInput:
    """``wsgi.input``: the request body, fetched chunk by chunk as it is read."""

    __slots__ = ("_fetch", "_buffer", "_more")

    def __init__(self, fetch: Callable[[], tuple[bytes, bool]]) -> None:
        self._fetch = fetch  # the next chunk and whether more follows (blocks the app's thread)
        self._buffer = bytearray()
        self._more = True

    def _fill(self) -> bool:
        """Fetches one more chunk; False at the end of the body."""
        if not self._more:
            return False
        chunk, self._more = self._fetch()
        self._buffer += chunk
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._fill():
                pass
            size = len(self._buffer)
        else:
            while len(self._buffer) < size and self._fill():
                pass
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        limit = None if size is None or size < 0 else size
        start = 0
        while True:
            end = self._buffer.find(b"\n", start, limit)
            if end >= 0:
                return self.read(end + 1)
            if limit is not None and len(self._buffer) >= limit:
                return self.read(limit)
            start = len(self._buffer)
            if not self._fill():
                return self.read(len(self._buffer))

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> WsgiInput:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class WsgiCall:
    """One request to a WSGI app: ``start_response``, ``write``, and the run in the app's thread.

    ``send`` takes each non-empty chunk in the app's thread (after the head
    is set); what ``run`` returns is sent by the caller on the event loop.
    """

    __slots__ = ("app", "environ", "head", "head_sent", "_send")

    def __init__(self, app: WsgiApp, environ: dict[str, Any], send: Callable[[WsgiCall, bytes], None]) -> None:
        self.app = app
        self.environ = environ
        self.head: tuple[int, list[tuple[str, str]]] | None = None
        self.head_sent = False
        self._send = send

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: ExcInfo | None = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # no reference cycle through the frame
        elif self.head is not None:
            raise AssertionError("start_response() called a second time without exc_info")
        self.head = (_status_code(status), _header_list(headers))
        return self.write

    def write(self, data: bytes) -> None:
        """PEP 3333's ``write``: the data is sent before it returns."""
        if self.head is None:
            raise AssertionError("write() before start_response()")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"write() takes bytes, not {type(data).__name__}")
        if data:
            self._send(self, bytes(data))

    def run(self) -> list[bytes]:
        """Calls the app and sends what it yields (in the app's thread); returns the
        chunks left for the caller to send (a list or tuple response: all of it)."""
        result = self.app(self.environ, self.start_response)
        try:
            if type(result) in (list, tuple):
                chunks = [_body_chunk(chunk) for chunk in result]
                if self.head is None:
                    raise AssertionError("the application returned without calling start_response()")
                return [chunk for chunk in chunks if chunk]
            for chunk in result:
                if self.head is None:
                    raise AssertionError("the application yielded a body chunk before calling start_response()")
                data = _body_chunk(chunk)
                if data:
                    self._send(self, data)
            if self.head is None:
                raise AssertionError("the application returned without calling start_response()")
            return []
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()


def _status_code(status: str) -> int:
    if not isinstance(status, str) or len(status) < 4 or status[3] != " " or not status[:3].isdigit():
        raise ValueError(f"start_response() status must be a string like \"200 OK\", got {status!r}")
    return int(status[:3])


def _header_list(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if not isinstance(headers, list):
        raise TypeError(f"start_response() headers must be a list of (name, value) tuples, not "
                        f"{type(headers).__name__}")
    pairs = header_pairs(headers)
    return [(name.strip().lower(), value.strip()) for name, value in pairs]


def _body_chunk(chunk: object) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    raise TypeError(f"a WSGI application must yield bytes, not {type(chunk).__name__}")


class Outcome:
    """What happened in the app's thread: a value or what it raised (any BaseException)."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value = value
        self.error = error

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _capture(fn: Callable[[], T]) -> Outcome:
    try:
        return Outcome(fn())
    except BaseException as exc:  # the request's failure, carried to the loop (see the module docstring)
        return Outcome(error=exc)


async def in_thread(pool: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
    """``fn()`` in ``pool`` with the current context; returns or raises what it did."""
    context = contextvars.copy_context()
    outcome: Outcome = await asyncio.get_running_loop().run_in_executor(pool, context.run, _capture, fn)
    return outcome.get()  # type: ignore[no-any-return]


def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Runs ``coro`` on ``loop`` from the app's thread and waits for it."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


async def serve_exchange(app: WsgiApp, pool: ThreadPoolExecutor, scope: dict[str, Any],
                         exchange: HttpExchange) -> None:
    """One HTTP-trigger request through the app (see the module docstring)."""
    loop = asyncio.get_running_loop()

    async def send(call: WsgiCall, data: bytes) -> None:
        if not exchange.started:
            assert call.head is not None
            exchange.start(*call.head)
            call.head_sent = True
        await exchange.send(data)

    body = WsgiInput(lambda: on_loop(loop, exchange.receive()))
    call = WsgiCall(app, build_environ(scope, body), lambda c, data: on_loop(loop, send(c, data)))
    rest = await in_thread(pool, call.run)
    for chunk in rest:
        await send(call, chunk)
    if not exchange.started:
        assert call.head is not None  # run() raised otherwise
        exchange.start(*call.head)
        call.head_sent = True
    exchange.finish()


class Collected:
    """The response to ``/invoke``, collected in the app's thread up to ``limit`` bytes."""

    __slots__ = ("limit", "chunks", "size", "too_large")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.too_large = True
            self.chunks.clear()
            raise ResponseTooLarge(f"the response to /invoke passed max_body ({self.limit} bytes)")
        self.chunks.append(data)


async def invoke(app: WsgiApp, pool: ThreadPoolExecutor, scope: dict[str, Any], body: bytes,
                 collected: Collected) -> tuple[int, list[tuple[str, str]]]:
    """``POST /invoke`` through the app; returns the status and headers (the body is in
    ``collected``). Raises what the app raised, or ``ResponseTooLarge``."""
    chunks = iter((body,))
    call = WsgiCall(app, build_environ(scope, WsgiInput(lambda: (next(chunks, b""), False))),
                    lambda c, data: collected.add(data))

    def run() -> None:
        for chunk in call.run():
            collected.add(chunk)

    await in_thread(pool, run)
    assert call.head is not None
    return call.head
