"""The data plane's session with the control plane, against a real gRPC server.

Each session the control plane ends (as a restarted one does) must leave
nothing of itself behind: no task of the session's still pending (asyncio
reports those as "Task was destroyed but it is pending!" once collected),
no exception nobody retrieved. The server here ends every session after its
snapshot, with the data plane's outbox empty: the moment a gRPC consumer
task of a request iterator would be left waiting forever.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import uvloop

from supervisor.data.control_link import ControlLink
from supervisor.v1 import control_pb2 as cpb
from supervisor.v1 import control_pb2_grpc as rpc

SESSIONS = 12


class EndsEverySession(rpc.ControlPlaneServicer):
    def __init__(self) -> None:
        self.sessions = 0
        self.hellos = 0

    async def Attach(self, request_iterator: AsyncIterator[cpb.DataPlaneEvent],  # noqa: N802 (gRPC's name)
                     context: Any) -> AsyncIterator[cpb.ControlEvent]:
        first = await request_iterator.__anext__()
        self.hellos += first.HasField("hello")
        self.sessions += 1
        yield cpb.ControlEvent(snapshot=cpb.Snapshot())


async def sessions_then_collect(sock: Path) -> tuple[list[dict[str, Any]], EndsEverySession]:
    problems: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: problems.append(context))
    servicer = EndsEverySession()
    server = grpc.aio.server()
    rpc.add_ControlPlaneServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{sock}")
    await server.start()
    link = ControlLink(f"unix:{sock}")
    runner = asyncio.ensure_future(link.run())
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while servicer.sessions < SESSIONS:
            assert asyncio.get_running_loop().time() < deadline, f"only {servicer.sessions} sessions in 30 s"
            await asyncio.sleep(0.01)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await link.close()
        await server.stop(0)
    for _ in range(3):  # whatever the sessions left behind is garbage now
        gc.collect()
        await asyncio.sleep(0)
    return problems, servicer


def test_sessions_the_control_plane_ends_leave_no_task_behind() -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        problems, servicer = uvloop.run(sessions_then_collect(Path(tmp) / "control.sock"))
    assert servicer.hellos == servicer.sessions >= SESSIONS  # every session began with the plane's hello
    assert not problems, [str(p.get("message")) + " " + repr(p.get("exception") or p.get("task")) for p in problems]
