"""An HTTP-trigger request, streamed between the client and a worker.

The front hands every request that is not ``/invoke`` or a lifecycle hook to
a ``TriggerExchange`` when its function serves HTTP (an ASGI or WSGI app, or
a custom runtime's server). The exchange opens a stream on a worker
(``Router.open_http``) and moves bytes both ways as they come (frames and
flow control in ``calink.frames``).

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
  (504 on timeout, 502 when the worker dies or the application's response
  head is invalid, 404 when the application raised). After it has started
  the status is gone: the connection is cut mid-response, which a client sees
  as a truncated response.
- The application's head is checked before anything is written: a status of
  200-599, header names that are tokens, values without control characters,
  one numeric Content-Length (dropped on 204 and 304, whose bodies are
  dropped too). Its ``x-fc-request-id`` is replaced by the request's.
- A slow client is not the function's timeout: when the deadline passes
  while the front waits on the client (for body bytes, or for it to take the
  response), the request fails as the client's (408 before the response, a
  cut after), the worker is told to stop, and it is killed only if it does
  not end the stream within a grace period (``Router._timeout``).
- One task per exchange streams the request body; the client connection
  (``cahttp.server.ClientConnection``) reports the client leaving at once,
  whatever the exchange is waiting for. Either way the stream is cancelled,
  and the application's slot is freed when its worker ends the stream (or is
  killed), not before.
- Every exchange counts one outcome in ``supervisor_invocations_total``:
  ``cancelled`` when the client left or was too slow; its access record
  (``access.py``) gets the same outcome, the status sent and, for a
  response cut after it started, the cause's error type.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from calink import frames
from calink.messages import Header, HttpRequest, HttpResponseStart, Result
from supervisor.data import errors
from supervisor.data.errors import InvocationError
from supervisor.logs import get_logger

if TYPE_CHECKING:
    from cahttp.server import ClientConnection
    from supervisor.data.access import AccessRecord
    from supervisor.data.links import HttpCall
    from supervisor.data.router import FunctionState, Router

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

log = get_logger()

# Headers about one connection, not the message: the front's server sets its own.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection", "te",
                        "trailer"})
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.1
BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
DIGITS = re.compile(r"[0-9]{1,19}")
BODILESS = frozenset({204, 304})


class ClientGone(Exception):
    """The client disconnected; there is nobody to answer."""


def client_head(head: HttpResponseStart, rid: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The application's status and headers as the client gets them; raises ``InvocationError`` (502)."""
    status = head.status
    if not 200 <= status <= 599:
        raise errors.invalid_response(f"status {status} (200-599 expected)")
    headers: list[tuple[bytes, bytes]] = []
    length: str | None = None
    for name, given in head.headers:
        value = given
        lower = name.lower()
        if lower in HOP_BY_HOP or lower == "x-fc-request-id":
            continue
        if not TOKEN.fullmatch(name) or BAD_VALUE.search(value):
            raise errors.invalid_response(f"header {name!r} is not a valid HTTP header")
        if lower == "content-length":
            value = value.strip(" \t")
            if not DIGITS.fullmatch(value) or (length is not None and value != length):
                raise errors.invalid_response(f"Content-Length {given!r}")
            if length is not None or status in BODILESS:
                length = value
                continue
            length = value
        try:
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
        except UnicodeEncodeError:
            raise errors.invalid_response(f"header {name!r} is not latin-1 text") from None
    headers.append((b"x-fc-request-id", rid))
    return status, headers


class TriggerExchange:
    __slots__ = ("router", "function", "scope", "request_id", "rid", "headers", "call", "started", "outcome",
                 "connection", "record")

    def __init__(self, router: Router, function: FunctionState, scope: Scope, request_id: str, rid: bytes,
                 headers: list[Header], record: AccessRecord | None = None) -> None:
        self.router = router
        self.function = function
        self.scope = scope
        self.request_id = request_id
        self.rid = rid
        self.headers = headers
        self.call: HttpCall | None = None
        self.started = False  # the response head has been sent to the client
        self.outcome = "crashed"  # what the exchange counts as when it ends without raising
        extensions = scope.get("extensions") or {}
        self.connection: ClientConnection | None = extensions.get("ca.connection")
        self.record = record

    async def run(self, receive: Receive, send: Send, content_length: int) -> None:
        """Serves the request; raises the contract's error while no response has started."""
        outcome = "crashed"
        connection = self.connection
        if connection is not None:
            connection.listener = self._client_gone
        try:
            await self._run(receive, send, content_length)
            outcome = self.outcome
        except InvocationError as exc:
            outcome = exc.outcome
            raise
        except ClientGone:
            outcome = "cancelled"
            raise
        finally:
            if connection is not None and connection.listener == self._client_gone:
                connection.listener = None
            call = self.call
            if call is not None:
                call.cancel()  # the exchange ended first (no-op once the stream has): the worker stops
                call.on_failure = None
            self.function.series.outcome[outcome].inc()
            if self.record is not None:
                self.record.outcome = outcome

    async def _run(self, receive: Receive, send: Send, content_length: int) -> None:
        config = self.function.config
        if content_length > config.max_body:
            raise errors.payload_too_large(config.name, config.max_body)
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if more and self.connection is not None and self.connection.stalled:
            raise errors.body_stalled(config.name, self.connection.body_timeout_s)
        if len(body) > config.max_body:
            raise errors.payload_too_large(config.name, config.max_body)
        first, rest = body[:frames.MAX_CHUNK], body[frames.MAX_CHUNK:]
        scope = self.scope
        client = scope.get("client") or ("", 0)
        request = HttpRequest(
            request_id=self.request_id, method=scope["method"],
            raw_path=scope.get("raw_path") or scope["path"].encode("utf-8"), query=scope.get("query_string", b""),
            headers=self.headers, body=first, more_body=more or bool(rest),
            http_version=scope.get("http_version", "1.1"), scheme=scope.get("scheme", "http"),
            client_host=client[0] or "", client_port=client[1] or 0)
        call = self.call = await self.router.open_http(self.function, request, self.record)
        call.on_failure = self._on_failure
        pump = asyncio.ensure_future(self._pump(call, receive, rest, more, len(body), request.more_body))
        try:
            await self._respond(call, send)
        finally:
            if not pump.done():
                pump.cancel()

    def _client_gone(self) -> None:
        if self.call is not None:
            self.call.fail(ClientGone())

    def _on_failure(self, failure: Exception) -> None:
        # The respond loop may be blocked writing to the client: cut the connection
        # now. Before the response started it is woken and answers the error.
        if self.started and not isinstance(failure, ClientGone) and self.connection is not None:
            self.connection.abort()

    async def _respond(self, call: HttpCall, send: Send) -> None:
        while not call.head.done() and call.failure is None:
            await call.wait()
        if call.failure is not None:
            raise call.failure
        head = call.head.result()
        if head is None:  # the stream ended without a response: an error answer
            result = Result.decode(call.future.result())  # raises the timeout's or crash's error
            error = result.error
            if result.ok:
                raise errors.handler_failed("IncompleteResponseError", "the application sent no response", "")
            raise errors.handler_failed(error.error_type, error.error_message, error.stack_trace)
        status, headers = client_head(head, self.rid)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        self.started = True
        if self.record is not None:
            self.record.status = status
        keep_body = status not in BODILESS
        chunks = call.chunks
        while True:
            if call.failure is not None:  # nobody to send the rest to, or no right to
                return self._abort(call.failure)
            if chunks:
                chunk = chunks.popleft()
                if keep_body:
                    call.client_waits += 1
                    try:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    except RuntimeError as exc:  # the server refused it: more than the app's Content-Length
                        return self._abort(errors.invalid_response(str(exc)))
                    finally:
                        call.client_waits -= 1
                call.ack(len(chunk))
            elif call.future.done():
                break
            else:
                await call.wait()
        try:
            result = Result.decode(call.future.result())
        except InvocationError as exc:  # timed out or crashed mid-response
            return self._abort(exc)
        if call.failure is not None:
            return self._abort(call.failure)
        if not result.ok:
            return self._abort(InvocationError(502, result.error.error_type, result.error.error_message, "error"))
        try:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except RuntimeError as exc:  # less than the app's Content-Length
            return self._abort(errors.invalid_response(str(exc)))
        self.outcome = "success"

    def _abort(self, cause: Exception) -> None:
        """The response started and cannot end well: the connection is cut."""
        self.outcome = cause.outcome if isinstance(cause, InvocationError) else "cancelled"
        if self.record is not None and isinstance(cause, InvocationError):
            self.record.error_type = cause.error_type
        if self.call is not None:
            self.call.cancel()
        if self.connection is not None:
            self.connection.abort()
        if self.outcome != "cancelled":
            log.warning("HTTP response aborted after it started", request_id=self.request_id,
                        function=self.function.config.name, error=str(cause))

    async def _pump(self, call: HttpCall, receive: Receive, pending: bytes, more: bool, size: int,
                    announced_more: bool) -> None:
        """Streams the rest of the request body, then watches for the client leaving."""
        limit = self.function.config.max_body
        if not more and self.connection is not None:
            self.connection.body_read()
        while True:
            while pending:
                if call.future.done() or call.failure is not None:
                    return  # the application answered without reading it all, or the stream failed
                if call.credit <= 0:
                    await call.wait_credit()
                    continue
                take = min(len(pending), call.credit, frames.MAX_CHUNK)
                call.send_body(pending[:take])
                pending = pending[take:]
            if not more:
                break
            call.client_waits += 1
            try:
                message = await receive()
            finally:
                call.client_waits -= 1
            if message["type"] == "http.disconnect":
                return call.fail(ClientGone())
            pending = message.get("body", b"")
            more = message.get("more_body", False)
            if more and self.connection is not None and self.connection.stalled:
                return call.fail(errors.body_stalled(self.function.config.name, self.connection.body_timeout_s))
            if not more and self.connection is not None:
                self.connection.body_read()
            size += len(pending)
            if size > limit:
                return call.fail(errors.payload_too_large(self.function.config.name, limit))
        if announced_more and not call.future.done() and call.failure is None:
            call.end_body()
        # The server answers this once the response is complete or the client has gone.
        message = await receive()
        if message["type"] == "http.disconnect" and not call.future.done():
            call.fail(ClientGone())
