"""The data plane's end of a worker connection.

One ``WorkerLink`` per connected worker, an asyncio protocol (no stream
objects, no task per frame): frames are decoded in ``data_received`` and
handed to the router, results resolve the waiting invocation's future.

Rules:
- Until the worker has authenticated, the only frame accepted is HELLO and
  frames are capped at 64 KiB; anything else drops the connection.
- After authentication the frame cap is the function's ``max_body`` plus
  overhead: a worker cannot make the data plane buffer more than that.
- The peer's pid comes from SO_PEERCRED, never from what the worker says.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import TYPE_CHECKING, NamedTuple

from google.protobuf.message import DecodeError

from supervisor import wire
from supervisor.data.dispatcher import Slotted, WorkerState
from supervisor.v1 import worker_pb2 as wpb

if TYPE_CHECKING:
    from supervisor.data.router import Router

PREAUTH_MAX_FRAME = 64 * 1024
_UCRED = struct.Struct("3i")


class Pending(NamedTuple):
    future: asyncio.Future[bytes]
    deadline: float  # awake-clock time
    request_id: str


class WorkerLink(Slotted, asyncio.Protocol):
    __slots__ = ("router", "transport", "decoder", "pending", "next_stream", "peer_pid", "peer_uid",
                 "authenticated", "mode", "writer", "max_requests", "due_sent")

    def __init__(self, router: Router) -> None:
        Slotted.__init__(self, "", "")
        self.router = router
        self.transport: asyncio.Transport | None = None
        self.decoder = wire.FrameDecoder(PREAUTH_MAX_FRAME)
        self.pending: dict[int, Pending] = {}
        self.next_stream = 1
        self.peer_pid = 0
        self.peer_uid = -1
        self.authenticated = False
        self.mode = ""
        self.writer = wire.FrameWriter()
        self.max_requests = 0  # report WorkerDue once it has served this many (0: never)
        self.due_sent = False

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
                if kind == wire.Kind.RESULT:
                    call = self.pending.pop(stream, None)
                    if call is not None and not call.future.done():
                        call.future.set_result(payload)
                elif not self.authenticated:
                    if kind != wire.Kind.HELLO or self.worker_id:
                        raise wire.ProtocolError(f"frame kind {kind} before authentication")
                    self.worker_id = "?"  # one HELLO per connection
                    self.router.on_hello(self, wpb.WorkerHello.FromString(payload))
                elif kind == wire.Kind.READY:
                    self.router.on_ready(self)
                elif kind == wire.Kind.DRAINING:
                    self.router.on_draining(self)
                elif kind == wire.Kind.INIT_ERROR:
                    self.router.on_init_error(self, wpb.ErrorInfo.FromString(payload))
                else:
                    raise wire.ProtocolError(f"unexpected frame kind {kind}")
        except (wire.ProtocolError, ValueError, DecodeError) as exc:
            self.router.on_protocol_error(self, str(exc))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.router.on_lost(self)

    # ---- commands --------------------------------------------------------

    def accept(self, worker_id: str, function: str, max_frame: int, next_token: bytes) -> None:
        self.worker_id = worker_id
        self.function = function
        self.authenticated = True
        self.decoder = wire.FrameDecoder(max_frame)
        self.send(wire.Kind.WELCOME, 0, wpb.WorkerWelcome(next_token=next_token).SerializeToString())

    def reject(self, reason: str) -> None:
        self.send(wire.Kind.REJECT, 0, wpb.WorkerReject(reason=reason).SerializeToString())
        self.writer.flush()
        self.close()

    def usable(self) -> bool:
        """Connected and not gone: a frame sent now can reach the worker."""
        transport = self.transport
        return self.state != WorkerState.GONE and transport is not None and not transport.is_closing()

    def call(self, message: wpb.Invoke, deadline: float, loop: asyncio.AbstractEventLoop) -> asyncio.Future[bytes]:
        """Sends an invocation; the future gets the RESULT payload."""
        stream = self.next_stream
        self.next_stream = stream + 1 if stream < 0xFFFFFFFF else 1
        future: asyncio.Future[bytes] = loop.create_future()
        self.pending[stream] = Pending(future, deadline, message.request_id)
        self.send(wire.Kind.INVOKE, stream, message.SerializeToString())
        return future

    def send(self, kind: wire.Kind, stream: int, payload: bytes = b"") -> None:
        self.writer.send(kind, stream, payload)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
