"""Faults on real processes: kill -9 of a worker, the data plane and the
control plane under load, and SIGTERM during a burst.

Each checks that only the invocations on the killed process fail (with the
contract's JSON error), that the pool comes back, and that no process is
leaked or left a zombie.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.e2e.harness import Running, function, start, started, wait_for


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Running]:
    with started(tmp_path, {"hello": function(min_warm=2, max_workers=4)}) as running:
        yield running


def tree(sup: Running) -> list[psutil.Process]:
    root = psutil.Process(sup.proc.pid)
    return [root, *root.children(recursive=True)]


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def no_zombies(sup: Running) -> bool:
    return not [p for p in tree(sup) if p.status() == psutil.STATUS_ZOMBIE]


def test_kill_worker_during_invocation(sup: Running) -> None:
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(sup.invoke, {"op": "sleep", "s": 30})
        busy = wait_for(lambda: [w for w in sup.workers("hello") if w["state"] == "busy"], 10, "a busy worker")
        others = [w["pid"] for w in sup.workers("hello") if w["pid"] != busy[0]["pid"]]
        os.kill(busy[0]["pid"], signal.SIGKILL)
        response = slow.result(timeout=20)
    assert response.status_code == 502
    assert response.json()["errorType"] == "WorkerCrashedError"
    assert response.headers["x-fc-status"] == "404"
    assert [sup.invoke({"op": "pid"}).status_code for _ in range(5)] == [200] * 5
    wait_for(lambda: len(sup.ready_workers("hello")) >= 2, 5, "pool back to min_warm")
    assert all(psutil.pid_exists(pid) for pid in others)  # the others were untouched
    wait_for(lambda: no_zombies(sup), 5, "no zombies")


def kill_plane_under_load(sup: Running, name: str, restarts: int | None = 1,
                          threads: int = 8) -> tuple[list[int], list[dict[str, object]]]:
    """Keeps invoking from 4 threads while the plane is killed; returns statuses and error bodies."""
    statuses: list[int] = []
    errors: list[dict[str, object]] = []
    stop = threading.Event()

    def load() -> None:
        with sup.client(timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post("/invoke", content=b'{"op": "pid"}')
                except Exception:  # the data plane itself went away: connection errors are expected
                    statuses.append(0)
                    continue
                statuses.append(response.status_code)
                if response.status_code != 200:
                    errors.append(response.json())

    pool = [threading.Thread(target=load) for _ in range(threads)]
    for thread in pool:
        thread.start()
    try:
        wait_for(lambda: len(statuses) >= 20, 10, "load running")
        old = sup.component_pid(name)
        sup.remember_processes()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: (s := sup.status()) and any(
            c["name"] == name and c["pid"] not in (None, old) and c["state"] == "running"
            and (restarts is None or c["restarts"] == restarts)
            for c in s["components"]), 15, f"{name} restarted")
        count = len(statuses)
        wait_for(lambda: statuses[count:].count(200) >= 20, 15, "invocations succeeding again")
    finally:
        stop.set()
        for thread in pool:
            thread.join(30)
    return statuses, errors


def test_kill_data_plane_under_load(sup: Running) -> None:
    workers_before = {w["pid"] for w in sup.ready_workers("hello")}
    statuses, errors = kill_plane_under_load(sup, "data-plane")
    # Only requests that were on the dead process fail (as connection errors); none gets a wrong answer.
    assert statuses.count(200) > 40
    assert all(code in (0, 200, 503) for code in statuses), statuses
    # Workers reconnected to the new data plane rather than being replaced.
    # (the load may have scaled the pool up meanwhile, so: a superset)
    wait_for(lambda: {w["pid"] for w in sup.ready_workers("hello")} >= workers_before, 10,
             "the same workers serving again")
    assert sup.status()["ready"] is True
    assert 'supervisor_component_restarts_total{component="data-plane"} 1.0' in sup.metrics()
    wait_for(lambda: no_zombies(sup), 5, "no zombies")


def test_kill_control_plane_under_load(sup: Running) -> None:
    workers_before = {w["pid"] for w in sup.ready_workers("hello")}
    statuses, errors = kill_plane_under_load(sup, "control-plane")
    for _ in range(2):  # again, with the replacement workers draining the old ones' traffic
        more, more_errors = kill_plane_under_load(sup, "control-plane", restarts=None)
        statuses += more
        errors += more_errors
    # The request path does not go through the control plane: no invocation fails.
    assert statuses and set(statuses) == {200}, (set(statuses), errors[:3])
    wait_for(lambda: len(sup.ready_workers("hello")) >= 2, 10, "pool back to min_warm")
    # The old workers drained and exited (parent-death signal); nothing was orphaned.
    wait_for(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                             for pid in workers_before), 15, "old workers gone")
    # The supervisor, two planes, the function's seed and its pool: nothing else.
    wait_for(lambda: len(tree(sup)) == 4 + len(sup.workers("hello")), 10, "exactly the expected processes")
    wait_for(lambda: no_zombies(sup), 5, "no zombies")


def test_sigterm_during_burst_fails_nothing(tmp_path: Path) -> None:
    sup = start(tmp_path, {"hello": function(min_warm=4, max_workers=4)}, grace_period="20s")
    wait_for(lambda: len(sup.ready_workers("hello")) == 4, 10, "four warm workers")
    with ThreadPoolExecutor(8) as pool:
        burst = [pool.submit(sup.invoke, {"op": "sleep", "s": 1.0}) for _ in range(6)]
        wait_for(lambda: sum(w["inflight"] for w in sup.workers("hello")) == 4, 10, "four in flight, two queued")
        sup.remember_processes()
        sup.proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=30) for f in burst]
    assert [r.status_code for r in results] == [200] * 6, [r.text for r in results]
    assert sup.proc.wait(30) == 0
    assert not sup.leaked()


def test_initialize_waits_for_a_restarting_control_plane(sup: Running) -> None:
    # FC calls /initialize once: a control plane that is (re)starting is waited
    # for, not reported as unavailable.
    os.kill(sup.component_pid("control-plane"), signal.SIGKILL)
    response = sup.post("/initialize", timeout=60)
    assert response.status_code == 200, response.text
    assert sup.invoke({}).status_code == 200


def test_a_freeze_during_start_up_kills_nothing(tmp_path: Path) -> None:
    # FC freezes idle containers; CLOCK_MONOTONIC runs on while frozen. A worker
    # still initializing when the tree is stopped for longer than its start
    # deadline (max(startup_timeout, timeout) + 5 s = 9 s here) must survive.
    # Awake time it really uses: its start (~1 s, more under load), 3 s of
    # initializer, and at most 2 s charged for the freeze: well under 9 s.
    with started(tmp_path, {"hello": function(initializer="fns:slow_init", startup_timeout="4s", timeout="1s",
                                              env={"INIT_SECONDS": "3"})}, initialize=False) as sup:
        starting = wait_for(lambda: [w for w in sup.workers("hello") if w["state"] == "starting"], 10,
                            "a worker initializing")
        # Freeze the whole tree only once the CA port accepts: the data plane may still be starting
        # when the first worker is, and a plane frozen mid-start is not what this test is about.
        wait_for(lambda: accepts(sup.ca_port), 10, "the CA port accepting")
        assert [(w["pid"], w["state"]) for w in sup.workers("hello")] == [(starting[0]["pid"], "starting")]
        frozen = tree(sup)
        for process in frozen:
            process.suspend()
        try:
            deadline = time.monotonic() + 11.0
            while time.monotonic() < deadline:  # the freeze itself: nothing runs, nothing to wait for
                time.sleep(deadline - time.monotonic())
        finally:
            for process in frozen:
                process.resume()
        assert sup.post("/initialize", timeout=30).status_code == 200
        ready = sup.ready_workers("hello")
        assert [w["pid"] for w in ready] == [starting[0]["pid"]], "the worker was killed as not ready in time"
        assert 'reason="init_failed"' not in sup.metrics()


def test_a_hung_worker_orphaned_by_a_control_plane_crash_still_dies(tmp_path: Path) -> None:
    with started(tmp_path, {"hello": function(timeout="1s", min_warm=1, max_workers=2)}) as sup:
        with ThreadPoolExecutor(1) as pool:
            hung = pool.submit(sup.invoke, {"op": "hang"})
            busy = wait_for(lambda: [w for w in sup.workers("hello") if w["state"] == "busy"], 10, "the hung worker")
            os.kill(sup.component_pid("control-plane"), signal.SIGKILL)
            assert hung.result(timeout=30).status_code == 504
        # Its parent is gone and nobody may own it any more: its own drain
        # deadline (timeout + 5 s, enforced by the kernel) ends it.
        wait_for(lambda: not psutil.pid_exists(busy[0]["pid"]) or
                 psutil.Process(busy[0]["pid"]).status() == psutil.STATUS_ZOMBIE, 20, "the hung worker gone")
        assert sup.invoke({"op": "pid"}).status_code == 200


def test_workers_inherit_no_file_descriptors(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        with started(tmp_path, {"hello": function()}, pass_fds=(write_end,)) as sup:
            fds = sup.invoke({"op": "fds"}).json()
            inherited = os.readlink(f"/proc/self/fd/{write_end}")
            assert inherited not in fds.values(), fds
            assert not [target for target in fds.values() if target.endswith("supervisor.lock")], fds
    finally:
        os.close(read_end)
        os.close(write_end)


def test_planes_are_forked_from_the_preloaded_supervisor(sup: Running) -> None:
    # Forked, not spawned: named after their component (the supervisor's argv is
    # theirs too) and children of the supervisor; a restarted plane likewise.
    for name in ("control-plane", "data-plane"):
        plane = psutil.Process(sup.component_pid(name))
        assert (plane.name(), plane.ppid()) == (name, sup.proc.pid)
    old = sup.component_pid("data-plane")
    os.kill(old, signal.SIGKILL)
    restarted = wait_for(lambda: (pid := sup.component_pid("data-plane")) != old and pid, 15, "a new data plane")
    assert psutil.Process(restarted).name() == "data-plane"
    wait_for(lambda: sup.invoke({}).status_code == 200, 15, "invocations served again")
