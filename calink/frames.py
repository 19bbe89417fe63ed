"""The worker link's frame format, shared by the data plane and the workers.

A frame is a 9-byte header followed by its payload::

    uint32 payload length (big-endian) | uint8 kind | uint32 stream id

The payload of each kind is one message of ``calink.messages``, raw body
bytes, a ``WINDOW`` count, or nothing (see ``Kind``). Stream ids pair an
INVOKE with its RESULT; connection-level frames (HELLO, WELCOME, READY, ...)
use stream 0. The whole protocol: ``docs/worker-protocol.md``.

Rules:
- A decoder never buffers more than one frame of at most ``max_frame`` bytes
  plus one partial header: a peer announcing a larger frame is a protocol
  error (the connection is dropped), so a worker cannot make the data plane
  hold more than the function's ``max_body`` for it.
- Decoding does no I/O and knows nothing of sockets; the transports feed it.

Streams (HTTP-trigger requests): ``HTTP_REQUEST`` opens stream ``s`` with
the first body chunk; ``REQUEST_BODY``... ``REQUEST_END`` follow when the body
has more. The worker answers ``RESPONSE_START``, ``RESPONSE_BODY``... and
ends the stream with ``RESULT`` (``ok=false`` before ``RESPONSE_START`` is an
error answer; after it, an aborted response). Body chunks are at most
``MAX_CHUNK`` bytes. Flow control is per stream and per direction: a sender
has at most ``STREAM_WINDOW`` bytes of body that the receiver has not yet
consumed and acknowledged with ``WINDOW``, so neither side buffers more than
that for a stream, and a slow client holds back only its own stream. A peer
that overruns the window breaks the protocol.

Why not gRPC for this link: it is the request path, and a frame here costs
one ``struct`` encode and one ``write`` (see bench/RESULTS.md, "The worker
link's codecs"). The standard library only: a worker imports this before
the function's code, which may bring its own versions of anything else.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections.abc import Iterator
from typing import Any

HEADER = struct.Struct(">IBI")
HEADER_SIZE = HEADER.size
# Slack over the body limit for the message fields around the body.
FRAME_OVERHEAD = 64 * 1024
# Streams: the largest body chunk in one frame, and the unacknowledged bytes
# a sender may have outstanding on one stream.
MAX_CHUNK = 64 * 1024
# The largest response head (status and headers, encoded) a worker may send:
# well inside FRAME_OVERHEAD, whatever the function's max_body. Request heads
# are bounded at the front (``MAX_REQUEST_HEAD``), for the same reason.
MAX_RESPONSE_HEAD = 32 * 1024
STREAM_WINDOW = 256 * 1024
WINDOW_ACK = struct.Struct(">I")


class Kind(enum.IntEnum):
    HELLO = 1  # worker -> data plane: WorkerHello
    WELCOME = 2  # data plane -> worker: WorkerWelcome
    REJECT = 3  # data plane -> worker: WorkerReject, then close
    READY = 4  # worker -> data plane: initialized, takes work
    INIT_ERROR = 5  # worker -> data plane: ErrorInfo, then the worker exits
    INVOKE = 6  # data plane -> worker: Invoke
    RESULT = 7  # worker -> data plane: Result (ends a stream)
    DRAIN = 8  # data plane -> worker: finish in-flight work, then exit
    DRAINING = 9  # worker -> data plane: send me no more work
    # HTTP-trigger exchanges, streamed both ways (see "Streams" above).
    HTTP_REQUEST = 10  # data plane -> worker: HttpRequest (with the first body chunk)
    REQUEST_BODY = 11  # data plane -> worker: raw bytes of the request body
    REQUEST_END = 12  # data plane -> worker: the request body is complete
    RESPONSE_START = 13  # worker -> data plane: HttpResponseStart
    RESPONSE_BODY = 14  # worker -> data plane: raw bytes of the response body
    WINDOW = 15  # either way: uint32, bytes of body the sender of this frame has consumed
    CANCEL = 16  # data plane -> worker: the client is gone; stop, then still send RESULT


class ProtocolError(Exception):
    """The peer broke the frame format; the connection must be dropped."""


def window_size(payload: bytes) -> int:
    """The byte count of a WINDOW frame's payload."""
    if len(payload) != WINDOW_ACK.size:
        raise ProtocolError(f"a WINDOW frame of {len(payload)} bytes (4 expected)")
    return int(WINDOW_ACK.unpack(payload)[0])


def encode(kind: Kind | int, stream: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind, stream) + payload


class FrameDecoder:
    """Splits a byte stream into (kind, stream, payload) frames."""

    __slots__ = ("_buf", "_max_frame")

    def __init__(self, max_frame: int) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> Iterator[tuple[int, int, bytes]]:
        buf = self._buf
        if not buf and len(data) >= HEADER_SIZE:
            # Fast path: whole frames in one read, no copy into the buffer.
            length, kind, stream = HEADER.unpack_from(data)
            end = HEADER_SIZE + length
            if length > self._max_frame:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self._max_frame}")
            if len(data) == end:
                yield kind, stream, data[HEADER_SIZE:]
                return
        buf += data
        offset = 0
        size = len(buf)
        try:
            while size - offset >= HEADER_SIZE:
                length, kind, stream = HEADER.unpack_from(buf, offset)
                if length > self._max_frame:
                    raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self._max_frame}")
                end = offset + HEADER_SIZE + length
                if end > size:
                    break
                yield kind, stream, bytes(buf[offset + HEADER_SIZE : end])
                offset = end
        finally:
            del buf[:offset]


class FrameWriter:
    """Frames queued in one loop iteration leave in one ``write()``.

    On this path a write that wakes the other side costs more than anything
    else, so a peer with several invocations in flight gets them (or their
    results) in one wake-up. Frames written before ``transport`` is set, or
    after it closed, are dropped: the connection is gone.
    """

    __slots__ = ("transport", "_pending")

    def __init__(self) -> None:
        self.transport: Any = None  # an asyncio (or uvloop) transport
        self._pending: list[bytes] | None = None

    def send(self, kind: Kind | int, stream: int, payload: bytes = b"") -> None:
        frame = encode(kind, stream, payload)
        if self._pending is None:
            self._pending = [frame]
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            self._pending.append(frame)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        transport = self.transport
        if pending and transport is not None and not transport.is_closing():
            transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
