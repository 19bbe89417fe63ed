"""The worker socket's gate, on a real unix socket: a credential counts only from the
process (pid and uid, by SO_PEERCRED) it was issued to, and only once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from pathlib import Path

from prometheus_client import CollectorRegistry

from calink import frames
from calink.messages import WorkerHello, WorkerReject, WorkerWelcome
from supervisor.clock import AwakeClock
from supervisor.config import parse_config
from supervisor.data.links import WorkerLink
from supervisor.data.router import Router
from supervisor.metrics import DataPlaneMetrics
from supervisor.v1 import control_pb2 as cpb


async def hello(path: str, worker_id: str, token: bytes) -> tuple[int, bytes]:
    """Presents a credential like a worker does; returns the answer frame."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        hello = WorkerHello(worker_id=worker_id, token=token, pid=os.getpid())
        writer.write(frames.encode(frames.Kind.HELLO, 0, hello.encode()))
        head = await asyncio.wait_for(reader.readexactly(frames.HEADER.size), 5)
        length, kind, _ = frames.HEADER.unpack(head)
        return kind, await asyncio.wait_for(reader.readexactly(length), 5)
    finally:
        writer.close()


def run_gate(tmp_path: Path, issued: cpb.WorkerAdded, token: bytes, attempts: int = 1) -> list[tuple[int, bytes]]:
    (tmp_path / "fn").mkdir()
    config = parse_config({"functions": {"fn": {"code_dir": "fn", "handler": "app:handler"}}}, tmp_path, {})
    path = str(tmp_path / "worker.sock")

    async def main() -> list[tuple[int, bytes]]:
        router = Router(config, DataPlaneMetrics(CollectorRegistry()), AwakeClock(), lambda event: None)
        router.expected[issued.worker_id] = issued
        server = await asyncio.get_running_loop().create_unix_server(lambda: WorkerLink(router), path)
        try:
            return [await hello(path, issued.worker_id, token) for _ in range(attempts)]
        finally:
            server.close()

    return asyncio.run(main())


def issue(token: bytes, *, pid: int | None = None, uid: int | None = None) -> cpb.WorkerAdded:
    added = cpb.WorkerAdded(worker_id="fn-1-abc", function="fn", pid=os.getpid() if pid is None else pid,
                            token_digest=hashlib.sha256(token).digest())
    if uid is not None:
        added.uid = uid
    return added


def test_the_right_process_is_welcomed(tmp_path: Path) -> None:
    token = secrets.token_bytes(32)
    [(kind, payload)] = run_gate(tmp_path, issue(token, uid=os.getuid()), token)
    assert kind == frames.Kind.WELCOME and len(WorkerWelcome.decode(payload).next_token) == 32


def test_a_made_up_credential_is_refused(tmp_path: Path) -> None:
    [(kind, payload)] = run_gate(tmp_path, issue(secrets.token_bytes(32)), secrets.token_bytes(32))
    assert kind == frames.Kind.REJECT and WorkerReject.decode(payload).reason == "bad credential"


def test_a_credential_from_another_pid_is_refused(tmp_path: Path) -> None:
    token = secrets.token_bytes(32)
    [(kind, payload)] = run_gate(tmp_path, issue(token, pid=os.getpid() + 1), token)
    assert kind == frames.Kind.REJECT and "issued to pid" in WorkerReject.decode(payload).reason


def test_a_credential_from_another_uid_is_refused(tmp_path: Path) -> None:
    token = secrets.token_bytes(32)
    [(kind, payload)] = run_gate(tmp_path, issue(token, uid=os.getuid() + 1), token)
    assert kind == frames.Kind.REJECT and "issued to uid" in WorkerReject.decode(payload).reason


def test_a_credential_is_spent_by_its_first_use(tmp_path: Path) -> None:
    token = secrets.token_bytes(32)
    first, second = run_gate(tmp_path, issue(token, uid=os.getuid()), token, attempts=2)
    assert first[0] == frames.Kind.WELCOME
    assert second[0] == frames.Kind.REJECT and WorkerReject.decode(second[1]).reason == "bad credential"


def test_a_hello_followed_at_once_by_its_worker_added_is_welcomed_without_waiting(tmp_path: Path, monkeypatch) -> None:
    """The control plane's WorkerAdded can land in the same loop turn as the worker's
    hello, before the task that waits for it has run: the hello must not then wait
    out the unknown-worker deadline (it did: a replacement took 3 s to be ready, and
    the worker it replaced served 86 invocations past its max_requests of 10)."""
    import supervisor.data.router as router_module

    monkeypatch.setattr(router_module, "UNKNOWN_WORKER_WAIT_S", 60.0)  # the bug: hello() times out after 5 s
    (tmp_path / "fn").mkdir()
    config = parse_config({"functions": {"fn": {"code_dir": "fn", "handler": "app:handler"}}}, tmp_path, {})
    path = str(tmp_path / "worker.sock")
    token = secrets.token_bytes(32)
    issued = issue(token, uid=os.getuid())

    async def main() -> tuple[int, bytes]:
        router = Router(config, DataPlaneMetrics(CollectorRegistry()), AwakeClock(), lambda event: None)
        on_hello = router.on_hello

        def hello_then_added(link: WorkerLink, message: WorkerHello) -> None:
            on_hello(link, message)
            router.on_control_event(cpb.ControlEvent(added=issued))

        router.on_hello = hello_then_added  # type: ignore[method-assign]
        server = await asyncio.get_running_loop().create_unix_server(lambda: WorkerLink(router), path)
        try:
            return await hello(path, issued.worker_id, token)
        finally:
            server.close()

    kind, _ = asyncio.run(main())
    assert kind == frames.Kind.WELCOME
