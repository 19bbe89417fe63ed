"""Logging for every supervisor process: structlog, one JSON object per line.

Contract (docs/logging.md):

* Every line is one JSON object (``fmt="json"``) or one human line
  (``fmt="console"``) and carries ``timestamp`` (ISO 8601, UTC, ``Z``),
  ``level``, ``event`` and ``component``; ``request_id``, ``function`` and
  ``worker`` are added by whoever binds them.
* Secrets never reach a log: :func:`redact` runs on every structlog line, in
  both formats, after every other processor that can add fields (bound context,
  contextvars) and before rendering. It replaces the value of any key whose
  lowercased name is sensitive (see :func:`is_sensitive_key`), at any depth of
  dicts, lists, tuples, dataclasses and ``(name, value)`` header pairs. It
  never mutates the caller's objects: nested containers are copied.
* A worker's captured output is re-emitted by :func:`emit_worker_line`, a fast
  path that bypasses the processor chain (it runs for every line a worker
  prints) but writes the same field names and timestamp format. The worker's
  text is only ever the value of ``event``, so a worker cannot forge fields;
  a Python worker's structured record (what its function logs) has its own
  level and its fields as keys, redacted, never the supervisor's own keys.
  A traceback it prints is one line too (:func:`emit_worker_trace`): level
  ``error``, the exception's line as ``event``, the whole trace as
  ``exception`` (the field structlog gives the planes' own tracebacks).
* FC's markers (``FC Invoke Start RequestId: <id>`` ...) are only written by
  :func:`emit_marker_line` (the control plane, on the data plane's word) and
  by plane code that logs one with a ``marker`` field. Everywhere else in
  JSON output, ``RequestId:`` is written with its colon escaped
  (``RequestId\\u003a``): the line decodes to the very same text, but a raw
  grep of stdout for FC's marker text (what FC's log service does) finds
  only real markers, whatever a handler prints or puts in an error message.

:func:`configure_logging` can be called again at any time (tests do): loggers
obtained before, even ones already cached by ``cache_logger_on_first_use``,
follow the new component, format and output, because they all share one
processor list (updated in place) and one output object (retargeted). Only a
change of ``level`` is not seen by loggers that were already used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TextIO, cast

import orjson
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

__all__ = [
    "REDACTED",
    "LineSink",
    "Logger",
    "configure_logging",
    "access_line",
    "emit_marker_line",
    "emit_worker_line",
    "emit_worker_trace",
    "marker_text",
    "get_logger",
    "is_sensitive_key",
    "redact",
    "utc_timestamp",
    "write_lines",
]

Logger = FilteringBoundLogger

REDACTED = "[REDACTED]"

# FC's credential names (snake case, header and camel case spellings) plus the
# generic ones. Any name *containing* one of _SENSITIVE_PARTS is covered too,
# which already catches most of the exact names; both lists are kept so the
# intent stays readable.
_SENSITIVE_NAMES = frozenset(
    {
        "access_key_secret",
        "security_token",
        "x-fc-access-key-secret",
        "x-fc-security-token",
        "accesskeysecret",
        "securitytoken",
        "token",
        "credential",
        "password",
        "secret",
        "authorization",
    }
)
_SENSITIVE_PARTS = ("secret", "token", "password", "credential")

# Deeper nesting than this is replaced wholesale: failing closed is cheaper
# than proving a self-referencing structure holds no secret.
_MAX_DEPTH = 32

_sensitive_cache: dict[str, bool] = {}


class LineSink(Protocol):
    """Where rendered lines go: takes one complete line, trailing newline included."""

    def write_line(self, line: bytes) -> None: ...


def is_sensitive_key(name: str) -> bool:
    """Whether a value stored under ``name`` must be redacted (memoized)."""
    hit = _sensitive_cache.get(name)
    if hit is None:
        low = name.lower()
        hit = low in _SENSITIVE_NAMES or any(part in low for part in _SENSITIVE_PARTS)
        # Key names are few in practice; the bound only guards against code
        # that logs dicts keyed by user data.
        if len(_sensitive_cache) > 4096:
            _sensitive_cache.clear()
        _sensitive_cache[name] = hit
    return hit


def _key_text(key: object) -> object:
    # orjson cannot serialize bytes keys (ASGI headers are bytes); decoding
    # here also lets the name check see them.
    if type(key) is bytes:
        return key.decode("utf-8", "replace")
    return key


def _redact_value(value: Any, depth: int) -> Any:
    cls = type(value)
    if cls is str or cls is int or cls is float or cls is bool or value is None:
        return value
    if depth >= _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        out: dict[object, Any] = {}
        for raw_key, item in value.items():
            key = _key_text(raw_key)
            sensitive = isinstance(key, str) and is_sensitive_key(key)
            out[key] = REDACTED if sensitive else _redact_value(item, depth + 1)
        return out
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        # A namedtuple: keep the field names, they decide what is secret.
        return _redact_value(dict(zip(value._fields, value)), depth)
    if isinstance(value, (list, tuple)):
        return [_redact_item(item, depth + 1) for item in value]
    # orjson serializes dataclasses field by field, and other objects by
    # repr(), which for pydantic models (the config) shows every field: walk
    # their fields instead.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _redact_value(
            {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, depth
        )
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump) and not isinstance(value, type):
        try:
            return _redact_value(model_dump(mode="json"), depth)
        except Exception:
            return REDACTED  # cannot see inside: fail closed
    return value


def _redact_item(item: Any, depth: int) -> Any:
    # A (name, value) pair is how ASGI/gRPC carry headers and metadata.
    if (type(item) is tuple or type(item) is list) and len(item) == 2:
        name = _key_text(item[0])
        if isinstance(name, str) and is_sensitive_key(name):
            return [name, REDACTED]
    return _redact_value(item, depth)


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: replace the values of sensitive keys at any depth.

    The top-level dict belongs to structlog (a fresh copy per call) and is
    changed in place; nested containers are rebuilt, never mutated.
    """
    for key, value in list(event_dict.items()):
        if is_sensitive_key(key):
            event_dict[key] = REDACTED
        elif key != "exc_info":  # the console renderer needs it as it is
            cls = type(value)
            if not (cls is str or cls is int or cls is float or cls is bool or value is None):
                event_dict[key] = _redact_value(value, 1)
    return event_dict


# --- timestamps -------------------------------------------------------------

_ts_second = -1
_ts_prefix = ""


def utc_timestamp() -> str:
    """ISO 8601 UTC with microseconds and ``Z``, e.g. ``2025-01-02T03:04:05.123456Z``.

    The date part is formatted once per second: datetime.isoformat() costs
    about 1 us, which matters on the per-worker-line path.
    """
    global _ts_second, _ts_prefix
    now = time.time()
    second = int(now)
    if second != _ts_second:
        _ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _ts_second = second
    return f"{_ts_prefix}.{int((now - second) * 1_000_000):06d}Z"


def _add_timestamp(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    event_dict["timestamp"] = utc_timestamp()
    return event_dict


# --- output -------------------------------------------------------------------


def _write_stream(stream: TextIO) -> Callable[[str | bytes], None]:
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        # Bytes straight to the binary layer skip an encode; measured ~2 %
        # faster than text writes with orjson output decoded. Flush what the
        # text layer holds first so earlier print()s keep their order.
        stream.flush()

        def write(message: str | bytes) -> None:
            data = message.encode("utf-8", "replace") if isinstance(message, str) else message
            buffer.write(data + b"\n")
            buffer.flush()

        return write

    def write_text(message: str | bytes) -> None:
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        stream.write(text + "\n")
        stream.flush()

    return write_text


def _write_sink(sink: LineSink) -> Callable[[str | bytes], None]:
    def write(message: str | bytes) -> None:
        data = message.encode("utf-8", "replace") if isinstance(message, str) else message
        sink.write_line(data + b"\n")

    return write


class _Output:
    """The one structlog "logger" object: hands rendered lines to the current target.

    One shared instance (not one per logger) is what lets a reconfiguration
    reach loggers that structlog has already cached.
    """

    def __init__(self) -> None:
        self.write: Callable[[str | bytes], None] = _write_stream(sys.stdout)

    def msg(self, message: str | bytes) -> None:
        self.write(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_OUTPUT = _Output()
# Updated in place by configure_logging (see the module docstring).
_PROCESSORS: list[Processor] = []


def _json_serializer(obj: Any, **kw: Any) -> bytes:
    default = kw.get("default")
    try:
        line = orjson.dumps(obj, default=default)
    except orjson.JSONEncodeError:
        # What orjson refuses (non-str keys, ints beyond 64 bits) is rare, and
        # a log call must not raise: the stdlib takes those, slowly.
        line = json.dumps(
            obj, default=default, skipkeys=True, ensure_ascii=False, separators=(",", ":")
        ).encode("utf-8", "replace")
    if _MARKER_COLON in line and not (isinstance(obj, dict) and "marker" in obj):
        line = line.replace(_MARKER_COLON, _ESCAPED_COLON)
    return line


_format = "json"


def configure_logging(
    component: str,
    fmt: str = "json",
    stream: TextIO | None = None,
    *,
    level: str = "info",
    sink: LineSink | None = None,
) -> None:
    """Set up structlog for this process.

    ``component`` is added to every line that does not bind its own (a logger
    may bind ``component="seed:hello"``). Lines go to ``sink`` when given (a
    :class:`supervisor.output.BoundedLineWriter`, so a stalled stdout reader
    cannot block the caller), else to ``stream`` (default ``sys.stdout``) with
    a blocking write per line.
    """
    global _format
    if fmt not in ("json", "console"):
        raise ValueError(f"log format must be 'json' or 'console', not {fmt!r}")
    target = stream if stream is not None else sys.stdout
    _format = fmt

    def add_component(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        # A processor, not a contextvar: contextvars do not reach threads
        # started before configuration (gRPC's), a processor reaches every line.
        event_dict.setdefault("component", component)
        return event_dict

    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_json_serializer)
    else:
        isatty = getattr(target, "isatty", None)
        renderer = structlog.dev.ConsoleRenderer(colors=bool(sink is None and isatty and isatty()))
    chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_timestamp,
        add_component,
        structlog.processors.StackInfoRenderer(),
    ]
    if fmt == "json":
        # The console renderer formats exceptions itself, and prettier.
        chain.append(structlog.processors.format_exc_info)
    chain += [redact, renderer]

    _PROCESSORS[:] = chain
    _bridge_stdlib()
    _OUTPUT.write = _write_sink(sink) if sink is not None else _write_stream(target)
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        context_class=dict,
        logger_factory=lambda *_args: _OUTPUT,
        cache_logger_on_first_use=True,
    )


class _StdlibBridge(logging.Handler):
    """Lines logged with the stdlib (uvicorn, asyncio, grpc) as structlog lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is still a line
            message = str(record.msg)
        fields: dict[str, Any] = {"logger": record.name}
        if record.exc_info and record.exc_info[0] is not None:
            fields["exc_info"] = record.exc_info
        get_logger().log(record.levelno, message, **fields)


def _bridge_stdlib() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(_StdlibBridge())


def get_logger(**bound: Any) -> Logger:
    """A logger with ``bound`` fields on every line (e.g. ``function=..., worker=...``)."""
    return cast(Logger, structlog.get_logger(**bound))


# --- the per-line fast path for workers' output -------------------------------

_LEVEL_BY_STREAM = {"stdout": "info", "stderr": "warning"}
# Inside a JSON string, "RequestId:" can only be text: the escaped colon is the
# same text to any JSON reader, and no longer FC's marker to a raw grep.
_MARKER_COLON = b"RequestId:"
_ESCAPED_COLON = b"RequestId\\u003a"
_MARKER_KINDS = {"invoke": "Invoke", "initialize": "Initialize", "pre_freeze": "PreFreeze", "pre_stop": "PreStop"}


# A structured record from a Python worker (worker.output.write_record, worker.python.log):
# RECORD_START + {"level", "event", "logger"?, "exception"?, "stack"?, "fields"?} on one stdout line.
RECORD_START = b"\x1a"
_RECORD_LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})
_RECORD_TEXTS = ("logger", "exception", "stack")
# Keys a record's fields never replace (a field with one of these names is logged as user_<name>).
_OWN_KEYS = frozenset({"timestamp", "level", "event", "component", "function", "worker", "request_id", "stream",
                       "truncated_bytes", "marker", "kind", "pid", *_RECORD_TEXTS})


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _worker_record(text: bytes) -> tuple[str, str, dict[str, Any]] | None:
    """``(level, event, keys)`` of a worker's structured record, redacted; None when
    ``text`` is not one (it is then logged as text)."""
    try:
        record = json.loads(text[1:])
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    level, event = record.get("level"), record.get("event")
    if level not in _RECORD_LEVELS or not isinstance(event, str):
        return None
    keys: dict[str, Any] = {key: record[key] for key in _RECORD_TEXTS if isinstance(record.get(key), str)}
    fields = record.get("fields")
    if isinstance(fields, dict):
        for key, value in fields.items():
            name = f"user_{key}" if key in _OWN_KEYS else key
            keys[name] = REDACTED if is_sensitive_key(name) else _redact_value(value, 1)
    return str(level), event, keys


def emit_worker_line(
    sink: LineSink,
    *,
    function: str,
    worker: str,
    stream: str,
    text: bytes,
    request_id: str | None,
    truncated: int = 0,
    fmt: str | None = None,
    component: str = "worker",
) -> None:
    """Re-emit one line a worker printed, as one log line into ``sink``.

    ``text`` is the raw line (tag already removed); it is decoded as UTF-8
    with replacement and loses trailing CR/LF. Level is ``info`` for stdout and
    ``warning`` for stderr; ``request_id`` is omitted when None and
    ``truncated_bytes`` when zero. ``fmt`` defaults to the configured format.
    No redaction runs on plain text: the fields are the supervisor's own, and
    the text is a single JSON string value, never parsed. The exception is a
    Python worker's structured record (``RECORD_START``, whole, on stdout):
    its level and event are the record's, its fields become keys (redacted;
    never one of the supervisor's own keys, see ``_OWN_KEYS``).
    """
    level = _LEVEL_BY_STREAM.get(stream, "info")
    record = _worker_record(text) if text[:1] == RECORD_START and stream == "stdout" and not truncated else None
    fields: dict[str, Any] = {}
    if record is not None:
        level, event, fields = record
    else:
        event = text.rstrip(b"\r\n").decode("utf-8", "replace")
    timestamp = utc_timestamp()
    if (fmt or _format) == "console":
        extra = f" request_id={request_id}" if request_id is not None else ""
        if truncated:
            extra += f" truncated_bytes={truncated}"
        if record is not None:  # a record's event and keys may hold line breaks; a console line must not
            event = _one_line(event)
            extra += "".join(f" {_one_line(key)}={value!r}" for key, value in fields.items())
        sink.write_line(
            (f"{timestamp} [{level:<9}] {event}  component={component} function={function}"
             + (f" worker={worker}" if worker else "") + f"{extra} stream={stream}\n").encode("utf-8", "replace")
        )
        return
    line = _output_keys(timestamp, level, event, component, function, worker, request_id, stream, truncated)
    if fields:
        line.update(fields)
        sink.write_line(_json_serializer(line) + b"\n")  # its values may be what orjson refuses
        return
    _write_record(sink, line)


def _output_keys(timestamp: str, level: str, event: str, component: str, function: str, worker: str,
                   request_id: str | None, stream: str, truncated: int) -> dict[str, object]:
    """The keys every record of a worker's output has, in their order."""
    line: dict[str, object] = {
        "timestamp": timestamp,
        "level": level,
        "event": event,
        "component": component,
        "function": function,
    }
    if worker:
        line["worker"] = worker
    if request_id is not None:
        line["request_id"] = request_id
    line["stream"] = stream
    if truncated:
        line["truncated_bytes"] = truncated
    return line


def _write_record(sink: LineSink, line: dict[str, object]) -> None:
    # Not OPT_APPEND_NEWLINE: orjson's result keeps a ~4 KiB allocation
    # (measured: 4.1 KiB of RSS per queued 175-byte line), and the sink may
    # hold thousands of lines. The concatenation is a right-sized copy.
    data = orjson.dumps(line)
    if _MARKER_COLON in data:
        data = data.replace(_MARKER_COLON, _ESCAPED_COLON)
    sink.write_line(data + b"\n")


def emit_worker_trace(
    sink: LineSink,
    *,
    function: str,
    worker: str,
    stream: str,
    lines: tuple[bytes, ...],
    event: bytes,
    request_id: str | None,
    truncated: int = 0,
    fmt: str | None = None,
    component: str = "worker",
) -> None:
    """Re-emit a traceback a worker printed (``lines``, grouped by
    :mod:`supervisor.control.traces`) as one log line into ``sink``.

    Like :func:`emit_worker_line`, with level ``error``, ``event`` the
    exception's line (``event``) and ``exception`` the trace's lines joined
    by newlines (each decoded as UTF-8 with replacement, without its CR);
    ``truncated_bytes`` counts what ``max_line`` cut from its lines. A
    console line shows the trace with its line breaks escaped.
    """
    text = "\n".join(line.rstrip(b"\r").decode("utf-8", "replace") for line in lines)
    message = event.rstrip(b"\r").decode("utf-8", "replace")
    timestamp = utc_timestamp()
    if (fmt or _format) == "console":
        extra = f" request_id={request_id}" if request_id is not None else ""
        if truncated:
            extra += f" truncated_bytes={truncated}"
        sink.write_line(
            (f"{timestamp} [error    ] {_one_line(message)}  component={component} function={function}"
             + (f" worker={worker}" if worker else "") + f"{extra} stream={stream} exception={text!r}\n"
             ).encode("utf-8", "replace"))
        return
    line = _output_keys(timestamp, "error", message, component, function, worker, request_id, stream, truncated)
    line["exception"] = text
    _write_record(sink, line)


def access_line(
    *,
    request_id: str,
    function: str | None,
    status: int | None,
    outcome: str,
    error_type: str | None,
    duration_ms: float,
    queue_ms: float,
    worker: str | None = None,
    method: str | None = None,
    path: str | None = None,
    component: str = "data-plane",
) -> bytes:
    """The data plane's access record of one invocation (:mod:`supervisor.data.access`)
    as one line in the configured format, without its newline (see :func:`write_lines`).

    A fast path like :func:`emit_worker_line` (one per invocation): the
    fields are the supervisor's own, and in JSON the colon of ``RequestId:``
    is escaped as in every line that is not a marker. ``worker``, ``method``
    and ``path`` are left out when None.
    """
    line: dict[str, object] = {
        "timestamp": utc_timestamp(),
        "level": "info",
        "event": "access",
        "component": component,
        "request_id": request_id,
        "function": function,
        "status": status,
        "outcome": outcome,
        "error_type": error_type,
        "duration_ms": duration_ms,
        "queue_ms": queue_ms,
    }
    if worker is not None:
        line["worker"] = worker
    if method is not None:
        line["method"] = method
        line["path"] = path
    if _format == "console":
        fields = " ".join(f"{key}={value}" for key, value in line.items() if key not in ("timestamp", "level", "event"))
        return _one_line(f"{line['timestamp']} [info     ] access  {fields}").encode("utf-8", "replace")
    return _json_serializer(line)


def write_lines(lines: list[bytes]) -> None:
    """Rendered lines (without newlines) to where this process's log lines go, in one write."""
    if lines:
        _OUTPUT.write(b"\n".join(lines))


def marker_text(kind: str, phase: str, request_id: str) -> str:
    """FC's text for a marker: ``marker_text("invoke", "start", "r1")`` is
    ``"FC Invoke Start RequestId: r1"``."""
    return f"FC {_MARKER_KINDS[kind]} {'Start' if phase == 'start' else 'End'} RequestId: {request_id}"


def emit_marker_line(
    sink: LineSink,
    *,
    kind: str,
    phase: str,
    request_id: str,
    function: str,
    worker: str,
    fmt: str | None = None,
    component: str = "control-plane",
) -> None:
    """One of FC's markers for one worker's invocation, as one log line into ``sink``.

    ``kind`` is invoke, initialize, pre_freeze or pre_stop; ``phase`` start
    or end. The line carries ``marker`` (the phase) and ``kind``, which no
    worker line has, and FC's text as ``event``, unescaped.
    """
    event = marker_text(kind, phase, request_id)
    timestamp = utc_timestamp()
    if (fmt or _format) == "console":
        sink.write_line(
            (f"{timestamp} [info     ] {event}  component={component} function={function} worker={worker}"
             f" request_id={request_id} marker={phase} kind={kind}\n").encode("utf-8", "replace"))
        return
    sink.write_line(orjson.dumps({
        "timestamp": timestamp,
        "level": "info",
        "event": event,
        "component": component,
        "function": function,
        "worker": worker,
        "request_id": request_id,
        "marker": phase,
        "kind": kind,
    }) + b"\n")
