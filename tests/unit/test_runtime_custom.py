"""worker.runtimes.custom and worker.runtimes.child on real processes, without the planes.

The function servers are examples/bootstrap, examples/express (when node and
npm are there) and small throwaway servers written to tmp_path. HTTP-trigger
requests go through a real ``HttpExchange`` whose frames a ``Peer`` collects,
playing the data plane's part of flow control. Every wait has a deadline;
nothing sleeps in place of a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

import worker.python.host as python_host
from calink import frames
from tests.unit.exchange_peer import Peer
from worker.host import StartupError
from worker.output import current_request_id
from worker.runtimes import child as child_module
from worker.runtimes import custom as custom_module
from worker.runtimes.child import ChildProcess, RuntimeExitedError, free_port, wait_ready
from worker.runtimes.custom import CustomHost

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DEADLINE_S = 10.0

pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param(("asyncio", {}), id="asyncio"),
                        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """The worker runs on uvloop; plain asyncio keeps the host honest about the API it uses."""
    backend: tuple[str, dict[str, Any]] = request.param
    return backend


@pytest.fixture(autouse=True)
def not_a_subreaper_afterwards() -> Iterator[None]:
    """ChildProcess makes its process a subreaper, as a worker must be. The test
    process must not stay one: orphans of later tests (e2e supervisors killed on
    purpose) would come back to it as zombies instead of going to init."""
    yield
    ctypes.CDLL(None, use_errno=True).prctl(child_module.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    child_module._subreaper = False
    child_module.sweep_orphans()  # what was adopted during the test


# ---- throwaway servers ------------------------------------------------------------

# Answers /invoke according to the event, plus a few routes the examples lack.
MISC_SERVER = r'''
import hashlib, json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/cookies":
            self.reply(200, b"two cookies", [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Multi", "one"),
                                             ("X-Multi", "two"), ("Connection", "keep-alive, X-Private"),
                                             ("X-Private", "hop"), ("Keep-Alive", "timeout=5")])
        else:
            self.reply(200, b"ok")

    def do_POST(self):
        if self.path == "/sink":
            return self.sink()
        if self.path == "/initialize" and os.environ.get("DIE_ON_INITIALIZE"):
            os._exit(4)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        print(f"event {body.decode()} for {self.headers.get('x-fc-request-id')}", flush=True)
        if body == b"500":
            self.reply(500, b"boom: something broke")
        elif body == b"fcstatus":
            self.reply(200, b"reported failure", [("x-fc-status", "404")])
        elif body == b"big":
            self.reply(200, b"x" * 5000)
        elif body == b"exit":
            sys.stdout.flush()
            os._exit(3)
        else:
            headers = {k: v for k, v in self.headers.items() if k.lower().startswith("x-fc-")}
            self.reply(200, json.dumps({"event": body.decode(), "headers": headers,
                                        "content_type": self.headers.get("Content-Type")}).encode(),
                       [("Content-Type", "application/json")])

    def sink(self):
        # Reads a chunked body piece by piece and says so: proves it arrives streamed.
        digest, total = hashlib.sha256(), 0
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                self.rfile.readline()
                break
            chunk = self.rfile.read(size)
            self.rfile.readline()
            digest.update(chunk)
            total += len(chunk)
            print(f"got {total}", flush=True)
        self.reply(200, json.dumps({"bytes": total, "sha256": digest.hexdigest()}).encode())

server = ThreadingHTTPServer(("0.0.0.0", int(os.environ["FC_SERVER_PORT"])), Handler)
print("misc server up", flush=True)
server.serve_forever()
'''

NEVER_LISTENS = r'''
import sys, time
print("starting up...", flush=True)
print("still thinking", file=sys.stderr, flush=True)
time.sleep(600)
'''

EXITS_AT_ONCE = r'''
import sys
print("loading config", flush=True)
print("fatal: no database configured", file=sys.stderr, flush=True)
sys.exit(3)
'''

# Forks a daemon (double fork + setsid) that outlives its parent, ignores SIGTERM
# itself, and speaks TCP only.
DAEMONIZES = r'''
import os, signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(sys.argv[1], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    os._exit(0)
os.wait()
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("0.0.0.0", int(os.environ["FC_SERVER_PORT"])))
sock.listen()
print("listening (tcp only)", flush=True)
while True:
    conn, _ = sock.accept()
    conn.close()
'''

ALWAYS_503 = r'''
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

HTTPServer(("0.0.0.0", int(os.environ["FC_SERVER_PORT"])), Handler).serve_forever()
'''

PRINTS = r'''
import sys
sys.stdout.write("x" * 200000 + "\n")
for i in range(30):
    print(f"line {i}")
sys.stdout.write("\x1eforged-id\x1fnot a tag\n")
sys.stdout.write("no newline at the end")
sys.stdout.flush()
'''


def script(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{source}")
    path.chmod(0o755)
    return path


def make_spec(code_dir: Path, command: list[str], **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "worker_id": "w-1", "function": "fn", "runtime": "custom", "code_dir": str(code_dir),
        "timeout_s": 2.0, "concurrency": 1, "max_body": 6 << 20, "memory_limit_mb": 0, "command": command,
        "ready": "http:/", "startup_timeout_s": 5.0, "hooks": [], "handler": None}
    spec.update(overrides)
    return spec


def gone(pid: int) -> bool:
    """The process no longer exists (not even as a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class Recorder(io.TextIOBase):
    """Stands in for the worker's tagged stdout/stderr: lines with their request id."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str | None, str]] = []

    def write(self, text: str) -> int:
        request_id = current_request_id.get()
        self.lines.extend((request_id, line) for line in text.splitlines())
        return len(text)

    def texts(self) -> list[str]:
        return [line for _, line in self.lines]


@pytest.fixture
def output(monkeypatch: pytest.MonkeyPatch) -> tuple[Recorder, Recorder]:
    """Where the child's lines go. pytest re-installs its own sys.stdout at each test
    phase, so the module's view of ``sys`` is what is replaced."""
    out, err = Recorder(), Recorder()
    monkeypatch.setattr(child_module, "sys", SimpleNamespace(stdout=out, stderr=err))
    return out, err


@pytest.fixture
def markers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    seen: list[tuple[str, str, str]] = []
    monkeypatch.setattr(python_host, "marker", lambda kind, rid, phase: seen.append((kind, rid, phase)))
    return seen


@contextlib.asynccontextmanager
async def running(spec: dict[str, Any]) -> AsyncIterator[CustomHost]:
    host = CustomHost(spec)
    await asyncio.wait_for(host.start(), DEADLINE_S)
    try:
        yield host
    finally:
        await asyncio.wait_for(host.close(), DEADLINE_S)
        assert host.child is not None
        assert gone(host.child.pid), "close() left the function's process behind"


async def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(delay)  # polling a condition, with a deadline
        delay = min(delay * 2, 0.05)


# ---- the data plane's end of an HTTP exchange -------------------------------------


# ---- invocations and hooks -----------------------------------------------------------


async def test_bootstrap_example_invocations_hooks_and_markers(
        output: tuple[Recorder, Recorder], markers: list[tuple[str, str, str]]) -> None:
    code_dir = EXAMPLES / "bootstrap"
    spec = make_spec(code_dir, ["./bootstrap"], ready="http:/healthz", hooks=["initialize", "pre-stop"])
    async with running(spec) as host:
        assert host.serves_http() and not host.runs_inline("invoke")
        assert host.has("initialize") and host.has("pre_stop") and not host.has("pre_freeze")
        init = await host.run("initialize", "init-1", {}, 2.0, b"")
        assert init.ok, init.error
        result = await host.run("invoke", "req-1", {"x-fc-function-name": "fn", "accept": "x"}, 2.0,
                                b'{"name": "bootstrap"}')
        assert result.ok, result.error
        assert result.content_type == "application/json"
        answer = json.loads(result.body)
        assert answer == {"hello": "bootstrap", "request_id": "req-1", "initialized": True, "event_bytes": 21}
        # A hook the function does not list is not called, and succeeds.
        assert (await host.run("pre_freeze", "freeze-1", {}, 2.0, b"")).ok
        assert (await host.run("pre_stop", "stop-1", {}, 2.0, b"")).ok
    assert markers[:2] == [("Initialize", "init-1", "Start"), ("Initialize", "init-1", "End")]
    assert ("Invoke", "req-1", "Start") in markers and ("PreStop", "stop-1", "End") in markers
    out, _ = output
    # What the server printed while handling a request is attributed to it.
    assert ("req-1", "invoke 1: 21 bytes") in out.lines
    assert ("init-1", "initialized (request init-1)") in out.lines


async def test_fc_headers_content_type_and_request_id_are_forwarded(tmp_path: Path,
                                                                     output: tuple[Recorder, Recorder]) -> None:
    server = script(tmp_path, "server.py", MISC_SERVER)
    async with running(make_spec(tmp_path, [str(server)])) as host:
        headers = {"x-fc-access-key-id": "AK", "x-fc-request-id": "other", "user-agent": "curl",
                   "content-type": "application/json"}
        result = await host.run("invoke", "req-7", headers, 2.0, b"{}")
        assert result.ok, result.error
        answer = json.loads(result.body)
        assert answer["headers"]["x-fc-access-key-id"] == "AK"
        assert answer["headers"]["x-fc-request-id"] == "req-7"
        assert answer["headers"]["x-fc-control-path"] == "/invoke"
        assert "user-agent" not in {k.lower() for k in answer["headers"]}
        assert answer["content_type"] == "application/json"
        plain = json.loads((await host.run("invoke", "req-8", {}, 2.0, b"x")).body)
        assert plain["content_type"] == "application/octet-stream"  # FC's default for events


async def test_failures_become_error_results(tmp_path: Path, output: tuple[Recorder, Recorder]) -> None:
    server = script(tmp_path, "server.py", MISC_SERVER)
    async with running(make_spec(tmp_path, [str(server)], max_body=1000)) as host:
        failed = await host.run("invoke", "req-1", {}, 2.0, b"500")
        assert not failed.ok
        assert failed.error.error_type == "HTTPError"
        assert "500" in failed.error.error_message and "boom: something broke" in failed.error.error_message

        reported = await host.run("invoke", "req-2", {}, 2.0, b"fcstatus")
        assert not reported.ok
        assert reported.error.error_type == "UnhandledInvocationError"
        assert "reported failure" in reported.error.error_message

        too_large = await host.run("invoke", "req-3", {}, 2.0, b"big")
        assert not too_large.ok and too_large.error.error_type == "ResultTooLargeError"
        assert "5000" in too_large.error.error_message and "1000" in too_large.error.error_message

        # The connection was dropped, not drained: the next call still works.
        assert (await host.run("invoke", "req-4", {}, 2.0, b"fine")).ok


async def test_fc_style_json_error_from_the_bootstrap(output: tuple[Recorder, Recorder]) -> None:
    spec = make_spec(EXAMPLES / "bootstrap", ["./bootstrap"], ready="http:/healthz")
    async with running(spec) as host:
        result = await host.run("invoke", "req-1", {}, 2.0, b"fail")
        assert not result.ok
        assert result.error.error_type == "ValueError"
        assert result.error.error_message == "the event asked to fail"
        assert "bootstrap: invoke()" in result.error.stack_trace


async def test_a_child_dying_mid_invocation_gives_no_answer_but_its_exit(
        tmp_path: Path, output: tuple[Recorder, Recorder]) -> None:
    server = script(tmp_path, "server.py", MISC_SERVER)
    host = CustomHost(make_spec(tmp_path, [str(server)]))
    await asyncio.wait_for(host.start(), DEADLINE_S)
    exited = host.exited()
    assert exited is not None and not exited.done()
    call = asyncio.ensure_future(host.run("invoke", "req-1", {}, 2.0, b"exit"))
    assert await asyncio.wait_for(asyncio.shield(exited), DEADLINE_S) == 3
    # The worker exits on exited(): an error result now would pass for the function's own.
    # (Proving an absence takes a bounded wait: well past the host's settling time.)
    done, _ = await asyncio.wait([call], timeout=3 * custom_module.EXIT_SETTLE_S)
    assert not done
    await asyncio.wait_for(host.close(), DEADLINE_S)
    with pytest.raises(RuntimeExitedError, match="exit code 3"):
        await asyncio.wait_for(call, DEADLINE_S)
    out, _ = output
    assert ("req-1", "event exit for req-1") in out.lines


async def test_a_child_dying_in_its_initializer_fails_it_at_once(
        tmp_path: Path, output: tuple[Recorder, Recorder], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIE_ON_INITIALIZE", "1")
    server = script(tmp_path, "server.py", MISC_SERVER)
    host = CustomHost(make_spec(tmp_path, [str(server)], hooks=["initialize"]))
    await asyncio.wait_for(host.start(), DEADLINE_S)
    with pytest.raises(RuntimeExitedError, match=r"exit code 4\) while serving initialize init-1"):
        await asyncio.wait_for(host.run("initialize", "init-1", {}, 2.0, b""), DEADLINE_S)
    await host.close()


# ---- startup ------------------------------------------------------------------------


async def test_startup_timeout_names_the_port_and_the_last_output(tmp_path: Path,
                                                                   output: tuple[Recorder, Recorder]) -> None:
    server = script(tmp_path, "slow.py", NEVER_LISTENS)
    host = CustomHost(make_spec(tmp_path, [str(server)], startup_timeout_s=0.5))
    with pytest.raises(StartupError) as caught:
        await asyncio.wait_for(host.start(), DEADLINE_S)
    info = caught.value.info
    assert info.error_type == "RuntimeStartError"
    assert str(server) in info.error_message
    assert f"did not answer GET / with a status below 500 on port {host.port} within 0.5s" in info.error_message
    assert "last output:" in info.error_message
    assert "starting up..." in info.error_message and "still thinking" in info.error_message
    assert host.child is not None and gone(host.child.pid)
    await host.close()


async def test_a_child_that_exits_fails_the_startup_at_once(tmp_path: Path,
                                                            output: tuple[Recorder, Recorder]) -> None:
    server = script(tmp_path, "exits.py", EXITS_AT_ONCE)
    host = CustomHost(make_spec(tmp_path, [str(server)], startup_timeout_s=30.0))
    started = time.monotonic()
    with pytest.raises(StartupError) as caught:
        await asyncio.wait_for(host.start(), DEADLINE_S)
    assert time.monotonic() - started < 5.0  # failed fast, not at the 30 s timeout
    message = caught.value.info.error_message
    assert f"exited (exit code 3) before its HTTP server listened on port {host.port}" in message
    assert message.endswith("last output:\nloading config\nfatal: no database configured")
    await host.close()


@pytest.mark.parametrize("case", ["missing", "not-executable", "no-shebang"])
async def test_a_command_that_cannot_run_is_a_startup_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bootstrap"
    if case == "not-executable":
        path.write_text("#!/bin/sh\n")
    elif case == "no-shebang":
        path.write_bytes(b"\x00\x01binary junk")
        path.chmod(0o755)
    host = CustomHost(make_spec(tmp_path, ["./bootstrap", "--flag"]))
    with pytest.raises(StartupError) as caught:
        await asyncio.wait_for(host.start(), DEADLINE_S)
    assert caught.value.info.error_type == "RuntimeStartError"
    assert "./bootstrap --flag" in caught.value.info.error_message
    await host.close()


async def test_http_readiness_needs_a_status_below_500(tmp_path: Path, output: tuple[Recorder, Recorder]) -> None:
    server = script(tmp_path, "unhealthy.py", ALWAYS_503)
    host = CustomHost(make_spec(tmp_path, [str(server)], ready="http:/health", startup_timeout_s=0.5))
    with pytest.raises(StartupError, match="last probe: GET /health answered 503"):
        await asyncio.wait_for(host.start(), DEADLINE_S)
    await host.close()


async def test_tcp_readiness_and_stop_kills_daemonized_grandchildren(tmp_path: Path,
                                                                     output: tuple[Recorder, Recorder]) -> None:
    server = script(tmp_path, "daemonizes.py", DAEMONIZES)
    pid_file = tmp_path / "daemon.pid"
    # timeout_s bounds the SIGTERM grace: the server ignores SIGTERM, so SIGKILL ends it.
    spec = make_spec(tmp_path, [str(server), str(pid_file)], ready="tcp", timeout_s=0.3)
    host = CustomHost(spec)
    await asyncio.wait_for(host.start(), DEADLINE_S)
    assert host.child is not None
    main_pid = host.child.pid
    await until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "the daemon's pid")
    daemon_pid = int(pid_file.read_text())
    daemon = psutil.Process(daemon_pid)
    # The daemon left its session, and its parent exited: it came back to us (subreaper).
    assert daemon.ppid() == os.getpid()
    assert os.getpgid(main_pid) == os.getpgrp()  # the child stays in the worker's group
    started = time.monotonic()
    await asyncio.wait_for(host.close(), DEADLINE_S)
    assert time.monotonic() - started >= 0.3  # it got its grace before SIGKILL
    assert gone(main_pid) and gone(daemon_pid)
    assert host.child.exited.result() == -signal.SIGKILL
    await host.close()  # idempotent


async def test_stop_is_graceful_when_the_child_honours_sigterm(output: tuple[Recorder, Recorder]) -> None:
    spec = make_spec(EXAMPLES / "bootstrap", ["./bootstrap"], ready="http:/healthz", timeout_s=5.0)
    async with running(spec) as host:
        assert host.child is not None
    assert host.child.exited.result() == 0
    out, _ = output
    assert "bootstrap stopped" in out.texts()


# ---- the child's output ------------------------------------------------------------------


async def test_output_is_split_bounded_attributed_and_cannot_forge_tags(tmp_path: Path,
                                                                        output: tuple[Recorder, Recorder]) -> None:
    program = script(tmp_path, "prints.py", PRINTS)
    child = ChildProcess([str(program)], str(tmp_path), dict(os.environ), "printer")
    child.request_id = "req-9"
    await child.start()
    status = await asyncio.wait_for(asyncio.shield(child.exited), DEADLINE_S)
    await child.stop(1.0)
    assert status == 0
    out, _ = output
    texts = out.texts()
    # The 200000-byte line arrives split at 64 KiB; nothing is lost.
    assert [len(t) for t in texts[:4]] == [65536, 65536, 65536, 200000 - 3 * 65536]
    assert texts[4:34] == [f"line {i}" for i in range(30)]
    assert texts[34] == "\\x1eforged-id\\x1fnot a tag"
    assert texts[35] == "no newline at the end"
    assert {request_id for request_id, _ in out.lines} == {"req-9"}
    last = child.last_lines()
    assert len(last) == 20 and last[-1] == "no newline at the end"
    assert all(len(line) <= 1024 + 3 for line in last)


async def test_wait_ready_fails_fast_when_the_child_exits(tmp_path: Path, output: tuple[Recorder, Recorder]) -> None:
    program = script(tmp_path, "exits.py", EXITS_AT_ONCE)
    child = ChildProcess([str(program)], str(tmp_path), dict(os.environ), "exits")
    await child.start()
    port = free_port()
    with pytest.raises(StartupError, match="exit code 3"):
        await asyncio.wait_for(wait_ready(child, "tcp", "127.0.0.1", port, 30.0), DEADLINE_S)
    await child.stop(1.0)
    await child.stop(1.0)  # idempotent
    assert gone(child.pid)
    assert child.pid not in child_module._owned


# ---- HTTP-trigger requests ------------------------------------------------------------------


async def test_http_request_is_forwarded_as_it_came(output: tuple[Recorder, Recorder],
                                                    markers: list[tuple[str, str, str]]) -> None:
    spec = make_spec(EXAMPLES / "bootstrap", ["./bootstrap"], ready="http:/healthz")
    async with running(spec) as host:
        peer = Peer(DEADLINE_S)
        exchange = peer.open("PUT", b"/a%20b/c", b"x=1&x=2&y=%2F", body=b"hello body", headers=[
            ("host", "example.com"), ("x-dup", "1"), ("x-dup", "2"), ("connection", "keep-alive, x-private"),
            ("x-private", "hop"), ("te", "trailers"), ("content-length", "10"), ("x-fc-request-id", "req-http-1")])
        await asyncio.wait_for(host.http(exchange), DEADLINE_S)
        result = peer.result()
        assert result is not None and result.ok and exchange.finished
        head = peer.head()
        assert head is not None and head.status == 200
        echo = json.loads(peer.body())
        assert echo["method"] == "PUT" and echo["path"] == "/a%20b/c" and echo["query"] == "x=1&x=2&y=%2F"
        sent = [(name.lower(), value) for name, value in echo["headers"]]
        assert [v for n, v in sent if n == "x-dup"] == ["1", "2"]
        assert ("host", "example.com") in sent
        assert not {"connection", "x-private", "te"} & {n for n, _ in sent}
        assert echo["body"] == "hello body" and echo["body_bytes"] == 10
    assert ("Invoke", "req-http-1", "Start") in markers and ("Invoke", "req-http-1", "End") in markers


async def test_response_headers_keep_duplicates_and_drop_hop_by_hop(tmp_path: Path,
                                                                    output: tuple[Recorder, Recorder]) -> None:
    server = script(tmp_path, "server.py", MISC_SERVER)
    async with running(make_spec(tmp_path, [str(server)])) as host:
        peer = Peer(DEADLINE_S)
        await asyncio.wait_for(host.http(peer.open("GET", b"/cookies")), DEADLINE_S)
        pairs = peer.header_pairs()
        assert [v for n, v in pairs if n == "set-cookie"] == ["a=1", "b=2"]
        assert [v for n, v in pairs if n == "x-multi"] == ["one", "two"]
        assert not {"connection", "keep-alive", "x-private", "transfer-encoding"} & {n for n, _ in pairs}
        assert peer.body() == b"two cookies"


async def test_a_streamed_response_arrives_while_the_server_still_writes(output: tuple[Recorder, Recorder]) -> None:
    spec = make_spec(EXAMPLES / "bootstrap", ["./bootstrap"], ready="http:/healthz")
    async with running(spec) as host:
        peer = Peer(DEADLINE_S)
        task = asyncio.ensure_future(host.http(peer.open("GET", b"/stream", b"n=4&delay=0.3")))
        await peer.until(lambda: b"chunk 0" in peer.body(), "the first chunk")
        # The server sleeps 0.3 s between chunks: the first one was forwarded on its own.
        assert not task.done() and b"chunk 1" not in peer.body()
        await asyncio.wait_for(task, DEADLINE_S)
        assert peer.body() == b"".join(b"chunk %d\n" % i for i in range(4))
        result = peer.result()
        assert result is not None and result.ok


async def test_a_request_body_beyond_the_window_streams_to_the_server(tmp_path: Path,
                                                                      output: tuple[Recorder, Recorder]) -> None:
    server = script(tmp_path, "server.py", MISC_SERVER)
    body = os.urandom(4 * frames.STREAM_WINDOW + 12345)
    out, _ = output
    async with running(make_spec(tmp_path, [str(server)])) as host:
        peer = Peer(DEADLINE_S)
        first = body[: frames.MAX_CHUNK]
        task = asyncio.ensure_future(host.http(peer.open("POST", b"/sink", body=first, more_body=True)))

        async def server_got_most() -> None:
            # Before the body ends, the server has already read most of it.
            await until(lambda: any(t.startswith("got ") and int(t[4:]) >= 2 * frames.STREAM_WINDOW
                                    for t in out.texts()), "the server to read the body as it streams")

        await peer.feed(body[len(first):], before_end=server_got_most)
        await asyncio.wait_for(task, DEADLINE_S)
        assert peer.max_outstanding <= frames.STREAM_WINDOW
        answer = json.loads(peer.body())
        assert answer == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


async def test_a_client_that_leaves_aborts_the_upstream_request(output: tuple[Recorder, Recorder]) -> None:
    spec = make_spec(EXAMPLES / "bootstrap", ["./bootstrap"], ready="http:/healthz", concurrency=2)
    async with running(spec) as host:
        peer = Peer(DEADLINE_S)
        exchange = peer.open("GET", b"/stream", b"n=100&delay=0.2")
        task = asyncio.ensure_future(host.http(exchange))
        await peer.until(lambda: b"chunk 0" in peer.body(), "the first chunk")
        exchange.on_cancel()
        await asyncio.wait_for(task, 2.0)  # the stream had 20 s to go
        assert exchange.finished
        # The slot is free: the next request gets through.
        again = Peer(DEADLINE_S)
        await asyncio.wait_for(host.http(again.open("GET", b"/hello")), DEADLINE_S)
        assert json.loads(again.body())["path"] == "/hello"


async def test_http_to_a_dead_server_leaves_the_answer_to_the_crash(tmp_path: Path,
                                                                    output: tuple[Recorder, Recorder]) -> None:
    server = script(tmp_path, "server.py", MISC_SERVER)
    host = CustomHost(make_spec(tmp_path, [str(server)]))
    await asyncio.wait_for(host.start(), DEADLINE_S)
    assert host.child is not None
    os.kill(host.child.pid, signal.SIGKILL)
    await asyncio.wait_for(asyncio.shield(host.child.exited), DEADLINE_S)
    peer = Peer(DEADLINE_S)
    exchange = peer.open("GET", b"/")
    call = asyncio.ensure_future(host.http(exchange))
    done, _ = await asyncio.wait([call], timeout=3 * custom_module.EXIT_SETTLE_S)
    assert not done and not exchange.finished and not peer.frames
    # The worker gives up its streams when the function's process exits: still no answer.
    exchange.on_cancel()
    done, _ = await asyncio.wait([call], timeout=3 * custom_module.EXIT_SETTLE_S)
    assert not done and not exchange.finished and not peer.frames
    await asyncio.wait_for(host.close(), DEADLINE_S)
    with pytest.raises(RuntimeExitedError, match="killed by SIGKILL"):
        await asyncio.wait_for(call, DEADLINE_S)
    assert peer.head() is None and peer.result() is None


# ---- the express example (Node.js) -------------------------------------------------------


@pytest.fixture(scope="module")
def express_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the express example")
    target = tmp_path_factory.mktemp("express")
    for name in ("package.json", "package-lock.json", "server.js"):
        source = EXAMPLES / "express" / name
        if source.exists():
            shutil.copy(source, target / name)
    command = ["npm", "ci" if (target / "package-lock.json").exists() else "install", "--no-audit", "--no-fund"]
    try:
        subprocess.run(command, cwd=target, check=True, capture_output=True, timeout=180)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"npm could not install express (offline?): {stderr.decode(errors='replace')[-500:]}")
    return target


async def test_express_example(express_dir: Path, output: tuple[Recorder, Recorder]) -> None:
    spec = make_spec(express_dir, ["node", "server.js"], ready="http:/healthz", hooks=["initialize", "pre-stop"],
                     concurrency=4, startup_timeout_s=15.0)
    async with running(spec) as host:
        assert (await host.run("initialize", "init-1", {}, 2.0, b"")).ok
        result = await host.run("invoke", "req-1", {}, 2.0, b'{"name": "node"}')
        assert result.ok, result.error
        answer = json.loads(result.body)
        assert answer["hello"] == "node" and answer["requestId"] == "req-1" and answer["initializedAt"]
        failed = await host.run("invoke", "req-2", {}, 2.0, b"fail")
        assert not failed.ok and failed.error.error_type == "Error"
        assert failed.error.error_message == "the event asked to fail"

        hello = Peer(DEADLINE_S)
        await asyncio.wait_for(host.http(hello.open("GET", b"/hello", b"name=express")), DEADLINE_S)
        assert hello.body() == b"hello, express!\n"

        stream = Peer(DEADLINE_S)
        task = asyncio.ensure_future(host.http(stream.open("GET", b"/stream", b"n=3&delay=300")))
        await stream.until(lambda: b"chunk 0" in stream.body(), "the first chunk")
        assert not task.done()
        await asyncio.wait_for(task, DEADLINE_S)
        assert stream.body() == b"chunk 0\nchunk 1\nchunk 2\n"

        upload = Peer(DEADLINE_S)
        body = os.urandom(3 * frames.STREAM_WINDOW)
        task = asyncio.ensure_future(host.http(upload.open("POST", b"/upload", body=body[:1000], more_body=True)))
        await upload.feed(body[1000:])
        await asyncio.wait_for(task, DEADLINE_S)
        echo = json.loads(upload.body())
        assert echo["body_bytes"] == len(body) and echo["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert (await host.run("pre_stop", "stop-1", {}, 2.0, b"")).ok
