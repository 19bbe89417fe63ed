"""Hosts a Python HTTP application: an ASGI 3 app, or a WSGI app through a2wsgi.

``handler = "module:app"`` names the application; ``interface`` says which
kind. A WSGI app is wrapped in ``a2wsgi.WSGIMiddleware`` (a pool of
``concurrency`` threads, streaming both ways) so one ASGI path serves both.

Rules and invariants:

- HTTP-trigger requests (``http``) reach the app as ASGI ``http`` scopes
  built from the ``HttpExchange``. Bodies stream both ways: ``receive``
  hands the app one chunk at a time (the exchange acknowledges it, so the
  data plane never has more than ``STREAM_WINDOW`` bytes in flight), and
  each ``http.response.body`` goes out as it is sent, waiting for the
  window. Nothing here holds a whole request or response.
- The response head is sent with the first body message, not on
  ``http.response.start``: an app that fails between the two still gets the
  contract's error answer instead of an aborted response.
- ``receive`` returns ``http.disconnect`` once the client is gone, or once
  the body is read and the response is complete (as uvicorn does). ``send``
  raises ``ClientDisconnected`` (an ``OSError``) once the client is gone.
- A WSGI app cannot be told through ``send``: a2wsgi's thread would block
  forever on a dead sender. So for WSGI ``send`` drops what comes after the
  end, and ``_WSGIGuard`` stops the app in its own thread instead: the next
  chunk it yields, its ``write()`` and its reads of ``wsgi.input`` raise
  (``ClientDisconnected``, or ``ResponseTooLarge`` on ``/invoke``), and its
  iterable is closed, as a WSGI server does when a socket write fails.
- Whatever the app raises (``SystemExit`` and the other ``BaseException``
  subclasses included, in a WSGI app's thread too) fails its own request
  only, as an ``Exception`` does (``PythonHost``'s rule).
- Everything the app does for a request runs with FC's markers around it
  and its request id in ``current_request_id`` (a2wsgi copies the context
  into its threads), so what it prints is attributed to the request.
- ``/invoke`` on an HTTP function is ``POST /invoke`` to the app, its
  response collected up to ``max_body`` (a larger one is refused and the
  app stopped): 2xx is the result, anything else a failure.
- Lifespan: an ASGI app that speaks the protocol gets ``startup`` once in
  ``start`` and ``shutdown`` in ``close`` (bounded by
  ``LIFESPAN_SHUTDOWN_S``); one that does not (it raises or returns before
  taking ``lifespan.startup``) is served anyway, as uvicorn's "auto" does.
  A failed startup is the worker's init error. The lifespan ``state`` is
  copied into every request's scope.
- Hooks are ``PythonHost``'s; they always run off the loop's own stack (an
  async hook as a task, a sync one in a thread) because the loop also
  carries the streams of HTTP exchanges.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, Protocol, cast
from urllib.parse import unquote_to_bytes

from a2wsgi import WSGIMiddleware

from calink.messages import ErrorInfo, Result
from worker.host import ClientDisconnected, HttpExchange, header_pairs
from worker.python.host import Invocation, LoadError, PythonHost, cancelled_from_outside
from worker.python.lifespan import ASGIApp, Lifespan, Message, Receive, Scope, Send

LIFESPAN_SHUTDOWN_S = 5.0
# How much of a failed /invoke response's body its error message quotes.
ERROR_TEXT_LIMIT = 1024
# Request headers that describe the original body's framing; /invoke gets the body whole.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})


class ResponseTooLarge(OSError):
    """The app's answer to ``/invoke`` passed ``max_body``; it cannot be delivered."""


class _Aborted(Protocol):
    """What the WSGI guard asks of the current request, from the app's thread."""

    def check(self) -> None:
        """Raises once the response can no longer go anywhere."""


# The request a WSGI app's thread is serving (a2wsgi runs it in a copy of the context).
_current_call: ContextVar[_Aborted | None] = ContextVar("http_app_call", default=None)


class HttpAppHost(PythonHost):
    """An ASGI or WSGI application, with ``PythonHost``'s hooks."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.interface = str(spec.get("interface") or "asgi")
        if self.interface not in ("asgi", "wsgi"):
            raise ValueError(f"function {self.meta.name!r}: interface {self.interface!r} is not an HTTP app "
                             "(expected \"asgi\" or \"wsgi\")")
        port = spec.get("ca_port")
        self.server: tuple[str, int] | None = ("127.0.0.1", int(port)) if port else None
        self.app: ASGIApp = _not_started
        # Lifespan state; each request's scope gets a shallow copy (the ASGI "state" extension).
        self.state: dict[str, Any] = {}
        self._wsgi: WSGIMiddleware | None = None
        self._lifespan: Lifespan | None = None

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        self.load()
        target = self.callables.get("invoke")
        if target is None:
            raise LoadError(f"function {self.meta.name!r}: an {self.interface} function needs "
                            "handler = \"module:app\" naming its application")
        if self.interface == "wsgi":
            self._wsgi = WSGIMiddleware(cast(Any, _WSGIGuard(target)), workers=self.concurrency)
            self.app = cast(ASGIApp, self._wsgi)
            return  # a2wsgi answers lifespan itself, with nothing to run
        self.app = cast(ASGIApp, target)
        lifespan = Lifespan(self.app, self.state)
        if await lifespan.startup():
            self._lifespan = lifespan

    def load(self) -> None:
        super().load()
        # PythonHost runs a sync hook inline when concurrency is 1; here it gets a thread (see the docstring).
        sync_hooks = any(kind != "invoke" and not inspect.iscoroutinefunction(fn)
                         for kind, fn in self.callables.items())
        if sync_hooks and self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="hook")

    async def close(self) -> None:
        lifespan, self._lifespan = self._lifespan, None
        if lifespan is not None:
            await lifespan.shutdown(LIFESPAN_SHUTDOWN_S)
        if self._wsgi is not None:
            self._wsgi.executor.shutdown(wait=False, cancel_futures=True)
        await super().close()

    def serves_http(self) -> bool:
        return True

    def runs_inline(self, kind: str) -> bool:
        return kind not in self.callables

    # ---- requests --------------------------------------------------------

    async def http(self, exchange: HttpExchange) -> None:
        request = exchange.request
        call = _ExchangeCall(exchange, lenient=self._wsgi is not None)
        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in request.headers]
        client = (request.client_host, request.client_port) if request.client_host else None
        scope = self._scope(request.method, request.raw_path or b"/", request.query, headers,
                            request.http_version or "1.1", request.scheme or "http", client)
        with Invocation("invoke", request.request_id):
            token = _current_call.set(call) if self._wsgi is not None else None
            try:
                await self.app(scope, call.receive, call.send)
            finally:
                if token is not None:
                    _current_call.reset(token)
                call.close()
        if exchange.cancelled and not exchange.finished:
            raise ClientDisconnected("the client disconnected before the response was complete")

    async def run(self, kind: str, request_id: str, headers: Mapping[str, str],
                  timeout_s: float, body: bytes) -> Result:
        """A hook as ``PythonHost`` runs it; ``invoke`` as ``POST /invoke`` to the app."""
        if kind != "invoke":
            return await super().run(kind, request_id, headers, timeout_s, body)
        call = _InvokeCall(body, self.max_result, lenient=self._wsgi is not None)
        pairs = [(name.encode("latin-1", "replace"), value.encode("latin-1", "replace"))
                 for name, value in headers.items() if name not in _FRAMING_HEADERS]
        pairs.append((b"content-length", str(len(body)).encode()))
        scope = self._scope("POST", b"/invoke", b"", pairs, "1.1", "http", None)
        with Invocation(kind, request_id):
            token = _current_call.set(call) if self._wsgi is not None else None
            try:
                await self.app(scope, call.receive, call.send)
            except BaseException as exc:  # whatever the app raised is the invocation's result
                if cancelled_from_outside(exc):
                    raise
                if not call.too_large:
                    return self._failed(exc)
            finally:
                if token is not None:
                    _current_call.reset(token)
                call.close()
        return call.result()

    def _scope(self, method: str, raw_path: bytes, query: bytes, headers: list[tuple[bytes, bytes]],
               http_version: str, scheme: str, client: tuple[str, int] | None) -> Scope:
        path = unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": http_version,
            "method": method,
            "scheme": scheme,
            # "replace", as uvicorn: a2wsgi re-encodes the path as UTF-8, which a surrogate would break.
            "path": path.decode("utf-8", "replace"),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": client,
            "server": self.server,
            "state": self.state.copy(),
        }


async def _not_started(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("the application is not loaded (the host has not been started)")


class _ExchangeCall:
    """``receive`` and ``send`` of one HTTP-trigger request, over its exchange."""

    __slots__ = ("exchange", "lenient", "_head", "_body_done", "_complete", "_lock", "_ended", "_watcher")

    def __init__(self, exchange: HttpExchange, *, lenient: bool) -> None:
        self.exchange = exchange
        # WSGI: after the end, drop what a2wsgi's sender passes on (the guard stops the app).
        self.lenient = lenient
        self._head: tuple[int, list[tuple[str, str]]] | None = None
        self._body_done = False
        self._complete = False
        # The exchange has one receiver slot: concurrent receive() calls take turns.
        self._lock = asyncio.Lock()
        self._ended: asyncio.Event | None = None  # the client left or the response is complete
        self._watcher: asyncio.Task[None] | None = None

    def check(self) -> None:
        if self.exchange.cancelled:
            raise ClientDisconnected("the client disconnected")

    async def receive(self) -> Message:
        if not self._body_done:
            async with self._lock:
                if not self._body_done:
                    try:
                        chunk, more = await self.exchange.receive()
                    except ClientDisconnected:
                        self._body_done = True
                        return {"type": "http.disconnect"}
                    self._body_done = not more
                    return {"type": "http.request", "body": chunk, "more_body": more}
        if not (self._complete or self.exchange.cancelled):
            if self._ended is None:
                self._ended = asyncio.Event()
                self._watcher = asyncio.ensure_future(self._watch(self._ended))
            await self._ended.wait()
        return {"type": "http.disconnect"}

    async def _watch(self, ended: asyncio.Event) -> None:
        # Only after the body is read: the exchange's receiver slot is free from then on.
        await self.exchange.wait_cancelled()
        ended.set()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        exchange = self.exchange
        if kind == "http.response.body":
            if self._complete:
                raise RuntimeError("ASGI message 'http.response.body' sent after the response completed")
            if self.lenient and exchange.cancelled:
                return
            try:
                if self._head is not None:
                    status, headers = self._head
                    self._head = None
                    exchange.start(status, headers)
                elif not exchange.started:
                    raise RuntimeError("ASGI message 'http.response.body' sent before 'http.response.start'")
                body = message.get("body", b"")
                more = bool(message.get("more_body", False))
                if body:
                    await exchange.send(body)
                if not more:
                    self._complete = True
                    exchange.finish()
                    if self._ended is not None:
                        self._ended.set()
            except ClientDisconnected:
                if not self.lenient:
                    raise
        elif kind == "http.response.start":
            if self._head is not None or exchange.started:
                raise RuntimeError("ASGI message 'http.response.start' sent twice")
            if message.get("trailers"):
                raise RuntimeError("response trailers are not supported (no http.response.trailers extension)")
            self._head = (int(message["status"]), header_pairs(message.get("headers") or ()))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on an http connection")

    def close(self) -> None:
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()


class _InvokeCall:
    """``receive`` and ``send`` of an /invoke event presented as ``POST /invoke``."""

    __slots__ = ("lenient", "limit", "status", "headers", "chunks", "size", "too_large", "complete",
                 "_body", "_ended")

    def __init__(self, body: bytes, limit: int, *, lenient: bool) -> None:
        self.lenient = lenient
        self.limit = limit
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False
        self.complete = False
        self._body: bytes | None = body
        self._ended = asyncio.Event()  # the response is complete or refused: the "client" is gone

    def check(self) -> None:
        if self.too_large:
            raise self._refusal()

    def _refusal(self) -> ResponseTooLarge:
        return ResponseTooLarge(f"the response to /invoke passed max_body ({self.limit} bytes)")

    async def receive(self) -> Message:
        body, self._body = self._body, None
        if body is not None:
            return {"type": "http.request", "body": body, "more_body": False}
        await self._ended.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if self.status is None or self.complete:
                raise RuntimeError("ASGI message 'http.response.body' outside a started response")
            if self.too_large:
                if self.lenient:
                    return
                raise self._refusal()
            body = message.get("body", b"")
            if body:
                self.size += len(body)
                if self.size > self.limit:
                    self.too_large = True
                    self.chunks.clear()
                    self._ended.set()
                    if self.lenient:
                        return
                    raise self._refusal()
                self.chunks.append(bytes(body))
            if not message.get("more_body", False):
                self.complete = True
                self._ended.set()
        elif kind == "http.response.start":
            if self.status is not None:
                raise RuntimeError("ASGI message 'http.response.start' sent twice")
            self.status = int(message["status"])
            self.headers = header_pairs(message.get("headers") or ())
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on an http connection")

    def close(self) -> None:
        self._ended.set()  # anything of the app's still waiting on receive() learns it is over

    def result(self) -> Result:
        if self.too_large:
            return Result(ok=False, error=ErrorInfo(
                error_type="ResultTooLargeError",
                error_message=f"the application's response to /invoke passed max_body ({self.limit} bytes)"))
        if not self.complete or self.status is None:
            return Result(ok=False, error=ErrorInfo(
                error_type="IncompleteResponseError",
                error_message="the application returned without a complete response to /invoke"))
        body = b"".join(self.chunks)
        if 200 <= self.status < 300:
            content_type = next((v for n, v in reversed(self.headers) if n.lower() == "content-type"), "")
            return Result(ok=True, body=body, content_type=content_type)
        text = body.decode("utf-8", "replace")
        if len(text) > ERROR_TEXT_LIMIT:
            text = f"{text[:ERROR_TEXT_LIMIT]}... ({len(body)} bytes)"
        return Result(ok=False, error=ErrorInfo(
            error_type=_error_type(body), error_message=f"HTTP {self.status}: {text}"))


def _error_type(body: bytes) -> str:
    """The ``errorType`` of a JSON error body (the contract's shape), else "HTTPError"."""
    if body[:1] == b"{":
        try:
            value = json.loads(body)
        except ValueError:
            return "HTTPError"
        if isinstance(value, dict) and isinstance(value.get("errorType"), str) and value["errorType"]:
            return str(value["errorType"])
    return "HTTPError"


# ---- WSGI --------------------------------------------------------------------

WriteCallable = Callable[[bytes], object]
StartResponse = Callable[..., WriteCallable]


class _WSGIGuard:
    """The WSGI app as a2wsgi runs it, stopped in its thread once its response
    can no longer go anywhere (see the module docstring)."""

    __slots__ = ("app",)

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        call = _current_call.get()
        if call is None:  # not a request of this host's: nothing to guard
            return cast(Iterable[bytes], self.app(environ, start_response))
        environ["wsgi.input"] = _GuardedInput(environ["wsgi.input"], call)

        def guarded_start_response(status: str, headers: list[tuple[str, str]],
                                   exc_info: Any = None) -> WriteCallable:
            write = start_response(status, headers, exc_info)

            def guarded_write(data: bytes) -> None:
                call.check()
                write(data)

            return guarded_write

        return _guarded_chunks(self.app(environ, guarded_start_response), call)


def _guarded_chunks(chunks: Iterable[bytes], call: _Aborted) -> Iterator[bytes]:
    try:
        for chunk in chunks:
            call.check()
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:  # PEP 3333: the server closes the app's iterable, however it ends
            close()


class _GuardedInput:
    """``wsgi.input`` that raises, instead of looking complete, once the client is gone."""

    __slots__ = ("_body", "_call")

    def __init__(self, body: Any, call: _Aborted) -> None:
        self._body = body
        self._call = call

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._body.read(size)
        self._call.check()
        return data

    def readline(self, limit: int = -1) -> bytes:
        line: bytes = self._body.readline(limit)
        self._call.check()
        return line

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = self._body.readlines(hint)
        self._call.check()
        return lines

    def __iter__(self) -> Iterator[bytes]:
        for line in self._body:
            self._call.check()
            yield line
