"""Logging for a Python function: the stdlib root logger and ``context.logger``.

Rules:

- Standard library only: a function's process imports nothing but the
  standard library and the worker's own code before the function's module.
- ``install`` (before the function's module is imported, in its seed and in
  every worker) puts one ``RecordHandler`` on the root logger and sets the
  root level to INFO, as FC's Python runtime does. So a handler's
  ``logging.info(...)`` / ``logging.error(...)`` (or any logger's record that
  reaches the root) is one log record at its own level: debug, info,
  warning, error or critical. A function that configures ``logging``
  itself keeps what it sets; ``logging.basicConfig(force=True)`` replaces
  the handler (its lines are then plain text on stderr, level warning).
- A record is one line on stdout (``worker.output.write_record``), tagged
  with the request id like a printed line: the JSON object ``{"level",
  "event", "logger"?, "exception"?, "stack"?, "fields"?}``. The control
  plane's log pump (``supervisor.logs.emit_worker_line``) logs it with the
  fields as JSON keys, redacted like every log line, and never lets them
  replace the supervisor's own keys (``timestamp``, ``level``, ``event``,
  ``component``, ``function``, ``worker``, ``request_id``, ``stream``...): a
  field called that is logged as ``user_<name>``.
- ``exception`` is the formatted traceback of ``exc_info`` (one record, the
  trace in one field, never one record per line); ``logger`` is the
  logger's name, except for the root logger and ``context.logger``.
- ``context.logger`` is a ``RequestLogger``: structlog's calling convention
  (``info("event", key=value)``, ``bind(key=value)``, ``exception(...)``)
  over the stdlib logger ``CONTEXT_LOGGER`` (level DEBUG: it logs every
  level, as it always did), so a function's own logging configuration sees
  its records too. Values that are not JSON are logged as ``str(value)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from worker.output import write_record

CONTEXT_LOGGER = "fc.context"
# What a RequestLogger call passes on to the stdlib logger rather than as fields.
_LOGGING_KEYWORDS = ("exc_info", "stack_info", "stacklevel")


def level_name(levelno: int) -> str:
    """The supervisor's level for a stdlib level number."""
    if levelno >= logging.CRITICAL:
        return "critical"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


class RecordHandler(logging.Handler):
    """Writes each record as one structured line (see the module docstring)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            payload: dict[str, Any] = {"level": level_name(record.levelno), "event": record.getMessage()}
            if record.name not in ("root", CONTEXT_LOGGER):
                payload["logger"] = record.name
            if record.exc_info:
                payload["exception"] = self._formatter().formatException(record.exc_info)
            elif record.exc_text:
                payload["exception"] = record.exc_text
            if record.stack_info:
                payload["stack"] = record.stack_info
            fields = getattr(record, "fields", None)
            if isinstance(fields, Mapping) and fields:
                payload["fields"] = dict(fields)
            write_record(json.dumps(payload, default=str, skipkeys=True, separators=(",", ":")))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _formatter(self) -> logging.Formatter:
        return self.formatter or _FORMATTER


_FORMATTER = logging.Formatter()


def install() -> None:
    """The root logger's handler and level for a function's process (idempotent)."""
    root = logging.getLogger()
    if any(isinstance(handler, RecordHandler) for handler in root.handlers):
        return
    root.addHandler(RecordHandler())
    if root.level == logging.WARNING:  # Python's default, untouched
        root.setLevel(logging.INFO)
    logging.getLogger(CONTEXT_LOGGER).setLevel(logging.DEBUG)


class RequestLogger:
    """``context.logger``: ``info("event", key=value)`` and friends (see the module docstring)."""

    __slots__ = ("_logger", "_fields")

    def __init__(self, fields: Mapping[str, Any] | None = None, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(CONTEXT_LOGGER)
        self._fields: dict[str, Any] = dict(fields or {})

    def bind(self, **fields: Any) -> RequestLogger:
        return RequestLogger({**self._fields, **fields}, self._logger)

    def unbind(self, *keys: str) -> RequestLogger:
        missing = [key for key in keys if key not in self._fields]
        if missing:
            raise KeyError(missing[0])
        return self.try_unbind(*keys)

    def try_unbind(self, *keys: str) -> RequestLogger:
        return RequestLogger({k: v for k, v in self._fields.items() if k not in keys}, self._logger)

    def new(self, **fields: Any) -> RequestLogger:
        return RequestLogger(fields, self._logger)

    def log(self, level: int, event: object = None, *args: Any, **fields: Any) -> None:
        self._log(level, event, args, fields)

    def debug(self, event: object = None, *args: Any, **fields: Any) -> None:
        self._log(logging.DEBUG, event, args, fields)

    def info(self, event: object = None, *args: Any, **fields: Any) -> None:
        self._log(logging.INFO, event, args, fields)

    msg = info

    def warning(self, event: object = None, *args: Any, **fields: Any) -> None:
        self._log(logging.WARNING, event, args, fields)

    warn = warning

    def error(self, event: object = None, *args: Any, **fields: Any) -> None:
        self._log(logging.ERROR, event, args, fields)

    def critical(self, event: object = None, *args: Any, **fields: Any) -> None:
        self._log(logging.CRITICAL, event, args, fields)

    fatal = critical

    def exception(self, event: object = None, *args: Any, **fields: Any) -> None:
        fields.setdefault("exc_info", True)
        self._log(logging.ERROR, event, args, fields)

    def _log(self, level: int, event: object, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
        if not self._logger.isEnabledFor(level):
            return
        options: dict[str, Any] = {key: fields.pop(key) for key in _LOGGING_KEYWORDS if key in fields}
        options["stacklevel"] = int(options.get("stacklevel", 1)) + 2  # the caller's line, not ours
        self._logger.log(level, event, *args, extra={"fields": {**self._fields, **fields}}, **options)

    def __repr__(self) -> str:
        return f"RequestLogger({self._fields!r})"
