"""Whatever user code raises costs only its own invocation, on real processes.

``BaseException`` itself, ``SystemExit``, ``KeyboardInterrupt``,
``GeneratorExit`` and ``asyncio.CancelledError`` raised by a handler are that
invocation's 404 ``UnhandledInvocationError`` naming the class (as any
handler exception), for sync handlers run inline and in threads, async
handlers, and the ASGI/WSGI apps (HTTP trigger and ``/invoke``): the worker
keeps its pid, a neighbour in flight in the same worker succeeds, and
``max_requests`` still counts the failed invocations. A hook that raises
them is that hook's failure: the initializer's is ``/initialize``'s 404
``InitializationError`` naming it, ``pre_freeze``/``pre_stop``'s is logged
and the worker serves on (or drains cleanly).

Functions: ``functions/raising/raising.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import FUNCTIONS_DIR, Running, started, wait_for
from tests.e2e.test_pools import bad_exits, exit_reasons, wait_for_exits

RAISING_DIR = FUNCTIONS_DIR / "raising"
NAMES = ["BaseException", "SystemExit", "KeyboardInterrupt", "GeneratorExit", "CancelledError"]


def raising_fn(handler: str = "raising:handler", **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"runtime": "python", "handler": handler, "code_dir": str(RAISING_DIR),
                            "min_warm": 1, "max_workers": 1, "timeout": "10s"}
    spec.update(overrides)
    return spec


def assert_unhandled(response: httpx.Response, name: str) -> None:
    assert response.status_code == 404, (name, response.status_code, response.text)
    assert response.headers["x-fc-status"] == "404"
    assert response.headers["x-fc-error-type"] == "UnhandledInvocationError"
    error = response.json()
    assert error["errorType"] == name, error
    assert f"raised on purpose: {name}" in error["errorMessage"], error


@contextlib.contextmanager
def neighbour(hold: Path, call: Callable[[], httpx.Response]) -> Iterator[Future[httpx.Response]]:
    """``call`` in flight in its handler (it wrote its mark) until the block ends."""
    hold.mkdir()
    hold.chmod(0o1777)  # the worker runs as another user
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(call)
        try:
            wait_for(lambda: future.done() or any(hold.glob("entered-*")), 15, "the neighbour in its handler")
            assert not future.done(), future.result().text
            yield future
        finally:
            (hold / "release").touch()


def the_pid(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return int(response.json()["pid"])


def test_an_inline_sync_handler_raising_base_exceptions_keeps_its_worker_and_max_requests_counts(
        tmp_path: Path) -> None:
    # concurrency 1, a sync handler: it runs inline on the worker's event loop.
    with started(tmp_path, {"raising": raising_fn(max_workers=2, max_requests=20)}) as sup:
        pid = the_pid(sup.invoke({}))
        for name in NAMES:
            assert_unhandled(sup.invoke({"raise": name}), name)
            assert the_pid(sup.invoke({})) == pid, name  # the same worker serves on
        # 11 invocations so far; the worker's own recycle point is 20-22 (jitter). Failed
        # invocations count too: 11 more (of which none succeed) make it due.
        for _ in range(11):
            assert_unhandled(sup.invoke({"raise": "SystemExit"}), "SystemExit")
        wait_for_exits(sup, "raising", "recycled", 1)
        assert the_pid(sup.invoke({})) != pid
        assert not bad_exits(sup, "raising"), (exit_reasons(sup, "raising"), str(sup.log_path))


@pytest.mark.parametrize(("handler", "concurrency"), [("raising:handler", 4), ("raising:async_handler", 4),
                                                      ("raising:async_handler", 1)],
                         ids=["sync-threads", "async-concurrent", "async-alone"])
def test_a_handler_raising_base_exceptions_fails_only_its_invocation(
        tmp_path: Path, handler: str, concurrency: int) -> None:
    with started(tmp_path, {"raising": raising_fn(handler, concurrency=concurrency)}) as sup:
        pid = the_pid(sup.invoke({}))
        for name in NAMES:
            if concurrency == 1:
                assert_unhandled(sup.invoke({"raise": name}), name)
            else:
                hold = tmp_path / f"hold-{name}"
                with neighbour(hold, lambda h=hold: sup.invoke({"hold": str(h)})) as held:  # type: ignore[misc]
                    assert_unhandled(sup.invoke({"raise": name}), name)
                assert the_pid(held.result(timeout=30)) == pid, name
            assert the_pid(sup.invoke({})) == pid, name
        assert not bad_exits(sup, "raising"), (exit_reasons(sup, "raising"), str(sup.log_path))


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_an_http_app_raising_base_exceptions_fails_only_its_request(tmp_path: Path, kind: str) -> None:
    fn = raising_fn("raising:app" if kind == "asgi" else "raising:wsgi_app", interface=kind, concurrency=4)
    with started(tmp_path, {"raising": fn}) as sup, sup.client() as client:
        pid = the_pid(client.get("/"))
        for name in NAMES:
            hold = tmp_path / f"hold-{name}"
            with neighbour(hold, lambda h=hold: client.get("/", params={"hold": str(h)})) as held:  # type: ignore[misc]
                assert_unhandled(client.get("/", params={"raise": name}), name)
                assert_unhandled(sup.invoke({"raise": name}), name)  # /invoke is POST /invoke to the app
            assert the_pid(held.result(timeout=30)) == pid, name
            assert the_pid(client.get("/")) == pid, name
        assert not bad_exits(sup, "raising"), (exit_reasons(sup, "raising"), str(sup.log_path))


@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt"])
def test_an_initializer_raising_base_exceptions_is_the_initialization_error(tmp_path: Path, name: str) -> None:
    fn = raising_fn(initializer="raising:init", env={"HOOK_RAISE": name})
    with started(tmp_path, {"raising": fn}, initialize=False) as sup:
        response = wait_for(lambda: (r := sup.post("/initialize")).status_code == 404 and r, 30, "/initialize 404")
        error = response.json()
        assert error["errorType"] == "InitializationError", error
        assert f"{name}: raised on purpose: {name}" in error["errorMessage"], error


def hook_failures(sup: Running, hook: str) -> list[dict[str, Any]]:
    return [line for line in sup.logs() if line.get("event") == f"{hook} hook failed"]


@pytest.mark.parametrize(("pre_freeze", "name"), [("raising:pre_freeze", "SystemExit"),
                                                  ("raising:pre_freeze", "KeyboardInterrupt"),
                                                  ("raising:async_pre_freeze", "KeyboardInterrupt"),
                                                  ("raising:async_pre_freeze", "CancelledError")])
def test_pre_freeze_and_pre_stop_raising_base_exceptions_are_those_hooks_failures(
        tmp_path: Path, pre_freeze: str, name: str) -> None:
    fn = raising_fn(pre_freeze=pre_freeze, pre_stop="raising:pre_stop", env={"HOOK_RAISE": name})
    with started(tmp_path, {"raising": fn}) as sup, sup.client() as client:
        pid = the_pid(sup.invoke({}))
        assert client.get("/pre-freeze", headers={"x-fc-request-id": "freeze-1"}).status_code == 200
        failed = wait_for(lambda: hook_failures(sup, "pre_freeze"), 10, "the pre_freeze failure logged")
        assert failed[0]["error_type"] == name and failed[0]["request_id"] == "freeze-1", failed
        assert the_pid(sup.invoke({})) == pid  # the worker serves on
        assert client.get("/pre-stop", headers={"x-fc-request-id": "stop-1"}).status_code == 200
        failed = wait_for(lambda: hook_failures(sup, "pre_stop"), 10, "the pre_stop failure logged")
        assert failed[0]["error_type"] == name and failed[0]["request_id"] == "stop-1", failed
        # The worker was then stopped as every worker is after /pre-stop: drained, not crashed.
        wait_for(lambda: sum(exit_reasons(sup, "raising").values()) >= 1, 15, "the worker's exit")
        assert not bad_exits(sup, "raising"), (exit_reasons(sup, "raising"), str(sup.log_path))
