"""The data plane's end of a worker connection.

One ``WorkerLink`` per connected worker, an asyncio protocol (no stream
objects, no task per frame): frames are decoded in ``data_received`` and
handed to the router, results resolve the waiting invocation's future.

Rules:
- Until the worker has authenticated, the only frame accepted is HELLO and
  frames are capped at 64 KiB; anything else drops the connection.
- After authentication the frame cap is the function's ``max_body`` plus
  overhead: a worker cannot make the data plane buffer more than that.
- The peer's pid and uid come from SO_PEERCRED, never from what the worker says.
- FC's markers: every invocation and hook is told to the control plane
  (``supervisor.marks``) before its frame is queued, and its end once its
  future is done (result, timeout, loss); so is a worker's initializer,
  from WELCOME to READY (or INIT_ERROR, or the link's loss).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from calink import frames
from calink.messages import ErrorInfo, HttpRequest, HttpResponseStart, Invoke, WorkerHello, WorkerReject, WorkerWelcome
from supervisor import marks
from supervisor.data.dispatcher import Slotted, WorkerState

if TYPE_CHECKING:
    from supervisor.data.router import Router

PREAUTH_MAX_FRAME = 64 * 1024
STREAM_REPLIES = frozenset({frames.Kind.RESPONSE_START, frames.Kind.RESPONSE_BODY, frames.Kind.WINDOW})
_UCRED = struct.Struct("3i")


class Pending(NamedTuple):
    future: asyncio.Future[bytes]
    deadline: float  # awake-clock time
    request_id: str


class HttpCall:
    """The data plane's end of one HTTP-trigger stream (see ``calink.frames``).

    Like a ``Pending`` call, ``future`` gets the RESULT payload (or the
    timeout's or crash's exception) and ends the stream. ``head`` resolves
    with the response head, or with None when the stream ended without one.
    Response chunks wait in ``chunks`` until the front has written them to
    the client and acknowledged them (``ack``): at most ``STREAM_WINDOW``
    bytes, or the worker broke the protocol. ``credit`` is what the front may
    still send of the request body before the worker acknowledges it.

    ``failure`` is why the front gives the stream up before it ends (the
    client left, was too slow, sent too much); ``fail`` sets it, tells the
    worker (CANCEL) and wakes everyone waiting. ``client_waits`` counts the
    front's waits on the client (reading the body, writing the response): a
    deadline that passes during one is the client's slowness, not the
    function's (``Router._timeout``).
    """

    __slots__ = ("future", "deadline", "request_id", "head", "chunks", "buffered", "credit", "_waiter",
                 "_credit_waiter", "link", "stream", "failure", "cancelled", "client_waits", "on_failure")

    def __init__(self, link: WorkerLink, stream: int, deadline: float, request_id: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.link = link
        self.stream = stream
        self.future: asyncio.Future[bytes] = loop.create_future()
        self.deadline = deadline
        self.request_id = request_id
        self.head: asyncio.Future[HttpResponseStart | None] = loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.credit = frames.STREAM_WINDOW
        self._waiter: asyncio.Future[None] | None = None
        self._credit_waiter: asyncio.Future[None] | None = None
        self.failure: Exception | None = None
        self.cancelled = False
        self.client_waits = 0
        self.on_failure: Callable[[Exception], None] | None = None
        self.future.add_done_callback(self._ended)

    def _ended(self, future: asyncio.Future[bytes]) -> None:
        if not future.cancelled():
            future.exception()  # a timeout after the front gave up is nobody's to read
        if not self.head.done():
            self.head.set_result(None)
        self.wake()
        _resolve(self._credit_waiter)

    def wake(self) -> None:
        """Wakes ``wait`` (a response chunk, the head, the end, or the front's own news)."""
        _resolve(self._waiter)

    async def wait(self) -> None:
        """Until the response side changes (see ``wake``)."""
        self._waiter = self.future.get_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def wait_credit(self) -> None:
        """Until the worker acknowledges request body bytes, or the stream ends."""
        self._credit_waiter = self.future.get_loop().create_future()
        try:
            await self._credit_waiter
        finally:
            self._credit_waiter = None

    def on_frame(self, kind: int, payload: bytes) -> None:
        if kind == frames.Kind.RESPONSE_BODY:
            if not self.head.done() or self.head.result() is None:
                raise frames.ProtocolError(f"response body before its head on stream {self.stream}")
            self.buffered += len(payload)
            if self.buffered > frames.STREAM_WINDOW:
                raise frames.ProtocolError(f"response body overran the stream window on stream {self.stream}")
            self.chunks.append(payload)
            self.wake()
        elif kind == frames.Kind.RESPONSE_START:
            if self.head.done():
                raise frames.ProtocolError(f"a second response head on stream {self.stream}")
            self.head.set_result(HttpResponseStart.decode(payload))
            self.wake()
        else:  # WINDOW: the worker has taken request body bytes
            self.credit += frames.window_size(payload)
            if self.credit > frames.STREAM_WINDOW:
                raise frames.ProtocolError(f"window update beyond what was sent on stream {self.stream}")
            _resolve(self._credit_waiter)

    def ack(self, size: int) -> None:
        """``size`` bytes of response body have been written to the client."""
        self.buffered -= size
        self.link.send(frames.Kind.WINDOW, self.stream, frames.WINDOW_ACK.pack(size))

    def send_body(self, chunk: bytes) -> None:
        """A request body chunk (the caller keeps within ``credit`` and ``MAX_CHUNK``)."""
        self.credit -= len(chunk)
        self.link.send(frames.Kind.REQUEST_BODY, self.stream, chunk)

    def end_body(self) -> None:
        self.link.send(frames.Kind.REQUEST_END, self.stream)

    def cancel(self) -> None:
        """The worker stops (and still ends the stream with RESULT); sent once."""
        if not self.future.done() and not self.cancelled:
            self.cancelled = True
            self.link.send(frames.Kind.CANCEL, self.stream)

    def fail(self, failure: Exception) -> None:
        """The front gives the stream up (the first reason counts)."""
        if self.failure is not None:
            return
        self.failure = failure
        self.cancel()
        self.wake()
        _resolve(self._credit_waiter)
        if self.on_failure is not None:
            self.on_failure(failure)


def _resolve(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class WorkerLink(Slotted, asyncio.Protocol):
    __slots__ = ("router", "transport", "decoder", "pending", "next_stream", "peer_pid", "peer_uid",
                 "authenticated", "mode", "writer", "max_requests", "due_sent", "completed")

    def __init__(self, router: Router) -> None:
        Slotted.__init__(self, "", "")
        self.router = router
        self.transport: asyncio.Transport | None = None
        self.decoder = frames.FrameDecoder(PREAUTH_MAX_FRAME)
        self.pending: dict[int, Pending | HttpCall] = {}
        self.next_stream = 1
        self.peer_pid = 0
        self.peer_uid = -1
        self.authenticated = False
        self.mode = ""
        self.writer = frames.FrameWriter()
        self.max_requests = 0  # report WorkerDue once it has served this many (0: never)
        self.due_sent = False
        self.completed = 0  # invocations it answered (a RESULT) on this connection

    # ---- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        self.writer.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            self.peer_pid, self.peer_uid, _ = _UCRED.unpack(creds)

    def data_received(self, data: bytes) -> None:
        try:
            for kind, stream, payload in self.decoder.feed(data):
                if kind == frames.Kind.RESULT:
                    call = self.pending.pop(stream, None)
                    if call is not None:
                        self.completed += 1
                        if not call.future.done():
                            call.future.set_result(payload)
                elif not self.authenticated:
                    if kind != frames.Kind.HELLO or self.worker_id:
                        raise frames.ProtocolError(f"frame kind {kind} before authentication")
                    self.worker_id = "?"  # one HELLO per connection
                    self.router.on_hello(self, WorkerHello.decode(payload))
                elif kind in STREAM_REPLIES:
                    call = self.pending.get(stream)
                    if isinstance(call, HttpCall):
                        call.on_frame(kind, payload)
                    # else: the stream has ended (timed out, say); its late frames mean nothing
                elif kind == frames.Kind.READY:
                    self._initialized()
                    self.router.on_ready(self)
                elif kind == frames.Kind.DRAINING:
                    self._initialized()
                    self.router.on_draining(self)
                elif kind == frames.Kind.INIT_ERROR:
                    self._initialized()
                    self.router.on_init_error(self, ErrorInfo.decode(payload))
                else:
                    raise frames.ProtocolError(f"unexpected frame kind {kind}")
        except (frames.ProtocolError, ValueError) as exc:
            self.router.on_protocol_error(self, str(exc))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.authenticated:
            self._initialized()
        self.router.on_lost(self)

    # ---- commands --------------------------------------------------------

    def accept(self, worker_id: str, function: str, max_frame: int, next_token: bytes) -> None:
        self.worker_id = worker_id
        self.function = function
        self.authenticated = True
        self.decoder = frames.FrameDecoder(max_frame)
        # FC's markers: the worker runs its initializer after WELCOME, until READY
        # (see supervisor.marks; on a reconnect it does not, and none are shown).
        state = self.router.functions.get(function)
        writer = marks.use(self.router.config.supervisor.run_dir)
        if state is not None and state.config.has_hook("initialize"):
            writer.start(worker_id, "initialize", f"init-{worker_id}")
        self.send(frames.Kind.WELCOME, 0, WorkerWelcome(next_token=next_token).encode())

    def reject(self, reason: str) -> None:
        self.send(frames.Kind.REJECT, 0, WorkerReject(reason=reason).encode())
        self.writer.flush()
        self.close()

    def usable(self) -> bool:
        """Connected and not gone: a frame sent now can reach the worker."""
        transport = self.transport
        return self.state != WorkerState.GONE and transport is not None and not transport.is_closing()

    def _stream_id(self) -> int:
        stream = self.next_stream
        self.next_stream = stream + 1 if stream < 0xFFFFFFFF else 1
        return stream

    def call(self, message: Invoke, deadline: float, loop: asyncio.AbstractEventLoop) -> asyncio.Future[bytes]:
        """Sends an invocation; the future gets the RESULT payload."""
        stream = self._stream_id()
        future: asyncio.Future[bytes] = loop.create_future()
        self.pending[stream] = Pending(future, deadline, message.request_id)
        _mark(self.worker_id, message.kind, message.request_id, future)
        self.send(frames.Kind.INVOKE, stream, message.encode())
        return future

    def open_stream(self, request: HttpRequest, deadline: float, loop: asyncio.AbstractEventLoop) -> HttpCall:
        """Sends an HTTP-trigger request (with its first body chunk)."""
        call = HttpCall(self, self._stream_id(), deadline, request.request_id, loop)
        call.credit -= len(request.body)
        self.pending[call.stream] = call
        _mark(self.worker_id, "invoke", request.request_id, call.future)
        self.send(frames.Kind.HTTP_REQUEST, call.stream, request.encode())
        return call

    def send(self, kind: frames.Kind, stream: int, payload: bytes = b"") -> None:
        self.writer.send(kind, stream, payload)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _initialized(self) -> None:
        """Its initializer is over (READY, INIT_ERROR, or the link is gone)."""
        writer = marks.writer()
        if writer is not None:
            writer.end(self.worker_id, f"init-{self.worker_id}")


def _mark(worker_id: str, kind: str, request_id: str, future: asyncio.Future[bytes]) -> None:
    """Tells the control plane, for FC's markers, that ``request_id`` is sent to
    the worker now (before its frame is queued) and when it is over."""
    writer = marks.writer()
    if writer is not None:
        writer.start(worker_id, kind, request_id)
        future.add_done_callback(functools.partial(_marked_over, writer, worker_id, request_id))


def _marked_over(writer: marks.MarkWriter, worker_id: str, request_id: str, _future: object) -> None:
    writer.end(worker_id, request_id)
