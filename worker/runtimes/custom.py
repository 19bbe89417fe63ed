"""Hosts a custom runtime: the function is an HTTP server in any language.

The worker starts the function's ``command`` as its child (``child.py``) with
its port in ``FC_SERVER_PORT``, ``FC_CUSTOM_LISTEN_PORT`` and ``PORT``, waits
until it is ready, then forwards work to it over HTTP on loopback, the way
Function Compute's custom runtime does:

- ``invoke``: ``POST /invoke`` with the event as the body; the answer's body
  is the result. ``initialize`` is ``POST /initialize``, ``pre_freeze`` and
  ``pre_stop`` are ``GET /pre-freeze`` and ``GET /pre-stop``; a hook is called
  only when the function lists it in ``hooks``. Each call carries the client's
  ``x-fc-*`` headers, ``x-fc-request-id`` and ``x-fc-control-path``.
- Failure follows FC: a server reports a failed invocation with the response
  header ``x-fc-status: 404`` (which decides when present; any value but 200
  is a failure); without it, a status outside 2xx is a failure. The error's
  type and message come from a JSON body with ``errorType``/``errorMessage``
  (FC's shape) when it has them.
- HTTP-trigger requests are forwarded as they came (method, raw path and
  query, every header in order except hop-by-hop ones, the body streamed
  within the exchange's window) and the answer streamed back chunk by chunk as
  it arrives. Nothing is buffered whole; no redirect is followed, no cookie
  kept, nothing decompressed.

Invariants:
- At most ``concurrency`` connections to the server (the data plane never
  sends more work than that). Idle connections are dropped after
  ``KEEPALIVE_S``, shorter than the idle timeout of common servers (Node.js
  5 s, gunicorn 2 s), so a request is never sent on a connection the server is
  closing.
- No timeout here: the data plane enforces the function's timeout by killing
  the worker, which takes the child with it.
- When the child dies, calls in flight give no answer (they end with
  ``RuntimeExitedError`` once the host is closed; the initializer's at once):
  the worker exits on ``exited()`` and the data plane reports the invocations
  as crashed. A connection error while the child is alive is an error result.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict
from yarl import URL

from calink.messages import ErrorInfo, Header, Result
from worker.host import ClientDisconnected, HttpExchange
from worker.python.host import Invocation
from worker.runtimes.child import ChildProcess, RuntimeExitedError, describe_exit, free_port, wait_ready

if TYPE_CHECKING:
    import aiohttp
else:
    aiohttp = None  # imported by ``import_client``

LOOPBACK = "127.0.0.1"
KEEPALIVE_S = 1.0
# How long a connection error waits to learn whether the child died (its
# sockets close a moment before its exit is observed).
EXIT_SETTLE_S = 0.2
MAX_STOP_GRACE_S = 5.0
# Of a failed invocation's body, this much ends up in the error message.
ERROR_TEXT_BYTES = 4096
# Response heads larger than aiohttp's 8 KiB defaults (big cookies) must pass.
MAX_HEADER_BYTES = 64 * 1024
# And many of them (aiohttp's default is 128); the head's total size is bounded by ``frames.MAX_RESPONSE_HEAD``.
MAX_HEADERS = 1024
# (method, path) the server is called on for each kind of work.
ROUTES = {"invoke": ("POST", "/invoke"), "initialize": ("POST", "/initialize"),
          "pre_freeze": ("GET", "/pre-freeze"), "pre_stop": ("GET", "/pre-stop")}
HOOKS = frozenset({"initialize", "pre_freeze", "pre_stop"})
# Headers about one connection, not the message (RFC 9110 7.6.1), plus
# ``expect``: this side streams the body itself.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                        "upgrade", "expect"})


class RuntimeConnectionError(ConnectionError):
    """The function's server could not be reached, or dropped the connection."""


def import_client() -> None:
    """Imports aiohttp. It takes ~100 ms (its TLS contexts load the system's
    CA store), so ``CustomHost.start`` does it while the child boots instead
    of before spawning it."""
    if globals()["aiohttp"] is None:
        globals()["aiohttp"] = importlib.import_module("aiohttp")


def connection_tokens(values: Iterable[str]) -> set[str]:
    """Header names listed in ``Connection`` values: hop-by-hop as well."""
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The server's response headers minus hop-by-hop ones; duplicates and order kept."""
    pairs = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]
    drop = HOP_BY_HOP | connection_tokens(value for name, value in pairs if name.lower() == "connection")
    return [(name, value) for name, value in pairs if name.lower() not in drop]


def request_headers(headers: Iterable[Header]) -> CIMultiDict[str]:
    """The client's request headers minus hop-by-hop ones; duplicates and order kept.

    Values are the client's bytes as latin-1 text; aiohttp writes text as
    UTF-8, so a non-ASCII value is handed over as the UTF-8 it almost always
    was (bytes that are not UTF-8 become U+FFFD).
    """
    pairs = [(name, value if value.isascii() else value.encode("latin-1").decode("utf-8", "replace"))
             for name, value in headers]
    drop = HOP_BY_HOP | connection_tokens(value for name, value in pairs if name.lower() == "connection")
    forwarded: CIMultiDict[str] = CIMultiDict()
    for name, value in pairs:
        if name.lower() not in drop:
            forwarded.add(name, value)
    return forwarded


def error_info(status: int, reason: str, fc_failure: bool, body: bytes, truncated: bool) -> ErrorInfo:
    """A failed invocation's error, from FC's JSON shape when the body has it."""
    error_type = error_message = stack_trace = ""
    try:
        document = json.loads(body) if body and not truncated else None
    except ValueError:
        document = None
    if isinstance(document, dict):
        error_type = str(document.get("errorType") or "")
        error_message = str(document.get("errorMessage") or "")
        trace = document.get("stackTrace")
        if isinstance(trace, list):
            stack_trace = "\n".join(str(line) for line in trace)
        elif trace:
            stack_trace = str(trace)
    if not error_type:
        # FC's name for a failure the function reported itself.
        error_type = "UnhandledInvocationError" if fc_failure else "HTTPError"
    if not error_message:
        text = body.decode("utf-8", "replace").strip()
        error_message = f"the function's server answered {status} {reason}".rstrip()
        if text:
            error_message += f": {text}" + (" ... (truncated)" if truncated else "")
    return ErrorInfo(error_type=error_type, error_message=error_message, stack_trace=stack_trace)


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the body, and whether there was more (never reads
    more than ``limit + 1`` bytes)."""
    buffer = bytearray()
    while len(buffer) <= limit:
        chunk = await response.content.read(limit + 1 - len(buffer))
        if not chunk:
            return bytes(buffer), False
        buffer += chunk
    return bytes(buffer[:limit]), True


class CustomHost:
    """The function's HTTP server, as a ``worker.host.Host``."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = spec
        self.timeout_s = float(spec["timeout_s"])
        self.concurrency = max(1, int(spec.get("concurrency") or 1))
        self.max_body = int(spec.get("max_body") or (1 << 62))
        self.command = [str(part) for part in spec["command"]]
        self.ready = str(spec.get("ready") or "http:/")
        self.startup_timeout_s = float(spec.get("startup_timeout_s") or 15.0)
        self.hooks = frozenset(str(hook).replace("-", "_") for hook in spec.get("hooks") or ())
        self.code_dir = str(spec.get("code_dir") or os.getcwd())
        self.port = 0
        self.child: ChildProcess | None = None
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        self._closed = False
        # Set by close(): calls that outlived their child end then (see _after_exit).
        self._closing = asyncio.Event()

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self.port = free_port(LOOPBACK)
        env = dict(os.environ)
        port = str(self.port)
        env.update({"FC_SERVER_PORT": port, "FC_CUSTOM_LISTEN_PORT": port, "PORT": port})
        env.setdefault("FC_FUNC_CODE_PATH", self.code_dir)  # FC's name for the code directory
        name = f"{self.spec.get('function', 'function')} ({self.spec.get('worker_id', os.getpid())})"
        self.child = ChildProcess(self.command, self.code_dir, env, name)
        await self.child.start()
        try:
            import_client()
            await wait_ready(self.child, self.ready, LOOPBACK, self.port, self.startup_timeout_s)
        except BaseException:
            await self.child.stop(0)
            raise
        base = f"http://{LOOPBACK}:{self.port}"
        self._urls = {kind: URL(base + path) for kind, (_, path) in ROUTES.items()}
        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=0, keepalive_timeout=KEEPALIVE_S)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            max_line_size=MAX_HEADER_BYTES, max_field_size=MAX_HEADER_BYTES, max_headers=MAX_HEADERS)

    def exited(self) -> asyncio.Future[int] | None:
        return self.child.exited if self.child is not None else None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.child is not None:
                await self.child.stop(min(MAX_STOP_GRACE_S, self.timeout_s))
            if self._session is not None:
                await self._session.close()
        finally:
            self._closing.set()

    # ---- invocations and hooks -------------------------------------------------

    def has(self, kind: str) -> bool:
        return kind in HOOKS and kind in self.hooks

    def runs_inline(self, kind: str) -> bool:
        return False

    def run_inline(self, kind: str, request_id: str, headers: Mapping[str, str], timeout_s: float,
                   body: bytes) -> Result:
        raise RuntimeError("a custom runtime never runs inline")

    async def run(self, kind: str, request_id: str, headers: Mapping[str, str], timeout_s: float,
                  body: bytes) -> Result:
        route = ROUTES.get(kind)
        if route is None:
            return Result(ok=False, error=ErrorInfo(
                error_type="UnknownKindError", error_message=f"a custom runtime cannot run {kind!r}"))
        with Invocation(kind, request_id):
            if kind != "invoke" and not self.has(kind):
                return Result(ok=True)  # not in hooks: nothing to call
            child = self._child()
            attributed = self.concurrency == 1
            if attributed:
                child.request_id = request_id
            try:
                return await self._call(kind, route[0], request_id, headers, body)
            finally:
                # Lines printed while handling the request belong to it, before its end marker.
                child.flush_output()
                if attributed:
                    child.request_id = None

    async def _call(self, kind: str, method: str, request_id: str, headers: Mapping[str, str],
                    body: bytes) -> Result:
        session = self._require_session()
        forwarded: CIMultiDict[str] = CIMultiDict(
            (name, value) for name, value in headers.items() if name.lower().startswith("x-fc-"))
        forwarded["x-fc-request-id"] = request_id
        forwarded["x-fc-control-path"] = ROUTES[kind][1]
        if method == "POST":
            # FC's custom runtime always sends events as octet-stream unless told otherwise.
            forwarded["content-type"] = headers.get("content-type") or "application/octet-stream"
        try:
            async with session.request(method, self._urls[kind], headers=forwarded,
                                       data=body if method == "POST" else None, allow_redirects=False) as response:
                return await self._result(response)
        except (aiohttp.ClientError, OSError) as exc:
            await self._raise_if_exited(f"{kind} {request_id}", answer=kind == "initialize")
            return Result(ok=False, error=ErrorInfo(
                error_type="RuntimeConnectionError", error_message=self._unreachable(exc)))

    async def _result(self, response: aiohttp.ClientResponse) -> Result:
        fc_status = response.headers.get("x-fc-status")
        if fc_status is not None:
            failed = fc_status.strip() != "200"
        else:
            failed = not 200 <= response.status < 300
        if failed:
            body, truncated = await read_at_most(response, ERROR_TEXT_BYTES)
            if truncated:
                response.close()  # the rest is not wanted: drop the connection, do not drain it
            return Result(ok=False, error=error_info(
                response.status, response.reason or "", fc_status is not None, body, truncated))
        length = response.content_length
        too_large = length is not None and length > self.max_body
        if not too_large:
            body, too_large = await read_at_most(response, self.max_body)
        if too_large:
            response.close()
            size = f"{length} bytes" if length is not None else f"more than {self.max_body} bytes"
            return Result(ok=False, error=ErrorInfo(
                error_type="ResultTooLargeError",
                error_message=f"the function's server returned {size}; max_body is {self.max_body}"))
        return Result(ok=True, body=body, content_type=response.headers.get("content-type", ""))

    # ---- HTTP-trigger requests -------------------------------------------------

    def serves_http(self) -> bool:
        return True

    async def http(self, exchange: HttpExchange) -> None:
        request = exchange.request
        child = self._child()
        attributed = self.concurrency == 1
        with Invocation("invoke", request.request_id):
            if attributed:
                child.request_id = request.request_id
            try:
                await self._exchange(exchange)
            finally:
                child.flush_output()
                if attributed:
                    child.request_id = None

    async def _exchange(self, exchange: HttpExchange) -> None:
        """Runs the proxying while watching for the client to leave."""
        body_taken = asyncio.Event()
        proxy = asyncio.ensure_future(self._proxy(exchange, body_taken))
        watcher = asyncio.ensure_future(self._watch_cancel(exchange, body_taken))
        try:
            await asyncio.wait((proxy, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when this task is cancelled: neither may outlive the exchange.
            pending = [task for task in (proxy, watcher) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if proxy.cancelled() or exchange.cancelled:
            # The client left (or the worker gave the stream up); cancelling the
            # proxy closed the upstream request.
            if not proxy.cancelled():
                proxy.exception()  # retrieved: the departure explains it
            if self._child().exited.done():
                await self._raise_if_exited(f"HTTP request {exchange.request.request_id}")
            exchange.finish()
            return
        proxy.result()  # its failure (before the response started) is the exchange's

    @staticmethod
    async def _watch_cancel(exchange: HttpExchange, body_taken: asyncio.Event) -> None:
        # ``receive`` and ``wait_cancelled`` share one waiter: wait until the body is taken.
        await body_taken.wait()
        await exchange.wait_cancelled()

    async def _proxy(self, exchange: HttpExchange, body_taken: asyncio.Event) -> None:
        session = self._require_session()
        request = exchange.request
        target = request.raw_path.decode("latin-1") or "/"
        if not target.startswith("/"):
            target = "/" + target  # origin form is all the server can be sent
        query = request.query.decode("latin-1")
        url = URL(f"http://{LOOPBACK}:{self.port}{target}" + (f"?{query}" if query else ""), encoded=True)
        headers = request_headers(request.headers)
        if "x-fc-request-id" not in headers:
            headers["x-fc-request-id"] = request.request_id
        data: AsyncIterator[bytes] | None
        if exchange.body_complete:
            body_taken.set()
            data = None
        else:
            data = self._request_body(exchange, body_taken)
        try:
            response = await session.request(request.method, url, headers=headers, data=data,
                                             allow_redirects=False)
        except ClientDisconnected:
            raise
        except (aiohttp.ClientError, OSError) as exc:
            if exchange.cancelled:
                raise ClientDisconnected("the client disconnected") from exc
            await self._raise_if_exited(f"HTTP request {request.request_id}")
            raise RuntimeConnectionError(self._unreachable(exc)) from exc
        complete = False
        try:
            exchange.start(response.status, response_headers(response.raw_headers))
            try:
                async for chunk in response.content.iter_any():
                    await exchange.send(chunk)
            except ClientDisconnected:
                raise
            except (aiohttp.ClientError, OSError) as exc:
                # The response has started: the client sees it aborted.
                await self._raise_if_exited(f"HTTP request {request.request_id}")
                exchange.finish(ErrorInfo(error_type="RuntimeConnectionError",
                                          error_message=self._unreachable(exc)))
                return
            complete = True
            exchange.finish()
        finally:
            if complete and exchange.body_complete:
                response.release()  # the connection is clean: keep it
            else:
                response.close()  # mid-body: the connection must not be reused

    @staticmethod
    async def _request_body(exchange: HttpExchange, body_taken: asyncio.Event) -> AsyncIterator[bytes]:
        """The request body as it arrives; each chunk taken opens the window for more."""
        try:
            while True:
                chunk, more = await exchange.receive()
                if chunk:
                    yield chunk
                if not more:
                    return
        finally:
            body_taken.set()

    # ---- helpers ----------------------------------------------------------------

    def _child(self) -> ChildProcess:
        if self.child is None:
            raise RuntimeError("the custom runtime has not been started")
        return self.child

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the custom runtime has not been started")
        return self._session

    def _unreachable(self, exc: BaseException) -> str:
        detail = str(exc) or type(exc).__name__
        return f"the function's server on {LOOPBACK}:{self.port} failed: {type(exc).__name__}: {detail}"

    async def _raise_if_exited(self, what: str, answer: bool = False) -> None:
        """Returns when the child is alive; when it has died (or dies within
        ``EXIT_SETTLE_S``) the crash, not this call, is the story.

        Then the call gives no answer of its own: the worker exits on
        ``exited()`` and the data plane reports the invocation as crashed
        (an answer from here would pass for the function's own error). It
        waits until ``close()`` and raises ``RuntimeExitedError``, which
        nobody hears in a worker that is exiting. ``answer`` raises at once:
        the initializer, which the worker awaits before it watches ``exited()``.
        """
        exited = self._child().exited
        if not exited.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), EXIT_SETTLE_S)
        if exited.done():
            if not answer:
                await self._closing.wait()
            raise RuntimeExitedError(f"the function's process exited ({describe_exit(exited.result())}) "
                                     f"while serving {what}")
