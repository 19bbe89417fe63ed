"""uvicorn's httptools protocol serving a raw ASGI callable, on our own loop.

We use uvicorn's protocol and ``ServerState`` directly instead of
``uvicorn.Server.serve`` because the plane owns the event loop, the signals
and the shutdown order: ``Server.serve`` installs its own signal handlers.
Shutdown mirrors uvicorn's: stop accepting, ask every connection to finish
its current request, wait for the request tasks with a deadline.

What uvicorn does not do, added on its protocol (the CA port faces clients
that may be slow, silent, broken or hostile):
- A request head (URL and headers) is at most ``MAX_REQUEST_HEAD`` bytes;
  a larger one is answered 414 or 431 and the connection closed, before the
  application sees it. uvicorn would buffer any size, and the head travels
  to a worker in one frame (``calink.frames.FRAME_OVERHEAD`` leaves room
  for this much, so a client's headers can never break a worker's link).
- Every answer the server gives on its own is the contract's JSON
  (``errorType``, ``errorMessage``, ``x-fc-status: 404``,
  ``x-fc-request-id``), never uvicorn's plain text: 400 ``BadRequestError``
  for what the parser refuses, 501 ``UnsupportedTransferEncodingError`` for a
  Transfer-Encoding other than ``chunked`` (a body still compressed, or
  encoded twice, would reach the handler as its event), 414/431, and 408
  ``ClientTimeoutError``. None of them is logged one by one: they are
  counted (``ClientStats``, the ``supervisor_client_*`` series) and a
  summary is reported at most every ``REPORT_S``.
- Client timeouts, enforced by one sweep per server every ``SWEEP_S`` (no
  timer per connection or request): a request head must arrive whole within
  ``header_timeout_s`` of its first byte, or of the connection for its first
  request (408, closed; a connection that never sent a byte is just
  closed); a request body that stalls for ``body_timeout_s`` while the
  server reads it fails its request with 408 and closes the connection; an
  idle keep-alive connection is closed after ``keep_alive_s``.
- A connection limit (``max_connections``, below the plane's descriptor
  limit): a connection accepted beyond it sheds another one, the idlest
  first (idle keep-alive, then the slowest head, then the longest-stalled
  body); connections whose request is being served are never shed; when
  none can be shed, the new one is closed. Sheds are counted and summarised
  in the report. The metrics port is a server of its own with its own limit,
  so it answers while the CA port is flooded.
- Each request's scope carries the client connection in
  ``scope["extensions"]["ca.connection"]`` (a ``ClientConnection``): the
  front can learn at once that the client left, and cut a response that
  cannot complete.
- What the server has to say (the summary of refused, shed and timed-out
  clients) goes to its ``report`` callable, ``report(event, fields)``: the
  data plane makes it one structlog record; the default is one warning on
  standard ``logging``'s ``cahttp`` logger. This module imports neither
  ``supervisor`` nor orjson nor structlog (see ``cahttp/__init__.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import httptools
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from cahttp.request_ids import SAFE_REQUEST_ID

# What a server reports: report(event, fields).
Report = Callable[[str, Mapping[str, Any]], None]

# How long a cut connection may take to deliver what was already written.
CUT_GRACE_S = 1.0
# At shutdown, how long requests whose connection was cut get to end.
CUT_WAIT_S = 0.1
# The sweep that enforces client timeouts, and how often its counts are logged.
SWEEP_S = 0.5
REPORT_S = 10.0
STATUS_TEXT = {400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long",
               431: b"Request Header Fields Too Large", 501: b"Not Implemented"}
ERROR_TYPES = {400: "BadRequestError", 408: "ClientTimeoutError", 414: "URITooLongError",
               431: "RequestHeaderFieldsTooLargeError", 501: "UnsupportedTransferEncodingError"}


@dataclasses.dataclass
class ClientLimits:
    """What a server allows its clients (``[supervisor]`` keys: ``client_header_timeout``,
    ``client_body_timeout``, ``keep_alive_timeout``; the limit from the fd budget)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    keep_alive_s: float = 75.0
    max_connections: int = 1000


@dataclasses.dataclass
class ClientStats:
    """What the server did to its clients, read at scrape time (``metrics.ClientCollector``)."""

    refused: Counter[str] = dataclasses.field(default_factory=Counter)  # answered by the server: reason -> count
    shed: Counter[str] = dataclasses.field(default_factory=Counter)  # closed to make room: whose -> count
    timed_out: Counter[str] = dataclasses.field(default_factory=Counter)  # phase -> count
    reported: tuple[int, int, int] = (0, 0, 0)


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
    connection) is called once when the connection is lost. ``stalled`` is set
    when the client stopped sending the request body for ``body_timeout_s``:
    whoever reads the body answers 408 (``errors.body_stalled``).
    """

    __slots__ = ("_protocol", "listener", "stalled")

    def __init__(self, protocol: CoalescingHttpToolsProtocol) -> None:
        self._protocol = protocol
        self.listener: Callable[[], None] | None = None
        self.stalled = False

    @property
    def body_timeout_s(self) -> float:
        return self._protocol.limits.body_timeout_s

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

    def stall(self) -> None:
        """The body stopped coming: wake the reader (it answers 408); the connection
        closes after that answer (what is left of the body cannot be skipped)."""
        self.stalled = True
        cycle = self._protocol.cycle
        if cycle is not None:
            cycle.keep_alive = False
            cycle.message_event.set()

    def lost(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener()


def error_response(status: int, message: str, request_id: str, extra: bytes = b"") -> bytes:
    """A whole HTTP response with the contract's JSON error, closing the connection."""
    body = json.dumps({"errorType": ERROR_TYPES[status], "errorMessage": message}, ensure_ascii=False,
                      separators=(",", ":")).encode()
    return b"".join((
        b"HTTP/1.1 %d %s\r\n" % (status, STATUS_TEXT[status]),
        b"x-fc-status: 404\r\nx-fc-request-id: ", request_id.encode("latin-1"), b"\r\n",
        b"content-type: application/json\r\nconnection: close\r\n", extra,
        b"content-length: %d\r\n\r\n" % len(body), body))


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's protocol with coalesced writes, a bounded head, client timeouts,
    contract-shaped refusals and a ``ClientConnection``.

    Times are the loop's (``loop.time()``, read once per received chunk).
    ``head_at`` is when the request head now arriving began (None between
    requests); ``idle_at`` when the connection last became idle (opened, or a
    response completed); ``used`` whether any request began on it.
    """

    owner: HttpServer  # set on the subclass each HttpServer makes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.connection = ClientConnection(self)
        self.limits = self.owner.limits
        self.head_bytes = 0
        self.refusal = 0  # the status the request now arriving is refused with
        self.refusal_reason = ""
        self.last_read = self.idle_at = self.loop.time()
        self.head_at: float | None = None
        self.used = False
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self.owner.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.connection.lost()

    def data_received(self, data: bytes) -> None:
        # uvicorn's, without a warning logged per bad request (they are counted).
        self._unset_keepalive_if_required()
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no upgrades here (ws="none"): the request is served as plain HTTP
        except httptools.HttpParserError as exc:
            if not self.refusal:
                self.refusal, self.refusal_reason = 400, "malformed"
                self.refusal_detail = f"the request is not valid HTTP/1.1 ({_parser_reason(exc)})"
            self.send_400_response("")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes = 0
        self.head_at = self.last_read
        self.used = True
        self.scope["extensions"] = {"ca.connection": self.connection}  # type: ignore[dict-item]  # ASGI types extensions as dicts

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url), 414)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + HEADER_COST, 431)
        if name.lower() == b"transfer-encoding" and value.strip(b" \t").lower() != b"chunked":
            # llhttp decodes chunked only: anything else would reach the handler still encoded.
            self._refuse(501, "transfer-encoding", "Transfer-Encoding "
                         f"{value.decode('latin-1')[:100]!r} is not supported (only chunked)")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        version = self.parser.get_http_version()
        if version not in ("1.1", "1.0"):  # llhttp also takes a request line with no version at all
            self._refuse(400, "version", f"HTTP/{version or '0.9'} is not supported (HTTP/1.1 or HTTP/1.0)")
        hosts = sum(1 for name, _ in self.headers if name == b"host")
        if hosts > 1 or (hosts == 0 and version == "1.1"):  # RFC 9112 3.2: answered 400
            self._refuse(400, "host", "an HTTP/1.1 request needs exactly one Host header")
        self.head_at = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self.idle_at = self.loop.time()
        super().on_response_complete()

    def _count_head(self, size: int, status: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_REQUEST_HEAD:
            what = "request URL" if status == 414 else "request head (URL and headers)"
            self._refuse(status, "too-large", f"the {what} exceeds {MAX_REQUEST_HEAD} bytes")

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        self.refusal, self.refusal_reason, self.refusal_detail = status, reason, detail
        raise ValueError(detail)  # the parser stops; data_received answers

    def send_400_response(self, msg: str) -> None:
        """Every refusal of the parser's, as the contract's JSON; the connection closes."""
        status = self.refusal or 400
        self.owner.stats.refused[self.refusal_reason or "malformed"] += 1
        detail = getattr(self, "refusal_detail", "") or "the request is not valid HTTP/1.1"
        if self.cycle is not None and not self.cycle.response_complete:
            # The parser failed in the middle of a request being served (a broken chunked
            # body): its application already answers or will; nothing else can be sent.
            self.connection.abort()
            return
        self.transport.write(error_response(status, detail, self._request_id()))
        self.transport.close()

    def _request_id(self) -> str:
        # The headers of the head being refused (a finished request's are not this one's).
        headers: list[tuple[bytes, bytes]] = getattr(self, "headers", []) if self.head_at is not None else []
        for name, value in headers:
            if name == b"x-fc-request-id":
                text = value.decode("latin-1")
                if SAFE_REQUEST_ID.fullmatch(text):
                    return text
        return self.owner.new_request_id()

    def timed_out_head(self) -> None:
        self.owner.stats.timed_out["header"] += 1
        if self.transport.is_closing():
            return
        self.transport.write(error_response(
            408, f"the request head did not arrive within {self.limits.header_timeout_s:g}s "
            "(supervisor.client_header_timeout)", self.owner.new_request_id()))
        self.transport.close()

    def sweep_state(self, now: float) -> tuple[int, float] | None:
        """What this connection is doing, for the sweep and for shedding:
        (rank, since) with rank 0 idle, 1 sending its head, 2 stalled sending
        its body; None while its request is being served."""
        if self.head_at is not None:
            return 1, self.head_at
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return 0, self.idle_at
        if cycle.more_body and not self.flow.read_paused and not cycle.disconnected:
            return 2, self.last_read
        return None


def log_report(event: str, fields: Mapping[str, Any]) -> None:
    """The default ``report``: one warning on standard ``logging``'s ``cahttp`` logger."""
    logging.getLogger("cahttp").warning("%s (%s)", event, ", ".join(f"{k}={v}" for k, v in fields.items()))


def _parser_reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:200]


class HttpServer:
    """One listening port's server.

    ``sockets``: listening sockets handed over by the supervisor
    (``listeners.py``); without them the server binds ``host:port`` itself.
    ``new_request_id`` names the answers the server gives on its own;
    ``protocol_base`` is a subclass of the protocol to serve with (a worker's
    private runtime API puts a gate in front of each connection); ``report``
    gets what the server has to say (``log_report`` by default).
    """

    def __init__(self, app: Any, host: str, port: int, backlog: int = 2048,
                 sockets: list[socket.socket] | None = None, limits: ClientLimits | None = None,
                 new_request_id: Callable[[], str] | None = None, name: str = "ca",
                 protocol_base: type[CoalescingHttpToolsProtocol] | None = None,
                 report: Report | None = None) -> None:
        self.host = host
        self.port = port
        self.name = name
        self.backlog = backlog
        self.sockets = sockets or []
        self.limits = limits or ClientLimits()
        self.stats = ClientStats()
        self.new_request_id = new_request_id or (lambda: os.urandom(16).hex())
        self.report = report or log_report
        self.config = UvicornConfig(app=app, http="httptools", ws="none", interface="asgi3", lifespan="off",
                                    access_log=False, log_config=None, proxy_headers=False,
                                    server_header=False, date_header=False,
                                    timeout_keep_alive=int(max(1, self.limits.keep_alive_s)))
        self.config.load()
        self.state = ServerState()
        self.servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._protocol = type("Protocol", (protocol_base or CoalescingHttpToolsProtocol,), {"owner": self})

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> CoalescingHttpToolsProtocol:
            made: CoalescingHttpToolsProtocol = self._protocol(config=self.config, server_state=self.state,
                                                               app_state={}, _loop=loop)
            return made

        if self.sockets:
            for sock in self.sockets:
                self.servers.append(await loop.create_server(protocol, sock=sock, backlog=self.backlog))
        else:
            self.servers.append(await loop.create_server(protocol, host=self.host, port=self.port,
                                                         backlog=self.backlog, reuse_address=True))
        self._sweeper = asyncio.ensure_future(self._sweep_forever())

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    # ---- the connection limit ------------------------------------------------

    def admit(self, new: CoalescingHttpToolsProtocol) -> None:
        """Called for each accepted connection: beyond ``max_connections``, shed the
        idlest other connection (or this one when none can go)."""
        connections = self.state.connections
        if len(connections) <= self.limits.max_connections:
            return
        now = new.loop.time()
        victim: CoalescingHttpToolsProtocol | None = None
        best: tuple[int, float] | None = None
        for connection in connections:
            if connection is new or not isinstance(connection, CoalescingHttpToolsProtocol):
                continue
            state = connection.sweep_state(now)
            if state is None or connection.transport.is_closing():
                continue
            if best is None or state < best:
                victim, best = connection, state
        if victim is None or best is None:
            self.stats.shed["new"] += 1
            new.transport.abort()
            return
        self.stats.shed[("idle", "head", "body")[best[0]]] += 1
        victim.transport.abort()

    # ---- client timeouts ---------------------------------------------------------

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        reported_at = -REPORT_S  # the first change is told at once, then one line per REPORT_S at most
        while True:
            await asyncio.sleep(SWEEP_S)
            now = loop.time()
            self.sweep(now)
            if now - reported_at >= REPORT_S and self._report():
                reported_at = now

    def sweep(self, now: float) -> None:
        limits = self.limits
        for connection in list(self.state.connections):
            if not isinstance(connection, CoalescingHttpToolsProtocol) or connection.transport.is_closing():
                continue
            state = connection.sweep_state(now)
            if state is None:
                continue
            rank, since = state
            if rank == 1 and now - since > limits.header_timeout_s:
                connection.timed_out_head()
            elif rank == 0 and not connection.used and now - since > limits.header_timeout_s:
                self.stats.timed_out["silent"] += 1
                connection.transport.close()  # never sent a byte: nobody to answer
            elif rank == 0 and connection.used and now - since > limits.keep_alive_s:
                connection.transport.close()  # an idle keep-alive connection: closing it is HTTP
            elif rank == 2 and now - since > limits.body_timeout_s and not connection.connection.stalled:
                self.stats.timed_out["body"] += 1
                connection.connection.stall()

    def _report(self) -> bool:
        """Reports what changed since the last report; False when nothing did."""
        stats = self.stats
        now = (sum(stats.refused.values()), sum(stats.shed.values()), sum(stats.timed_out.values()))
        if now == stats.reported:
            return False
        before = stats.reported
        stats.reported = now
        self.report("clients refused, shed or timed out", {
            "port": self.name, "refused": now[0] - before[0], "shed": now[1] - before[1],
            "timed_out": now[2] - before[2], "connections": len(self.state.connections),
            "max_connections": self.limits.max_connections})
        return True

    # ---- shutdown --------------------------------------------------------------

    async def shutdown(self, timeout_s: float) -> None:
        """Stops accepting, lets in-flight requests finish within ``timeout_s``, then
        cuts the connections still busy (their requests end as the client's
        departure, quietly) and closes the rest."""
        self.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
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
