"""Pull-model runtimes: the function's own process polls this worker for events.

``runtime = "lambda"`` and ``runtime = "scf"`` run the user's ``command``
(``python -m awslambdaric app.handler``, an SCF ``bootstrap``...) as a child
of the worker and serve it a runtime API on a private loopback port
(``lambda_api`` or ``scf_api``). An invocation becomes the next event the
runtime pulls; the runtime's answer becomes the invocation's ``Result``.

The pieces and their rules:

- ``EventQueue`` is the bookkeeping between invocations and the runtime, and
  does no I/O. An event is *pending* until a poller takes it, then *in
  flight* until the runtime answers it (or the host closes). A poller that
  leaves before it was told about its event gives the event back, at the
  head of the queue. Request ids are unique among pending and in-flight
  events (they pair answers with events); a duplicate is refused at once.
- Several pollers may wait at once (``concurrency`` > 1): events go to them
  in arrival order. The data plane never sends more than ``concurrency``
  invocations at a time, so the host adds no limit of its own, and no timer:
  the data plane enforces the timeout by killing the worker.
- Request bodies posted by the runtime are read at most ``max_body`` bytes
  deep: a larger one is refused with 413 as soon as it is known (from
  Content-Length, or while reading), never buffered whole; the server
  discards the rest as it arrives.
- Closing stops the runtime first (its long polls end with its
  connections), then fails what is still queued or in flight, then stops the
  server; a poll still open then is answered 500, which the Lambda API
  defines as "runtime should exit promptly".
- ``PullHost.start`` returns once the runtime is ready (Lambda: its first
  ``GET .../invocation/next``; SCF: ``POST /runtime/init/ready``). An init
  error it reports, its exit, or ``startup_timeout_s`` without readiness
  raise ``StartupError`` naming the cause, with the runtime's last output
  lines, and leave nothing running.
- The child's environment is the worker's own (the launcher built it from
  the function's ``env`` and FC's variables; nothing of the supervisor's
  reaches it) plus the runtime's documented variables, which win.
- While exactly one invocation is in flight, ``child.request_id`` names it,
  so the runtime's output is attributed to it; FC's markers frame every
  invocation.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import psutil

from supervisor.data.http_server import HttpServer
from supervisor.v1 import worker_pb2 as wpb
from worker.host import HttpExchange, StartupError
from worker.python.host import Invocation
from worker.runtimes.child import ChildProcess, describe_exit

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

LOOPBACK = "127.0.0.1"
STOP_GRACE_S = 2.0  # SIGTERM to SIGKILL for the runtime when the worker exits
SERVER_SHUTDOWN_S = 0.5  # the runtime is gone by then: what remains are idle long polls
DEFAULT_MAX_BODY = 6 * 1024 * 1024
INIT_ERROR_TYPE = "RuntimeInitError"
TOO_LARGE_TYPE = "ResultTooLargeError"  # the Python host's name for the same failure
STOPPED_TYPE = "RuntimeExitedError"


class ClientGone(Exception):
    """The runtime closed its connection before the exchange was complete."""


class QueueClosed(Exception):
    """The host is closing: a poller is told to exit instead of given an event."""


# ---- events ------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Event:
    """One invocation as the runtime sees it."""

    request_id: str
    body: bytes
    headers: Mapping[str, str]  # the invocation's request headers (lower-case names)
    timeout_s: float
    deadline_ms: int  # epoch milliseconds: what runtimes are told (they compare with wall time)
    result: asyncio.Future[wpb.Result] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class EventQueue:
    """Invocations waiting for the runtime, and those it has taken (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: deque[Event] = deque()
        self._pollers: deque[asyncio.Future[Event]] = deque()
        self.in_flight: dict[str, Event] = {}
        # Every event not yet answered (pending, handed to a poller, in flight) by request id.
        self._ids: dict[str, Event] = {}
        self._closed: wpb.ErrorInfo | None = None

    def put(self, event: Event) -> None:
        """Queues an invocation; its ``result`` resolves when the runtime answers."""
        if self._closed is not None:
            event.result.set_result(wpb.Result(ok=False, error=self._closed))
            return
        if event.request_id in self._ids:
            event.result.set_result(wpb.Result(ok=False, error=wpb.ErrorInfo(
                error_type="DuplicateRequestIdError",
                error_message=f"request id {event.request_id!r} is already in flight on this worker; "
                              "the runtime pairs answers with events by id, so ids must be unique")))
            return
        self._ids[event.request_id] = event
        self._pending.append(event)
        self._dispatch()

    def poll(self) -> asyncio.Future[Event]:
        """A future for the next event (already resolved when one is pending;
        already cancelled when the queue is closed).

        Cancelling it withdraws the poller. The event it yields is not yet in
        flight: the caller either ``take``s it or ``give_back``s it.
        """
        waiter: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        if self._closed is not None:
            waiter.cancel()
            return waiter
        waiter.add_done_callback(self._forget_poller)
        self._pollers.append(waiter)
        self._dispatch()
        return waiter

    def _forget_poller(self, waiter: asyncio.Future[Event]) -> None:
        # A poller that gave up leaves at once: a runtime polling with a timeout
        # in a loop must not grow the queue of pollers while no event comes.
        if waiter.cancelled():
            try:
                self._pollers.remove(waiter)
            except ValueError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def waiting(self) -> int:
        """How many pollers are waiting for an event now."""
        return sum(1 for waiter in self._pollers if not waiter.done())

    def take(self, event: Event) -> None:
        """The runtime is being told about ``event``: it is in flight until answered."""
        if not event.result.done():
            self.in_flight[event.request_id] = event

    def give_back(self, event: Event) -> None:
        """A poller left before it was told about ``event``: the next poller gets it."""
        if not event.result.done():
            self._pending.appendleft(event)
            self._dispatch()

    def answer(self, request_id: str, result: wpb.Result) -> bool:
        """Completes the in-flight event ``request_id``; False when there is none."""
        event = self.in_flight.pop(request_id, None)
        if event is None:
            return False
        del self._ids[request_id]
        if not event.result.done():
            event.result.set_result(result)
        return True

    def withdraw(self, event: Event) -> None:
        """Forgets ``event`` wherever it still is (its invocation ended or was cancelled).

        Only this very event: a refused duplicate must not remove the
        original that holds the same id.
        """
        if self._ids.get(event.request_id) is not event:
            return
        del self._ids[event.request_id]
        if self.in_flight.get(event.request_id) is event:
            del self.in_flight[event.request_id]
        else:
            try:
                self._pending.remove(event)
            except ValueError:
                pass

    def close(self, error: wpb.ErrorInfo) -> None:
        """Fails every pending and in-flight event, and every later ``put``."""
        self._closed = error
        # Every event it knows, including one handed to a poller and not yet taken.
        for event in self._ids.values():
            if not event.result.done():
                event.result.set_result(wpb.Result(ok=False, error=error))
        self._pending.clear()
        self.in_flight.clear()
        self._ids.clear()
        for waiter in self._pollers:
            waiter.cancel()
        self._pollers.clear()

    def _dispatch(self) -> None:
        while self._pending and self._pollers:
            waiter = self._pollers.popleft()
            if waiter.done():  # its poller left (cancelled)
                continue
            event = self._pending.popleft()
            if event.result.done():  # withdrawn or closed meanwhile
                continue
            waiter.set_result(event)


# ---- the HTTP plumbing both runtime APIs share --------------------------------------------


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower-case bytes), as text."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The request body, or None once it is known to exceed ``limit`` bytes.

    Raises ``ClientGone`` if the connection drops before the body is complete.
    """
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def respond(send: Send, status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Sends a whole response.

    The connection stays open even when the request body was left unread: the
    server discards the rest as it arrives. Closing instead would make the
    kernel reset the connection (unread data), which can destroy the answer
    before a client still sending its body has read it.
    """
    head = [(b"content-length", str(len(body)).encode())]
    if headers:
        head.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, status: int, document: Mapping[str, str]) -> None:
    await respond(send, status, orjson.dumps(document), [(b"content-type", b"application/json")])


async def respond_closing(send: Send) -> None:
    """The answer to a poll when the host is closing: exit now."""
    await respond_json(send, 500, {"errorType": "Runtime.ExitError",
                                   "errorMessage": "the worker is stopping; the runtime must exit"})


async def await_event(queue: EventQueue, receive: Receive) -> Event | None:
    """Waits for the next event on behalf of a ``GET .../next`` long poll.

    Returns the event, now in flight, or None when the poller hung up first
    (an event it had been given goes back to the queue). Raises
    ``QueueClosed`` when the host closes the queue meanwhile.
    """
    await receive()  # the (empty) request body; from now on receive() only reports a disconnect
    waiter = queue.poll()
    if not waiter.done():
        hangup = asyncio.ensure_future(receive())
        try:
            await asyncio.wait((waiter, hangup), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            if not waiter.done():
                waiter.cancel()  # the poller left (or the server is shutting down)
        if hangup.done() and not hangup.cancelled() and not waiter.cancelled():
            queue.give_back(waiter.result())  # it hung up as the event came: the next poller gets it
            return None
    if waiter.cancelled():
        if queue.closed:
            raise QueueClosed
        return None
    event = waiter.result()
    queue.take(event)
    return event


def error_info_from_body(body: bytes, header_type: str | None, fallback_type: str) -> wpb.ErrorInfo:
    """An ``ErrorInfo`` from an error report: AWS's JSON shape
    (``errorType``, ``errorMessage``, ``stackTrace`` as a list of lines or a
    string) when the body has it, else the body as the message."""
    document: Any = None
    if body[:1] == b"{":
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            document = None
    if isinstance(document, dict):
        error_type = document.get("errorType")
        message = document.get("errorMessage")
        trace = document.get("stackTrace")
        if isinstance(trace, list):
            lines = [str(line) for line in trace]
            trace = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
        return wpb.ErrorInfo(
            error_type=error_type if isinstance(error_type, str) and error_type else header_type or fallback_type,
            error_message=message if isinstance(message, str) else "",
            stack_trace=trace if isinstance(trace, str) else "")
    return wpb.ErrorInfo(error_type=header_type or fallback_type,
                         error_message=body.decode("utf-8", "replace").strip())


def too_large(request_id: str, what: str, limit: int) -> wpb.Result:
    """The result of an invocation whose answer the runtime API refused with 413."""
    return wpb.Result(ok=False, error=wpb.ErrorInfo(
        error_type=TOO_LARGE_TYPE,
        error_message=f"the runtime's {what} for request {request_id} is larger than max_body ({limit} bytes)"))


# ---- the host ------------------------------------------------------------------------------


class RuntimeApi(Protocol):
    """What ``PullHost`` needs from ``lambda_api.LambdaApi`` and ``scf_api.ScfApi``."""

    # None once the runtime is ready; the runtime's error when it reported one during init.
    startup: asyncio.Future[wpb.ErrorInfo | None]
    ready_hint: str  # what the runtime must do to be ready, for the timeout message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


def _memory_mb(spec: Mapping[str, Any]) -> int:
    """The function's memory limit, or (unlimited) the machine's memory, in MiB."""
    limit = int(spec.get("memory_limit_mb") or 0)
    return limit if limit > 0 else psutil.virtual_memory().total // (1024 * 1024)


class PullHost:
    """Runs a Lambda or SCF runtime as the worker's child and feeds it events."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = spec
        self.runtime: str = spec["runtime"]
        if self.runtime not in ("lambda", "scf"):
            raise ValueError(f"PullHost serves the lambda and scf runtimes, not {self.runtime!r}")
        self.function: str = spec["function"]
        self.code_dir: str = spec["code_dir"]
        self.timeout_s = float(spec["timeout_s"])
        self.concurrency = max(1, int(spec.get("concurrency") or 1))
        self.max_body = int(spec.get("max_body") or DEFAULT_MAX_BODY)
        self.memory_mb = _memory_mb(spec)
        self.startup_timeout_s = float(spec.get("startup_timeout_s") or 10.0)
        self.queue = EventQueue()
        self.api: RuntimeApi | None = None
        self.server: HttpServer | None = None
        self.child: ChildProcess | None = None
        self.port = 0
        self._running: list[str] = []  # request ids of the invocations in run()
        self._closed = False

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.api = self._make_api()
        # Port 0: the kernel picks a free port at bind time, so no other process
        # can take it between choosing and binding.
        self.server = HttpServer(self.api, LOOPBACK, 0)
        await self.server.start()
        assert self.server.server is not None
        self.port = int(self.server.server.sockets[0].getsockname()[1])
        self.child = ChildProcess(list(self.spec["command"]), self.code_dir, self.child_env(),
                                  f"{self.runtime}:{self.function}")
        try:
            await self.child.start()
            await self._wait_ready(self.api, self.child)
        except BaseException:
            await self.close()
            raise

    async def _wait_ready(self, api: RuntimeApi, child: ChildProcess) -> None:
        done, _ = await asyncio.wait((api.startup, child.exited), timeout=self.startup_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        # An init error is reported before the runtime exits: it is the better cause.
        if api.startup.done():
            error = api.startup.result()
            if error is None:
                return
            raise StartupError(error.error_type or INIT_ERROR_TYPE,
                               self._explain(f"the {self.runtime} runtime reported an init error: "
                                             f"{error.error_message or '(no message)'}", child))
        if child.exited in done:
            raise StartupError(INIT_ERROR_TYPE, self._explain(
                f"the {self.runtime} runtime {child.describe()} exited ({describe_exit(child.exited.result())}) "
                "before it was ready", child))
        raise StartupError(INIT_ERROR_TYPE, self._explain(
            f"the {self.runtime} runtime {child.describe()} was not ready within {self.startup_timeout_s:g}s: "
            f"{api.ready_hint} (raise startup_timeout if it needs longer)", child))

    def _explain(self, message: str, child: ChildProcess) -> str:
        lines = child.last_lines()
        if not lines:
            return f"{message}; it printed nothing"
        return message + "; its last output:\n" + "\n".join(f"  {line}" for line in lines)

    def _make_api(self) -> RuntimeApi:
        # Imported here: each API module builds on this one's queue and plumbing.
        if self.runtime == "lambda":
            from worker.runtimes.lambda_api import LambdaApi

            return LambdaApi(self.queue, function=self.function, max_body=self.max_body,
                             region=self._aws_region(), account=os.environ.get("FC_ACCOUNT_ID", ""))
        from worker.runtimes.scf_api import ScfApi

        return ScfApi(self.queue, max_body=self.max_body, memory_mb=self.memory_mb,
                      redeliver=self.concurrency == 1)

    def _aws_region(self) -> str:
        return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    def child_env(self) -> dict[str, str]:
        """The runtime's environment: the worker's, plus the runtime's documented variables."""
        env = dict(os.environ)
        # The configured handler; else one the function's env gives; else empty.
        handler = self.spec.get("handler") or env.get("_HANDLER", "")
        if self.runtime == "lambda":
            env.update(self._lambda_env(handler))
        else:
            env.update(self._scf_env(handler))
        return env

    def _lambda_env(self, handler: str) -> dict[str, str]:
        # As the Lambda developer guide lists them ("Defined runtime environment variables").
        region = self._aws_region()
        stream_id = hashlib.blake2b(str(self.spec.get("worker_id", "")).encode(), digest_size=16).hexdigest()
        env = {
            "AWS_LAMBDA_RUNTIME_API": f"{LOOPBACK}:{self.port}",
            "_HANDLER": handler,
            "AWS_REGION": region,
            "AWS_DEFAULT_REGION": region,
            "AWS_LAMBDA_FUNCTION_NAME": self.function,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
            "AWS_LAMBDA_FUNCTION_TIMEOUT": str(math.ceil(self.timeout_s)),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{self.function}",
            "AWS_LAMBDA_LOG_STREAM_NAME": time.strftime("%Y/%m/%d/", time.gmtime()) + f"[$LATEST]{stream_id}",
            "LAMBDA_TASK_ROOT": self.code_dir,
        }
        if self.concurrency > 1:
            # Lambda Managed Instances' variable: runtimes that know it (awslambdaric
            # forks that many pollers) take up to this many events at once.
            env["AWS_LAMBDA_MAX_CONCURRENCY"] = str(self.concurrency)
        return env

    def _scf_env(self, handler: str) -> dict[str, str]:
        # As SCF's docs list them (see scf_api); account ids and role keys are not ours to invent.
        return {
            "SCF_RUNTIME_API": LOOPBACK,
            "SCF_RUNTIME_API_PORT": str(self.port),
            "_HANDLER": handler,
            "SCF_RUNTIME": "CustomRuntime",
            "SCF_FUNCTIONNAME": self.function,
            "SCF_FUNCTIONVERSION": "$LATEST",
            "SCF_NAMESPACE": os.environ.get("SCF_NAMESPACE", "default"),
            "TENCENTCLOUD_RUNENV": "SCF",
            "TENCENTCLOUD_REGION": os.environ.get("TENCENTCLOUD_REGION", "ap-guangzhou"),
            "USER_CODE_ROOT": self.code_dir,
        }

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The runtime first: its long polls end with its connections, quietly,
        # instead of being answered with an error it would log.
        if self.child is not None:
            await self.child.stop(STOP_GRACE_S)
        self.queue.close(wpb.ErrorInfo(error_type=STOPPED_TYPE,
                                       error_message=f"the {self.runtime} runtime stopped before it answered"))
        if self.server is not None:
            await self.server.shutdown(SERVER_SHUTDOWN_S)

    def exited(self) -> asyncio.Future[int] | None:
        return self.child.exited if self.child is not None else None

    # ---- invocations ---------------------------------------------------------------------

    def has(self, kind: str) -> bool:
        return False  # Lambda and SCF runtimes take no lifecycle hooks

    def runs_inline(self, kind: str) -> bool:
        return kind != "invoke"

    def run_inline(self, kind: str, request_id: str, headers: Mapping[str, str], timeout_s: float,
                   body: bytes) -> wpb.Result:
        """A lifecycle hook: there is none to run, but FC's markers still frame it."""
        with Invocation(kind, request_id):
            return wpb.Result(ok=True)

    async def run(self, kind: str, request_id: str, headers: Mapping[str, str], timeout_s: float,
                  body: bytes) -> wpb.Result:
        if kind != "invoke":
            return self.run_inline(kind, request_id, headers, timeout_s, body)
        if not body and self.runtime == "lambda":
            body = b"{}"  # Lambda's event for an invocation without a payload
        event = Event(request_id=request_id, body=body, headers=headers, timeout_s=timeout_s,
                      deadline_ms=int((time.time() + timeout_s) * 1000))
        self._running.append(request_id)
        self._attribute_output()
        try:
            with Invocation(kind, request_id):
                self.queue.put(event)
                try:
                    return await event.result
                finally:
                    if self.child is not None:
                        # What the runtime printed for this event belongs before its end marker.
                        self.child.flush_output()
        finally:
            self.queue.withdraw(event)
            self._running.remove(request_id)
            self._attribute_output()

    def _attribute_output(self) -> None:
        if self.child is not None:
            self.child.request_id = self._running[0] if len(self._running) == 1 else None

    def serves_http(self) -> bool:
        return False

    async def http(self, exchange: HttpExchange) -> None:
        raise RuntimeError(f"a {self.runtime} function does not serve HTTP requests")
