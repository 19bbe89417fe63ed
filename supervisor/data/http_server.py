"""uvicorn's httptools protocol serving a raw ASGI callable, on our own loop.

We use uvicorn's protocol and ``ServerState`` directly instead of
``uvicorn.Server.serve`` because the plane owns the event loop, the signals
and the shutdown order: ``Server.serve`` installs its own signal handlers.
Shutdown mirrors uvicorn's: stop accepting, ask every connection to finish
its current request, wait for the request tasks with a deadline.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState


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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


class HttpServer:
    def __init__(self, app: Any, host: str, port: int, backlog: int = 2048) -> None:
        self.host = host
        self.port = port
        self.backlog = backlog
        self.config = UvicornConfig(app=app, http="httptools", interface="asgi3", lifespan="off", access_log=False,
                                    log_config=None, proxy_headers=False, server_header=False,
                                    date_header=False, timeout_keep_alive=75)
        self.config.load()
        self.state = ServerState()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: CoalescingHttpToolsProtocol(config=self.config, server_state=self.state, app_state={},
                                                _loop=loop),
            host=self.host, port=self.port, backlog=self.backlog, reuse_address=True)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def shutdown(self, timeout_s: float) -> None:
        """Stops accepting, lets in-flight requests finish, closes the rest."""
        self.stop_accepting()
        for connection in list(self.state.connections):
            connection.shutdown()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.state.tasks and asyncio.get_running_loop().time() < deadline:
            await asyncio.wait(list(self.state.tasks), timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        for task in list(self.state.tasks):
            task.cancel()
        for connection in list(self.state.connections):
            connection.transport.close()
