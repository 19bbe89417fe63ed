"""Pull-model runtimes: the function's own process polls this worker for events.

``runtime = "lambda"`` and ``runtime = "scf"`` run the user's ``command``
(``python -m awslambdaric app.handler``, an SCF ``bootstrap``...) as a child
of the worker and serve it a runtime API on a loopback port
(``lambda_api`` or ``scf_api``) that only the worker's own processes may use
(``gate``: the worker's network namespace when it has one, and always a check
that each connection comes from the runtime's process tree). An invocation
becomes the next event the runtime pulls; the runtime's answer becomes the
invocation's ``Result``.

The pieces and their rules:

- ``events.EventQueue`` pairs invocations with the runtime's polls and
  answers (its rules are there).
- Several pollers may wait at once (``concurrency`` > 1): events go to them
  in arrival order. The data plane never sends more than ``concurrency``
  invocations at a time, so the host adds no limit of its own, and no timer:
  the data plane enforces the timeout by killing the worker.
- Request bodies posted by the runtime are bounded by ``max_body`` (see
  ``events``).
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
from collections.abc import Mapping
from typing import Any, Protocol

import psutil

from calink.messages import ErrorInfo, Result
from worker.host import HttpExchange, StartupError
from worker.python.host import Invocation
from worker.runtimes.child import ChildProcess, describe_exit
from worker.runtimes.events import (
    Event,
    EventQueue,
    Receive,
    Scope,
    Send,
)
from worker.runtimes.gate import LOOPBACK, PrivateApiServer

STOP_GRACE_S = 2.0  # SIGTERM to SIGKILL for the runtime when the worker exits
SERVER_SHUTDOWN_S = 0.5  # the runtime is gone by then: what remains are idle long polls
DEFAULT_MAX_BODY = 6 * 1024 * 1024
INIT_ERROR_TYPE = "RuntimeInitError"
STOPPED_TYPE = "RuntimeExitedError"


# ---- the host ------------------------------------------------------------------------------


class RuntimeApi(Protocol):
    """What ``PullHost`` needs from ``lambda_api.LambdaApi`` and ``scf_api.ScfApi``."""

    # None once the runtime is ready; the runtime's error when it reported one during init.
    startup: asyncio.Future[ErrorInfo | None]
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
        self.server: PrivateApiServer | None = None
        self.child: ChildProcess | None = None
        self.port = 0
        self._running: list[str] = []  # request ids of the invocations in run()
        self._closed = False

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.api = self._make_api()
        self.server = PrivateApiServer(self.api)
        await self.server.start()
        self.port = self.server.port
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
        self.queue.close(ErrorInfo(error_type=STOPPED_TYPE,
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
                   body: bytes) -> Result:
        """A lifecycle hook: there is none to run, but FC's markers still frame it."""
        with Invocation(kind, request_id):
            return Result(ok=True)

    async def run(self, kind: str, request_id: str, headers: Mapping[str, str], timeout_s: float,
                  body: bytes) -> Result:
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
