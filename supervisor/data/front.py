"""The front HTTP server on the CA port: FC's contract as a raw ASGI callable.

Served by uvicorn's httptools protocol (no web framework on the hot path).
Routes: ``/invoke`` (event invocation, POST only), ``/initialize``,
``/pre-freeze``, ``/pre-stop`` (lifecycle hooks, GET or POST; any other
method on these four is 405 ``MethodNotAllowedError`` with ``Allow``,
and reaches no worker), anything else an HTTP-trigger
request for the function named by ``x-fc-function-name`` (else the default
one), streamed to it when it serves HTTP (``exchange.py``); otherwise 404.

Rules:
- Every answer carries ``x-fc-request-id`` (``cahttp/request_ids.py``).
- Every ``/invoke`` and HTTP-trigger request is one access record when it
  is over, whatever its end (``access.py``), unless ``access_log = false``.
- Every failure is the contract's JSON (``errorType``, ``errorMessage``,
  ``stackTrace`` for handler exceptions) with ``x-fc-status: 404`` and the
  contract's status; see ``errors.py``.
- A body over the function's ``max_body`` is refused from its Content-Length
  before anything is read, or as soon as the limit is passed while reading;
  nothing beyond the limit is buffered. A body the client stops sending for
  ``client_body_timeout`` is 408 ``ClientTimeoutError`` (``cahttp/server.py``
  notices the stall).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson

from cahttp.request_ids import SAFE_REQUEST_ID, RequestIds
from cahttp.server import ClientConnection
from calink.messages import Header
from supervisor.data import access, errors
from supervisor.data.access import AccessRecord
from supervisor.data.errors import InvocationError
from supervisor.data.exchange import ClientGone, TriggerExchange
from supervisor.data.router import Router
from supervisor.logs import get_logger
from supervisor.output import flush_shared

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

log = get_logger()

HOOK_PATHS = {"/initialize": "initialize", "/pre-freeze": "pre_freeze", "/pre-stop": "pre_stop"}
EMPTY_START_HEADERS: list[tuple[bytes, bytes]] = []


class Lifecycle(Protocol):
    """What the front needs from the plane for the lifecycle hooks."""

    async def initialize(self, request_id: str) -> InvocationError | None: ...

    async def pre_freeze(self, request_id: str) -> None: ...

    async def pre_stop(self, request_id: str) -> None: ...


class Front:
    def __init__(self, router: Router, lifecycle: Lifecycle) -> None:
        self.router = router
        self.lifecycle = lifecycle
        self.request_ids = RequestIds()
        # A [supervisor] key: a reload cannot change it.
        self.access_log = router.config.supervisor.access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        function_name: str | None = None
        request_id: str | None = None
        content_length = -1
        fc_headers: list[Header] = []
        for name, value in scope["headers"]:
            text = value.decode("latin-1")
            fc_headers.append((name.decode("latin-1"), text))
            if name == b"x-fc-request-id":
                # An id that could not be logged safely (markers, tags) is replaced.
                request_id = text if SAFE_REQUEST_ID.fullmatch(text) else None
            elif name == b"x-fc-function-name":
                function_name = text
            elif name == b"content-length":
                content_length = int(value) if value.isdigit() else -1
        if not request_id:
            request_id = self.request_ids.new()
            fc_headers = [h for h in fc_headers if h[0] != "x-fc-request-id"]
            fc_headers.append(("x-fc-request-id", request_id))
        rid = request_id.encode("latin-1")
        path = scope["path"]
        record: AccessRecord | None = None
        if self.access_log and path not in HOOK_PATHS:
            record = (AccessRecord(request_id, function_name) if path == "/invoke" else
                      AccessRecord(request_id, function_name, scope["method"], path))
        try:
            if path == "/invoke":
                if scope["method"] != "POST":
                    raise errors.method_not_allowed(scope["method"], path, "POST")
                await self._invoke(function_name, request_id, rid, fc_headers, content_length, receive, send,
                                   scope, record)
            elif path in HOOK_PATHS:
                if scope["method"] not in ("GET", "POST"):
                    raise errors.method_not_allowed(scope["method"], path, "GET, POST")
                await self._hook(HOOK_PATHS[path], request_id, rid, send)
            else:
                await self._http(scope, function_name, request_id, rid, fc_headers, content_length, receive, send,
                                 record)
        except InvocationError as exc:
            if record is not None:
                record.failed(exc)
            await self._send_error(send, exc, rid, request_id, self._resolved(function_name))
        except ClientGone:
            if record is not None:
                record.client_left()
            return
        except Exception as exc:  # a bug here must still answer with the contract's JSON
            log.exception("unexpected error on the request path", request_id=request_id)
            failure = InvocationError(500, "InternalError", f"the supervisor failed: {exc!r}", "crashed")
            if record is not None:
                record.failed(failure)
            await self._send_error(send, failure, rid, request_id, self._resolved(function_name))
        finally:
            if record is not None:
                record.emit()

    def _resolved(self, function_name: str | None) -> str | None:
        config = self.router.config.function_for(function_name)
        return config.name if config is not None else function_name

    async def _invoke(self, function_name: str | None, request_id: str, rid: bytes, headers: list[Header],
                      content_length: int, receive: Receive, send: Send, scope: Scope,
                      record: AccessRecord | None = None) -> None:
        config = self.router.config.function_for(function_name)
        if config is None:
            raise errors.not_found(f"no function named {function_name!r} is configured here"
                                   if function_name else "no function named in x-fc-function-name and no "
                                   "default_function configured")
        function = self.router.functions[config.name]
        if record is not None:
            record.function = config.name
        try:
            if content_length > config.max_body:
                raise errors.payload_too_large(config.name, config.max_body)
            body = await read_body(receive, config.max_body, config.name, connection_of(scope))
            result = await self.router.invoke(function, "invoke", request_id, headers, body, record)
        except InvocationError as exc:
            function.series.outcome[exc.outcome].inc()
            raise
        if not result.ok:
            function.series.outcome["error"].inc()
            error = result.error
            raise errors.handler_failed(error.error_type, error.error_message, error.stack_trace)
        function.series.outcome["success"].inc()
        if record is not None:
            record.status = 200
        response_headers = [(b"x-fc-request-id", rid), (b"content-length", str(len(result.body)).encode())]
        if result.content_type:
            response_headers.append((b"content-type", result.content_type.encode("latin-1")))
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        await send({"type": "http.response.body", "body": result.body})

    async def _http(self, scope: Scope, function_name: str | None, request_id: str, rid: bytes,
                    headers: list[Header], content_length: int, receive: Receive, send: Send,
                    record: AccessRecord | None = None) -> None:
        """An HTTP-trigger request, streamed both ways through a worker (``exchange.py``)."""
        config = self.router.config.function_for(function_name)
        if record is not None and config is not None:
            record.function = config.name
        if config is None or not config.serves_http:
            what = (f"function {config.name!r} is an event function (invoke it with POST /invoke)"
                    if config is not None else "no function serves HTTP requests here")
            raise errors.not_found(f"{what}: {scope['method']} {scope['path']}")
        function = self.router.functions[config.name]
        await TriggerExchange(self.router, function, scope, request_id, rid, headers, record).run(
            receive, send, content_length)

    async def _hook(self, kind: str, request_id: str, rid: bytes, send: Send) -> None:
        if kind == "initialize":
            failure = await self.lifecycle.initialize(request_id)
            if failure is not None:
                raise failure
        elif kind == "pre_freeze":
            await self.lifecycle.pre_freeze(request_id)
        else:
            await self.lifecycle.pre_stop(request_id)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-fc-request-id", rid), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def _send_error(self, send: Send, exc: InvocationError, rid: bytes, request_id: str,
                          function: str | None) -> None:
        payload: dict[str, Any] = {"errorType": exc.error_type, "errorMessage": exc.message}
        if exc.stack_trace:
            payload["stackTrace"] = exc.stack_trace.rstrip("\n").split("\n")
        body = orjson.dumps(payload)
        headers = [(b"x-fc-request-id", rid), (b"x-fc-status", b"404"), (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), *exc.headers]
        if exc.retry_after is not None:
            headers.append((b"retry-after", str(exc.retry_after).encode()))
        if exc.status >= 500 and exc.status != 503:
            log.warning("invocation failed", request_id=request_id, function=function, status=exc.status,
                        error_type=exc.error_type, error_message=exc.message)
        try:
            await send({"type": "http.response.start", "status": exc.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        except Exception:  # the client left; nothing more to do
            return


def connection_of(scope: Scope) -> ClientConnection | None:
    extensions = scope.get("extensions") or {}
    connection: ClientConnection | None = extensions.get("ca.connection")
    return connection


async def read_body(receive: Receive, limit: int, function: str, connection: ClientConnection | None = None) -> bytes:
    """The whole request body, refusing it as soon as it passes ``limit`` or stalls."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > limit:
            raise errors.payload_too_large(function, limit)
        return body
    chunks = [body]
    size = len(body)
    while True:
        if connection is not None and connection.stalled:
            raise errors.body_stalled(function, connection.body_timeout_s)
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise errors.payload_too_large(function, limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def flush_stdio() -> None:
    """Everything this process logged reaches stdout (pre-freeze, pre-stop, exit)."""
    access.flush()
    flush_shared(2.0)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass

