"""The CA-port contract, end to end: one real supervisor, many functions.

Each test talks HTTP to ``supervisor run`` the way Function Compute does and
checks the contract's statuses, error types, headers and bodies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.harness import Running, function, started, wait_for

SECRET = "s3cr3t-value-never-logged"
TOKEN = "sts-token-never-logged"


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("contract")
    hooks = tmp / "hooks"
    hooks.mkdir()
    hooks.chmod(0o1777)  # workers (another user when the tests run as root) write their markers here
    functions = {
        "hello": function(initializer="fns:init", pre_freeze="fns:pre_freeze", max_body="1KiB",
                          env={"GREETING": "hi", "HOOK_DIR": str(hooks)}),
        "short": function(timeout="1s", min_warm=1, max_workers=1),
        "queue": function(min_warm=1, max_workers=1, max_queue=2, timeout="20s"),
        "par": function(min_warm=1, max_workers=4),
        "aio": function("fns:async_handler", concurrency=4, min_warm=1, max_workers=1),
        # Generous: the claim is "never stalls", not a speed, and CI machines are noisy.
        "flood": function(timeout="60s", min_warm=1, max_workers=1),
    }
    with started(tmp, functions, default_function="hello",
                 extra_env={"SUPERVISOR_TEST_SECRET": "supervisor-env-secret"}) as running:
        yield running


def error_of(response: httpx.Response) -> dict[str, object]:
    assert response.headers["x-fc-status"] == "404", response.headers
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body["errorType"], str) and isinstance(body["errorMessage"], str)
    return body  # type: ignore[no-any-return]


def test_invoke_default_function(sup: Running) -> None:
    response = sup.invoke({"hello": "world"})
    assert response.status_code == 200
    assert response.json() == {"hello": "world"}
    assert response.headers["content-type"] == "application/json"
    assert "x-fc-status" not in response.headers


def test_invoke_routes_by_function_name(sup: Running) -> None:
    hello_pid = sup.invoke({"op": "pid"}).json()["pid"]
    par_pid = sup.invoke({"op": "pid"}, function="par").json()["pid"]
    assert hello_pid != par_pid
    assert {w["pid"] for w in sup.workers("par")} >= {par_pid}


def test_request_id_is_echoed_or_generated(sup: Running) -> None:
    given = sup.invoke({"op": "context"}, headers={"x-fc-request-id": "req-given-1"})
    assert given.headers["x-fc-request-id"] == "req-given-1"
    assert given.json()["request_id"] == "req-given-1"
    generated = sup.invoke({"op": "context"})
    rid = generated.headers["x-fc-request-id"]
    assert rid and generated.json()["request_id"] == rid
    assert sup.invoke({"op": "raise"}).headers["x-fc-request-id"]


def test_context_has_the_contract_fields(sup: Running) -> None:
    response = sup.invoke({"op": "context"}, headers={
        "x-fc-access-key-id": "AKID", "x-fc-access-key-secret": SECRET, "x-fc-security-token": TOKEN})
    ctx = response.json()
    assert ctx["function_name"] == "hello"
    assert ctx["timeout_s"] == 10.0
    assert 0 < ctx["remaining_ms"] <= 10_000
    assert (ctx["access_key_id"], ctx["access_key_secret"], ctx["security_token"]) == ("AKID", SECRET, TOKEN)
    assert ctx["headers"]["x-fc-access-key-id"] == "AKID"
    assert ctx["env_greeting"] == "hi"
    assert ctx["fc_function_name"] == "hello"
    assert ctx["env_home_leak"] is None, "the supervisor's own environment reached a worker"


def test_return_values_are_encoded_per_contract(sup: Running) -> None:
    text = sup.invoke({"op": "text"})
    assert (text.text, text.headers["content-type"]) == ("plain text", "text/plain; charset=utf-8")
    none = sup.invoke({"op": "none"})
    assert none.status_code == 200 and none.content == b""
    raw = sup.invoke(b"\x00\x01not json\xff")
    assert raw.content == b"\x00\x01not json\xff"
    assert raw.headers["content-type"] == "application/octet-stream"


def test_handler_exception_is_404_with_stack_trace(sup: Running) -> None:
    response = sup.invoke({"op": "raise", "msg": "bad input"})
    assert response.status_code == 404
    assert response.headers["x-fc-error-type"] == "UnhandledInvocationError"
    body = error_of(response)
    assert body["errorType"] == "ValueError"
    assert body["errorMessage"] == "bad input"
    trace = body["stackTrace"]
    assert isinstance(trace, list) and any("fns.py" in line for line in trace)
    assert sup.invoke({"op": "pid"}).status_code == 200  # the worker survived


def test_unknown_function_name_falls_back_to_default_function(sup: Running) -> None:
    # FC sends its own function name, which need not match a configured one.
    response = sup.invoke({"op": "pid"}, function="fc-service$fc-function")
    assert response.status_code == 200
    assert response.json()["pid"] in {w["pid"] for w in sup.workers("hello")}


def test_other_paths_of_event_functions_are_404(sup: Running) -> None:
    with sup.client() as client:
        response = client.get("/some/trigger/path?x=1")
    assert response.status_code == 404
    assert error_of(response)["errorType"] == "FunctionNotFoundError"


def test_body_over_max_body_is_413(sup: Running) -> None:
    response = sup.invoke(b"x" * 2048)
    assert response.status_code == 413
    assert error_of(response)["errorType"] == "PayloadTooLargeError"

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while reading
        for _ in range(8):
            yield b"y" * 512

    with sup.client() as client:
        streamed = client.post("/invoke", content=chunks())
    assert streamed.status_code == 413
    assert sup.invoke(b"z" * 1024).status_code == 200  # exactly max_body is fine


def test_timeout_is_504_and_the_worker_is_replaced(sup: Running) -> None:
    before = sup.invoke({"op": "pid"}, function="short").json()["pid"]
    response = sup.invoke({"op": "hang"}, function="short")
    assert response.status_code == 504
    assert error_of(response)["errorType"] == "FunctionTimeoutError"
    after = wait_for(lambda: sup.invoke({"op": "pid"}, function="short"), 15, "a replacement worker")
    assert after.status_code == 200 and after.json()["pid"] != before
    assert re.search(r'supervisor_worker_exits_total\{function="short",reason="timeout"\} [1-9]', sup.metrics())


def test_worker_crash_is_502_and_only_that_invocation_fails(sup: Running) -> None:
    response = sup.invoke({"op": "crash"}, function="par")
    assert response.status_code == 502
    assert error_of(response)["errorType"] == "WorkerCrashedError"
    assert sup.invoke({"op": "pid"}, function="par").status_code == 200
    wait_for(lambda: len(sup.ready_workers("par")) >= 1, 10, "par back to min_warm")


def test_queue_overflow_is_503_with_retry_after(sup: Running) -> None:
    # One worker (concurrency 1) and max_queue 2: 1 runs, 2 wait, the rest are refused.
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(sup.invoke, {"op": "sleep", "s": 1.5}, "queue") for _ in range(6)]
        responses = [f.result() for f in futures]
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 200, 503, 503, 503], codes
    for rejected in (r for r in responses if r.status_code == 503):
        assert error_of(rejected)["errorType"] == "TooManyRequestsError"
        assert int(rejected.headers["retry-after"]) >= 1


def test_parallel_invocations_get_their_own_workers(sup: Running) -> None:
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: sup.invoke({"op": "sleep", "s": 1.0}, "par"), range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    assert len({r.json()["pid"] for r in responses}) == 4  # concurrency 1: four workers at once
    assert len(sup.workers("par")) <= 4  # never above max_workers


def test_async_handler_runs_concurrency_invocations_at_once(sup: Running) -> None:
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: sup.invoke({"barrier": 4}, "aio"), range(4)))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert len({r.json()["pid"] for r in responses}) == 1


def test_initialize_is_repeatable(sup: Running) -> None:
    assert sup.post("/initialize").status_code == 200
    assert sup.post("/initialize").status_code == 200


def test_pre_freeze_runs_hooks_and_answers_200(sup: Running, tmp_path_factory: pytest.TempPathFactory) -> None:
    with sup.client() as client:
        response = client.get("/pre-freeze", headers={"x-fc-request-id": "freeze-1"})
    assert response.status_code == 200
    hooks = Path(sup.config_path.parent, "hooks")
    written = list(hooks.glob("pre_freeze-*"))
    assert written and written[0].read_text() == "freeze-1"
    assert sup.invoke({"op": "pid"}).status_code == 200  # still serving after a freeze


def test_status_json_has_the_contract_shape(sup: Running) -> None:
    status = sup.status()
    assert set(status) == {"ready", "components", "functions"}
    assert status["ready"] is True
    names = {c["name"]: c for c in status["components"]}
    assert set(names) >= {"control-plane", "data-plane"}
    for component in names.values():
        assert set(component) == {"name", "pid", "state", "restarts", "uptime_s"}
        assert component["state"] == "running"
    fn = next(f for f in status["functions"] if f["name"] == "hello")
    assert {"name", "runtime", "min_warm", "max_workers", "concurrency", "queue_depth", "inflight",
            "workers"} <= set(fn)
    worker = fn["workers"][0]
    assert set(worker) == {"id", "pid", "state", "inflight", "served", "age_s", "rss_bytes", "mode"}
    assert worker["state"] in ("starting", "idle", "busy", "draining")
    assert sup.cli("status", "--run-dir", str(sup.run_dir)).returncode == 0


def test_metrics_have_the_contract_series(sup: Running) -> None:
    sup.invoke({})
    text = wait_for(lambda: (t := sup.metrics()) and "supervisor_worker_memory_bytes{" in t and t, 10,
                    "worker memory in /metrics")
    for series in ("supervisor_ready 1.0", 'supervisor_workers{function="hello",state="idle"}',
                   'supervisor_capacity_slots{function="hello"}', 'supervisor_inflight_requests{function="hello"}',
                   'supervisor_queue_depth{function="hello"}',
                   'supervisor_invocations_total{function="hello",outcome="success"}',
                   'supervisor_invocation_duration_seconds_count{function="hello"}',
                   'supervisor_queue_wait_seconds_count{function="hello"}',
                   'supervisor_worker_starts_total{function="hello",mode="fork"}',
                   'supervisor_worker_start_seconds_count{function="hello",mode="fork"}',
                   'supervisor_worker_exits_total{function="short",reason="timeout"}',
                   'supervisor_worker_memory_bytes{function="hello",worker="',
                   'supervisor_component_restarts_total{component="data-plane"}'):
        assert series in text, f"{series} missing from /metrics"
    families = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert len(families) == len(set(families)), "a family appears twice in one scrape"
    openmetrics = httpx.get(f"http://127.0.0.1:{sup.metrics_port}/metrics", trust_env=False,
                            headers={"accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n") and openmetrics.text.count("# EOF") == 1
    assert httpx.get(f"http://127.0.0.1:{sup.metrics_port}/healthz", trust_env=False).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{sup.metrics_port}/readyz", trust_env=False).status_code == 200


def test_worker_output_is_attributed_and_secrets_never_logged(sup: Running) -> None:
    response = sup.invoke({"op": "print", "n": 3, "text": "attributed-line"}, headers={
        "x-fc-request-id": "req-print-1", "x-fc-access-key-secret": SECRET, "x-fc-security-token": TOKEN})
    assert response.status_code == 200

    def lines_for_request() -> list[dict[str, object]]:
        # The worker's lines, and FC's markers around them (written by the control plane).
        mine = [r for r in sup.logs() if r.get("request_id") == "req-print-1"
                and r.get("component") in ("worker", "control-plane")]
        return mine if any(r.get("marker") == "end" for r in mine) else []

    mine = wait_for(lines_for_request, 10, "the worker's lines in the log")
    events = [r["event"] for r in mine]
    assert events[0] == "FC Invoke Start RequestId: req-print-1" and mine[0]["marker"] == "start"
    assert events[-1] == "FC Invoke End RequestId: req-print-1" and mine[-1]["marker"] == "end"
    assert [e for e in events if str(e).startswith("attributed-line")] == [f"attributed-line {i}" for i in range(3)]
    stderr_line = next(r for r in mine if r["event"] == "to stderr")
    assert stderr_line["stream"] == "stderr"
    for record in mine:
        assert record["function"] == "hello" and record["worker"] and record["level"] and record["timestamp"]
    everything = sup.log_path.read_text()
    assert SECRET not in everything and TOKEN not in everything
    for record in sup.logs():
        if not record.get("unparsed"):
            assert {"timestamp", "level", "event", "component"} <= set(record), record


def test_cli_invoke_prints_the_result(sup: Running) -> None:
    ok = sup.cli("invoke", "hello", "--data", '{"name": "cli"}', "--run-dir", str(sup.run_dir))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"name": "cli"}
    failed = sup.cli("invoke", "hello", "--data", '{"op": "raise"}', "--run-dir", str(sup.run_dir))
    assert failed.returncode != 0 and b"ValueError" in failed.stderr


def test_a_10mb_line_and_a_flood_neither_stall_the_worker_nor_bloat_the_supervisor(sup: Running) -> None:
    control = psutil.Process(sup.component_pid("control-plane"))
    response = sup.invoke({"op": "flood", "n": 100_000}, function="flood", headers={"x-fc-request-id": "req-flood"},
                          timeout=90)
    assert response.status_code == 200, response.text  # the worker was never blocked for good on its stdout
    written = 100_000 + 2  # the 10 MB line, the flood, "flood done"

    def accounted() -> bool:
        """Every line is logged, or counted as dropped (when stdout could not keep up):
        never lost silently."""
        records = sup.logs()
        logged = sum(1 for r in records if r.get("request_id") == "req-flood" and r.get("stream") == "stdout"
                     and not str(r.get("event", "")).startswith("FC Invoke"))
        dropped = sum(int(r.get("dropped", 0)) for r in records if r.get("event") == "log lines dropped")
        return logged + dropped >= written

    wait_for(accounted, 30, "every line logged or counted as dropped")
    done = [r for r in sup.logs() if r.get("event") == "flood done"]
    assert all(r["request_id"] == "req-flood" for r in done)
    huge = [r for r in sup.logs() if r.get("request_id") == "req-flood" and r.get("truncated_bytes")]
    assert huge and len(huge[0]["event"]) <= 16 * 1024 and huge[0]["truncated_bytes"] >= 10 * 1024 * 1024 - 16 * 1024
    assert huge[0]["function"] == "flood"
    assert control.memory_info().rss < 200 * 1024 * 1024
    assert sup.invoke({}, function="flood").status_code == 200


def test_a_result_over_max_body_fails_only_that_invocation(sup: Running) -> None:
    pid = sup.invoke({"op": "pid"}).json()["pid"]
    response = sup.invoke({"op": "big", "n": 2048})  # hello's max_body is 1 KiB
    assert response.status_code == 404
    assert error_of(response)["errorType"] == "ResultTooLargeError"
    assert sup.invoke({"op": "pid"}).json()["pid"] == pid  # the worker and its link survived
