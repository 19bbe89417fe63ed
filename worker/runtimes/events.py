"""What the Lambda and SCF runtime APIs share: the event queue and small HTTP helpers.

``EventQueue`` is the bookkeeping between invocations and the runtime, and
does no I/O. An event is *pending* until a poller takes it, then *in
flight* until the runtime answers it (or the host closes). A poller that
leaves before it was told about its event gives the event back, at the head
of the queue. Request ids are unique among pending and in-flight events
(they pair answers with events); a duplicate is refused at once.

The helpers serve a raw ASGI app (``lambda_api``, ``scf_api``) on uvicorn's
httptools protocol. Request bodies posted by the runtime are read at most
``max_body`` bytes deep: a larger one is refused with 413 as soon as it is
known (from Content-Length, or while reading), never buffered whole.

JSON is the standard library's (the worker imports nothing else before the
function), read as strictly as the runtimes' own clients write it:
``json_loads`` takes UTF-8 only, refuses ``NaN``/``Infinity`` and nesting
deep enough to exhaust the stack (``ValueError`` for all of them, never
``RecursionError``); ``json_dumps`` writes compact UTF-8.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from calink.messages import ErrorInfo, Result

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

TOO_LARGE_TYPE = "ResultTooLargeError"  # the Python host's name for the same failure


class ClientGone(Exception):
    """The runtime closed its connection before the exchange was complete."""


class QueueClosed(Exception):
    """The host is closing: a poller is told to exit instead of given an event."""


# ---- events ------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Event:
    """One invocation as the runtime sees it."""

    request_id: str
    body: bytes
    headers: Mapping[str, str]  # the invocation's request headers (lower-case names)
    timeout_s: float
    deadline_ms: int  # epoch milliseconds: what runtimes are told (they compare with wall time)
    result: asyncio.Future[Result] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class EventQueue:
    """Invocations waiting for the runtime, and those it has taken (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: deque[Event] = deque()
        self._pollers: deque[asyncio.Future[Event]] = deque()
        self.in_flight: dict[str, Event] = {}
        # Every event not yet answered (pending, handed to a poller, in flight) by request id.
        self._ids: dict[str, Event] = {}
        self._closed: ErrorInfo | None = None

    def put(self, event: Event) -> None:
        """Queues an invocation; its ``result`` resolves when the runtime answers."""
        if self._closed is not None:
            event.result.set_result(Result(ok=False, error=self._closed))
            return
        if event.request_id in self._ids:
            event.result.set_result(Result(ok=False, error=ErrorInfo(
                error_type="DuplicateRequestIdError",
                error_message=f"request id {event.request_id!r} is already in flight on this worker; "
                              "the runtime pairs answers with events by id, so ids must be unique")))
            return
        self._ids[event.request_id] = event
        self._pending.append(event)
        self._dispatch()

    def poll(self) -> asyncio.Future[Event]:
        """A future for the next event (already resolved when one is pending;
        already cancelled when the queue is closed).

        Cancelling it withdraws the poller. The event it yields is not yet in
        flight: the caller either ``take``s it or ``give_back``s it.
        """
        waiter: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        if self._closed is not None:
            waiter.cancel()
            return waiter
        waiter.add_done_callback(self._forget_poller)
        self._pollers.append(waiter)
        self._dispatch()
        return waiter

    def _forget_poller(self, waiter: asyncio.Future[Event]) -> None:
        # A poller that gave up leaves at once: a runtime polling with a timeout
        # in a loop must not grow the queue of pollers while no event comes.
        if waiter.cancelled():
            try:
                self._pollers.remove(waiter)
            except ValueError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def waiting(self) -> int:
        """How many pollers are waiting for an event now."""
        return sum(1 for waiter in self._pollers if not waiter.done())

    def take(self, event: Event) -> None:
        """The runtime is being told about ``event``: it is in flight until answered."""
        if not event.result.done():
            self.in_flight[event.request_id] = event

    def give_back(self, event: Event) -> None:
        """A poller left before it was told about ``event``: the next poller gets it."""
        if not event.result.done():
            self._pending.appendleft(event)
            self._dispatch()

    def answer(self, request_id: str, result: Result) -> bool:
        """Completes the in-flight event ``request_id``; False when there is none."""
        event = self.in_flight.pop(request_id, None)
        if event is None:
            return False
        del self._ids[request_id]
        if not event.result.done():
            event.result.set_result(result)
        return True

    def withdraw(self, event: Event) -> None:
        """Forgets ``event`` wherever it still is (its invocation ended or was cancelled).

        Only this very event: a refused duplicate must not remove the
        original that holds the same id.
        """
        if self._ids.get(event.request_id) is not event:
            return
        del self._ids[event.request_id]
        if self.in_flight.get(event.request_id) is event:
            del self.in_flight[event.request_id]
        else:
            try:
                self._pending.remove(event)
            except ValueError:
                pass

    def close(self, error: ErrorInfo) -> None:
        """Fails every pending and in-flight event, and every later ``put``."""
        self._closed = error
        # Every event it knows, including one handed to a poller and not yet taken.
        for event in self._ids.values():
            if not event.result.done():
                event.result.set_result(Result(ok=False, error=error))
        self._pending.clear()
        self.in_flight.clear()
        self._ids.clear()
        for waiter in self._pollers:
            waiter.cancel()
        self._pollers.clear()

    def _dispatch(self) -> None:
        while self._pending and self._pollers:
            waiter = self._pollers.popleft()
            if waiter.done():  # its poller left (cancelled)
                continue
            event = self._pending.popleft()
            if event.result.done():  # withdrawn or closed meanwhile
                continue
            waiter.set_result(event)


# ---- the HTTP plumbing both runtime APIs share --------------------------------------------


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower-case bytes), as text."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The request body, or None once it is known to exceed ``limit`` bytes.

    Raises ``ClientGone`` if the connection drops before the body is complete.
    """
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def respond(send: Send, status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Sends a whole response.

    The connection stays open even when the request body was left unread: the
    server discards the rest as it arrives. Closing instead would make the
    kernel reset the connection (unread data), which can destroy the answer
    before a client still sending its body has read it.
    """
    head = [(b"content-length", str(len(body)).encode())]
    if headers:
        head.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_loads(data: bytes | str) -> Any:
    """A JSON document (see the module docstring); ``ValueError`` when ``data`` is none."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def json_dumps(document: Any, ascii_only: bool = False) -> bytes:
    """Compact JSON, UTF-8 (or ASCII with ``\\u`` escapes when ``ascii_only``)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=ascii_only, allow_nan=False).encode()


async def respond_json(send: Send, status: int, document: Mapping[str, str]) -> None:
    await respond(send, status, json_dumps(document), [(b"content-type", b"application/json")])


async def respond_closing(send: Send) -> None:
    """The answer to a poll when the host is closing: exit now."""
    await respond_json(send, 500, {"errorType": "Runtime.ExitError",
                                   "errorMessage": "the worker is stopping; the runtime must exit"})


async def await_event(queue: EventQueue, receive: Receive) -> Event | None:
    """Waits for the next event on behalf of a ``GET .../next`` long poll.

    Returns the event, now in flight, or None when the poller hung up first
    (an event it had been given goes back to the queue). Raises
    ``QueueClosed`` when the host closes the queue meanwhile.
    """
    await receive()  # the (empty) request body; from now on receive() only reports a disconnect
    waiter = queue.poll()
    if not waiter.done():
        hangup = asyncio.ensure_future(receive())
        try:
            await asyncio.wait((waiter, hangup), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            if not waiter.done():
                waiter.cancel()  # the poller left (or the server is shutting down)
        if hangup.done() and not hangup.cancelled() and not waiter.cancelled():
            queue.give_back(waiter.result())  # it hung up as the event came: the next poller gets it
            return None
    if waiter.cancelled():
        if queue.closed:
            raise QueueClosed
        return None
    event = waiter.result()
    queue.take(event)
    return event


def error_info_from_body(body: bytes, header_type: str | None, fallback_type: str) -> ErrorInfo:
    """An ``ErrorInfo`` from an error report: AWS's JSON shape
    (``errorType``, ``errorMessage``, ``stackTrace`` as a list of lines or a
    string) when the body has it, else the body as the message."""
    document: Any = None
    if body[:1] == b"{":
        try:
            document = json_loads(body)
        except ValueError:
            document = None
    if isinstance(document, dict):
        error_type = document.get("errorType")
        message = document.get("errorMessage")
        trace = document.get("stackTrace")
        if isinstance(trace, list):
            lines = [str(line) for line in trace]
            trace = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
        return ErrorInfo(
            error_type=error_type if isinstance(error_type, str) and error_type else header_type or fallback_type,
            error_message=message if isinstance(message, str) else "",
            stack_trace=trace if isinstance(trace, str) else "")
    return ErrorInfo(error_type=header_type or fallback_type,
                     error_message=body.decode("utf-8", "replace").strip())


def too_large(request_id: str, what: str, limit: int) -> Result:
    """The result of an invocation whose answer the runtime API refused with 413."""
    return Result(ok=False, error=ErrorInfo(
        error_type=TOO_LARGE_TYPE,
        error_message=f"the runtime's {what} for request {request_id} is larger than max_body ({limit} bytes)"))
