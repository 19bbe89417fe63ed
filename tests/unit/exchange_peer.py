"""The data plane's end of one HTTP exchange, for testing hosts without the planes.

A ``Peer`` collects the frames a real ``worker.host.HttpExchange`` sends,
feeds it a request body within the stream window, and acknowledges response
bytes as a fast client would (``auto_ack``), so a host's flow control runs
exactly as it does behind the data plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from calink import frames
from calink.messages import HttpRequest, HttpResponseStart, Result
from worker.host import HttpExchange


class Peer:
    """Collects one exchange's frames and plays the data plane's part of flow control."""

    def __init__(self, deadline_s: float = 10.0, request_id: str = "req-http-1") -> None:
        self.deadline_s = deadline_s
        self.request_id = request_id
        self.frames: list[tuple[frames.Kind, bytes]] = []
        self.changed = asyncio.Event()
        self.exchange: HttpExchange | None = None
        self.auto_ack = True  # acknowledge response bytes as a fast client would
        self.sent_in = 0  # request-body bytes handed to the exchange
        self.acked_in = 0  # request-body bytes the worker acknowledged (WINDOW)
        self.max_outstanding = 0

    def send_frame(self, kind: frames.Kind, stream: int, payload: bytes) -> None:
        self.frames.append((frames.Kind(kind), payload))
        if kind == frames.Kind.WINDOW:
            self.acked_in += frames.WINDOW_ACK.unpack(payload)[0]
        elif kind == frames.Kind.RESPONSE_BODY and self.auto_ack:
            # Later, as the link would: never from inside the exchange's own send.
            asyncio.get_running_loop().call_soon(self.ack, len(payload))
        self.changed.set()

    def ack(self, size: int) -> None:
        assert self.exchange is not None
        if not self.exchange.finished:
            self.exchange.on_window(frames.WINDOW_ACK.pack(size))

    def open(self, method: str = "GET", path: bytes = b"/", query: bytes = b"",
             headers: list[tuple[str, str]] | None = None, body: bytes = b"", more_body: bool = False,
             request_id: str | None = None) -> HttpExchange:
        request = HttpRequest(
            request_id=request_id or self.request_id, method=method, raw_path=path, query=query,
            headers=list(headers or []), timeout_ms=10_000, body=body,
            more_body=more_body, http_version="1.1", scheme="http", client_host="10.0.0.7", client_port=40_000)
        self.exchange = HttpExchange(self.send_frame, 1, request)
        self.sent_in = len(body)
        return self.exchange

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        while not condition():
            self.changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    def has_room(self, size: int) -> bool:
        """Sending ``size`` more request bytes stays within the stream window."""
        return self.sent_in + size - self.acked_in <= frames.STREAM_WINDOW

    async def feed(self, data: bytes, before_end: Callable[[], Awaitable[Any]] | None = None) -> None:
        """The rest of the request body in MAX_CHUNK frames within the window, then its end."""
        assert self.exchange is not None
        for offset in range(0, len(data), frames.MAX_CHUNK):
            piece = data[offset : offset + frames.MAX_CHUNK]
            await self.until(functools.partial(self.has_room, len(piece)), "the worker to acknowledge request bytes")
            self.exchange.on_body(piece)
            self.sent_in += len(piece)
            self.max_outstanding = max(self.max_outstanding, self.sent_in - self.acked_in)
        if before_end is not None:
            await before_end()
        self.exchange.on_end()

    def has_body(self) -> bool:
        return any(kind == frames.Kind.RESPONSE_BODY for kind, _ in self.frames)

    def kinds(self) -> list[frames.Kind]:
        return [kind for kind, _ in self.frames if kind != frames.Kind.WINDOW]

    def head(self) -> HttpResponseStart | None:
        return next((HttpResponseStart.decode(p) for k, p in self.frames if k == frames.Kind.RESPONSE_START),
                    None)

    def header_pairs(self) -> list[tuple[str, str]]:
        head = self.head()
        assert head is not None
        return [(name.lower(), value) for name, value in head.headers]

    def body(self) -> bytes:
        return b"".join(p for k, p in self.frames if k == frames.Kind.RESPONSE_BODY)

    def result(self) -> Result | None:
        return next((Result.decode(p) for k, p in self.frames if k == frames.Kind.RESULT), None)

    def json(self) -> Any:
        return json.loads(self.body())
