"""The contract's failures as values: status, errorType, message.

Every failure on the CA port is one of these, rendered by ``front.py`` as
JSON with ``errorType``, ``errorMessage`` (and ``stackTrace`` for handler
exceptions) and the header ``x-fc-status: 404``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class InvocationError(Exception):
    status: int
    error_type: str
    message: str
    outcome: str  # the supervisor_invocations_total outcome it counts as
    stack_trace: str = ""
    retry_after: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


def too_many_requests(function: str, why: str) -> InvocationError:
    return InvocationError(503, "TooManyRequestsError", f"function {function!r}: {why}", "rejected",
                           retry_after=1)


def shutting_down() -> InvocationError:
    return InvocationError(503, "ShuttingDownError", "this instance is draining and takes no new invocations",
                           "rejected", retry_after=5)


def stopped_before_done(grace_s: float) -> InvocationError:
    """An invocation still running (or queued) when the stop's grace period ran out."""
    return InvocationError(503, "ShuttingDownError", f"this instance stopped: its grace_period ({grace_s:g}s) "
                           "ended before the invocation finished", "cancelled", retry_after=1)


def body_stalled(function: str, timeout_s: float) -> InvocationError:
    return InvocationError(408, "ClientTimeoutError",
                           f"function {function!r}: the client stopped sending the request body for "
                           f"{timeout_s:g}s (supervisor.client_body_timeout)", "cancelled",
                           headers=[(b"connection", b"close")])


def method_not_allowed(method: str, path: str, allowed: str) -> InvocationError:
    return InvocationError(405, "MethodNotAllowedError", f"{method} {path}: only {allowed} is allowed here",
                           "rejected", headers=[(b"allow", allowed.encode())])


def not_found(what: str) -> InvocationError:
    return InvocationError(404, "FunctionNotFoundError", what, "rejected")


def payload_too_large(function: str, limit: int) -> InvocationError:
    return InvocationError(413, "PayloadTooLargeError",
                           f"function {function!r}: request body exceeds max_body ({limit} bytes)", "rejected")


def timed_out(function: str, timeout_s: float) -> InvocationError:
    return InvocationError(504, "FunctionTimeoutError",
                           f"function {function!r} did not finish within its timeout of {timeout_s:g}s; "
                           "the worker was killed and is being replaced", "timeout")


def worker_crashed(function: str, detail: str, oom: bool = False) -> InvocationError:
    if oom:
        return InvocationError(502, "FunctionOOMError",
                               f"function {function!r}: the worker exceeded its memory limit ({detail})", "crashed")
    return InvocationError(502, "WorkerCrashedError",
                           f"function {function!r}: the worker died during the invocation ({detail})", "crashed")


def init_failed(function: str, error_type: str, message: str) -> InvocationError:
    return InvocationError(502, "InitializationError",
                           f"function {function!r} failed to initialize: {error_type}: {message}", "error")


def handler_failed(error_type: str, message: str, stack_trace: str) -> InvocationError:
    return InvocationError(404, error_type or "Error", message, "error", stack_trace=stack_trace,
                           headers=[(b"x-fc-error-type", b"UnhandledInvocationError")])


def invalid_response(detail: str) -> InvocationError:
    return InvocationError(502, "InvalidResponseError", f"the application's response is not valid HTTP: {detail}",
                           "error")


def client_timeout(function: str, timeout_s: float) -> InvocationError:
    return InvocationError(408, "ClientTimeoutError",
                           f"function {function!r}: the client did not send its request (or take the response) "
                           f"within the function's timeout of {timeout_s:g}s", "cancelled",
                           headers=[(b"connection", b"close")])
