"""The data plane process: front HTTP server, worker socket, metrics port.

Started by the supervisor as ``python -m supervisor.data.main CONFIG``. It
tells the supervisor it is up by writing ``READY`` on the file descriptor in
``$SUPERVISOR_NOTIFY_FD`` once its three listeners are bound.

Shutdown (SIGTERM or SIGINT, from the supervisor): stop taking invocations
(503 ShuttingDownError), let in-flight and queued ones finish until the
stop's deadline (``runstate.stop_deadline``: ``grace_period`` after the
supervisor began stopping, shared with the control plane), answer those
still running then with 503 ShuttingDownError, close the connections once
the answers are written, and exit 0. A second signal does the same at once.
``/pre-stop`` does the same drain and also runs the ``pre_stop`` hooks and
stops the workers, but keeps the plane up answering 503 until the
platform's SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE

from cahttp.server import ClientLimits, HttpServer
from supervisor import listeners, runstate
from supervisor.clock import AwakeClock
from supervisor.config import Config
from supervisor.data import errors
from supervisor.data.control_link import ControlLink
from supervisor.data.errors import InvocationError
from supervisor.data.front import Front, flush_stdio
from supervisor.data.links import WorkerLink
from supervisor.data.router import Router
from supervisor.logs import configure_logging, get_logger
from supervisor.metrics import ClientCollector, DataPlaneMetrics, LiveCollector, exposition, merge_expositions
from supervisor.output import shared_sink
from supervisor.runstate import (
    EXIT_BOOT_ERROR,
    RunPaths,
    load_plane_config,
    notify_ready,
    read_seed_restarts,
    read_state,
)

log = get_logger()
INITIALIZE_TIMEOUT_S = 120.0  # FC's own limit for an instance's initialization
# Before the stop's deadline: when what still runs is answered (the answers
# must be written before the supervisor kills this plane, DATA_KILL_S after it).
ABORT_BEFORE_S = 0.25
# How long written answers get to leave before the connections are closed.
FLUSH_S = 0.2
# The descriptors kept out of the client connections' share (client_limits).
FD_RESERVE = 128
FD_PER_WORKER = 4
METRICS_CONNECTIONS = 64


class DataPlane:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.paths = RunPaths(config.supervisor.run_dir)
        self.clock = AwakeClock()
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics = DataPlaneMetrics(self.registry)
        self.control = ControlLink(self.paths.ctl_target)
        self.router = Router(config, self.metrics, self.clock, self.control.send)
        self.control.on_event = self.router.on_control_event
        self.control.on_attach = self.router.resend_state
        self.registry.register(LiveCollector(self.router.ready, self.router.pool_views, self._restarts))
        settings = config.supervisor
        # The supervisor's listening sockets (the ports outlive this plane), else bound here.
        handed = listeners.take_inherited()
        front = Front(self.router, self)
        ca_limits, metrics_limits = client_limits(config, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.front = HttpServer(front, settings.host, settings.ca_port, sockets=handed.get("ca_port"),
                                limits=ca_limits, new_request_id=front.request_ids.new, name="ca",
                                report=report_clients)
        self.metrics_server = (HttpServer(self.metrics_app, settings.host, settings.metrics_port,
                                          sockets=handed.get("metrics_port"), limits=metrics_limits,
                                          name="metrics", report=report_clients)
                               if settings.metrics_port else None)
        self.registry.register(ClientCollector(
            [self.front] + ([self.metrics_server] if self.metrics_server is not None else [])))
        self.worker_server: asyncio.Server | None = None
        self.stopped = asyncio.Event()
        self._stop_requests = 0
        self._stopping: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_lock = asyncio.Lock()
        self._draining = asyncio.Event()  # set with router.draining: wakes a waiting /initialize
        self._workers_stopped = False

    # ---- startup -----------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock_path = self.paths.worker_sock
        # The supervisor holds the run_dir lock, so a socket file here is stale.
        if sock_path.exists() or sock_path.is_symlink():
            sock_path.unlink()
        self.worker_server = await loop.create_unix_server(lambda: WorkerLink(self.router), str(sock_path),
                                                           backlog=1024)
        # Workers may run as other users; the credential, not the mode, is the gate.
        os.chmod(sock_path, 0o666)
        await listen(self.front, "ca_port")
        if self.metrics_server is not None:
            await listen(self.metrics_server, "metrics_port")
        log.info("data plane listening", ca_port=self.config.supervisor.ca_port,
                 metrics_port=self.config.supervisor.metrics_port, worker_socket=str(sock_path))
        notify_ready()

    # ---- lifecycle hooks (FC) ----------------------------------------------

    async def initialize(self, request_id: str) -> InvocationError | None:
        log.info("FC Initialize Start RequestId: " + request_id, request_id=request_id,
                 marker="start", kind="initialize")
        try:
            if self.router.draining:  # after /pre-stop: no worker will ever get ready
                return errors.shutting_down()
            waiting = asyncio.ensure_future(self.control.wait_ready(INITIALIZE_TIMEOUT_S))
            drained = asyncio.ensure_future(self._draining.wait())
            try:
                await asyncio.wait((waiting, drained), return_when=asyncio.FIRST_COMPLETED)
            finally:
                drained.cancel()
                if not waiting.done():
                    waiting.cancel()
            if not waiting.done() or waiting.cancelled():
                return errors.shutting_down()
            reply = waiting.result()
        except grpc.aio.AioRpcError as exc:
            return InvocationError(503, "ControlPlaneUnavailableError",
                                   f"the control plane did not answer: {exc.code().name}", "rejected", retry_after=1)
        finally:
            log.info("FC Initialize End RequestId: " + request_id, request_id=request_id,
                     marker="end", kind="initialize")
        if reply.ok:
            return None
        return InvocationError(404, "InitializationError",
                               f"function {reply.function!r} failed to initialize: "
                               f"{reply.error_type}: {reply.error_message}", "error")

    async def pre_freeze(self, request_id: str) -> None:
        log.info("FC PreFreeze Start RequestId: " + request_id, request_id=request_id,
                 marker="start", kind="pre_freeze")
        for worker, result in await self.router.run_hook("pre_freeze", request_id, self._hook_timeout()):
            if not result.ok:
                log.error("pre_freeze hook failed", worker=worker, request_id=request_id,
                          error_type=result.error.error_type, error_message=result.error.error_message)
        # Freeze-safety: timers measure awake time; note "now" so the pause
        # that follows counts as a freeze, not as work.
        self.clock.note()
        log.info("FC PreFreeze End RequestId: " + request_id, request_id=request_id,
                 marker="end", kind="pre_freeze")
        await asyncio.to_thread(flush_stdio)

    async def pre_stop(self, request_id: str) -> None:
        log.info("FC PreStop Start RequestId: " + request_id, request_id=request_id,
                 marker="start", kind="pre_stop")
        await self.drain()
        if not self._workers_stopped:
            for worker, result in await self.router.run_hook("pre_stop", request_id, self._hook_timeout()):
                if not result.ok:
                    log.error("pre_stop hook failed", worker=worker, request_id=request_id,
                              error_type=result.error.error_type, error_message=result.error.error_message)
            try:
                await self.control.stop_workers(self.router.config.supervisor.grace_period, "shutdown")
                self._workers_stopped = True
            except grpc.aio.AioRpcError as exc:
                log.error("control plane did not stop the workers", code=exc.code().name)
        log.info("FC PreStop End RequestId: " + request_id, request_id=request_id,
                 marker="end", kind="pre_stop")
        await asyncio.to_thread(flush_stdio)

    def _hook_timeout(self) -> float:
        return max(f.timeout for f in self.router.config.functions.values())

    async def drain(self, deadline: float | None = None) -> bool:
        """Takes no new invocations; waits for the accepted ones until ``deadline``
        (loop time; by default ``grace_period`` from now)."""
        async with self._drain_lock:
            grace = self.router.config.supervisor.grace_period
            if not self.router.draining:
                self.router.draining = True
                self._draining.set()
                log.info("draining", grace_period_s=grace)
            loop = asyncio.get_running_loop()
            clean = await self.router.wait_idle(loop.time() + grace if deadline is None else deadline)
            if not clean:
                log.warning("grace period over with invocations still running")
            return clean

    # ---- metrics port ------------------------------------------------------

    async def metrics_app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        status, content_type, body = 404, b"text/plain", b"not found\n"
        if path == "/metrics":
            accept = next((v.decode() for k, v in scope["headers"] if k == b"accept"), "")
            openmetrics = "application/openmetrics-text" in accept
            parts = [exposition(self.registry, openmetrics)]
            try:
                parts.append(await self.control.metrics(openmetrics))
            except grpc.aio.AioRpcError:
                pass  # the control plane is restarting; its series return with it
            status, body = 200, merge_expositions(parts, openmetrics)
            content_type = (OPENMETRICS_CONTENT_TYPE if openmetrics else CONTENT_TYPE_LATEST).encode()
        elif path == "/healthz":
            status, body = 200, b"ok\n"
        elif path == "/readyz":
            ready = self.router.ready()
            status, body = (200, b"ready\n") if ready else (503, b"not ready\n")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _restarts(self) -> dict[str, int]:
        state = read_state(self.paths) or {}
        restarts = {c["name"]: int(c.get("restarts", 0)) for c in state.get("components", []) if "name" in c}
        restarts.update(read_seed_restarts(self.paths))
        return restarts

    # ---- shutdown ----------------------------------------------------------

    def request_stop(self) -> None:
        self._stop_requests += 1
        if self._stop_requests == 1:
            self._stopping = asyncio.ensure_future(self._graceful_stop())
        else:
            log.warning("second stop signal: answering what still runs and exiting now")
            self._stopping.cancel()
            self._stopping = asyncio.ensure_future(self._end_now())

    async def _graceful_stop(self) -> None:
        grace = self.router.config.supervisor.grace_period
        loop = asyncio.get_running_loop()
        remaining = runstate.stop_deadline(self.paths, grace) - time.monotonic()
        if not await self.drain(loop.time() + remaining - ABORT_BEFORE_S):
            await self._end_now()
            return
        await self.front.shutdown(FLUSH_S)
        self.stopped.set()

    async def _end_now(self) -> None:
        """Answers every invocation still running or queued, lets the answers
        leave, closes the connections: no client is left without its answer."""
        self.router.draining = True
        self._draining.set()
        answered = self.router.abort_all(errors.stopped_before_done(self.router.config.supervisor.grace_period))
        if answered:
            log.warning("stopping: answered the invocations still running", count=answered)
        await self.front.shutdown(FLUSH_S)
        self.stopped.set()


def report_clients(event: str, fields: Mapping[str, Any]) -> None:
    """The front's servers report as structlog records (at most one per ``cahttp.server.REPORT_S``)."""
    log.warning(event, **fields)


def client_limits(config: Config, nofile: int) -> tuple[ClientLimits, ClientLimits]:
    """The CA port's and the metrics port's client limits. Connections get what
    the descriptor limit leaves after a reserve for this plane's own needs
    (worker links, the control link, logs: ``FD_RESERVE`` plus
    ``FD_PER_WORKER`` per possible worker) and the metrics port's own share,
    so that accepting never fails for want of a descriptor."""
    settings = config.supervisor
    if nofile < 0:  # RLIM_INFINITY: not for descriptors on Linux, but never a limit of 8
        nofile = 1 << 20
    workers = sum(f.max_workers for f in config.functions.values())
    spare = max(0, nofile - FD_RESERVE - FD_PER_WORKER * workers)
    metrics_share = min(METRICS_CONNECTIONS, max(4, spare // 8))
    timeouts = {"header_timeout_s": settings.client_header_timeout, "body_timeout_s": settings.client_body_timeout,
                "keep_alive_s": settings.keep_alive_timeout}
    return (ClientLimits(max_connections=max(8, spare - metrics_share), **timeouts),
            ClientLimits(max_connections=metrics_share, **timeouts))


async def listen(server: HttpServer, key: str) -> None:
    """Starts ``server`` on the supervisor's sockets or, for a plane started by hand,
    binds its port, retrying briefly (a previous instance may still hold it)."""
    deadline = asyncio.get_running_loop().time() + listeners.BIND_RETRY_S
    while True:
        try:
            await server.start()
            return
        except OSError as exc:
            if asyncio.get_running_loop().time() >= deadline:
                raise listeners.CannotListen(f"cannot listen on {server.host}:{server.port} "
                                             f"(supervisor.{key}): {exc.strerror or exc}") from exc
            await asyncio.sleep(0.2)


async def amain(config_path: Path, run_dir: Path | None = None) -> int:
    config = load_plane_config(config_path, "data plane", run_dir)
    if config is None:
        return EXIT_BOOT_ERROR
    configure_logging("data-plane", config.supervisor.log_format, sink=shared_sink("data-plane"))
    plane = DataPlane(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, plane.request_stop)
    try:
        await plane.start()
    except listeners.CannotListen as exc:
        log.critical("data plane cannot start", error=str(exc))
        return EXIT_BOOT_ERROR
    background = [asyncio.ensure_future(coro) for coro in (
        plane.clock.run(), plane.router.sweep(), plane.router.report_demand(), plane.control.run())]
    stopped = asyncio.ensure_future(plane.stopped.wait())
    done, _ = await asyncio.wait([stopped, *background], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in done if t is not stopped]
    for task in background:
        task.cancel()
    if failed:
        # A background task must never end: the plane is broken; let the supervisor restart it.
        log.error("data plane task died", error=repr(failed[0].exception()))
        return 1
    if plane.metrics_server is not None:
        plane.metrics_server.stop_accepting()
    await plane.control.close()
    log.info("data plane stopped")
    return 0


def run_plane(config_path: Path, run_dir: Path | None) -> int:
    return runstate.run_plane(amain, config_path, run_dir, flush_stdio)


def preload() -> None:
    import uvloop  # noqa: F401


def main() -> None:
    sys.exit(run_plane(*runstate.plane_argv(sys.argv)))


if __name__ == "__main__":
    main()
