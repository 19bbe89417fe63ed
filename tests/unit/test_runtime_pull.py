"""worker.runtimes.pull (+ lambda_api, scf_api): pull-model runtimes on real processes.

The host starts real runtimes (awslambdaric and the SCF bash bootstrap from
examples/, and a small Lambda runtime client written here) and talks to them
through real sockets; the runtime APIs are also probed over HTTP with httpx.
No plane is involved. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest

from cahttp.server import HttpServer
from calink.messages import ErrorInfo, Result
from worker.host import StartupError
from worker.runtimes.events import Event, EventQueue
from worker.runtimes.lambda_api import LambdaApi
from worker.runtimes.pull import PullHost
from worker.runtimes.scf_api import ScfApi

ROOT = Path(__file__).resolve().parents[2]
LAMBDA_DIR = ROOT / "examples" / "lambda"
SCF_DIR = ROOT / "examples" / "scf"
RIC = [sys.executable, "-m", "awslambdaric"]
DEADLINE_S = 10.0

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spec(runtime: str, code_dir: Path, command: list[str], **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "worker_id": "fn-1-abc", "function": "fn", "runtime": runtime, "code_dir": str(code_dir),
        "timeout_s": 30.0, "concurrency": 1, "max_body": 1024 * 1024, "memory_limit_mb": 256,
        "command": command, "startup_timeout_s": DEADLINE_S, "handler": None,
    }
    base.update(extra)
    return base


async def until(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    """Waits (polling) until ``condition()`` holds; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def within(awaitable: Awaitable[Any], timeout_s: float = DEADLINE_S) -> Any:
    return await asyncio.wait_for(awaitable, timeout_s)


def gone(pids: list[int]) -> bool:
    """None of ``pids`` exists any more (a zombie still exists: nobody reaped it)."""
    return not any(psutil.pid_exists(pid) for pid in pids)


def tree(pid: int) -> list[int]:
    try:
        return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


async def invoke(host: PullHost, request_id: str, event: Any, headers: dict[str, str] | None = None) -> Result:
    body = event if isinstance(event, bytes) else orjson.dumps(event)
    result: Result = await within(host.run("invoke", request_id, headers or {}, 30.0, body))
    return result


@pytest.fixture
async def started() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[PullHost]]]:
    """Starts hosts and always closes them, asserting that no process is left."""
    hosts: list[PullHost] = []

    async def start(host_spec: dict[str, Any]) -> PullHost:
        host = PullHost(host_spec)
        hosts.append(host)
        await within(host.start())
        return host

    yield start
    for host in hosts:
        pids = tree(host.child.pid) if host.child is not None and host.child.pid else []
        await within(host.close())
        assert gone(pids), f"processes left after close(): {pids}"


# A minimal Lambda runtime client: `threads` pollers (AWS_LAMBDA_MAX_CONCURRENCY),
# each GET next -> act on the event -> POST response or error.
CLIENT = textwrap.dedent('''
    import json, os, threading, time, urllib.request

    API = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime"
    THREADS = int(os.environ.get("AWS_LAMBDA_MAX_CONCURRENCY", "1"))
    barrier = threading.Barrier(2, timeout=10)

    def post(path, body, headers=None):
        request = urllib.request.Request(API + path, data=body, method="POST", headers=headers or {})
        with urllib.request.urlopen(request) as answer:
            answer.read()

    def serve():
        while True:
            with urllib.request.urlopen(API + "/invocation/next") as answer:
                event = json.loads(answer.read())
                headers = {k.lower(): v for k, v in answer.headers.items()}
            rid = headers["lambda-runtime-aws-request-id"]
            if "barrier" in event:
                barrier.wait()  # both events must be in flight at once to get past this
            if "hold" in event:  # answer once the test creates this file
                deadline = time.monotonic() + 10
                while not os.path.exists(event["hold"]) and time.monotonic() < deadline:
                    time.sleep(0.005)
            if "error" in event:
                post(f"/invocation/{rid}/error", json.dumps({"errorType": event["error"], "errorMessage": "as asked",
                                                             "stackTrace": ["line one", "line two"]}).encode(),
                     {"Lambda-Runtime-Function-Error-Type": "Unhandled"})
                continue
            env = {k: os.environ.get(k) for k in ("_HANDLER", "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_MAX_CONCURRENCY",
                                                  "LAMBDA_TASK_ROOT", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                                                  "AWS_LAMBDA_FUNCTION_VERSION", "AWS_REGION", "GREETING")}
            post(f"/invocation/{rid}/response", json.dumps({"event": event, "headers": headers, "env": env,
                                                            "thread": threading.current_thread().name}).encode(),
                 {"Content-Type": "application/json"})

    if os.environ.get("FAIL_INIT"):
        post("/init/error", json.dumps({"errorType": "ConfigMissing", "errorMessage": "no config"}).encode(),
             {"Lambda-Runtime-Function-Error-Type": "ConfigMissing"})
        raise SystemExit(1)
    workers = [threading.Thread(target=serve, name=f"poller-{i}", daemon=True) for i in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
''')


@pytest.fixture
def client_dir(tmp_path: Path) -> Path:
    (tmp_path / "client.py").write_text(CLIENT)
    return tmp_path


# ---- the event queue (pure bookkeeping) ---------------------------------------------------------


def make_event(request_id: str) -> Event:
    return Event(request_id=request_id, body=b"{}", headers={}, timeout_s=1.0, deadline_ms=0)


async def test_queue_hands_events_to_pollers_in_order() -> None:
    queue = EventQueue()
    first, second = queue.poll(), queue.poll()
    a, b = make_event("a"), make_event("b")
    queue.put(a)
    queue.put(b)
    assert first.result() is a and second.result() is b
    queue.take(a)
    assert queue.answer("a", Result(ok=True, body=b"1"))
    assert a.result.result().body == b"1"
    assert not queue.answer("a", Result(ok=True)), "an answered id is not in flight any more"


async def test_queue_given_back_event_goes_first_and_withdrawn_pollers_are_skipped() -> None:
    queue = EventQueue()
    left = queue.poll()
    left.cancel()  # a poller that gave up
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert queue.waiting() == 0
    a, b = make_event("a"), make_event("b")
    queue.put(a)
    queue.put(b)
    taken = queue.poll().result()
    assert taken is a
    queue.give_back(taken)  # its poller hung up before it was told
    assert queue.poll().result() is a
    assert queue.poll().result() is b


async def test_queue_refuses_a_duplicate_id_without_disturbing_the_original() -> None:
    queue = EventQueue()
    original, duplicate = make_event("x"), make_event("x")
    queue.put(original)
    queue.put(duplicate)
    assert duplicate.result.result().error.error_type == "DuplicateRequestIdError"
    queue.withdraw(duplicate)  # what run() does when the duplicate returns
    queue.take(queue.poll().result())
    assert queue.answer("x", Result(ok=True)) and original.result.result().ok


async def test_queue_close_fails_everything_now_and_later() -> None:
    queue = EventQueue()
    flying, handed = make_event("f"), make_event("h")
    queue.put(flying)
    queue.take(queue.poll().result())
    receiving = queue.poll()
    queue.put(handed)  # handed to that poller, not yet taken
    idle = queue.poll()
    error = ErrorInfo(error_type="RuntimeExitedError", error_message="gone")
    queue.close(error)
    assert flying.result.result().error == error and handed.result.result().error == error
    assert receiving.result() is handed and idle.cancelled()
    queue.take(handed)  # what the poller does next: nothing is in flight after close
    assert not queue.in_flight
    late = make_event("late")
    queue.put(late)
    assert late.result.result().error == error
    other = EventQueue()
    pending = make_event("p")
    other.put(pending)
    other.close(error)
    assert pending.result.result().error == error


# ---- Lambda through awslambdaric ------------------------------------------------------------------


async def test_lambda_success_through_awslambdaric(started: Any) -> None:
    host = await started(spec("lambda", LAMBDA_DIR, [*RIC, "app.handler"], function="greeter"))
    result = await invoke(host, "req-1", {"name": "ada"})
    assert result.ok, result.error
    assert result.content_type == "application/json"
    answer = orjson.loads(result.body)
    assert answer["hello"] == "ada"
    assert answer["request_id"] == "req-1"
    assert answer["function"] == "greeter"
    assert 0 < answer["remaining_ms"] <= 30_000
    empty = await invoke(host, "req-2", b"")  # no payload: Lambda's {} event
    assert empty.ok and orjson.loads(empty.body)["hello"] == "world"


async def test_lambda_handler_error_is_an_error_result_with_the_exception_type(started: Any) -> None:
    host = await started(spec("lambda", LAMBDA_DIR, [*RIC, "app.handler"]))
    result = await invoke(host, "req-err", {"fail": "on purpose"})
    assert not result.ok
    assert result.error.error_type == "RequestedFailure"
    assert result.error.error_message == "on purpose"
    assert "app.py" in result.error.stack_trace and "raise RequestedFailure" in result.error.stack_trace
    after = await invoke(host, "req-ok", {"name": "again"})  # the runtime goes on
    assert after.ok


async def test_lambda_init_error_is_a_startup_error_with_the_runtime_type(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(
        "class ConfigMissing(Exception):\n    pass\n\nraise ConfigMissing('DATABASE_URL is not set')\n"
        "def handler(event, context):\n    return event\n")
    host = PullHost(spec("lambda", tmp_path, [*RIC, "broken.handler"]))
    with pytest.raises(StartupError) as caught:
        await within(host.start())
    info = caught.value.info
    assert info.error_type == "ConfigMissing"
    assert "DATABASE_URL is not set" in info.error_message
    assert host.child is not None and host.child.exited.done(), "a failed start leaves nothing running"


async def test_lambda_missing_module_reports_awslambdaric_error_type(tmp_path: Path) -> None:
    host = PullHost(spec("lambda", tmp_path, [*RIC, "nowhere.handler"]))
    with pytest.raises(StartupError) as caught:
        await within(host.start())
    assert caught.value.info.error_type == "Runtime.ImportModuleError"
    assert "nowhere" in caught.value.info.error_message


@pytest.mark.parametrize("runtime, hint", [("lambda", "/2018-06-01/runtime/invocation/next"),
                                           ("scf", "/runtime/init/ready")])
async def test_a_runtime_that_never_gets_ready_fails_after_startup_timeout(tmp_path: Path, runtime: str,
                                                                           hint: str) -> None:
    command = [sys.executable, "-c", "print('warming up', flush=True)\nimport time\ntime.sleep(60)"]
    host = PullHost(spec(runtime, tmp_path, command, startup_timeout_s=0.5))
    started_at = time.monotonic()
    with pytest.raises(StartupError) as caught:
        await within(host.start())
    assert 0.5 <= time.monotonic() - started_at < DEADLINE_S
    info = caught.value.info
    assert info.error_type == "RuntimeInitError"
    assert "not ready within 0.5s" in info.error_message and hint in info.error_message
    assert "warming up" in info.error_message, "the runtime's last output explains the failure"
    assert host.child is not None and host.child.exited.done(), "the runtime was stopped"


async def test_a_runtime_that_exits_during_init_fails_with_its_output(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "print('cannot open /etc/app.conf', flush=True)\nraise SystemExit(3)"]
    host = PullHost(spec("lambda", tmp_path, command))
    with pytest.raises(StartupError) as caught:
        await within(host.start())
    info = caught.value.info
    assert info.error_type == "RuntimeInitError"
    assert "exit code 3" in info.error_message and "cannot open /etc/app.conf" in info.error_message


async def test_lambda_concurrency_through_awslambdaric_processes(started: Any) -> None:
    host = await started(spec("lambda", LAMBDA_DIR, [*RIC, "app.handler"], concurrency=2))
    results = await within(asyncio.gather(*(invoke(host, f"c-{i}", {"name": str(i)}) for i in range(6))))
    assert [orjson.loads(r.body)["hello"] for r in results] == [str(i) for i in range(6)]
    assert host.child is not None and len(tree(host.child.pid)) >= 3, "awslambdaric forked one poller per slot"


# ---- Lambda through a runtime client written here -------------------------------------------------


async def test_two_pollers_take_two_events_at_once_and_output_is_attributed(started: Any, client_dir: Path) -> None:
    os.environ["GREETING"] = "from the worker's environment"
    try:
        host = await started(spec("lambda", client_dir, [sys.executable, "client.py"], concurrency=2,
                                  handler="client.handler", function="pair"))
    finally:
        del os.environ["GREETING"]
    assert host.child is not None
    release = client_dir / "release"
    held = {"barrier": True, "hold": str(release)}
    first = asyncio.ensure_future(invoke(host, "one", held))
    await until(lambda: "one" in host.queue.in_flight, "the first event in flight")
    assert host.child.request_id == "one", "one invocation in flight: its output is its own"
    duplicate = await invoke(host, "one", held)
    assert duplicate.error.error_type == "DuplicateRequestIdError"
    assert host.child.request_id == "one"
    second = asyncio.ensure_future(invoke(host, "two", held, {"x-amzn-trace-id": "Root=1-abc-def"}))
    await until(lambda: "two" in host.queue.in_flight, "the second event in flight")
    assert host.child.request_id is None, "two in flight: no single request owns the output"
    release.touch()
    one, two = await within(asyncio.gather(first, second))
    assert one.ok and two.ok, (one.error, two.error)
    answers = [orjson.loads(one.body), orjson.loads(two.body)]
    assert {a["thread"] for a in answers} == {"poller-0", "poller-1"}, "both pollers had an event at once"
    env, headers = answers[1]["env"], answers[1]["headers"]
    assert env == {"_HANDLER": "client.handler", "AWS_LAMBDA_FUNCTION_NAME": "pair", "AWS_LAMBDA_MAX_CONCURRENCY": "2",
                   "LAMBDA_TASK_ROOT": str(client_dir), "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
                   "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST", "AWS_REGION": "us-east-1",
                   "GREETING": "from the worker's environment"}
    assert headers["lambda-runtime-aws-request-id"] == "two"
    assert headers["lambda-runtime-trace-id"] == "Root=1-abc-def"
    assert headers["lambda-runtime-invoked-function-arn"] == "arn:aws:lambda:us-east-1:000000000000:function:pair"
    assert abs(int(headers["lambda-runtime-deadline-ms"]) - (time.time() + 30) * 1000) < 10_000
    assert host.child.request_id is None


async def test_runtime_error_report_keeps_body_type_and_joins_the_trace(started: Any, client_dir: Path) -> None:
    host = await started(spec("lambda", client_dir, [sys.executable, "client.py"]))
    result = await invoke(host, "e-1", {"error": "ValueError"})
    assert not result.ok
    assert (result.error.error_type, result.error.error_message) == ("ValueError", "as asked")
    assert result.error.stack_trace == "line one\nline two\n"


async def test_init_error_from_a_runtime_client(client_dir: Path) -> None:
    os.environ["FAIL_INIT"] = "1"
    try:
        host = PullHost(spec("lambda", client_dir, [sys.executable, "client.py"]))
        with pytest.raises(StartupError) as caught:
            await within(host.start())
    finally:
        del os.environ["FAIL_INIT"]
    assert caught.value.info.error_type == "ConfigMissing"
    assert "no config" in caught.value.info.error_message


async def test_close_fails_waiting_invocations_and_leaves_no_process(client_dir: Path) -> None:
    host = PullHost(spec("lambda", client_dir, [sys.executable, "client.py"]))
    await within(host.start())
    assert host.child is not None
    pids = tree(host.child.pid)
    waiting = asyncio.ensure_future(invoke(host, "held", {"hold": str(client_dir / "never")}))
    await until(lambda: "held" in host.queue.in_flight, "the event in flight")
    await within(host.close())
    result = await within(waiting)
    assert result.error.error_type == "RuntimeExitedError"
    assert gone(pids)
    await within(host.close())  # idempotent


# ---- SCF through the example bash bootstrap -------------------------------------------------------


needs_curl = pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None,
                                reason="the SCF example bootstrap needs bash and curl")


@needs_curl
async def test_scf_bootstrap_success_and_error(started: Any) -> None:
    host = await started(spec("scf", SCF_DIR, ["./bootstrap"]))
    result = await invoke(host, "s-1", {"name": "ada"})
    assert result.ok, result.error
    assert result.body == b"Echoing request: '{\"name\":\"ada\"}'"
    assert result.content_type == "", "curl's form default says nothing about the result"
    failed = await invoke(host, "s-2", {"fail": True})
    assert not failed.ok
    assert failed.error.error_type == "FunctionError"
    assert failed.error.error_message == "handler failed for request s-2"
    again = await invoke(host, "s-3", {"name": "bob"})
    assert again.ok and b"bob" in again.body


# ---- the runtime APIs over HTTP -------------------------------------------------------------------


class Served:
    """A runtime API on a loopback port, with an httpx client for it."""

    def __init__(self, app: Any, queue: EventQueue) -> None:
        self.app = app
        self.queue = queue
        self.server = HttpServer(app, "127.0.0.1", 0)
        self.client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Served:
        await self.server.start()
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE_S)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.client is not None
        await self.client.aclose()
        self.queue.close(ErrorInfo(error_type="Closed"))
        await self.server.shutdown(1.0)

    @property
    def http(self) -> httpx.AsyncClient:
        assert self.client is not None
        return self.client

    def put(self, request_id: str, body: bytes = b'{"k": 1}', headers: dict[str, str] | None = None) -> Event:
        event = Event(request_id=request_id, body=body, headers=headers or {}, timeout_s=3.0,
                      deadline_ms=int((time.time() + 3) * 1000))
        self.queue.put(event)
        return event


def lambda_api(max_body: int = 1024) -> Served:
    queue = EventQueue()
    return Served(LambdaApi(queue, function="f", max_body=max_body, region="eu-west-1", account="123456789012"), queue)


def scf_api(max_body: int = 1024, redeliver: bool = True) -> Served:
    queue = EventQueue()
    return Served(ScfApi(queue, max_body=max_body, memory_mb=128, redeliver=redeliver), queue)


NEXT = "/2018-06-01/runtime/invocation/next"
INIT_ERROR = "/2018-06-01/runtime/init/error"


def answer_path(request_id: str, verb: str = "response") -> str:
    return f"/2018-06-01/runtime/invocation/{request_id}/{verb}"


async def test_lambda_api_next_headers_and_answers() -> None:
    async with lambda_api() as api:
        event = api.put("r-1", headers={
            "x-amz-client-context": "eyJjbGllbnQiOiB7ImFwcCI6ICJ4In19",  # base64 of {"client": {"app": "x"}}
            "lambda-runtime-cognito-identity": '{"cognitoIdentityId": "id-1"}'})
        got = await api.http.get(NEXT)
        assert got.status_code == 200 and got.content == b'{"k": 1}'
        assert got.headers["content-type"] == "application/json"
        assert got.headers["lambda-runtime-aws-request-id"] == "r-1"
        assert got.headers["lambda-runtime-deadline-ms"] == str(event.deadline_ms)
        assert got.headers["lambda-runtime-invoked-function-arn"] == "arn:aws:lambda:eu-west-1:123456789012:function:f"
        assert got.headers["lambda-runtime-trace-id"].startswith("Root=1-")
        assert got.headers["lambda-runtime-client-context"] == '{"client":{"app":"x"}}'
        assert got.headers["lambda-runtime-cognito-identity"] == '{"cognitoIdentityId":"id-1"}'
        assert api.app.startup.result() is None, "the first poll means the runtime is ready"
        done = await api.http.post(answer_path("r-1"), content=b"[1, 2]", headers={"content-type": "text/x-mine"})
        assert (done.status_code, done.json()) == (202, {"status": "OK"})
        assert event.result.result() == Result(ok=True, body=b"[1, 2]", content_type="text/x-mine")
        again = await api.http.post(answer_path("r-1"), content=b"late")
        assert (again.status_code, again.json()["errorType"]) == (400, "InvalidRequestID")
        unknown = await api.http.post(answer_path("nobody", "error"), content=b"{}")
        assert (unknown.status_code, unknown.json()["errorType"]) == (400, "InvalidRequestID")


async def test_lambda_api_refuses_a_body_over_max_body_and_fails_the_invocation() -> None:
    async with lambda_api(max_body=1000) as api:
        event = api.put("big")
        assert (await api.http.get(NEXT)).status_code == 200
        refused = await api.http.post(answer_path("big"), content=b"x" * 1001)
        assert (refused.status_code, refused.json()["errorType"]) == (413, "RequestEntityTooLarge")
        assert event.result.result().error.error_type == "ResultTooLargeError"
        # Chunked (no Content-Length): refused while reading, all the same.
        streamed = api.put("streamed")
        assert (await api.http.get(NEXT)).status_code == 200

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(64):
                yield b"y" * 100

        refused = await api.http.post(answer_path("streamed", "error"), content=chunks())
        assert refused.status_code == 413
        assert streamed.result.result().error.error_type == "ResultTooLargeError"
        finished = await api.http.post(answer_path("big"), content=b"{}")
        assert finished.status_code == 400, "the refused invocation is over"


async def test_lambda_api_init_error_is_taken_during_init_only() -> None:
    async with lambda_api() as api:
        report = {"errorType": "Runtime.ImportModuleError", "errorMessage": "no module", "stackTrace": []}
        first = await api.http.post(INIT_ERROR, json=report)
        assert (first.status_code, first.json()) == (202, {"status": "OK"})
        info = api.app.startup.result()
        assert (info.error_type, info.error_message) == ("Runtime.ImportModuleError", "no module")
        second = await api.http.post(INIT_ERROR, json=report)
        assert (second.status_code, second.json()["errorType"]) == (403, "InvalidStateTransition")
        poll = await api.http.get(NEXT)
        assert poll.status_code == 403, "a runtime that failed init must exit, not poll"
    async with lambda_api() as api:
        poller = asyncio.ensure_future(api.http.get(NEXT))
        await until(lambda: api.app.startup.done(), "the first poll")
        late = await api.http.post(INIT_ERROR, json={"errorType": "Late", "errorMessage": "too late"})
        assert (late.status_code, late.json()["errorType"]) == (403, "InvalidStateTransition")
        api.put("wake")
        assert (await within(poller)).status_code == 200


async def test_lambda_api_unknown_paths_and_methods() -> None:
    async with lambda_api() as api:
        assert (await api.http.get("/2018-06-01/runtime/restore/next")).status_code == 404
        assert (await api.http.get("/2018-06-01/runtime/invocation/r/other")).status_code == 404
        assert (await api.http.get("/")).status_code == 404
        wrong = await api.http.post(NEXT)
        assert (wrong.status_code, wrong.headers["allow"]) == (405, "GET")
        assert (await api.http.get(answer_path("r"))).status_code == 405


async def test_a_poller_that_hangs_up_gives_its_event_back() -> None:
    async with lambda_api() as api:
        with pytest.raises(httpx.ReadTimeout):
            await api.http.get(NEXT, timeout=0.2)
        await until(lambda: api.queue.waiting() == 0, "the server to notice the hang-up")
        event = api.put("kept")
        got = await api.http.get(NEXT)
        assert got.headers["lambda-runtime-aws-request-id"] == "kept"
        assert "kept" in api.queue.in_flight and not event.result.done()


async def test_scf_api_ready_next_and_answers() -> None:
    async with scf_api() as api:
        assert (await api.http.post("/runtime/init/ready", content=b" ")).status_code == 200
        assert api.app.startup.result() is None
        assert (await api.http.post("/runtime/init/ready", content=b" ")).status_code == 200, "repeats are fine"
        none = await api.http.post("/runtime/invocation/response", content=b"orphan")
        assert (none.status_code, none.json()["errorType"]) == (400, "NoInvocationInFlight")
        event = api.put("s-1", body=b"evt")
        got = await api.http.get("/runtime/invocation/next")
        assert (got.status_code, got.content) == (200, b"evt")
        assert (got.headers["request_id"], got.headers["memory_limit_in_mb"],
                got.headers["time_limit_in_ms"]) == ("s-1", "128", "3000")
        repeat = await api.http.get("/runtime/invocation/next")
        assert repeat.headers["request_id"] == "s-1", "SCF: polling again mid-invocation returns the same event"
        done = await api.http.post("/runtime/invocation/response", content=b"ok",
                                   headers={"content-type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200
        assert event.result.result() == Result(ok=True, body=b"ok", content_type="")
        late = await api.http.post("/runtime/invocation/error", content=b"changed my mind")
        assert late.status_code == 400, "the first result is final"
        failing = api.put("s-2")
        await api.http.get("/runtime/invocation/next")
        assert (await api.http.post("/runtime/invocation/error", content=b"parse event error")).status_code == 200
        assert failing.result.result().error == ErrorInfo(error_type="FunctionError",
                                                              error_message="parse event error")


async def test_scf_api_pairs_answers_by_request_id_when_several_are_in_flight() -> None:
    async with scf_api(redeliver=False) as api:
        first, second = api.put("a"), api.put("b")
        assert (await api.http.get("/runtime/invocation/next")).headers["request_id"] == "a"
        assert (await api.http.get("/runtime/invocation/next")).headers["request_id"] == "b"
        ambiguous = await api.http.post("/runtime/invocation/response", content=b"?")
        assert (ambiguous.status_code, ambiguous.json()["errorType"]) == (400, "AmbiguousInvocation")
        assert (await api.http.post("/runtime/invocation/response", content=b"B",
                                    headers={"request_id": "b"})).status_code == 200
        assert (await api.http.post("/runtime/invocation/response", content=b"A")).status_code == 200
        assert (first.result.result().body, second.result.result().body) == (b"A", b"B")


async def test_scf_api_limits_and_unknown_paths() -> None:
    async with scf_api(max_body=10) as api:
        event = api.put("big")
        await api.http.get("/runtime/invocation/next")
        refused = await api.http.post("/runtime/invocation/response", content=b"z" * 11)
        assert refused.status_code == 413
        assert event.result.result().error.error_type == "ResultTooLargeError"
        assert (await api.http.get("/runtime/other")).status_code == 404
        wrong = await api.http.get("/runtime/init/ready")
        assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")
