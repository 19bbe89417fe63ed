"""A Python function's log records, from ``logging`` / ``context.logger`` in the worker
to the supervisor's log line (``worker.python.log`` -> ``worker.output.write_record``
-> the pipe -> ``supervisor.logs.emit_worker_line``), without processes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import logs
from supervisor.control.logpump import Attributor, LineSplitter
from worker import output
from worker.python import log


class Sink:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write_line(self, line: bytes) -> None:
        self.lines.append(line)


@pytest.fixture
def pipe() -> Iterator[int]:
    """Installs the worker's tagged streams on a pipe; yields its read end."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    saved = (sys.stdout, sys.stderr, output._stdout, output._stderr)
    output.install(write_fd, write_fd)
    try:
        yield read_fd
    finally:
        sys.stdout, sys.stderr, output._stdout, output._stderr = saved
        os.close(read_fd)
        os.close(write_fd)


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger as a fresh process has it (no handlers, WARNING); restored after."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    root.handlers = []
    root.setLevel(logging.WARNING)
    try:
        yield root
    finally:
        root.handlers = saved[1]
        root.setLevel(saved[0])


def logged(read_fd: int) -> list[dict[str, Any]]:
    """What the pump and emit_worker_line make of everything written so far."""
    data = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except BlockingIOError:
            break
        data += chunk
    sink = Sink()
    attributor = Attributor()
    for line, truncated in LineSplitter().feed(data):
        request_id, text = attributor.attribute(line)
        logs.emit_worker_line(sink, function="fn", worker="w1", stream="stdout", text=text,
                              request_id=request_id, truncated=truncated, fmt="json")
    return [json.loads(line) for line in sink.lines]


def test_request_logger_fields_are_keys(pipe: int, root_logger: logging.Logger) -> None:
    log.install()
    logger = log.RequestLogger()
    token = output.current_request_id.set("req-1")
    try:
        logger.bind(user="u1").info("hello %s", "you", n=3, nested={"a": [1, None]}, secret_key="s3cr3t",
                                    worker="forged")
    finally:
        output.current_request_id.reset(token)
    (record,) = logged(pipe)
    assert record["event"] == "hello you" and record["level"] == "info" and record["request_id"] == "req-1"
    assert record["user"] == "u1" and record["n"] == 3 and record["nested"] == {"a": [1, None]}
    assert record["secret_key"] == logs.REDACTED
    assert record["worker"] == "w1" and record["user_worker"] == "forged" and record["component"] == "worker"


def test_stdlib_levels_and_tracebacks(pipe: int, root_logger: logging.Logger) -> None:
    log.install()
    log.install()  # idempotent: one handler
    assert sum(isinstance(h, log.RecordHandler) for h in root_logger.handlers) == 1
    logging.debug("dropped")
    logging.info("i")
    logging.getLogger("lib").warning("w")
    logging.error("e")
    logging.critical("c")
    try:
        raise KeyError("k")
    except KeyError:
        logging.exception("failed")
    assert output._stdout is not None
    output._stdout.write("a partial line")  # what print(..., end="") writes (pytest owns sys.stdout here)
    logging.error("after partial")
    records = logged(pipe)
    assert [(r["level"], r["event"]) for r in records] == [
        ("info", "i"), ("warning", "w"), ("error", "e"), ("critical", "c"), ("error", "failed"),
        ("info", "a partial line"), ("error", "after partial")]
    assert records[1]["logger"] == "lib" and "logger" not in records[0]
    assert records[4]["exception"].startswith("Traceback") and "KeyError: 'k'" in records[4]["exception"]


def test_text_that_only_looks_like_a_record_is_text() -> None:
    for text in (b"\x1anot json", b"\x1a[1, 2]", b'\x1a{"level": "loud", "event": "x"}', b'\x1a{"event": 3}',
                 b"\x1a" + b"[" * 100_000):
        sink = Sink()
        logs.emit_worker_line(sink, function="f", worker="w", stream="stdout", text=text, request_id=None, fmt="json")
        (line,) = sink.lines
        assert json.loads(line)["event"] == text.decode() and json.loads(line)["level"] == "info"
    sink = Sink()  # on stderr, or cut by max_line: never a record
    record = b'\x1a{"level": "error", "event": "x"}'
    logs.emit_worker_line(sink, function="f", worker="w", stream="stderr", text=record, request_id=None, fmt="json")
    logs.emit_worker_line(sink, function="f", worker="w", stream="stdout", text=record, request_id=None,
                          truncated=5, fmt="json")
    assert [json.loads(line)["level"] for line in sink.lines] == ["warning", "info"]


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                     max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(fields=st.dictionaries(st.text(), _json, max_size=6), event=st.text(), level=st.sampled_from(
    ["debug", "info", "warning", "error", "critical"]), fmt=st.sampled_from(["json", "console"]))
def test_any_record_is_one_line_with_the_supervisors_keys(fields: dict[str, Any], event: str, level: str,
                                                          fmt: str) -> None:
    text = b"\x1a" + json.dumps({"level": level, "event": event, "fields": fields}).encode()
    sink = Sink()
    logs.emit_worker_line(sink, function="f", worker="w", stream="stdout", text=text, request_id="r", fmt=fmt)
    (line,) = sink.lines
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    if fmt == "json":
        record = json.loads(line)
        assert (record["level"], record["event"], record["function"], record["worker"], record["request_id"]) == (
            level, event, "f", "w", "r")
        for key, value in fields.items():
            name = f"user_{key}" if key in logs._OWN_KEYS else key
            # nested values are redacted by key too (logs.redact's rule)
            assert record[name] == (logs.REDACTED if logs.is_sensitive_key(name) else logs._redact_value(value, 1))
