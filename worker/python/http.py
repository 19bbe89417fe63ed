"""Hosts a Python HTTP application: an ASGI 3 app, or a WSGI app.

``handler = "module:app"`` names the application; ``interface`` says which
kind. A WSGI app is served by ``worker.python.wsgi`` (PEP 3333's server side
over the same exchange, in a pool of ``concurrency`` threads, streaming both
ways; its rules are there). The rules below are the ASGI app's, and the
ones both share.

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
- Whatever the app raises (``SystemExit`` and the other ``BaseException``
  subclasses included, in a WSGI app's thread too) fails its own request
  only, as an ``Exception`` does (``PythonHost``'s rule).
- Everything the app does for a request runs with FC's markers around it
  and its request id in ``current_request_id`` (a WSGI app's thread runs in
  a copy of the context), so what it prints is attributed to the request.
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
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast
from urllib.parse import unquote_to_bytes

from calink.messages import ErrorInfo, Result
from worker.host import ClientDisconnected, HttpExchange, header_pairs
from worker.python import wsgi
from worker.python.host import Invocation, LoadError, PythonHost, cancelled_from_outside
from worker.python.lifespan import ASGIApp, Lifespan, Message, Receive, Scope, Send
from worker.python.wsgi import ResponseTooLarge

LIFESPAN_SHUTDOWN_S = 5.0
# How much of a failed /invoke response's body its error message quotes.
ERROR_TEXT_LIMIT = 1024
# Request headers that describe the original body's framing; /invoke gets the body whole.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})


__all__ = ["HttpAppHost", "ResponseTooLarge"]


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
        self._wsgi: wsgi.WsgiApp | None = None
        self._wsgi_pool: ThreadPoolExecutor | None = None
        self._lifespan: Lifespan | None = None

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        self.load()
        target = self.callables.get("invoke")
        if target is None:
            raise LoadError(f"function {self.meta.name!r}: an {self.interface} function needs "
                            "handler = \"module:app\" naming its application")
        if self.interface == "wsgi":
            self._wsgi = cast(wsgi.WsgiApp, target)
            self._wsgi_pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="wsgi")
            return  # WSGI has no lifespan
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
        if self._wsgi_pool is not None:
            self._wsgi_pool.shutdown(wait=False, cancel_futures=True)
        await super().close()

    def serves_http(self) -> bool:
        return True

    def runs_inline(self, kind: str) -> bool:
        return kind not in self.callables

    # ---- requests --------------------------------------------------------

    async def http(self, exchange: HttpExchange) -> None:
        request = exchange.request
        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in request.headers]
        client = (request.client_host, request.client_port) if request.client_host else None
        scope = self._scope(request.method, request.raw_path or b"/", request.query, headers,
                            request.http_version or "1.1", request.scheme or "http", client)
        with Invocation("invoke", request.request_id):
            if self._wsgi is not None and self._wsgi_pool is not None:
                await wsgi.serve_exchange(self._wsgi, self._wsgi_pool, scope, exchange)
            else:
                call = _ExchangeCall(exchange)
                try:
                    await self.app(scope, call.receive, call.send)
                finally:
                    call.close()
        if exchange.cancelled and not exchange.finished:
            raise ClientDisconnected("the client disconnected before the response was complete")

    async def run(self, kind: str, request_id: str, headers: Mapping[str, str],
                  timeout_s: float, body: bytes) -> Result:
        """A hook as ``PythonHost`` runs it; ``invoke`` as ``POST /invoke`` to the app."""
        if kind != "invoke":
            return await super().run(kind, request_id, headers, timeout_s, body)
        pairs = [(name.encode("latin-1", "replace"), value.encode("latin-1", "replace"))
                 for name, value in headers.items() if name not in _FRAMING_HEADERS]
        pairs.append((b"content-length", str(len(body)).encode()))
        scope = self._scope("POST", b"/invoke", b"", pairs, "1.1", "http", None)
        if self._wsgi is not None and self._wsgi_pool is not None:
            return await self._invoke_wsgi(self._wsgi, self._wsgi_pool, request_id, scope, body)
        call = _InvokeCall(body, self.max_result)
        with Invocation(kind, request_id):
            try:
                await self.app(scope, call.receive, call.send)
            except BaseException as exc:  # whatever the app raised is the invocation's result
                if cancelled_from_outside(exc):
                    raise
                if not call.too_large:
                    return self._failed(exc)
            finally:
                call.close()
        return call.result()

    async def _invoke_wsgi(self, app: wsgi.WsgiApp, pool: ThreadPoolExecutor, request_id: str, scope: Scope,
                           body: bytes) -> Result:
        collected = wsgi.Collected(self.max_result)
        with Invocation("invoke", request_id):
            try:
                status, headers = await wsgi.invoke(app, pool, scope, body, collected)
            except BaseException as exc:  # whatever the app raised is the invocation's result
                if cancelled_from_outside(exc):
                    raise
                if not collected.too_large:
                    return self._failed(exc)
        if collected.too_large:
            return _too_large(self.max_result)
        return _invoke_result(status, headers, b"".join(collected.chunks))

    def _scope(self, method: str, raw_path: bytes, query: bytes, headers: list[tuple[bytes, bytes]],
               http_version: str, scheme: str, client: tuple[str, int] | None) -> Scope:
        path = unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": http_version,
            "method": method,
            "scheme": scheme,
            # "replace", as uvicorn (a WSGI app gets the raw bytes as latin-1 in PATH_INFO).
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

    __slots__ = ("exchange", "_head", "_body_done", "_complete", "_lock", "_ended", "_watcher")

    def __init__(self, exchange: HttpExchange) -> None:
        self.exchange = exchange
        self._head: tuple[int, list[tuple[str, str]]] | None = None
        self._body_done = False
        self._complete = False
        # The exchange has one receiver slot: concurrent receive() calls take turns.
        self._lock = asyncio.Lock()
        self._ended: asyncio.Event | None = None  # the client left or the response is complete
        self._watcher: asyncio.Task[None] | None = None

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

    __slots__ = ("limit", "status", "headers", "chunks", "size", "too_large", "complete", "_body", "_ended")

    def __init__(self, body: bytes, limit: int) -> None:
        self.limit = limit
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False
        self.complete = False
        self._body: bytes | None = body
        self._ended = asyncio.Event()  # the response is complete or refused: the "client" is gone

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
                raise self._refusal()
            body = message.get("body", b"")
            if body:
                self.size += len(body)
                if self.size > self.limit:
                    self.too_large = True
                    self.chunks.clear()
                    self._ended.set()
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
            return _too_large(self.limit)
        if not self.complete or self.status is None:
            return Result(ok=False, error=ErrorInfo(
                error_type="IncompleteResponseError",
                error_message="the application returned without a complete response to /invoke"))
        return _invoke_result(self.status, self.headers, b"".join(self.chunks))


def _too_large(limit: int) -> Result:
    return Result(ok=False, error=ErrorInfo(
        error_type="ResultTooLargeError",
        error_message=f"the application's response to /invoke passed max_body ({limit} bytes)"))


def _invoke_result(status: int, headers: list[tuple[str, str]], body: bytes) -> Result:
    """A complete response to ``POST /invoke`` as the invocation's result: 2xx is the result."""
    if 200 <= status < 300:
        content_type = next((v for n, v in reversed(headers) if n.lower() == "content-type"), "")
        return Result(ok=True, body=body, content_type=content_type)
    text = body.decode("utf-8", "replace")
    if len(text) > ERROR_TEXT_LIMIT:
        text = f"{text[:ERROR_TEXT_LIMIT]}... ({len(body)} bytes)"
    return Result(ok=False, error=ErrorInfo(
        error_type=_error_type(body), error_message=f"HTTP {status}: {text}"))


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
