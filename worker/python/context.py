"""The ``context`` object a Python handler receives (FC's names).

Built once per invocation from the request's headers; cheap to create because
the logger is made lazily and credentials are plain attributes. ``logger``
is a ``worker.python.log.RequestLogger``: standard library only, its fields
logged as JSON keys of the record.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from worker.python.log import RequestLogger


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key_id: str
    access_key_secret: str
    security_token: str

    def __repr__(self) -> str:
        # A handler that logs its context must not leak the secret.
        return f"Credentials(access_key_id={self.access_key_id!r}, access_key_secret='***', security_token='***')"


@dataclass(frozen=True, slots=True)
class FunctionMeta:
    name: str
    handler: str
    memory_size: int
    timeout: int


class Context:
    """What a handler or hook knows about its invocation."""

    __slots__ = ("request_id", "function_name", "memory_limit_mb", "timeout_s", "headers",
                 "credentials", "function", "_deadline", "_logger")

    def __init__(self, *, request_id: str, function: FunctionMeta, headers: Mapping[str, str],
                 timeout_s: float) -> None:
        self.request_id = request_id
        self.function = function
        self.function_name = function.name
        self.memory_limit_mb = function.memory_size
        self.timeout_s = timeout_s
        self.headers = headers
        self.credentials = Credentials(
            access_key_id=headers.get("x-fc-access-key-id", ""),
            access_key_secret=headers.get("x-fc-access-key-secret", ""),
            security_token=headers.get("x-fc-security-token", ""),
        )
        self._deadline = time.monotonic() + timeout_s
        self._logger: RequestLogger | None = None

    def remaining_time_ms(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    @property
    def logger(self) -> RequestLogger:
        """Records attributed to this invocation (by the request id current where it is called)."""
        if self._logger is None:
            self._logger = RequestLogger()
        return self._logger

    def __repr__(self) -> str:
        return f"Context(request_id={self.request_id!r}, function_name={self.function_name!r})"
