"""A pull runtime's API serves its own runtime only, on real processes.

Next to a Lambda function (the unmodified ``awslambdaric``) and an SCF
function (the example's bash + curl ``bootstrap``), a thief function
(``functions/pullthief/thief.py``), told each API's port, long-polls for
their events and posts forged results for their invocations in flight. It
runs as the same user as they do (``nobody``, the default as root, or the
test's own user otherwise): the uid tells nothing apart, the gate must. It
gets no event and no answer is accepted, while every invocation gets its
own runtime's genuine result. With ``network = "none"`` the API is inside
the worker's own network namespace: not even reachable. ``status`` says
which gate applies.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.control.sandbox import probe
from tests.e2e.harness import FUNCTIONS_DIR, Running, started, wait_for
from tests.e2e.test_pull_runtimes import SCF_EXAMPLE, lambda_fn

pytest.importorskip("awslambdaric", reason="awslambdaric is a test dependency (pyproject's [test] extra)")

THIEF = {"runtime": "python", "handler": "thief:handler", "code_dir": str(FUNCTIONS_DIR / "pullthief"),
         "min_warm": 1, "max_workers": 2, "timeout": "20s"}
SLOW_SCF_HANDLER = """\
# Like the example's index.sh, but an event that asks for it takes 3 s.
function slow_handler () {
  case "$1" in *'"sleep"'*) sleep 3 ;; esac
  echo "Echoing request: '$1'"
}
"""


def scf_fn(code_dir: Path) -> dict[str, Any]:
    return {"runtime": "scf", "command": ["./bootstrap"], "handler": "slow.slow_handler", "code_dir": str(code_dir),
            "min_warm": 1, "max_workers": 1, "timeout": "10s"}


def runtime_env(sup: Running, function: str) -> dict[str, str]:
    """The environment of ``function``'s runtime process (what its worker told it)."""
    worker = wait_for(lambda: sup.ready_workers(function), 30, f"a ready {function} worker")[0]
    child = wait_for(lambda: psutil.Process(worker["pid"]).children(), 10, "the runtime process")[0]
    return dict(child.environ())


def api_port(sup: Running, function: str) -> int:
    env = runtime_env(sup, function)
    if "AWS_LAMBDA_RUNTIME_API" in env:
        return int(env["AWS_LAMBDA_RUNTIME_API"].rsplit(":", 1)[1])
    return int(env["SCF_RUNTIME_API_PORT"])


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    if not (shutil.which("bash") and shutil.which("curl")):
        pytest.skip("the SCF example's bootstrap is bash + curl, and one of them is missing here")
    base = tmp_path_factory.mktemp("pull-private")
    scf_dir = base / "scf"
    scf_dir.mkdir()
    shutil.copy2(SCF_EXAMPLE / "bootstrap", scf_dir / "bootstrap")  # the example's, unchanged
    (scf_dir / "slow.sh").write_text(SLOW_SCF_HANDLER)
    scf_dir.chmod(0o755)
    functions = {"lam": lambda_fn(timeout="10s", max_workers=1), "scf": scf_fn(scf_dir), "thief": THIEF}
    with started(base, functions, default_function="thief") as running:
        yield running


def thief(sup: Running, attempt: dict[str, Any], timeout: float = 40.0) -> dict[str, Any]:
    response = sup.invoke(attempt, function="thief", timeout=timeout)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_the_thief_runs_as_the_same_user_as_the_runtimes(sup: Running) -> None:
    uid = thief(sup, {})["uid"]
    for function in ("lam", "scf"):
        worker = sup.ready_workers(function)[0]
        assert psutil.Process(worker["pid"]).uids().real == uid  # the uid tells them apart: no
        gate = {f["name"]: f for f in sup.status()["functions"]}[function]["isolation"]["runtime_api"]
        assert "own processes" in gate, gate


@pytest.mark.parametrize("function", ["lam", "scf"])
def test_another_function_cannot_take_a_pull_runtimes_events(sup: Running, tmp_path: Path, function: str) -> None:
    mark = tmp_path / "polling"
    api = "lambda" if function == "lam" else "scf"
    with ThreadPoolExecutor(1) as pool:
        stolen = pool.submit(thief, sup, {"steal": {"port": api_port(sup, function), "api": api, "mark": str(mark),
                                                   "timeout": 6.0}})
        wait_for(lambda: stolen.done() or mark.exists(), 15, "the thief's poll sent")
        # The runtime answers each event and polls again: behind the thief, were it let in.
        answers = [sup.invoke({"op": "echo", "i": i}, function=function, timeout=15) for i in range(3)]
        result = stolen.result(timeout=30)
    assert "error" in result["poll"] and "answer" not in result, result  # refused: never an event
    for i, answer in enumerate(answers):
        assert answer.status_code == 200, (i, answer.text)
        if function == "lam":
            assert answer.json()["event"] == {"op": "echo", "i": i}
        else:
            assert answer.text.strip() == f"Echoing request: '{{\"op\": \"echo\", \"i\": {i}}}'"


@pytest.mark.parametrize("function", ["lam", "scf"])
def test_another_function_cannot_answer_a_pull_runtimes_invocation(sup: Running, function: str) -> None:
    api = "lambda" if function == "lam" else "scf"
    port = api_port(sup, function)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(sup.invoke, {"op": "sleep", "s": 3}, function, 20.0, {"x-fc-request-id": "victim-1"})
        wait_for(lambda: slow.done() or sum(w["inflight"] for w in sup.workers(function)) == 1, 10,
                 "the invocation in flight")
        forged = thief(sup, {"forge": {"port": port, "api": api, "request_id": "victim-1", "for_s": 2.0}})
        answer = slow.result(timeout=30)
    assert forged["accepted"] is None, forged
    assert answer.status_code == 200, answer.text
    assert "forged" not in answer.text
    if function == "lam":
        assert answer.json() == {"slept": 3}


CAPS = probe() if sys.platform == "linux" else {}


@pytest.mark.skipif(not CAPS.get("root") or bool(CAPS.get("network")),
                    reason=f"a network namespace needs root and unshare (this machine: {CAPS})")
def test_without_network_the_runtime_api_is_inside_the_workers_own_namespace(tmp_path: Path) -> None:
    functions = {"lam": lambda_fn(max_workers=1, limits={"network": "none", "require_isolation": True}),
                 "thief": THIEF}
    with started(tmp_path, functions, default_function="thief") as sup:
        gate = {f["name"]: f for f in sup.status()["functions"]}["lam"]["isolation"]["runtime_api"]
        assert "network namespace" in gate, gate
        port = api_port(sup, "lam")
        forged = thief(sup, {"forge": {"port": port, "api": "lambda", "request_id": "x", "for_s": 0.5}})
        assert forged["accepted"] is None and all("Connection refused" in str(t) for t in forged["tries"]), forged
        assert sup.invoke({"op": "echo", "x": 1}, function="lam").json()["event"] == {"op": "echo", "x": 1}
