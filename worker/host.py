"""What a worker hosts, and the worker's end of an HTTP-trigger stream.

A ``Host`` runs one function's code for ``worker.main``: Python handlers
(``worker.python``), an HTTP server in any language, or a runtime that pulls
events through the Lambda or SCF runtime API (``worker.runtimes``). The
worker owns the connection to the data plane; the host only turns
invocations, lifecycle hooks and HTTP exchanges into results.

An ``HttpExchange`` is one HTTP-trigger request streamed both ways (the
frames are described in ``calink.frames``). Its rules:

- The request body arrives in chunks; each chunk is acknowledged with a
  ``WINDOW`` frame when the host takes it (``receive``), so the data plane
  sends at most ``STREAM_WINDOW`` bytes ahead of what the application has
  read. A data plane that overruns the window breaks the protocol.
- The response is ``start`` (status and headers), ``send`` (body chunks,
  split at ``MAX_CHUNK``), then ``finish``. ``send`` waits while the data
  plane has ``STREAM_WINDOW`` bytes unacknowledged: a slow client slows the
  application, it never grows a buffer.
- ``finish(error)`` before ``start`` makes the data plane answer with the
  contract's error; after ``start`` it aborts the response.
- After ``CANCEL`` (the client went away), ``receive`` and ``send`` raise
  ``ClientDisconnected``; the host still calls ``finish``, which frees the
  worker's slot.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from calink import frames
from calink.messages import ErrorInfo, HttpRequest, HttpResponseStart, Result

SendFrame = Callable[[frames.Kind, int, bytes], None]


class ClientDisconnected(OSError):
    """The client of an HTTP exchange is gone (or the data plane gave up on it)."""


class InvalidResponseError(RuntimeError):
    """The function's response cannot be sent (a head over ``frames.MAX_RESPONSE_HEAD``)."""


class StartupError(Exception):
    """The function could not be started; ``info`` is what ``/initialize`` reports."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.info = ErrorInfo(error_type=error_type, error_message=message)


class Host(Protocol):
    """What ``worker.main`` needs from the code it hosts."""

    timeout_s: float

    async def start(self) -> None:
        """Loads the function (imports, or starts its process and waits until it
        is ready). Raises ``StartupError`` (or anything) when it cannot."""

    def has(self, kind: str) -> bool:
        """Whether the lifecycle hook ``kind`` ("initialize", "pre_freeze", "pre_stop") exists."""

    def runs_inline(self, kind: str) -> bool:
        """Whether ``kind`` may run synchronously on the loop (``run_inline``)."""

    def run_inline(self, kind: str, request_id: str, headers: Mapping[str, str], timeout_s: float,
                   body: bytes) -> Result: ...

    async def run(self, kind: str, request_id: str, headers: Mapping[str, str], timeout_s: float,
                  body: bytes) -> Result:
        """An event invocation ("invoke") or a lifecycle hook, as a ``Result``."""

    def serves_http(self) -> bool:
        """Whether HTTP-trigger requests can be served (``http``)."""

    async def http(self, exchange: HttpExchange) -> None:
        """Serves one HTTP-trigger request; the worker calls ``exchange.finish``
        if the host has not (with the exception, when it raised)."""

    def exited(self) -> asyncio.Future[int] | None:
        """For a host with a process of its own: resolves with its exit status
        when that process ends (the worker then ends too). None otherwise."""

    async def close(self) -> None:
        """Stops what the host started (the worker is exiting)."""


class HttpExchange:
    """The worker's end of one HTTP-trigger stream (see the module docstring)."""

    __slots__ = ("request", "stream", "_send_frame", "_chunks", "_unacked_in", "_body_done", "_cancelled",
                 "_receiving", "_credit", "_credit_waiter", "started", "finished", "_loop")

    def __init__(self, send_frame: SendFrame, stream: int, request: HttpRequest) -> None:
        self.request = request
        self.stream = stream
        self._send_frame = send_frame
        self._chunks: deque[bytes] = deque()
        self._unacked_in = 0
        self._body_done = not request.more_body
        self._cancelled = False
        self._receiving: asyncio.Future[None] | None = None
        self._credit = frames.STREAM_WINDOW
        self._credit_waiter: asyncio.Future[None] | None = None
        self.started = False
        self.finished = False
        self._loop = asyncio.get_running_loop()
        if request.body:
            self.on_body(request.body)

    # ---- frames from the data plane (called by the worker) ----------------

    def on_body(self, chunk: bytes) -> None:
        self._unacked_in += len(chunk)
        if self._unacked_in > frames.STREAM_WINDOW:
            raise frames.ProtocolError(f"request body overran the stream window on stream {self.stream}")
        if chunk:
            self._chunks.append(chunk)
        self._wake_receiver()

    def on_end(self) -> None:
        self._body_done = True
        self._wake_receiver()

    def on_window(self, payload: bytes) -> None:
        self._credit += frames.window_size(payload)
        if self._credit > frames.STREAM_WINDOW:
            raise frames.ProtocolError(f"window update beyond what was sent on stream {self.stream}")
        waiter = self._credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_cancel(self) -> None:
        self._cancelled = True
        self._wake_receiver()
        waiter = self._credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_receiver(self) -> None:
        waiter = self._receiving
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- the request (for hosts) -------------------------------------------

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def body_complete(self) -> bool:
        """Every chunk of the request body has been taken by ``receive``."""
        return self._body_done and not self._chunks

    async def receive(self) -> tuple[bytes, bool]:
        """The next chunk of the request body and whether more follows.

        At the end it returns ``(b"", False)`` (again on every later call).
        Raises ``ClientDisconnected`` once the exchange is cancelled.
        """
        while True:
            if self._cancelled:
                raise ClientDisconnected("the client disconnected")
            if self._chunks:
                chunk = self._chunks.popleft()
                self._unacked_in -= len(chunk)
                self._send_frame(frames.Kind.WINDOW, self.stream, frames.WINDOW_ACK.pack(len(chunk)))
                return chunk, not self.body_complete
            if self._body_done:
                return b"", False
            self._receiving = self._loop.create_future()
            try:
                await self._receiving
            finally:
                self._receiving = None

    async def wait_cancelled(self) -> None:
        """Returns once the client is gone (ASGI's ``http.disconnect``)."""
        while not self._cancelled:
            self._receiving = self._loop.create_future()
            try:
                await self._receiving
            finally:
                self._receiving = None

    # ---- the response (for hosts) ------------------------------------------

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Sends the response head. Header names and values are latin-1 text.

        Raises ``InvalidResponseError`` (nothing sent) for a head too large for
        one frame, which would otherwise break the link for every stream on it.
        """
        if self.started or self.finished:
            raise RuntimeError("the response has already started")
        if self._cancelled:
            raise ClientDisconnected("the client disconnected")
        head = HttpResponseStart(status=status, headers=headers).encode()
        size = len(head)
        if size > frames.MAX_RESPONSE_HEAD:
            raise InvalidResponseError(f"the response head is {size} bytes; at most {frames.MAX_RESPONSE_HEAD} "
                                       "can be sent")
        self.started = True
        self._send_frame(frames.Kind.RESPONSE_START, self.stream, head)

    async def send(self, data: bytes) -> None:
        """Sends body bytes, waiting for the window; the response must have started."""
        if not self.started or self.finished:
            raise RuntimeError("send() outside a started response")
        view = memoryview(data)
        while view:
            if self._cancelled:
                raise ClientDisconnected("the client disconnected")
            if self._credit <= 0:
                self._credit_waiter = self._loop.create_future()
                try:
                    await self._credit_waiter
                finally:
                    self._credit_waiter = None
                continue
            size = min(len(view), self._credit, frames.MAX_CHUNK)
            self._credit -= size
            self._send_frame(frames.Kind.RESPONSE_BODY, self.stream, bytes(view[:size]))
            view = view[size:]

    def finish(self, error: ErrorInfo | None = None) -> None:
        """Ends the exchange: the response is complete, or failed with ``error``."""
        if self.finished:
            return
        self.finished = True
        result = Result(ok=True) if error is None else Result(ok=False, error=error)
        self._send_frame(frames.Kind.RESULT, self.stream, result.encode())


def header_pairs(headers: Any) -> list[tuple[str, str]]:
    """``(name, value)`` byte or text pairs as the latin-1 text pairs of the frames."""
    pairs = []
    for name, value in headers:
        pairs.append((name.decode("latin-1") if isinstance(name, (bytes, bytearray)) else str(name),
                      value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)))
    return pairs
