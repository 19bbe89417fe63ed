"""One access record per invocation from the data plane (issue 12, item 5).

On a real supervisor: every ``/invoke`` and HTTP-trigger request is one
``event: "access"`` record with ``request_id``, ``function``, ``status``,
``outcome``, ``error_type``, ``duration_ms``, ``queue_ms`` (``worker`` once a
worker had it; ``method`` and ``path`` for HTTP triggers): a success, a
handler's exception, a timeout, a full queue, a queued invocation, an
unknown function, a wrong method, an HTTP-trigger request (its query string
never logged); none for the lifecycle calls. ``[supervisor] access_log =
false`` turns it off.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import FUNCTIONS_DIR, Running, function, started, wait_for

KEYS = {"timestamp", "level", "event", "component", "request_id", "function", "status", "outcome", "error_type",
        "duration_ms", "queue_ms"}


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("access")
    functions = {
        "ev": function(min_warm=1, max_workers=2, timeout="1s"),
        "narrow": function(min_warm=1, max_workers=1, max_queue=1, timeout="20s"),
        "web": {"runtime": "python", "interface": "asgi", "handler": "web:app",
                "code_dir": str(FUNCTIONS_DIR / "runtimes"), "min_warm": 1, "max_workers": 1, "timeout": "10s"},
    }
    with started(tmp, functions, default_function="ev") as running:
        yield running


def access_of(sup: Running, request_id: str) -> dict[str, Any]:
    """The one access record of ``request_id`` (waited for: the log is written by another thread)."""
    def found() -> list[dict[str, Any]]:
        return [r for r in sup.logs() if r.get("event") == "access" and r.get("request_id") == request_id]

    records = wait_for(found, 10, f"the access record of {request_id}")
    assert len(records) == 1, records
    record = records[0]
    assert KEYS <= set(record), record
    assert record["level"] == "info" and record["component"] == "data-plane"
    assert isinstance(record["duration_ms"], float) and record["duration_ms"] >= record["queue_ms"] >= 0
    return record  # type: ignore[no-any-return]


def test_a_success(sup: Running) -> None:
    assert sup.invoke({"echo": 1}, headers={"x-fc-request-id": "acc-ok"}).status_code == 200
    record = access_of(sup, "acc-ok")
    assert (record["function"], record["status"], record["outcome"], record["error_type"]) == ("ev", 200, "success",
                                                                                               None)
    assert record["worker"].startswith("ev-") and record["queue_ms"] == 0
    assert "method" not in record and "path" not in record


def test_a_handler_exception(sup: Running) -> None:
    assert sup.invoke({"op": "raise"}, headers={"x-fc-request-id": "acc-raise"}).status_code == 404
    record = access_of(sup, "acc-raise")
    assert (record["status"], record["outcome"], record["error_type"]) == (404, "error", "ValueError")
    assert record["worker"].startswith("ev-")


def test_a_timeout(sup: Running) -> None:
    response = sup.invoke({"op": "sleep", "s": 5}, headers={"x-fc-request-id": "acc-timeout"})
    assert response.status_code == 504
    record = access_of(sup, "acc-timeout")
    assert (record["status"], record["outcome"], record["error_type"]) == (504, "timeout", "FunctionTimeoutError")
    assert record["worker"].startswith("ev-")


def gauge(sup: Running, name: str, function: str) -> float:
    for line in sup.metrics().splitlines():
        if line.startswith(f'{name}{{function="{function}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_queued_invocation_and_a_full_queue(sup: Running) -> None:
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(sup.invoke, {"op": "sleep", "s": 1.0}, "narrow", 30, {"x-fc-request-id": "acc-busy"})
        wait_for(lambda: gauge(sup, "supervisor_inflight_requests", "narrow") == 1, 10, "narrow busy")
        queued = pool.submit(sup.invoke, {"echo": 2}, "narrow", 30, {"x-fc-request-id": "acc-queued"})
        wait_for(lambda: gauge(sup, "supervisor_queue_depth", "narrow") == 1, 10, "one queued")
        full = sup.invoke({"echo": 3}, "narrow", headers={"x-fc-request-id": "acc-full"})
        assert full.status_code == 503 and full.json()["errorType"] == "TooManyRequestsError"
        assert busy.result().status_code == 200 and queued.result().status_code == 200
    refused = access_of(sup, "acc-full")
    assert (refused["function"], refused["status"], refused["outcome"], refused["error_type"]) == (
        "narrow", 503, "rejected", "TooManyRequestsError")
    assert "worker" not in refused and refused["queue_ms"] == 0
    waited = access_of(sup, "acc-queued")
    assert waited["outcome"] == "success" and waited["queue_ms"] > 0
    assert waited["worker"] == access_of(sup, "acc-busy")["worker"]


def test_refusals_before_routing(sup: Running) -> None:
    with sup.client() as client:
        # An event function takes no HTTP-trigger request.
        missing = client.get("/page", headers={"x-fc-function-name": "ev", "x-fc-request-id": "acc-missing"})
        assert missing.status_code == 404
        assert client.get("/invoke", headers={"x-fc-request-id": "acc-get"}).status_code == 405
    record = access_of(sup, "acc-missing")
    assert (record["function"], record["status"], record["outcome"], record["error_type"]) == (
        "ev", 404, "rejected", "FunctionNotFoundError")
    assert (record["method"], record["path"]) == ("GET", "/page") and "worker" not in record
    wrong = access_of(sup, "acc-get")
    assert (wrong["status"], wrong["error_type"], wrong["function"]) == (405, "MethodNotAllowedError", None)


def test_an_http_trigger_request(sup: Running) -> None:
    with sup.client() as client:
        response = client.post("/echo?token=secret-in-query", content=b"hi",
                               headers={"x-fc-function-name": "web", "x-fc-request-id": "acc-web"})
    assert response.status_code == 200
    record = access_of(sup, "acc-web")
    assert (record["function"], record["status"], record["outcome"], record["method"], record["path"]) == (
        "web", 200, "success", "POST", "/echo")
    assert record["worker"].startswith("web-") and record["error_type"] is None
    assert "secret-in-query" not in sup.log_path.read_text()
    with sup.client() as client:
        boom = client.get("/boom", headers={"x-fc-function-name": "web", "x-fc-request-id": "acc-boom"})
    assert boom.status_code == 404
    failed = access_of(sup, "acc-boom")
    assert (failed["method"], failed["path"], failed["outcome"], failed["status"]) == ("GET", "/boom", "error", 404)


def test_lifecycle_calls_are_not_invocations(sup: Running) -> None:
    with sup.client() as client:
        assert client.post("/initialize", headers={"x-fc-request-id": "acc-init"}).status_code == 200
        assert client.get("/pre-freeze", headers={"x-fc-request-id": "acc-freeze"}).status_code == 200
    assert sup.invoke({}, headers={"x-fc-request-id": "acc-after"}).status_code == 200
    access_of(sup, "acc-after")  # written after the two calls before it
    assert not [r for r in sup.logs() if r.get("event") == "access"
                and r.get("request_id") in ("acc-init", "acc-freeze")]


def test_each_line_is_one_json_object(sup: Running) -> None:
    for line in sup.log_path.read_text().splitlines():
        assert isinstance(json.loads(line), dict)


def test_access_log_false_turns_it_off(tmp_path: Path) -> None:
    with started(tmp_path, {"ev": function()}, access_log=False) as quiet:
        assert quiet.invoke({"echo": 1}, headers={"x-fc-request-id": "quiet-1"}).status_code == 200
        with httpx.Client(base_url=quiet.base, trust_env=False) as client:
            assert client.get("/invoke").status_code == 405
        wait_for(lambda: any(r.get("request_id") == "quiet-1" and r.get("marker") == "end" for r in quiet.logs()),
                 10, "the invocation's End marker")
        assert not [r for r in quiet.logs() if r.get("event") == "access"]
