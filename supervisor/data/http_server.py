"""uvicorn's httptools protocol serving a raw ASGI callable, on our own loop.

We use uvicorn's protocol and ``ServerState`` directly instead of
``uvicorn.Server.serve`` because the plane owns the event loop, the signals
and the shutdown order: ``Server.serve`` installs its own signal handlers.
Shutdown mirrors uvicorn's: stop accepting, ask every connection to finish
its current request, wait for the request tasks with a deadline.

Two things uvicorn does not do, added on its protocol:
- A request head (URL and headers) is at most ``MAX_REQUEST_HEAD`` bytes;
  a larger one is answered 414 or 431 and the connection closed, before the
  application sees it. uvicorn would buffer any size, and the head travels
  to a worker in one frame (``wire.FRAME_OVERHEAD`` leaves room for this
  much, so a client's headers can never break a worker's link).
- Each request's scope carries the client connection in
  ``scope["extensions"]["ca.connection"]`` (a ``ClientConnection``): the
  front can learn at once that the client left, and cut a response that
  cannot complete.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

# How long a cut connection may take to deliver what was already written.
CUT_GRACE_S = 1.0
# At shutdown, how long requests whose connection was cut get to end.
CUT_WAIT_S = 0.1


class CoalescingTransport:
    """A transport whose writes in one loop iteration leave in one ``write()``.

    uvicorn writes a response's status line and headers, then its body, as
    two writes: two syscalls, each able to wake the client. Here a write that
    wakes another process is the most expensive step of an invocation, so the
    writes are gathered and sent once, at the end of the current iteration.
    Everything else is the real transport's.
    """

    __slots__ = ("_transport", "_pending", "_loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._pending: list[bytes] | None = None
        self._loop = loop

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def cut(self) -> None:
        """Ends the connection: what was written still goes, for at most ``CUT_GRACE_S``;
        then it is reset (a client that does not read cannot hold it open)."""
        self.flush()
        transport = self._transport
        transport.close()
        if transport.get_write_buffer_size():
            self._loop.call_later(CUT_GRACE_S, transport.abort)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# The URL plus every header's name and value, each header counted with
# HEADER_COST more for its framing (on the wire and in the worker frame).
MAX_REQUEST_HEAD = 32 * 1024
HEADER_COST = 16


class ClientConnection:
    """The client connection a request came on, as the front sees it.

    ``listener`` (one at a time: HTTP/1.1 serves one request at a time per
    connection) is called once when the connection is lost.
    """

    __slots__ = ("_protocol", "listener")

    def __init__(self, protocol: CoalescingHttpToolsProtocol) -> None:
        self._protocol = protocol
        self.listener: Callable[[], None] | None = None

    def abort(self) -> None:
        """Cuts the connection now: the client sees the response truncated."""
        protocol = self._protocol
        if protocol.cycle is not None:
            # uvicorn: nothing more is sent, and the unfinished response is not an error to log.
            protocol.cycle.disconnected = True
        transport = protocol.transport
        if isinstance(transport, CoalescingTransport):
            transport.cut()
        else:
            transport.abort()

    def body_read(self) -> None:
        """The request body has been taken whole: read on, so that a departure is seen.

        uvicorn pauses reading while more than 64 KiB of body waits, and resumes
        only on the next ``receive()``: after a large last chunk, a client that
        leaves while the front waits on the worker would go unnoticed.
        """
        self._protocol.flow.resume_reading()

    def lost(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener()


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's protocol with coalesced writes, a bounded head and a ``ClientConnection``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.connection = ClientConnection(self)
        self.head_bytes = 0
        self.head_refused = 0  # the status a too-large head is answered with
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.connection.lost()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes = 0
        self.scope["extensions"] = {"ca.connection": self.connection}  # type: ignore[dict-item]  # ASGI types extensions as dicts

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url), 414)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + HEADER_COST, 431)
        super().on_header(name, value)

    def _count_head(self, size: int, status: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_REQUEST_HEAD:
            self.head_refused = status
            raise ValueError("request head too large")  # the parser stops; data_received answers

    def send_400_response(self, msg: str) -> None:
        if not self.head_refused:
            super().send_400_response(msg)
            return
        error_type, what = ((b"URITooLongError", "request URL") if self.head_refused == 414
                            else (b"RequestHeaderFieldsTooLargeError", "request head (URL and headers)"))
        body = orjson.dumps({"errorType": error_type.decode(),
                             "errorMessage": f"the {what} exceeds {MAX_REQUEST_HEAD} bytes"})
        self.transport.write(b"".join((
            b"HTTP/1.1 %d %s\r\n" % (self.head_refused, b"URI Too Long" if self.head_refused == 414
                                      else b"Request Header Fields Too Large"),
            b"x-fc-status: 404\r\ncontent-type: application/json\r\nconnection: close\r\n",
            b"content-length: %d\r\n\r\n" % len(body), body)))
        self.transport.close()


class HttpServer:
    """``sockets``: listening sockets handed over by the supervisor (``listeners.py``);
    without them the server binds ``host:port`` itself."""

    def __init__(self, app: Any, host: str, port: int, backlog: int = 2048,
                 sockets: list[socket.socket] | None = None) -> None:
        self.host = host
        self.port = port
        self.backlog = backlog
        self.sockets = sockets or []
        self.config = UvicornConfig(app=app, http="httptools", interface="asgi3", lifespan="off", access_log=False,
                                    log_config=None, proxy_headers=False, server_header=False,
                                    date_header=False, timeout_keep_alive=75)
        self.config.load()
        self.state = ServerState()
        self.servers: list[asyncio.Server] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> CoalescingHttpToolsProtocol:
            return CoalescingHttpToolsProtocol(config=self.config, server_state=self.state, app_state={}, _loop=loop)

        if self.sockets:
            for sock in self.sockets:
                self.servers.append(await loop.create_server(protocol, sock=sock, backlog=self.backlog))
        else:
            self.servers.append(await loop.create_server(protocol, host=self.host, port=self.port,
                                                         backlog=self.backlog, reuse_address=True))

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    async def shutdown(self, timeout_s: float) -> None:
        """Stops accepting, lets in-flight requests finish within ``timeout_s``, then
        cuts the connections still busy (their requests end as the client's
        departure, quietly) and closes the rest."""
        self.stop_accepting()
        for connection in list(self.state.connections):
            connection.shutdown()
        await self._wait_tasks(timeout_s)
        for connection in list(self.state.connections):
            if isinstance(connection, CoalescingHttpToolsProtocol) and connection.cycle is not None:
                connection.connection.abort()
        await self._wait_tasks(CUT_WAIT_S)
        for task in list(self.state.tasks):
            task.cancel()  # still running after its connection was cut: a bug, and uvicorn logs it
        for connection in list(self.state.connections):
            connection.transport.close()

    async def _wait_tasks(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.state.tasks and loop.time() < deadline:
            await asyncio.wait(list(self.state.tasks), timeout=max(0.0, deadline - loop.time()))
