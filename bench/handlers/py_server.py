"""A minimal Python HTTP server for bench/custom.py: the custom-runtime function
hit directly and through ``supervisor run`` (``runtime = "custom"``).

An asyncio protocol on uvloop (when importable) with httptools' parser: no
framework, so that the server is not what the benchmark measures. Listens on
127.0.0.1:$FC_SERVER_PORT (else $PORT) and answers, like
bench/handlers/node_server/server.js:

    GET /            200, "hello, world\\n" (HTTP-trigger requests)
    POST /invoke     200, a small JSON body saying how many bytes the event had
    POST /initialize, /pre-freeze, /pre-stop   200, empty (FC's lifecycle hooks)
    anything else    404

HTTP/1.1 keep-alive (``Connection: close`` and HTTP/1.0 close after the
answer); TCP_NODELAY on every connection. ``SERVER_PROCS=N`` (N > 1) forks
N processes that share the port with SO_REUSEPORT (bench/custom.py's "direct
xN" baseline); the supervisor starts one process per worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from typing import cast

import httptools

HELLO = b"hello, world\n"
HOOKS = frozenset({b"/initialize", b"/pre-freeze", b"/pre-stop"})


def response(status: bytes, content_type: bytes, body: bytes, close: bool) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n" + body)


class HttpProtocol(asyncio.Protocol):
    """One connection: parse requests with httptools, answer each when its body is complete."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(response(b"400 Bad Request", b"text/plain", b"bad request\n", True))
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.size += len(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        path = self.url.split(b"?", 1)[0]
        method = self.parser.get_method()
        close = not self.parser.should_keep_alive()
        if method == b"GET" and path == b"/":
            out = response(b"200 OK", b"text/plain", HELLO, close)
        elif method == b"POST" and path == b"/invoke":
            out = response(b"200 OK", b"application/json", b'{"ok":true,"bytes":%d}' % self.size, close)
        elif path in HOOKS:
            out = response(b"200 OK", b"text/plain", b"", close)
        else:
            out = response(b"404 Not Found", b"text/plain", b"not found\n", close)
        transport.write(out)
        if close:
            transport.close()


def listener(port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    server = await loop.create_server(HttpProtocol, sock=sock)
    async with server:
        await stop


def run(sock: socket.socket) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(sock))
    else:
        uvloop.run(serve(sock))


class Stopped(Exception):
    pass


def stop_waiting(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def main() -> int:
    port = int(os.environ.get("FC_SERVER_PORT") or os.environ.get("PORT") or 9000)
    procs = max(1, int(os.environ.get("SERVER_PROCS") or 1))
    if procs == 1:
        run(listener(port, reuse_port=False))
        return 0
    children = []
    for _ in range(procs):
        sock = listener(port, reuse_port=True)  # one listener per process: the kernel spreads connections
        pid = os.fork()
        if pid == 0:
            run(sock)
            os._exit(0)
        sock.close()
        children.append(pid)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_waiting)  # wake from the wait below, then pass it on
    try:
        os.waitpid(children[0], 0)
    except (Stopped, ChildProcessError):
        pass
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in children:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
