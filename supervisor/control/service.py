"""The control plane's gRPC service (``supervisor.v1.ControlPlane``).

Rules:
- One data plane session at a time: a new ``Attach`` replaces the previous
  one (a restarted data plane re-attaches; the old stream is ended).
- A session starts with a full ``Snapshot``; then deltas. Its outgoing
  queue is bounded: a data plane that stops reading is cut off and, when it
  re-attaches, gets a fresh snapshot instead of an unbounded backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry

from supervisor.control.manager import PoolManager
from supervisor.logs import get_logger
from supervisor.metrics import exposition
from supervisor.v1 import control_pb2 as cpb
from supervisor.v1 import control_pb2_grpc as rpc

SESSION_QUEUE_LIMIT = 16384

log = get_logger()


class Session:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[cpb.ControlEvent | None] = asyncio.Queue(SESSION_QUEUE_LIMIT)
        self.closed = False

    def send(self, event: cpb.ControlEvent) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("data plane is not reading its session; cutting it off")
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)


class ControlPlaneService(rpc.ControlPlaneServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(self, manager: PoolManager, registry: CollectorRegistry) -> None:
        self.manager = manager
        self.registry = registry
        self.session: Session | None = None
        manager.sink = self._to_data_plane

    def _to_data_plane(self, event: cpb.ControlEvent) -> None:
        if self.session is not None:
            self.session.send(event)

    async def Attach(self, request_iterator: AsyncIterator[cpb.DataPlaneEvent],
                     context: Any) -> AsyncIterator[cpb.ControlEvent]:
        if self.session is not None:
            self.session.close()
        session = self.session = Session()
        self.manager.data_plane_attached = True
        self.manager.on_attach()
        reader = asyncio.ensure_future(self._read(request_iterator, session))
        try:
            yield cpb.ControlEvent(snapshot=self.manager.snapshot())
            while True:
                event = await session.queue.get()
                if event is None:
                    return
                yield event
        finally:
            reader.cancel()
            session.close()
            if self.session is session:
                self.session = None
                self.manager.data_plane_attached = False

    async def _read(self, request_iterator: AsyncIterator[cpb.DataPlaneEvent], session: Session) -> None:
        try:
            async for event in request_iterator:
                if event.WhichOneof("event") == "hello":
                    log.info("data plane attached", pid=event.hello.pid)
                    continue
                self.manager.on_data_event(event)
        except Exception as exc:  # the stream broke: end the session, the data plane re-attaches
            log.warning("data plane session ended", error=repr(exc))
        finally:
            session.close()

    async def WaitReady(self, request: cpb.WaitReadyRequest, context: Any) -> cpb.WaitReadyReply:
        return await self.manager.wait_ready(request.timeout_s or 120.0)

    async def StopWorkers(self, request: cpb.StopWorkersRequest, context: Any) -> cpb.StopWorkersReply:
        self.manager.draining = True
        stopped = await self.manager.stop_all(request.grace_s or 30.0, request.reason or "shutdown")
        return cpb.StopWorkersReply(stopped=stopped)

    async def GetStatus(self, request: cpb.StatusRequest, context: Any) -> cpb.StatusReply:
        await self.manager.fresh_counts()  # counts as of now: `served` includes what was just answered
        return self.manager.status()

    async def Reload(self, request: cpb.ReloadRequest, context: Any) -> cpb.ReloadReply:
        return await self.manager.reload(request.wait_s)

    async def Scale(self, request: cpb.ScaleRequest, context: Any) -> cpb.ScaleReply:
        return self.manager.scale(request)

    async def GetMetrics(self, request: cpb.MetricsRequest, context: Any) -> cpb.MetricsReply:
        return cpb.MetricsReply(exposition=exposition(self.registry, request.openmetrics))
