"""The CA port and the metrics port outlive the data plane.

The supervisor binds both once and hands the listening sockets to every data
plane it starts: while a killed data plane is being replaced, new
connections wait in the kernel's backlog and the new plane serves them. Only
the requests that were in flight on the dead plane fail.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.harness import Running, function, started, wait_for

REQUEST = (b"POST /invoke HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
           b"content-length: 13\r\nconnection: close\r\n\r\n{\"op\": \"pid\"}")


def one_request(port: int) -> str:
    """One invocation on a new connection: "ok", "refused", "reset" (in flight on a dead plane) or the status."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(REQUEST)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except ConnectionRefusedError:
        return "refused"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    if not data:
        return "reset"  # accepted by the dead plane, closed with no answer
    status = data.split(b" ", 2)[1].decode()
    return "ok" if status == "200" else status


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Running]:
    with started(tmp_path, {"hello": function(min_warm=2, max_workers=4)}) as running:
        yield running


def test_no_connection_is_refused_while_the_data_plane_restarts(sup: Running) -> None:
    outcomes: Counter[str] = Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def load() -> None:
        while not stop.is_set():
            outcome = one_request(sup.ca_port)
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        for kill in range(3):
            wanted = 50 * (kill + 1)
            wait_for(lambda: outcomes["ok"] >= wanted, 20, "load running")  # noqa: B023
            old = sup.component_pid("data-plane")
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: any(c["name"] == "data-plane" and c["pid"] not in (None, old)  # noqa: B023
                                 and c["state"] == "running" for c in sup.status()["components"]),
                     15, "data plane restarted")
        served_before = outcomes["ok"]
        wait_for(lambda: outcomes["ok"] >= served_before + 50, 20, "invocations succeeding again")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    # Nothing refused; only what was in flight on a killed plane (a handful per kill) failed.
    assert outcomes["refused"] == 0, outcomes
    assert set(outcomes) <= {"ok", "reset"}, outcomes
    assert outcomes["reset"] <= 3 * 8, outcomes


def test_the_metrics_port_outlives_the_data_plane_too(sup: Running) -> None:
    old = sup.component_pid("data-plane")
    os.kill(old, signal.SIGKILL)
    # Connected while no data plane runs: it waits in the backlog, then gets its answer.
    with socket.create_connection(("127.0.0.1", sup.metrics_port), timeout=20) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_only_the_supervisor_and_the_data_plane_hold_the_listening_sockets(sup: Running) -> None:
    root = psutil.Process(sup.proc.pid)
    holders = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port in (sup.ca_port, sup.metrics_port):
                    holders.setdefault(conn.laddr.port, set()).add(process.pid)
        except psutil.NoSuchProcess:
            continue
    data_plane = sup.component_pid("data-plane")
    # Workers, seeds and the control plane never inherit them.
    assert holders == {sup.ca_port: {sup.proc.pid, data_plane}, sup.metrics_port: {sup.proc.pid, data_plane}}


def test_spawned_data_planes_inherit_the_sockets_too(tmp_path: Path) -> None:
    """When importing the planes starts a thread, the supervisor spawns them instead of
    forking (a ``sitecustomize`` starts one here): the sockets are inherited by exec."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, threading\n"
        "if os.environ.pop('CA_TEST_THREAD', None):  # the supervisor only, not what it starts\n"
        "    threading.Thread(target=threading.Event().wait, daemon=True).start()\n")
    env = {"PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}", "CA_TEST_THREAD": "1"}
    with started(tmp_path, {"hello": function()}, extra_env=env) as sup:
        assert any(line.get("event", "").startswith("importing the planes started threads") for line in sup.logs())
        for _ in range(2):
            old = sup.component_pid("data-plane")
            os.kill(old, signal.SIGKILL)
            # Made while no data plane runs: waits in the backlog, then is served.
            assert one_request(sup.ca_port) == "ok"
            assert sup.component_pid("data-plane") != old
