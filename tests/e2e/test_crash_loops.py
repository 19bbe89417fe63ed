"""A crash while serving costs only its own invocations; a crash loop backs off.

On real processes (issue 11, item 1):
- A poison input that kills its worker (``os._exit``) shortly after the
  worker became ready, mixed with normal invocations at concurrency: every
  poison invocation gets 502 ``WorkerCrashedError``, every normal one 200
  (it waits for a replacement), for a Python function and for a custom
  runtime (``functions/runtimes/server.py``'s ``/crash``). No crash loop is
  declared.
- A true crash loop (``functions/crashloop``: every worker dies right after
  READY, before serving anything): the log says it is a crash loop, the pool
  backs off, invocations get 502 ``InitializationError`` naming it, and
  ``/initialize`` fails with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.harness import FUNCTIONS_DIR, Running, function, start, started, wait_for
from tests.e2e.test_pools import exits
from tests.e2e.test_runtimes import http_fn

POISON_EVERY = 8  # one poison input in every 8 a client sends


def storm(sup: Running, send: Callable[[httpx.Client, bool], httpx.Response], clients: int,
          each: int) -> list[tuple[bool, int, str]]:
    """``clients`` threads send ``each`` invocations; returns (poison?, status, errorType) per invocation."""
    results: list[tuple[bool, int, str]] = []
    lock = threading.Lock()

    def client_loop(offset: int) -> None:
        with sup.client(timeout=60) as client:
            for n in range(offset, offset + each):
                poison = n % POISON_EVERY == 0
                response = send(client, poison)
                error = response.json().get("errorType", "") if response.status_code != 200 else ""
                with lock:
                    results.append((poison, response.status_code, error))

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop, i + 1) for i in range(clients)]:
            future.result(timeout=180)
    return results


def check_storm(sup: Running, name: str, results: list[tuple[bool, int, str]]) -> None:
    normal = [(status, error) for poison, status, error in results if not poison]
    poisoned = [(status, error) for poison, status, error in results if poison]
    failed = [r for r in normal if r[0] != 200]
    assert not failed, (f"{len(failed)} of {len(normal)} normal invocations failed "
                        f"(first: {failed[:5]}); only the poison ones may")
    assert all(r == (502, "WorkerCrashedError") for r in poisoned), poisoned
    assert not [line for line in sup.logs() if "crash loop" in str(line.get("event", ""))], \
        "a poison input is not a crash loop"
    wait_for(lambda: exits(sup, name, "crashed") >= len(poisoned), 10, "every poisoned worker's exit counted")
    # The pool is healthy afterwards: nothing says it failed to initialize.
    assert sup.post("/initialize").status_code == 200
    status = next(fn for fn in sup.status()["functions"] if fn["name"] == name)
    assert not status.get("init_error"), status


def test_a_poison_input_storm_fails_only_the_poison_invocations(tmp_path: Path) -> None:
    fn = function(min_warm=1, max_workers=4, concurrency=1, timeout="30s")

    def send(client: httpx.Client, poison: bool) -> httpx.Response:
        event = b'{"op": "crash", "code": 13}' if poison else b'{"op": "sleep", "s": 0.02}'
        return client.post("/invoke", content=event)

    with started(tmp_path, {"poisoned": fn}) as sup:
        check_storm(sup, "poisoned", storm(sup, send, clients=8, each=40))


def test_a_poison_input_storm_on_a_custom_runtime_fails_only_the_poison_invocations(tmp_path: Path) -> None:
    fn = http_fn("custom", tmp_path, min_warm=1, max_workers=3, concurrency=1, timeout="30s")

    def send(client: httpx.Client, poison: bool) -> httpx.Response:
        return client.get("/crash" if poison else "/pid")

    with started(tmp_path, {"web": fn}) as sup:
        check_storm(sup, "web", storm(sup, send, clients=6, each=16))


def crash_loop_lines(sup: Running) -> list[dict[str, Any]]:
    return [line for line in sup.logs()
            if "crash loop" in str(line.get("event", "")) and line.get("level") == "error"]


def test_a_true_crash_loop_backs_off_and_fails_initialize(tmp_path: Path) -> None:
    fn = function("crashloop:handler", code_dir=str(FUNCTIONS_DIR / "crashloop"), initializer="crashloop:init",
                  min_warm=1, max_workers=2, env={"DIE_AFTER_S": "0.3"})
    sup = start(tmp_path, {"looping": fn}, initialize=False)
    try:
        lines = wait_for(lambda: crash_loop_lines(sup), 30, "a log line saying it is a crash loop")
        assert lines[0].get("function") == "looping", lines[0]
        # Every worker became ready and then died without serving: none failed to initialize.
        assert exits(sup, "looping", "crashed") >= 3
        response = sup.post("/initialize", timeout=30)
        assert response.status_code != 200
        body = response.json()
        assert body["errorType"] == "InitializationError" and "crash loop" in body["errorMessage"], body

        # While it backs off, invocations fail at once with the reason.
        def init_error() -> dict[str, Any] | None:
            answer = sup.invoke({"op": "pid"}, timeout=30)
            if answer.status_code == 502 and answer.json()["errorType"] == "InitializationError":
                return answer.json()  # type: ignore[no-any-return]
            assert answer.status_code == 502 and answer.json()["errorType"] == "WorkerCrashedError", answer.text
            return None

        error = wait_for(init_error, 30, "an invocation answered InitializationError")
        assert "crash loop" in error["errorMessage"], error
        status = next(f for f in sup.status()["functions"] if f["name"] == "looping")
        assert "crash loop" in status["init_error"], status
    finally:
        code = sup.stop()
        leaked = sup.leaked()
        if leaked:
            sup.kill_all()
    assert code == 0 and not leaked, (code, leaked)
