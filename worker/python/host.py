"""Hosts a Python function: loads its callables and runs invocations and hooks.

Rules:
- User code runs only here, after the worker has authenticated.
- A sync handler runs inline on the event loop when the function's
  concurrency is 1 (no thread hop: fastest, and nothing else can be running),
  otherwise in a pool of ``concurrency`` threads; an async handler runs as a
  task. Either way the current request id is in ``current_request_id`` so
  that what the handler prints is attributed to its request.
- Every outcome becomes a ``Result``: the handler's value encoded per the
  contract (bytes, str, None, or JSON), or the exception's class, message and
  stack trace. *Anything* user code raises is its invocation's failure, not
  only ``Exception``: ``SystemExit``, ``KeyboardInterrupt``,
  ``GeneratorExit``, a bare ``BaseException`` and an ``asyncio.CancelledError``
  it raised itself would otherwise end the worker's event loop (or the task
  that owes the result), and every other invocation of the worker with it.
  The one thing let through is the cancellation of the running task itself
  (``cancelled_from_outside``): that is the worker's, not the handler's.
  ``os._exit`` stays a crash.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime
import enum
import importlib
import inspect
import json
import math
import sys
import traceback
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from calink.messages import ErrorInfo, Result
from worker.host import HttpExchange
from worker.output import current_request_id, marker
from worker.python import log
from worker.python.context import Context, FunctionMeta

# Hook kinds as sent by the data plane, and the markers FC prints around them.
MARKERS = {"invoke": "Invoke", "initialize": "Initialize", "pre_freeze": "PreFreeze", "pre_stop": "PreStop"}


class LoadError(Exception):
    """A configured callable cannot be imported."""


def resolve(ref: str) -> Callable[..., Any]:
    module_name, _, attr = ref.partition(":")
    module = importlib.import_module(module_name)
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise LoadError(f"{ref!r} is not callable")
    return target  # type: ignore[no-any-return]


def _json_default(value: Any) -> Any:
    """What ``json`` does not encode by itself, as the worker always encoded it
    (dataclasses, datetimes as ISO 8601, UUIDs as text, enums by value)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def encode_value(value: Any) -> tuple[bytes, str]:
    """A handler's return value as (body, content type): compact JSON in UTF-8."""
    if value is None:
        return b"", ""
    if isinstance(value, bytes):
        return value, "application/octet-stream"
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value), "application/octet-stream"
    if isinstance(value, str):
        return value.encode(), "text/plain; charset=utf-8"
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default, allow_nan=False)
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise  # a circular reference: the handler's error
        value = _finite(value)  # NaN and infinities are null, as JSON has no such number
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    try:
        return text.encode(), "application/json"
    except UnicodeEncodeError:  # a lone surrogate: escaped, the JSON stays valid
        return json.dumps(value, separators=(",", ":"), default=_json_default).encode(), "application/json"


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in dicts, lists and tuples) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def cancelled_from_outside(exc: BaseException) -> bool:
    """Whether ``exc`` is the cancellation of the running task (someone called
    ``cancel()`` on it), as opposed to a ``CancelledError`` user code raised."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop: a thread's own exception
        return False
    return task is not None and task.cancelling() > 0


def error_result(exc: BaseException) -> Result:
    """The failure ``exc`` as a ``Result``; never raises (a broken ``__str__`` included)."""
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except BaseException:  # user code's __str__ may raise anything
        message = f"<exception str() failed: {type(exc).__name__}>"
    return Result(ok=False, error=ErrorInfo(
        error_type=type(exc).__name__, error_message=message, stack_trace=trace))


class Invocation:
    """The scope of one invocation or hook: FC's markers around it, and its
    request id current for whatever it prints (a class, not a generator-based
    context manager: it runs on every invocation)."""

    __slots__ = ("label", "request_id", "token")

    def __init__(self, kind: str, request_id: str) -> None:
        self.label = MARKERS.get(kind, "Invoke")
        self.request_id = request_id

    def __enter__(self) -> None:
        marker(self.label, self.request_id, "Start")
        self.token = current_request_id.set(self.request_id)

    def __exit__(self, *exc: object) -> None:
        current_request_id.reset(self.token)
        marker(self.label, self.request_id, "End")


class PythonHost:
    """The function's callables and how to run them."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = spec
        self.meta = FunctionMeta(
            name=spec["function"], handler=spec.get("handler") or "",
            memory_size=int(spec.get("memory_limit_mb") or 0), timeout=int(spec["timeout_s"]))
        self.timeout_s = float(spec["timeout_s"])
        self.max_result = int(spec.get("max_body") or (1 << 62))
        self.concurrency = int(spec.get("concurrency", 1))
        self.callables: dict[str, Callable[..., Any]] = {}
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self.load()

    def serves_http(self) -> bool:
        return False

    async def http(self, exchange: HttpExchange) -> None:
        raise RuntimeError("an event function does not serve HTTP requests")

    def exited(self) -> asyncio.Future[int] | None:
        return None

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def load(self) -> None:
        """Imports the handler and the hooks (raises on any failure)."""
        log.install()  # before the function's first module: what it logs are records
        for kind, key in (("invoke", "handler"), ("initialize", "initializer"),
                          ("pre_freeze", "pre_freeze"), ("pre_stop", "pre_stop")):
            ref = self.spec.get(key)
            if ref:
                self.callables[kind] = resolve(ref)
        if self.concurrency > 1:
            self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="handler")

    def has(self, kind: str) -> bool:
        return kind in self.callables

    def runs_inline(self, kind: str) -> bool:
        """Whether ``kind`` can run synchronously on the loop (no task, no thread)."""
        fn = self.callables.get(kind)
        return fn is None or (self._executor is None and not inspect.iscoroutinefunction(fn))

    def run_inline(self, kind: str, request_id: str, headers: Mapping[str, str],
                   timeout_s: float, body: bytes) -> Result:
        """Runs a sync callable (or nothing) right here: the fast path."""
        fn = self.callables.get(kind)
        with Invocation(kind, request_id):
            if fn is None:
                return Result(ok=True)
            context = Context(request_id=request_id, function=self.meta, headers=headers, timeout_s=timeout_s)
            try:
                value = fn(body, context) if kind == "invoke" else fn(context)
                payload, content_type = encode_value(value)
            except BaseException as exc:  # whatever the handler raised is the invocation's result
                return self._failed(exc)
            return self._ok(payload, content_type)

    async def run(self, kind: str, request_id: str, headers: Mapping[str, str],
                  timeout_s: float, body: bytes) -> Result:
        """Runs an async callable as a task, or a sync one in the thread pool."""
        fn = self.callables[kind]
        with Invocation(kind, request_id):
            context = Context(request_id=request_id, function=self.meta, headers=headers, timeout_s=timeout_s)
            args: tuple[Any, ...] = (body, context) if kind == "invoke" else (context,)
            try:
                if inspect.iscoroutinefunction(fn):
                    value = await fn(*args)
                else:
                    assert self._executor is not None
                    ctx = contextvars.copy_context()
                    value = await asyncio.get_running_loop().run_in_executor(self._executor, ctx.run, fn, *args)
                if inspect.isawaitable(value):
                    value = await value
                payload, content_type = encode_value(value)
            except BaseException as exc:  # whatever the handler raised is the invocation's result
                if cancelled_from_outside(exc):
                    raise
                return self._failed(exc)
            return self._ok(payload, content_type)

    def _ok(self, payload: bytes, content_type: str) -> Result:
        if len(payload) > self.max_result:
            # The link would refuse the frame (and drop every invocation on it).
            return Result(ok=False, error=ErrorInfo(
                error_type="ResultTooLargeError",
                error_message=f"the handler returned {len(payload)} bytes; max_body is {self.max_result}"))
        return Result(ok=True, body=payload, content_type=content_type)

    @staticmethod
    def _failed(exc: BaseException) -> Result:
        result = error_result(exc)
        # FC shows the trace in the function's log as well as in the answer.
        sys.stderr.write(result.error.stack_trace)
        return result
