"""The access record's fields and rendering (``supervisor.data.access``,
``supervisor.logs.emit_access_line``) and its config key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import logs
from supervisor.config import ConfigError, parse_config
from supervisor.data import errors
from supervisor.data.access import AccessRecord


class ListSink:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write_line(self, line: bytes) -> None:
        self.lines.append(line)


@pytest.fixture
def sink() -> Iterator[ListSink]:
    sink = ListSink()
    logs.configure_logging("data-plane", "json", sink=sink)
    yield sink
    logs.configure_logging("test", "json")


def only(sink: ListSink) -> dict[str, object]:
    (line,) = sink.lines
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert isinstance(record, dict)
    return record


def test_a_success_on_a_worker(sink: ListSink) -> None:
    record = AccessRecord("req-1", "hello")
    record.worker, record.status, record.queue_s = "hello-1-abc", 200, 0.0125
    record.emit()
    line = only(sink)
    duration = line.pop("duration_ms")
    assert isinstance(duration, float) and duration >= 0
    assert isinstance(line.pop("timestamp"), str)
    assert line == {"level": "info", "event": "access", "component": "data-plane", "request_id": "req-1",
                    "function": "hello", "status": 200, "outcome": "success", "error_type": None, "queue_ms": 12.5,
                    "worker": "hello-1-abc"}


def test_a_refusal_of_an_http_trigger_request(sink: ListSink) -> None:
    record = AccessRecord("req-2", None, "GET", "/RequestId: forged")
    record.failed(errors.too_many_requests("web", "queue full"))
    record.emit()
    assert b"RequestId:" not in sink.lines[0]  # only FC's markers carry that text raw
    line = only(sink)
    assert (line["status"], line["outcome"], line["error_type"], line["function"]) == (
        503, "rejected", "TooManyRequestsError", None)
    assert (line["method"], line["path"]) == ("GET", "/RequestId: forged") and "worker" not in line


def test_a_client_that_left_has_no_status(sink: ListSink) -> None:
    record = AccessRecord("req-3", "hello")
    record.client_left()
    record.emit()
    line = only(sink)
    assert line["status"] is None and line["outcome"] == "cancelled" and line["error_type"] is None


def test_console_format_is_one_line() -> None:
    sink = ListSink()
    logs.configure_logging("data-plane", "console", sink=sink)
    try:
        record = AccessRecord("req-4", "hello", "POST", "/a\nb")
        record.status = 200
        record.emit()
    finally:
        logs.configure_logging("test", "json")
    (line,) = sink.lines
    text = line.decode()
    assert text.count("\n") == 1 and " access " in text and "request_id=req-4" in text and "status=200" in text


def test_access_log_is_a_boolean_key_on_by_default(tmp_path: Path) -> None:
    (tmp_path / "fn").mkdir()
    functions = {"fn": {"code_dir": "fn", "handler": "app:handler"}}
    assert parse_config({"functions": functions}, tmp_path, {}).supervisor.access_log is True
    off = parse_config({"supervisor": {"access_log": False}, "functions": functions}, tmp_path, {})
    assert off.supervisor.access_log is False
    with pytest.raises(ConfigError) as refused:
        parse_config({"supervisor": {"access_log": "no"}, "functions": functions}, tmp_path, {})
    assert [p.path for p in refused.value.problems] == ["supervisor.access_log"]
