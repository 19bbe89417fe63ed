"""The data plane's gRPC session with the control plane.

One ``Attach`` stream, kept open for the plane's whole life and re-opened
with bounded backoff when the control plane restarts. Events for the control
plane go through a bounded outbox; while no session is open they are
dropped, because a new session starts with a full resend of this plane's
state (``Router.resend_state``) instead of replaying stale deltas.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from collections.abc import Callable
from typing import Any

import grpc

from supervisor.logs import get_logger
from supervisor.v1 import control_pb2 as cpb
from supervisor.v1 import control_pb2_grpc as rpc

OUTBOX_LIMIT = 16384
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 1.0

log = get_logger()


class ControlLink:
    def __init__(self, target: str) -> None:
        self.target = target
        # Short reconnect backoffs: both planes start at once, and gRPC's default
        # (1 s, growing) would leave /initialize waiting on a closed socket.
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", 20),
            ("grpc.min_reconnect_backoff_ms", 20),
            ("grpc.max_reconnect_backoff_ms", 500),
        ])
        self.stub = rpc.ControlPlaneStub(self.channel)
        self._outbox: asyncio.Queue[cpb.DataPlaneEvent] | None = None
        self._dropped = 0
        self.attached = asyncio.Event()
        self.on_event: Callable[[cpb.ControlEvent], None] = lambda event: None
        self.on_attach: Callable[[], None] = lambda: None

    def send(self, event: cpb.DataPlaneEvent) -> None:
        outbox = self._outbox
        if outbox is None:
            return
        try:
            outbox.put_nowait(event)
        except asyncio.QueueFull:
            self._dropped += 1
            if self._dropped in (1, 100, 10000):
                log.warning("control plane outbox full; events dropped", dropped=self._dropped)

    @staticmethod
    async def _write_events(call: Any, outbox: asyncio.Queue[cpb.DataPlaneEvent]) -> None:
        """The session's outgoing side, a task this plane owns: written with
        ``call.write``, not handed to gRPC as a request iterator (gRPC's consumer
        task for an iterator outlives a session the control plane ended, and
        is then destroyed pending, or fails closing the generator)."""
        await call.write(cpb.DataPlaneEvent(hello=cpb.DataPlaneHello(pid=os.getpid())))
        while True:
            await call.write(await outbox.get())

    async def _wait_listening(self) -> None:
        """Returns once the control plane accepts connections on its socket.

        Both planes start at once: polling the socket (cheap, local) attaches
        within milliseconds of the control plane listening, where gRPC's own
        reconnect backoff would add up to its current delay.
        """
        path = self.target.removeprefix("unix:")
        interval = 0.002
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.setblocking(False)
                if probe.connect_ex(path) == 0:
                    return
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 0.1)

    async def run(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            await self._wait_listening()
            outbox: asyncio.Queue[cpb.DataPlaneEvent] = asyncio.Queue(OUTBOX_LIMIT)
            call = self.stub.Attach(wait_for_ready=True)
            writer = asyncio.ensure_future(self._write_events(call, outbox))
            writer.add_done_callback(functools.partial(_end_call, call))  # a session that cannot send is over
            try:
                first = True
                async for event in call:
                    if first:
                        first = False
                        self._outbox = outbox
                        self.on_event(event)  # the snapshot
                        self.attached.set()
                        self.on_attach()
                        delay = RECONNECT_MIN_S
                        log.info("attached to the control plane")
                        continue
                    self.on_event(event)
            except grpc.aio.AioRpcError as exc:
                if self.attached.is_set():
                    log.warning("control plane session lost; reconnecting", code=exc.code().name)
            finally:
                self._outbox = None
                self.attached.clear()
                call.cancel()
                writer.cancel()
                # Its end (cancelled, or the call's own error) is this session's: nothing to report.
                await asyncio.gather(writer, return_exceptions=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def wait_ready(self, timeout_s: float) -> cpb.WaitReadyReply:
        # wait_for_ready: a control plane still starting (or restarting) is
        # waited for within the deadline, not reported as unavailable.
        reply: cpb.WaitReadyReply = await self.stub.WaitReady(cpb.WaitReadyRequest(timeout_s=timeout_s),
                                                              timeout=timeout_s + 5, wait_for_ready=True)
        return reply

    async def stop_workers(self, grace_s: float, reason: str) -> cpb.StopWorkersReply:
        reply: cpb.StopWorkersReply = await self.stub.StopWorkers(
            cpb.StopWorkersRequest(grace_s=grace_s, reason=reason), timeout=grace_s + 10)
        return reply

    async def metrics(self, openmetrics: bool) -> bytes:
        reply = await self.stub.GetMetrics(cpb.MetricsRequest(openmetrics=openmetrics), timeout=2.0)
        return bytes(reply.exposition)

    async def close(self) -> None:
        await self.channel.close()


def _end_call(call: Any, _writer: asyncio.Future[None]) -> None:
    call.cancel()
