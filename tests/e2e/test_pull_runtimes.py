"""Pull-model runtimes through the CA port, on real processes: the unmodified
``awslambdaric`` from PyPI serves invocations through the worker's Lambda
Runtime API, and an SCF bootstrap written the way SCF's docs show (bash +
curl, ``examples/scf``) through the SCF API. Success, handler errors,
timeouts, crashes, init errors and concurrency behave as for every runtime.

Handlers: ``functions/pull/lam.py`` (and ``broken.py``, which fails at import).
"""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.harness import FUNCTIONS_DIR, started, wait_for
from tests.e2e.test_pools import exits

PULL_DIR = FUNCTIONS_DIR / "pull"
SCF_EXAMPLE = Path(__file__).parents[2] / "examples" / "scf"

pytest.importorskip("awslambdaric", reason="awslambdaric is a test dependency (pyproject's [test] extra)")


def lambda_fn(module: str = "lam", **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"runtime": "lambda", "command": [sys.executable, "-m", "awslambdaric", f"{module}.handler"],
                            "handler": f"{module}.handler", "code_dir": str(PULL_DIR), "min_warm": 1,
                            "max_workers": 2, "timeout": "10s", "startup_timeout": "20s"}
    spec.update(overrides)
    return spec


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_awslambdaric_serves_invocations(tmp_path: Path) -> None:
    fn = lambda_fn(limits={"memory": "256MiB"})
    with started(tmp_path, {"lam": fn}, extra_env={"SUPERVISOR_SECRET": "do-not-leak"}) as sup:
        response = sup.invoke({"op": "echo", "x": 1}, headers={"x-fc-request-id": "lam-req-1"})
        assert response.status_code == 200, response.text
        assert response.headers["x-fc-request-id"] == "lam-req-1"
        result = response.json()
        assert result["event"] == {"op": "echo", "x": 1}
        assert result["request_id"] == "lam-req-1" and result["function"] == "lam"
        assert result["memory"] == "256" and 0 < result["remaining_ms"] <= 10_000
        assert result["handler_env"] == "lam.handler" and result["secret"] is None
        # What the handler printed is logged, attributed to its invocation.
        wait_for(lambda: any("echo for lam-req-1" in line.get("event", "") and line.get("request_id") == "lam-req-1"
                             for line in sup.logs()), 10, "the handler's output in the log")
        for i in range(20):  # the runtime keeps pulling
            assert sup.invoke({"op": "echo", "i": i}).json()["event"]["i"] == i


def test_a_lambda_handler_error_is_the_contracts_error(tmp_path: Path) -> None:
    with started(tmp_path, {"lam": lambda_fn()}) as sup:
        response = sup.invoke({"op": "fail"})
        assert response.status_code == 404 and response.headers["x-fc-status"] == "404"
        error = response.json()
        assert error["errorType"] == "DeliberateError" and error["errorMessage"] == "asked to fail"
        assert any("asked to fail" in line or "lam.py" in line for line in error["stackTrace"])
        assert sup.invoke({"op": "echo"}).status_code == 200


def test_a_lambda_timeout_kills_the_runtime_and_the_pool_recovers(tmp_path: Path) -> None:
    with started(tmp_path, {"lam": lambda_fn(timeout="1s", max_workers=1)}) as sup:
        runtime_pid = sup.invoke({"op": "pid"}).json()["pid"]
        response = sup.invoke({"op": "sleep", "s": 30})
        assert response.status_code == 504 and response.json()["errorType"] == "FunctionTimeoutError"
        wait_for(lambda: gone(runtime_pid), 10, "the runtime process killed with its worker")
        wait_for(lambda: sup.invoke({"op": "echo"}).status_code == 200, 30, "a replacement worker")
        assert exits(sup, "lam", "timeout") == 1


def test_a_lambda_runtime_crash_mid_invocation_is_502(tmp_path: Path) -> None:
    with started(tmp_path, {"lam": lambda_fn(max_workers=1)}) as sup:
        response = sup.invoke({"op": "crash"})
        assert response.status_code == 502 and response.json()["errorType"] == "WorkerCrashedError"
        wait_for(lambda: sup.invoke({"op": "echo"}).status_code == 200, 30, "a replacement worker")
        assert exits(sup, "lam", "crashed") == 1


def test_a_lambda_init_error_is_reported_by_initialize(tmp_path: Path) -> None:
    with started(tmp_path, {"lam": lambda_fn("broken")}, initialize=False) as sup:
        response = wait_for(lambda: (r := sup.post("/initialize")).status_code == 404 and r, 60,
                            "/initialize to report the init error")
        error = response.json()
        assert error["errorType"] == "InitializationError"
        assert "broken at import" in error["errorMessage"]


def test_lambda_concurrency_is_honoured(tmp_path: Path) -> None:
    with started(tmp_path, {"lam": lambda_fn(concurrency=2, max_workers=1)}) as sup:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: sup.invoke({"op": "sleep", "s": 0.5}), range(4)))
        assert [a.status_code for a in answers] == [200] * 4
        assert len(sup.workers("lam")) == 1


def test_an_http_trigger_request_to_a_lambda_function_is_404(tmp_path: Path) -> None:
    with started(tmp_path, {"lam": lambda_fn()}) as sup, sup.client() as client:
        response = client.get("/some/path")
        assert response.status_code == 404 and response.json()["errorType"] == "FunctionNotFoundError"


def test_an_scf_bootstrap_serves_through_the_scf_api(tmp_path: Path) -> None:
    if not (shutil.which("bash") and shutil.which("curl")):
        pytest.skip("the SCF example's bootstrap is bash + curl, and one of them is missing here")
    fn = {"runtime": "scf", "command": ["./bootstrap"], "handler": "index.main_handler", "code_dir": str(SCF_EXAMPLE),
          "min_warm": 1, "max_workers": 2, "timeout": "10s"}
    with started(tmp_path, {"scf": fn}) as sup:
        response = sup.invoke('{"name": "scf"}', headers={"x-fc-request-id": "scf-req-1"})
        assert response.status_code == 200, response.text
        assert response.text.strip() == "Echoing request: '{\"name\": \"scf\"}'"
        failed = sup.invoke('{"fail": true, "x": "fail"}')
        assert failed.status_code == 404 and failed.headers["x-fc-status"] == "404"
        assert "handler failed" in failed.json()["errorMessage"]
        assert sup.invoke('{"again": 1}').status_code == 200
        wait_for(lambda: any("handling" in line.get("event", "") and line.get("request_id") == "scf-req-1"
                             for line in sup.logs()), 10, "the bootstrap's output in the log")
