"""supervisor.logs: line format, reconfiguration, redaction, the worker-line fast path."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import logs

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SECRET = "s3cr3t-VALUE"


class ListSink:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write_line(self, line: bytes) -> None:
        self.lines.append(line)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # Leave logging as other tests found it (not pointing at a closed StringIO).
    config = structlog.get_config()
    processors, write, fmt = list(logs._PROCESSORS), logs._OUTPUT.write, logs._format
    yield
    structlog.contextvars.clear_contextvars()
    structlog.configure(**config)
    logs._PROCESSORS[:] = processors
    logs._OUTPUT.write, logs._format = write, fmt


def lines_of(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_line_has_the_contract_fields() -> None:
    buf = io.StringIO()
    logs.configure_logging("control-plane", stream=buf)
    logs.get_logger(function="hello", worker="w1").info("worker started", pid=42)
    (line,) = lines_of(buf)
    assert line["event"] == "worker started"
    assert line["level"] == "info"
    assert line["component"] == "control-plane"
    assert ISO_UTC.match(line["timestamp"])
    assert (line["function"], line["worker"], line["pid"]) == ("hello", "w1", 42)


def test_stdlib_lines_become_structured_lines() -> None:
    # uvicorn, asyncio and grpc log with the stdlib: those lines must follow the contract too.
    import logging

    buf = io.StringIO()
    logs.configure_logging("data-plane", stream=buf)
    logs.configure_logging("data-plane", stream=buf)  # again: still one bridge, one line per record
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request %s", "received.")
    logging.getLogger("uvicorn.error").info("below the root's level")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("asyncio").exception("Exception in callback", extra={"x": 1})
    logging.getLogger("grpc").error("100%% of %s", "calls")
    first, second, third = lines_of(buf)
    assert (first["event"], first["level"], first["logger"], first["component"]) == (
        "Invalid HTTP request received.", "warning", "uvicorn.error", "data-plane")
    assert second["level"] == "error" and "ValueError: bad" in second["exception"]
    assert third["logger"] == "grpc" and third["event"] == "100% of calls"


def test_binary_stream_and_sink_outputs() -> None:
    raw = io.BytesIO()
    text = io.TextIOWrapper(raw, encoding="utf-8")
    logs.configure_logging("data-plane", stream=text)
    logs.get_logger().warning("via buffer")
    assert json.loads(raw.getvalue())["level"] == "warning"

    sink = ListSink()
    logs.configure_logging("data-plane", sink=sink)
    logs.get_logger().error("via sink")
    (line,) = sink.lines
    assert line.endswith(b"\n") and json.loads(line)["event"] == "via sink"


def test_a_bound_component_wins_and_levels_filter() -> None:
    buf = io.StringIO()
    logs.configure_logging("control-plane", stream=buf)
    log = logs.get_logger(component="seed:hello")
    log.debug("hidden")
    log.info("shown")
    (line,) = lines_of(buf)
    assert line["component"] == "seed:hello"


def test_reconfigure_reaches_loggers_already_cached() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure_logging("one", stream=first)
    log = logs.get_logger()
    log.info("a")  # caches the bound logger (cache_logger_on_first_use)
    logs.configure_logging("two", stream=second)
    log.info("b")
    assert [line["event"] for line in lines_of(first)] == ["a"]
    assert lines_of(second)[0]["component"] == "two"


def test_console_format_is_readable_and_redacted() -> None:
    buf = io.StringIO()
    logs.configure_logging("control-plane", fmt="console", stream=buf)
    logs.get_logger().info("hello there", security_token=SECRET)
    out = buf.getvalue()
    assert "hello there" in out and "component=control-plane" in out
    assert SECRET not in out and logs.REDACTED in out


def test_bad_format_is_refused() -> None:
    with pytest.raises(ValueError):
        logs.configure_logging("x", fmt="xml")


def test_exceptions_are_rendered() -> None:
    buf = io.StringIO()
    logs.configure_logging("control-plane", stream=buf)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get_logger().exception("failed")
    (line,) = lines_of(buf)
    assert line["level"] == "error" and "RuntimeError: boom" in line["exception"]


# --- redaction ------------------------------------------------------------------

NAMES = [
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
]


@pytest.mark.parametrize("name", NAMES + [n.upper() for n in NAMES] + ["X-Fc-Security-Token", "AccessKeySecret", "db_password", "my_secret_thing", "refresh_token", "credentials"])
def test_sensitive_names(name: str) -> None:
    assert logs.is_sensitive_key(name)


@pytest.mark.parametrize("name", ["access_key_id", "request_id", "function", "event", "headers", "x-fc-request-id"])
def test_harmless_names(name: str) -> None:
    assert not logs.is_sensitive_key(name)


def test_redaction_catches_nested_secrets_and_header_names() -> None:
    @dataclasses.dataclass
    class Credentials:
        access_key_id: str
        access_key_secret: str

    buf = io.StringIO()
    logs.configure_logging("data-plane", stream=buf)
    headers = {"x-fc-request-id": "r1", "X-Fc-Access-Key-Secret": SECRET, "x-fc-security-token": SECRET}
    structlog.contextvars.bind_contextvars(token=SECRET)
    logs.get_logger().info(
        "request",
        headers=headers,
        nested={"a": [{"b": {"password": SECRET, "keep": 1}}]},
        asgi_headers=[(b"x-fc-security-token", SECRET.encode()), (b"content-type", b"json")],
        grpc_metadata=(("x-fc-access-key-secret", SECRET), ("x-fc-request-id", "r1")),
        creds=Credentials(access_key_id="AK", access_key_secret=SECRET),
        secret=SECRET,
    )
    out = buf.getvalue()
    assert SECRET not in out
    (line,) = lines_of(buf)
    assert line["headers"] == {
        "x-fc-request-id": "r1",
        "X-Fc-Access-Key-Secret": logs.REDACTED,
        "x-fc-security-token": logs.REDACTED,
    }
    assert line["nested"] == {"a": [{"b": {"password": logs.REDACTED, "keep": 1}}]}
    assert line["creds"] == {"access_key_id": "AK", "access_key_secret": logs.REDACTED}
    assert line["grpc_metadata"][1] == ["x-fc-request-id", "r1"]
    assert line["token"] == logs.REDACTED
    # The caller's objects are not touched.
    assert headers["x-fc-security-token"] == SECRET


def test_redaction_fails_closed_on_cycles() -> None:
    loop: dict[str, Any] = {"name": "x"}
    loop["self"] = loop
    event = logs.redact(None, "info", {"event": "e", "loop": loop})
    json.dumps(event)  # finite: the cycle was cut


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5))
keys = st.sampled_from(NAMES + ["Authorization", "x-Fc-Security-Token", "a", "b", "items", "headers", "id"])


def nested(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
        st.lists(st.tuples(keys, children), max_size=3),
    )


def plant(value: Any) -> Any:
    """Put SECRET under every sensitive key (and only there)."""
    if isinstance(value, dict):
        return {k: (SECRET if logs.is_sensitive_key(k) else plant(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [plant(v) for v in value]
    if isinstance(value, tuple):
        name, item = value
        return (name, SECRET if logs.is_sensitive_key(name) else plant(item))
    return value


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, st.recursive(json_scalars, nested, max_leaves=20), max_size=5))
def test_no_planted_secret_reaches_the_output(fields: dict[str, Any]) -> None:
    buf = io.StringIO()
    logs.configure_logging("x", stream=buf)
    logs.get_logger().info("e", **plant(fields))
    assert SECRET not in buf.getvalue()
    assert json.loads(buf.getvalue())["event"] == "e"


# --- worker lines ---------------------------------------------------------------


def test_worker_line_fields() -> None:
    sink = ListSink()
    logs.emit_worker_line(
        sink, function="hello", worker="w1", stream="stdout", text=b"hi\r", request_id="r-1", fmt="json"
    )
    logs.emit_worker_line(
        sink, function="hello", worker="w1", stream="stderr", text=b"bad \xff", request_id=None, truncated=7, fmt="json"
    )
    out, err = (json.loads(line) for line in sink.lines)
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in sink.lines)
    assert out == {
        "timestamp": out["timestamp"],
        "level": "info",
        "event": "hi",
        "component": "worker",
        "function": "hello",
        "worker": "w1",
        "request_id": "r-1",
        "stream": "stdout",
    }
    assert ISO_UTC.match(out["timestamp"])
    assert err["level"] == "warning" and err["event"] == "bad \ufffd" and err["truncated_bytes"] == 7
    assert "request_id" not in err


@given(st.binary(max_size=200).filter(lambda b: b"\n" not in b))
def test_worker_text_cannot_forge_fields(text: bytes) -> None:
    sink = ListSink()
    for forged in (text, b'", "level": "error", "component": "data-plane', b'{"request_id": "other"}' + text):
        logs.emit_worker_line(sink, function="f", worker="w", stream="stdout", text=forged, request_id=None, fmt="json")
    for line in sink.lines:
        parsed = json.loads(line)
        assert set(parsed) == {"timestamp", "level", "event", "component", "function", "worker", "stream"}
        assert (parsed["level"], parsed["component"]) == ("info", "worker")


def test_worker_line_console() -> None:
    sink = ListSink()
    logs.emit_worker_line(
        sink, function="f", worker="w1", stream="stderr", text=b"oops", request_id="r1", truncated=3, fmt="console"
    )
    (line,) = sink.lines
    text = line.decode()
    assert text.endswith("\n") and "oops" in text and "[warning" in text
    assert "request_id=r1" in text and "truncated_bytes=3" in text and "function=f" in text


def test_timestamps_share_one_format() -> None:
    buf = io.StringIO()
    logs.configure_logging("x", stream=buf)
    logs.get_logger().info("e")
    assert ISO_UTC.match(lines_of(buf)[0]["timestamp"])
    assert ISO_UTC.match(logs.utc_timestamp())


def test_values_orjson_refuses_still_log() -> None:
    buf = io.StringIO()
    logs.configure_logging("x", stream=buf)
    logs.get_logger().info("odd", big=2**70, keyed={1: "a", (1, 2): "skipped"}, obj=object())
    (line,) = lines_of(buf)
    assert line["big"] == 2**70 and line["keyed"] == {"1": "a"} and line["obj"].startswith("<object")


def test_namedtuples_and_models_are_walked() -> None:
    from typing import NamedTuple

    import pydantic

    class Pair(NamedTuple):
        access_key_id: str
        access_key_secret: str

    class Spec(pydantic.BaseModel):
        name: str
        env: dict[str, str]

    buf = io.StringIO()
    logs.configure_logging("x", stream=buf)
    logs.get_logger().info(
        "e", pair=Pair("AK", SECRET), spec=Spec(name="hello", env={"DB_PASSWORD": SECRET, "GREETING": "hi"})
    )
    assert SECRET not in buf.getvalue()
    (line,) = lines_of(buf)
    assert line["pair"]["access_key_id"] == "AK"
    assert line["spec"]["env"] == {"DB_PASSWORD": logs.REDACTED, "GREETING": "hi"}


def test_console_exceptions_survive_redaction() -> None:
    buf = io.StringIO()
    logs.configure_logging("x", fmt="console", stream=buf)
    try:
        raise KeyError("missing")
    except KeyError as exc:
        logs.get_logger().error("failed", exc_info=(type(exc), exc, exc.__traceback__))
        logs.get_logger().exception("failed again", token=SECRET)
    out = buf.getvalue()
    assert out.count("KeyError: 'missing'") == 2 and SECRET not in out
