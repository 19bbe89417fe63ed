"""An HTTP-trigger request, streamed between the client and a worker.

The front hands every request that is not ``/invoke`` or a lifecycle hook to
a ``TriggerExchange`` when its function serves HTTP (an ASGI or WSGI app, or
a custom runtime's server). The exchange opens a stream on a worker
(``Router.open_http``) and moves bytes both ways as they come (frames and
flow control in ``supervisor.wire``).

Rules:
- Nothing is buffered whole. The request body goes to the worker as the
  client sends it, never more than ``STREAM_WINDOW`` bytes ahead of what the
  application has read; response chunks are written to the client as they
  arrive and acknowledged only once written, so a slow client slows its own
  application and nothing else.
- ``max_body`` bounds the request body, from its Content-Length before
  anything is read (the front) or as soon as the count passes it: before the
  response has started that is the contract's 413; after, the connection is
  cut. Either way the worker is told (CANCEL).
- Until the response starts, every failure is the contract's JSON error
  (504 on timeout, 502 when the worker dies, 404 when the application
  raised). After it has started the status is gone: the connection is closed
  mid-response, which a client sees as a truncated response.
- One task per exchange reads the request body and then watches for the
  client leaving; a client that leaves cancels the stream, and the
  application's slot is freed when its worker ends the stream (or is killed
  at the timeout), not before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from supervisor import wire
from supervisor.data import errors
from supervisor.data.errors import InvocationError
from supervisor.logs import get_logger
from supervisor.v1 import worker_pb2 as wpb

if TYPE_CHECKING:
    from supervisor.data.links import HttpCall
    from supervisor.data.router import FunctionState, Router

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

log = get_logger()

# Headers about one connection, not the message: the front's server sets its own.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection", "te",
                        "trailer"})


class ClientGone(Exception):
    """The client disconnected; there is nobody to answer."""


class TriggerExchange:
    __slots__ = ("router", "function", "scope", "request_id", "rid", "headers", "failure", "call")

    def __init__(self, router: Router, function: FunctionState, scope: Scope, request_id: str, rid: bytes,
                 headers: list[wpb.Header]) -> None:
        self.router = router
        self.function = function
        self.scope = scope
        self.request_id = request_id
        self.rid = rid
        self.headers = headers
        # What the body pump found wrong (the client left, the body is too large).
        self.failure: Exception | None = None
        self.call: HttpCall | None = None

    async def run(self, receive: Receive, send: Send) -> None:
        config = self.function.config
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if len(body) > config.max_body:
            raise errors.payload_too_large(config.name, config.max_body)
        first, rest = body[:wire.MAX_CHUNK], body[wire.MAX_CHUNK:]
        scope = self.scope
        client = scope.get("client") or ("", 0)
        request = wpb.HttpRequest(
            request_id=self.request_id, method=scope["method"],
            raw_path=scope.get("raw_path") or scope["path"].encode("utf-8"), query=scope.get("query_string", b""),
            headers=self.headers, body=first, more_body=more or bool(rest),
            http_version=scope.get("http_version", "1.1"), scheme=scope.get("scheme", "http"),
            client_host=client[0] or "", client_port=client[1] or 0)
        call = self.call = await self.router.open_http(self.function, request)
        pump = asyncio.ensure_future(self._pump(call, receive, rest, more, len(body), request.more_body))
        try:
            await self._respond(call, send)
        finally:
            if not pump.done():
                pump.cancel()

    async def _respond(self, call: HttpCall, send: Send) -> None:
        while not call.head.done() and self.failure is None:
            await call.wait()
        if self.failure is not None:
            call.cancel()
            raise self.failure
        head = call.head.result()
        if head is None:  # the stream ended without a response: an error answer
            result = wpb.Result.FromString(call.future.result())  # raises the timeout's or crash's error
            error = result.error
            if result.ok:
                raise errors.handler_failed("IncompleteResponseError", "the application sent no response", "")
            raise errors.handler_failed(error.error_type, error.error_message, error.stack_trace)
        headers = [(h.name.encode("latin-1"), h.value.encode("latin-1")) for h in head.headers
                   if h.name.lower() not in HOP_BY_HOP]
        if not any(name.lower() == b"x-fc-request-id" for name, _ in headers):
            headers.append((b"x-fc-request-id", self.rid))
        await send({"type": "http.response.start", "status": head.status, "headers": headers})
        chunks = call.chunks
        while True:
            if self.failure is not None:  # nobody to send the rest to, or no right to
                call.cancel()
                self._aborted(self.failure)
                return
            if chunks:
                chunk = chunks.popleft()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                call.ack(len(chunk))
            elif call.future.done():
                break
            else:
                await call.wait()
        try:
            result = wpb.Result.FromString(call.future.result())
        except InvocationError as exc:  # timed out or crashed mid-response
            self.function.series.outcome[exc.outcome].inc()
            self._aborted(exc)
            return
        if not result.ok:
            self.function.series.outcome["error"].inc()
            self._aborted(InvocationError(502, result.error.error_type, result.error.error_message, "error"))
            return
        self.function.series.outcome["success"].inc()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _aborted(self, cause: Exception) -> None:
        """The response started and cannot end well: the server cuts the connection."""
        if not isinstance(cause, ClientGone):
            log.warning("HTTP response aborted after it started", request_id=self.request_id,
                        function=self.function.config.name, error=str(cause))

    async def _pump(self, call: HttpCall, receive: Receive, pending: bytes, more: bool, size: int,
                    announced_more: bool) -> None:
        """Streams the rest of the request body, then watches for the client leaving."""
        limit = self.function.config.max_body
        while True:
            while pending:
                if call.future.done():
                    return  # the application answered without reading it all
                if call.credit <= 0:
                    await call.wait_credit()
                    continue
                take = min(len(pending), call.credit, wire.MAX_CHUNK)
                call.send_body(pending[:take])
                pending = pending[take:]
            if not more:
                break
            message = await receive()
            if message["type"] == "http.disconnect":
                return self._fail(call, ClientGone())
            pending = message.get("body", b"")
            more = message.get("more_body", False)
            size += len(pending)
            if size > limit:
                return self._fail(call, errors.payload_too_large(self.function.config.name, limit))
        if announced_more and not call.future.done():
            call.end_body()
        # The server answers this once the response is complete or the client has gone.
        message = await receive()
        if message["type"] == "http.disconnect" and not call.future.done():
            self._fail(call, ClientGone())

    def _fail(self, call: HttpCall, failure: Exception) -> None:
        self.failure = failure
        call.wake()
