"""Stopping on real processes: one budget, every client answered, JSON only.

SIGTERM gives the whole instance ``grace_period`` (+1 s at most) to stop:
invocations still running when it ends are answered with the contract's
JSON error before the port closes, and workers that ignore SIGTERM are
killed within the same budget. A second signal stops at once, without a
traceback on stdout.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from tests.e2e.harness import Running, function, start, started, wait_for

GRACE_S = 3.0


def stubborn(tmp_path: Path, **overrides: object) -> Running:
    return start(tmp_path, {"hello": function(min_warm=2, max_workers=2, initializer="fns:stubborn_init",
                                              timeout="60s", **overrides)}, grace_period=f"{GRACE_S:g}s")


def assert_json_logs(sup: Running) -> None:
    unparsed = [line["event"] for line in sup.logs() if line.get("unparsed")]
    assert not unparsed, unparsed[:20]
    assert not [line for line in sup.logs() if "Exception in ASGI application" in str(line.get("event"))]


def test_sigterm_stops_within_the_grace_period_and_answers_every_client(tmp_path: Path) -> None:
    sup = stubborn(tmp_path)
    try:
        with ThreadPoolExecutor(3) as pool:
            running = [pool.submit(sup.invoke, {"op": "sleep", "s": 30}, timeout=30) for _ in range(2)]
            queued = pool.submit(sup.invoke, {"op": "sleep", "s": 30}, timeout=30)
            wait_for(lambda: sum(w["inflight"] for w in sup.workers("hello")) == 2, 10, "two in flight")
            sup.remember_processes()
            began = time.monotonic()
            sup.proc.send_signal(signal.SIGTERM)
            code = sup.proc.wait(GRACE_S + 5)
            took = time.monotonic() - began
            answers = [f.result(timeout=10) for f in [*running, queued]]
    finally:
        sup.kill_all()
    assert code == 0
    assert took <= GRACE_S + 1.0, f"stopping took {took:.2f}s with grace_period {GRACE_S}s"
    for response in answers:
        assert response.status_code == 503, response.text
        assert response.json()["errorType"] == "ShuttingDownError"
        assert response.headers["x-fc-status"] == "404" and response.headers["x-fc-request-id"]
    assert not sup.leaked()
    assert_json_logs(sup)


def test_invocations_that_finish_within_the_grace_period_succeed(tmp_path: Path) -> None:
    with started(tmp_path, {"hello": function(min_warm=2, max_workers=2)}, grace_period="10s") as sup:
        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(sup.invoke, {"op": "sleep", "s": 1.5}) for _ in range(2)]
            wait_for(lambda: sum(w["inflight"] for w in sup.workers("hello")) == 2, 10, "two in flight")
            sup.remember_processes()
            began = time.monotonic()
            sup.proc.send_signal(signal.SIGTERM)
            assert [f.result(timeout=20).status_code for f in running] == [200, 200]
            assert sup.proc.wait(15) == 0
            # Nothing left to wait for once they finished: no idle waiting out the grace period.
            assert time.monotonic() - began < 10
    assert_json_logs(sup)


def test_a_second_signal_stops_at_once_without_a_traceback(tmp_path: Path) -> None:
    sup = stubborn(tmp_path)
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(sup.invoke, {"op": "sleep", "s": 30}, timeout=30)
            wait_for(lambda: sum(w["inflight"] for w in sup.workers("hello")) == 1, 10, "one in flight")
            sup.remember_processes()
            sup.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: any(line.get("event") == "draining" for line in sup.logs()), 10, "draining")
            sup.proc.send_signal(signal.SIGTERM)
            sup.proc.wait(10)
            try:
                response: httpx.Response | None = running.result(timeout=10)
            except httpx.HTTPError:
                response = None  # a fast stop may cut the connection; it must not hang
    finally:
        sup.kill_all()
    if response is not None:
        assert response.status_code == 503 and response.json()["errorType"] == "ShuttingDownError"
    assert not [p for p in sup.leaked() if psutil.pid_exists(p)]
    assert_json_logs(sup)
