"""worker.python.http: HttpAppHost on the real examples (examples/asgi and
examples/wsgi) and on small apps defined here, without the planes.

A ``Peer`` stands for the data plane's end of the worker link: it collects
the frames a real ``HttpExchange`` sends, acknowledges response bytes with
``WINDOW`` the way the data plane does, and feeds request bodies without ever
having more than ``STREAM_WINDOW`` unacknowledged. Every wait has a deadline;
nothing sleeps in place of a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import uvloop

import worker.python.http as http_host
from calink import frames
from calink.messages import Result
from tests.unit.exchange_peer import Peer
from worker.host import ClientDisconnected, HttpExchange, StartupError
from worker.output import current_request_id
from worker.python.http import HttpAppHost

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DEADLINE_S = 5.0
INTERFACES = ("asgi", "wsgi")

pytestmark = pytest.mark.anyio

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Plain asyncio, and uvloop: the loop workers run on."""
    if request.param == "uvloop":
        return "asyncio", {"loop_factory": uvloop.new_event_loop}
    return "asyncio", {}


# ---- the data plane's end ---------------------------------------------------------


class Gate:
    """Stands in for an example's ``pause``: holds its stream until the test opens it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.thread_event = threading.Event()

    async def async_pause(self, index: int) -> None:
        await asyncio.wait_for(self.event.wait(), DEADLINE_S)

    def thread_pause(self, index: int) -> None:
        if not self.thread_event.wait(DEADLINE_S):
            raise TimeoutError("the test never opened the gate")

    def open(self) -> None:
        self.event.set()
        self.thread_event.set()


def make_spec(interface: str, handler: str, code_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"function": f"{interface}-test", "handler": handler, "interface": interface,
            "code_dir": str(code_dir), "timeout_s": 10, "concurrency": 4, "max_body": 6 << 20,
            "memory_limit_mb": 128, **extra}


@contextlib.asynccontextmanager
async def running(spec: dict[str, Any]) -> AsyncIterator[HttpAppHost]:
    host = HttpAppHost(spec)
    await host.start()
    try:
        yield host
    finally:
        await host.close()


@contextlib.asynccontextmanager
async def example(interface: str, **extra: Any) -> AsyncIterator[tuple[HttpAppHost, ModuleType]]:
    """The example app of ``interface``, freshly imported (both examples are ``app``)."""
    code_dir = EXAMPLES / interface
    sys.path.insert(0, str(code_dir))
    sys.modules.pop("app", None)
    try:
        spec = make_spec(interface, "app:app", code_dir, initializer="app:init", **extra)
        async with running(spec) as host:
            yield host, sys.modules["app"]
    finally:
        sys.modules.pop("app", None)
        sys.path.remove(str(code_dir))


def here(name: str, interface: str = "asgi", **extra: Any) -> dict[str, Any]:
    """A spec for an app defined in this module."""
    return make_spec(interface, f"{__name__}:{name}", Path(__file__).parent, **extra)


def gate_stream(module: ModuleType, interface: str, monkeypatch: pytest.MonkeyPatch) -> Gate:
    gate = Gate()
    monkeypatch.setattr(module, "pause", gate.async_pause if interface == "asgi" else gate.thread_pause)
    return gate


async def serve(host: HttpAppHost, exchange: HttpExchange) -> None:
    await asyncio.wait_for(host.http(exchange), DEADLINE_S)


# ---- requests through the examples ---------------------------------------------------


@pytest.mark.parametrize("interface", INTERFACES)
async def test_request_passes_through_as_it_came(interface: str) -> None:
    rng = random.Random(7)
    first, rest = rng.randbytes(3000), bytes(range(256)) * 700  # binary, over several frames
    body = first + rest
    headers = [("content-type", "application/octet-stream"), ("x-custom", "a"), ("x-custom", "b"),
               ("content-length", str(len(body)))]
    async with example(interface) as (host, _):
        peer = Peer(DEADLINE_S, "req-1")
        exchange = peer.open("PUT", b"/echo/a%20b/%C3%A9", b"x=1&y=%20z", headers, first, more_body=True)
        task = asyncio.ensure_future(serve(host, exchange))
        await peer.feed(rest)
        await task
    head = peer.head()
    assert head is not None and head.status == 200
    assert ("content-type", "application/json") in list(head.headers)
    assert peer.result() == Result(ok=True)
    assert peer.kinds()[0] == frames.Kind.RESPONSE_START and peer.kinds()[-1] == frames.Kind.RESULT
    echo = peer.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == "/echo/a b/é"
    assert echo["query"] == "x=1&y=%20z"
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    if interface == "asgi":
        assert echo["raw_path"] == "/echo/a%20b/%C3%A9"
        assert [list(pair) for pair in headers] == echo["headers"]
    else:  # WSGI has one environ entry per header name
        assert dict(map(tuple, echo["headers"]))["x-custom"] == "a,b"
        assert dict(map(tuple, echo["headers"]))["content-type"] == "application/octet-stream"


@pytest.mark.parametrize("interface", INTERFACES)
async def test_streamed_response_leaves_before_the_app_finishes(interface: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    async with example(interface) as (host, module):
        gate = gate_stream(module, interface, monkeypatch)
        peer = Peer(DEADLINE_S, "req-1")
        task = asyncio.ensure_future(serve(host, peer.open(path=b"/stream", query=b"chunks=3")))
        # The app is held after its first chunk until the test has seen that chunk.
        await peer.until(peer.has_body, "the first chunk")
        assert peer.body() == b"chunk 0\n"
        assert not task.done() and peer.result() is None
        gate.open()
        await task
    head = peer.head()
    assert head is not None and head.status == 200
    assert peer.body() == b"chunk 0\nchunk 1\nchunk 2\n"
    assert peer.result() == Result(ok=True)


@pytest.mark.parametrize("interface", INTERFACES)
async def test_large_upload_streams_within_the_window(interface: str) -> None:
    body = random.Random(1).randbytes(8 << 20)
    async with example(interface) as (host, _):
        peer = Peer(DEADLINE_S, "req-1")
        exchange = peer.open("POST", b"/upload", headers=[("content-length", str(len(body)))],
                             body=body[: frames.MAX_CHUNK], more_body=True)
        task = asyncio.ensure_future(serve(host, exchange))
        # The data plane sends a window ahead and no more: 8 MiB get through only
        # because the app consumes (and the host acknowledges) as it goes.
        await peer.feed(body[frames.MAX_CHUNK :])
        await task
    assert peer.json() == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert peer.acked_in == len(body)
    assert 0 < peer.max_outstanding <= frames.STREAM_WINDOW


@pytest.mark.parametrize("interface", INTERFACES)
async def test_chunked_upload_without_content_length(interface: str) -> None:
    body = random.Random(2).randbytes(700_000)
    async with example(interface) as (host, _):
        peer = Peer(DEADLINE_S, "req-1")
        task = asyncio.ensure_future(serve(host, peer.open("POST", b"/upload", more_body=True)))
        await peer.feed(body)
        await task
    assert peer.json() == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@pytest.mark.parametrize("interface", INTERFACES)
async def test_a_data_plane_cannot_make_the_host_hold_more_than_the_window(interface: str) -> None:
    async with example(interface) as (host, _):
        peer = Peer(DEADLINE_S, "req-1")
        exchange = peer.open("POST", b"/upload", more_body=True)
        task = asyncio.ensure_future(serve(host, exchange))
        # No await in between: the app cannot have read any of it.
        for _ in range(frames.STREAM_WINDOW // frames.MAX_CHUNK):
            exchange.on_body(b"\0" * frames.MAX_CHUNK)
        with pytest.raises(frames.ProtocolError):
            exchange.on_body(b"\0")
        exchange.on_cancel()  # what the worker does when its link drops
        with pytest.raises(ClientDisconnected):
            await task


@pytest.mark.parametrize("interface", INTERFACES)
async def test_requests_run_concurrently_up_to_concurrency(interface: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    async with example(interface, concurrency=2) as (host, module):
        gate = gate_stream(module, interface, monkeypatch)
        peers = [Peer(DEADLINE_S, "req-1"), Peer(DEADLINE_S, "req-1")]
        tasks = [asyncio.ensure_future(serve(host, p.open(path=b"/stream", query=b"chunks=2", request_id=f"r{i}")))
                 for i, p in enumerate(peers)]
        for peer in peers:  # both are past their first chunk while both are held
            await peer.until(peer.has_body, "a first chunk")
        gate.open()
        await asyncio.gather(*tasks)
    assert [p.body() for p in peers] == [b"chunk 0\nchunk 1\n"] * 2


@pytest.mark.parametrize("interface", INTERFACES)
async def test_client_gone_mid_stream_stops_the_app(interface: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with example(interface) as (host, module):
        gate = gate_stream(module, interface, monkeypatch)
        peer = Peer(DEADLINE_S, "req-1")
        exchange = peer.open(path=b"/stream", query=b"chunks=5")
        task = asyncio.ensure_future(serve(host, exchange))
        await peer.until(peer.has_body, "the first chunk")
        exchange.on_cancel()
        gate.open()
        with pytest.raises(ClientDisconnected):
            await task
    assert peer.body() == b"chunk 0\n"
    assert peer.result() is None  # worker.main finishes a failed exchange


@pytest.mark.parametrize("interface", INTERFACES)
async def test_client_gone_mid_upload(interface: str) -> None:
    async with example(interface) as (host, _):
        peer = Peer(DEADLINE_S, "req-1")
        exchange = peer.open("POST", b"/upload", body=b"x" * 1000, more_body=True)
        task = asyncio.ensure_future(serve(host, exchange))
        await peer.until(lambda: peer.acked_in == 1000, "the app to read the first chunk")
        exchange.on_cancel()
        with pytest.raises(ClientDisconnected):
            await task
    assert peer.head() is None and peer.result() is None


@pytest.mark.parametrize("interface", INTERFACES)
async def test_invoke_is_post_invoke_to_the_app(interface: str) -> None:
    event = b'{"name": "fc"}'
    headers = {"content-type": "application/json", "content-length": "999", "x-fc-request-id": "inv-1"}
    async with example(interface) as (host, _):
        assert not host.runs_inline("invoke")
        result = await asyncio.wait_for(host.run("invoke", "inv-1", headers, 10.0, event), DEADLINE_S)
    assert result.ok and result.content_type == "application/json"
    echo = json.loads(result.body)
    assert (echo["method"], echo["path"], echo["body_length"]) == ("POST", "/invoke", len(event))
    sent = {name: value for name, value in echo["headers"]}
    assert sent["content-length"] == str(len(event))  # the body's real length, not the client's claim
    assert sent["x-fc-request-id"] == "inv-1"


@pytest.mark.parametrize("interface", INTERFACES)
async def test_hooks_run_like_python_hosts(interface: str) -> None:
    async with example(interface) as (host, _):
        assert host.has("initialize") and not host.runs_inline("initialize")
        result = await asyncio.wait_for(host.run("initialize", "init-1", {}, 10.0, b""), DEADLINE_S)
        assert result == Result(ok=True)
        # Nothing configured: answered inline, as PythonHost does.
        assert not host.has("pre_stop") and host.runs_inline("pre_stop")
        assert host.run_inline("pre_stop", "stop-1", {}, 1.0, b"") == Result(ok=True)


# ---- lifespan -------------------------------------------------------------------------


async def test_lifespan_startup_and_shutdown_run_once() -> None:
    async with example("asgi") as (host, module):
        assert module.lifecycle == {"startup": 1, "shutdown": 0}
        peer = Peer(DEADLINE_S, "req-1")
        await serve(host, peer.open(path=b"/echo"))
        assert peer.json()["state"] == ["started_at"]  # the lifespan state reaches requests
        await host.close()
        assert module.lifecycle == {"startup": 1, "shutdown": 1}
    assert module.lifecycle == {"startup": 1, "shutdown": 1}  # close() again is a no-op


async def http_only(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """No lifespan support: it refuses other scopes, as many small apps do."""
    assert scope["type"] == "http", "http only"
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def answers_everything(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """No lifespan support either: it answers the lifespan scope with an HTTP response."""
    await receive()
    await http_only({**scope, "type": "http"}, receive, send)


async def startup_fails(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database"})


async def startup_raises(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    await receive()
    raise ConnectionRefusedError("the database refused the connection")


hung_shutdown: list[str] = []


async def shutdown_hangs(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "lifespan.startup.complete"})
    await receive()
    try:
        await asyncio.Event().wait()
    finally:
        hung_shutdown.append("cancelled")


@pytest.mark.parametrize("app", ["http_only", "answers_everything"])
async def test_apps_without_lifespan_are_served(app: str) -> None:
    async with running(here(app)) as host:
        peer = Peer(DEADLINE_S, "req-1")
        await serve(host, peer.open())
    head = peer.head()
    assert head is not None and head.status == 204 and peer.result() == Result(ok=True)


async def test_lifespan_startup_failed_is_an_init_error() -> None:
    host = HttpAppHost(here("startup_fails"))
    with pytest.raises(StartupError) as caught:
        await host.start()
    assert "no database" in caught.value.info.error_message
    await host.close()


async def test_lifespan_startup_exception_is_an_init_error() -> None:
    host = HttpAppHost(here("startup_raises"))
    with pytest.raises(ConnectionRefusedError):
        await host.start()
    await host.close()


async def test_lifespan_shutdown_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_host, "LIFESPAN_SHUTDOWN_S", 0.1)
    hung_shutdown.clear()
    host = HttpAppHost(here("shutdown_hangs"))
    await host.start()
    await asyncio.wait_for(host.close(), DEADLINE_S)
    assert hung_shutdown == ["cancelled"]


# ---- failures and disconnects on apps defined here -----------------------------------


async def fails_before_start(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    raise ValueError("broken before the response")


async def fails_after_start(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"partial", "more_body": True})
    raise ValueError("broken mid-response")


async def fails_between_head_and_body(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    raise ValueError("broken before the first body chunk")


def wsgi_fails(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    raise ValueError("broken WSGI app")


@pytest.mark.parametrize(("app", "interface", "message", "started"), [
    ("fails_before_start", "asgi", "broken before the response", False),
    ("fails_between_head_and_body", "asgi", "broken before the first body chunk", False),
    ("fails_after_start", "asgi", "broken mid-response", True),
    ("wsgi_fails", "wsgi", "broken WSGI app", False),
])
async def test_app_exceptions_propagate(app: str, interface: str, message: str, started: bool) -> None:
    async with running(here(app, interface)) as host:
        peer = Peer(DEADLINE_S, "req-1")
        with pytest.raises(ValueError, match=message):
            await serve(host, peer.open())
    # Before the head went out, worker.main can still answer with the contract's error.
    assert (peer.head() is not None) == started
    assert peer.result() is None


class AsgiRecorder:
    """Reads until the client is gone, or answers and then asks again; records what it saw."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.request_ids: list[str | None] = []

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # returns without taking lifespan.startup: no lifespan
        self.request_ids.append(current_request_id.get())
        if scope["path"] == "/answer-then-listen":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})
        while True:
            message = await receive()
            self.seen.append(message["type"])
            if message["type"] == "http.disconnect":
                return


asgi_recorder = AsgiRecorder()


class WsgiRecorder:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.request_ids: list[str | None] = []
        self.produced = 0
        self.fill_at = 0  # how many chunks fill the window, and the one the app is blocked sending
        self.filled = threading.Event()  # the app is (about to be) blocked handing over a chunk

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        self.request_ids.append(current_request_id.get())
        if environ["PATH_INFO"] == "/read":
            try:
                while environ["wsgi.input"].read(1024):
                    pass
            except OSError as exc:
                self.seen.append(type(exc).__name__)
                raise
            start_response("200 OK", [])
            return [b"read it all"]
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return self.forever()

    def forever(self) -> Iterator[bytes]:
        try:
            while True:
                self.produced += 1
                if self.produced >= self.fill_at:
                    self.filled.set()
                yield b"x" * frames.MAX_CHUNK
        finally:
            self.seen.append("closed")


wsgi_recorder = WsgiRecorder()


@pytest.mark.parametrize(("recorder", "interface", "seen"), [
    ("asgi_recorder", "asgi", ["http.request", "http.disconnect"]),  # ASGI: receive() says so
    ("wsgi_recorder", "wsgi", ["ClientDisconnected"]),  # WSGI: reading wsgi.input raises
])
async def test_app_reading_the_body_learns_the_client_left(recorder: str, interface: str, seen: list[str]) -> None:
    app = globals()[recorder]
    app.seen.clear()
    async with running(here(recorder, interface)) as host:
        peer = Peer(DEADLINE_S, "req-1")
        exchange = peer.open("POST", b"/read", body=b"abc", more_body=True)
        task = asyncio.ensure_future(serve(host, exchange))
        await peer.until(lambda: peer.acked_in == 3, "the app to read the first chunk")
        exchange.on_cancel()
        with pytest.raises(ClientDisconnected):
            await task
    assert app.seen == seen
    assert peer.head() is None and peer.result() is None


async def test_asgi_receive_after_a_complete_response_is_disconnect() -> None:
    asgi_recorder.seen.clear()
    async with running(here("asgi_recorder")) as host:
        peer = Peer(DEADLINE_S, "req-1")
        await serve(host, peer.open(path=b"/answer-then-listen"))
    assert peer.body() == b"done" and peer.result() == Result(ok=True)
    assert asgi_recorder.seen == ["http.request", "http.disconnect"]


async def test_wsgi_app_blocked_on_a_full_window_is_stopped_when_the_client_leaves() -> None:
    wsgi_recorder.seen.clear()
    wsgi_recorder.produced = 0
    wsgi_recorder.filled.clear()
    # The window's chunks, and the one the app's thread is then blocked sending
    # (each chunk is sent before the next is asked for: nothing is queued).
    wsgi_recorder.fill_at = frames.STREAM_WINDOW // frames.MAX_CHUNK + 1
    async with running(here("wsgi_recorder", "wsgi")) as host:
        peer = Peer(DEADLINE_S, "req-1")
        peer.auto_ack = False  # a client that reads nothing: the app fills the window and waits
        exchange = peer.open()
        task = asyncio.ensure_future(serve(host, exchange))
        await peer.until(lambda: len(peer.body()) == frames.STREAM_WINDOW, "the window to fill")
        assert await asyncio.to_thread(wsgi_recorder.filled.wait, DEADLINE_S), "the app never filled the queue"
        exchange.on_cancel()
        with pytest.raises(ClientDisconnected):
            await task
    assert wsgi_recorder.seen == ["closed"]  # its iterable was closed, its thread freed


@pytest.mark.parametrize(("recorder", "interface", "path"), [
    ("asgi_recorder", "asgi", b"/answer-then-listen"), ("wsgi_recorder", "wsgi", b"/read")])
async def test_requests_run_with_their_id_and_markers(recorder: str, interface: str, path: bytes,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    app = globals()[recorder]
    app.request_ids.clear()
    async with running(here(recorder, interface)) as host:
        peer = Peer(DEADLINE_S, "req-1")
        exchange = peer.open("POST", path, body=b"abc", request_id="req-42")
        await serve(host, exchange)
    assert app.request_ids == ["req-42"]  # in the app's thread too, for WSGI
    out = capfd.readouterr().out
    assert "\x1cS\x1freq-42\n" in out and "\x1cE\x1freq-42\n" in out  # the boundary records (worker.output)


# ---- /invoke on apps defined here --------------------------------------------------------


async def invoke_modes(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Answers /invoke as the x-mode header says."""
    assert scope["type"] == "http"
    mode = dict(scope["headers"]).get(b"x-mode", b"").decode()
    if mode == "json-error":
        body = json.dumps({"errorType": "QuotaExceeded", "errorMessage": "too many"}).encode()
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
    elif mode == "text-error":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"not here " * 500})
    elif mode == "endless":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"y" * 4096, "more_body": True})
        except OSError as exc:
            invoke_stopped.append(type(exc).__name__)
            raise
    elif mode == "unfinished":
        await send({"type": "http.response.start", "status": 200, "headers": []})
    else:
        raise ValueError("unknown mode")


invoke_stopped: list[str] = []


def wsgi_endless(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    start_response("200 OK", [])
    try:
        while True:
            yield b"y" * 4096
    finally:
        invoke_stopped.append("closed")


async def invoke(host: HttpAppHost, mode: str) -> Result:
    return await asyncio.wait_for(host.run("invoke", "inv-2", {"x-mode": mode}, 10.0, b"{}"), DEADLINE_S)


async def test_invoke_failure_statuses_become_errors() -> None:
    async with running(here("invoke_modes")) as host:
        json_error = await invoke(host, "json-error")
        text_error = await invoke(host, "text-error")
        unfinished = await invoke(host, "unfinished")
    assert not json_error.ok and json_error.error.error_type == "QuotaExceeded"
    assert json_error.error.error_message.startswith("HTTP 429: {")
    assert not text_error.ok and text_error.error.error_type == "HTTPError"
    assert text_error.error.error_message.startswith("HTTP 404: not here")
    assert len(text_error.error.error_message) < 1200  # truncated
    assert not unfinished.ok and unfinished.error.error_type == "IncompleteResponseError"


async def test_invoke_app_exception_is_the_result(capfd: pytest.CaptureFixture[str]) -> None:
    async with running(here("invoke_modes")) as host:
        result = await invoke(host, "no-such-mode")
    assert not result.ok and result.error.error_type == "ValueError"
    assert "unknown mode" in result.error.stack_trace
    assert "unknown mode" in capfd.readouterr().err  # in the function's log, as PythonHost does


@pytest.mark.parametrize(("app", "interface", "stopped"), [
    ("invoke_modes", "asgi", "ResponseTooLarge"), ("wsgi_endless", "wsgi", "closed")])
async def test_invoke_response_over_max_body_is_refused(app: str, interface: str, stopped: str) -> None:
    invoke_stopped.clear()
    async with running(here(app, interface, max_body=100_000)) as host:
        result = await invoke(host, "endless")
    assert not result.ok and result.error.error_type == "ResultTooLargeError"
    assert invoke_stopped == [stopped]  # the app was stopped, not left producing
