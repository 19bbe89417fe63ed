"""The control plane process: gRPC service on ``run_dir/control.sock``, pools.

Started by the supervisor as ``python -m supervisor.control.main CONFIG``;
writes ``READY`` on ``$SUPERVISOR_NOTIFY_FD`` once its socket is bound (mode
0600: only the supervisor's user may talk to it).

SIGHUP (forwarded by the supervisor) reloads the config, like the Reload
call. On SIGTERM/SIGINT it stops every worker gracefully (SIGTERM; SIGKILL
for those still running ``KILL_AFTER_S`` after the stop's deadline,
``runstate.stop_deadline``, which the data plane's drain shared) and exits
0. By then the supervisor has already drained the data plane, so no
invocation is lost. A second signal kills the workers at once; only tasks
this module started are cancelled (never gRPC's own).
If this process dies instead, its workers get SIGTERM from the kernel
(parent-death signal), finish what they have, and exit; the restarted
control plane starts fresh ones.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from supervisor import runstate
from supervisor.control.manager import PoolManager
from supervisor.control.output import listen_for_marks
from supervisor.control.sandbox import Isolation
from supervisor.logs import configure_logging, get_logger
from supervisor.metrics import ControlPlaneMetrics
from supervisor.output import flush_shared, shared_sink
from supervisor.runstate import EXIT_BOOT_ERROR, RunPaths, load_plane_config, notify_ready

log = get_logger()
# Past the stop's deadline: when workers that ignored SIGTERM are killed.
KILL_AFTER_S = 0.4


async def amain(config_path: Path, run_dir: Path | None = None) -> int:
    config = load_plane_config(config_path, "control plane", run_dir)
    if config is None:
        return EXIT_BOOT_ERROR
    configure_logging("control-plane", config.supervisor.log_format, sink=shared_sink("control-plane"))
    paths = RunPaths(config.supervisor.run_dir)
    listen_for_marks(paths.marks_fifo)  # before any worker: FC's markers come from the data plane's word
    registry = CollectorRegistry(auto_describe=True)
    # Probed before gRPC starts any thread; v2: the tree is prepared here (only this
    # process makes worker cgroups).
    isolation = Isolation.detect(paths.run_dir)
    manager = PoolManager(config, ControlPlaneMetrics(registry), sink=lambda event: None, isolation=isolation)
    # Start the warm workers first: they import and initialize while this
    # process loads gRPC (~100 ms), and dial the data plane with retries.
    # The data plane learns of them from the Attach snapshot.
    manager.reconcile()

    import grpc

    from supervisor.control.service import ControlPlaneService
    from supervisor.v1 import control_pb2_grpc as rpc

    service = ControlPlaneService(manager, registry)

    sock = paths.control_sock
    if sock.exists() or sock.is_symlink():
        sock.unlink()  # stale: the supervisor holds the run_dir lock
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    rpc.add_ControlPlaneServicer_to_server(service, server)
    old_umask = os.umask(0o177)  # the socket is born 0600, no window where it is wider
    try:
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(sock, 0o600)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[object]] = set()

    def reload_on_signal() -> None:  # SIGHUP, forwarded by the supervisor
        task: asyncio.Task[object] = asyncio.ensure_future(manager.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_on_signal)
    log.info("control plane listening", socket=str(sock))
    notify_ready()

    background = [asyncio.ensure_future(c) for c in (manager.run(), manager.poll_memory(), manager.clock.run())]
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([stopped, *background], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if stopped not in done:
        failed = next(iter(done))
        log.error("control plane task died", error=repr(failed.exception()))
        code = 1
    manager.draining = True
    # Removing the handler would restore SIGHUP's default (terminate) mid-stop.
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP while stopping: no reload"))
    budget = runstate.stop_deadline(paths, config.supervisor.grace_period) + KILL_AFTER_S - time.monotonic()
    stopping = asyncio.ensure_future(manager.stop_all(max(0.0, budget), "shutdown"))

    def now() -> None:  # a second signal during the stop
        log.warning("second stop signal: killing the workers now")
        stopping.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, now)
    try:
        stopped_count = await stopping
        log.info("workers stopped", count=stopped_count)
    except asyncio.CancelledError:
        for record in list(manager.by_id.values()):
            manager.kill(record, "shutdown")
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    manager.release_cgroups()
    await server.stop(0.5)
    log.info("control plane stopped")
    return code


def run_plane(config_path: Path, run_dir: Path | None) -> int:
    return runstate.run_plane(amain, config_path, run_dir, _flush)


def _flush() -> None:
    flush_shared(2.0)
    sys.stdout.flush()

def preload() -> None:
    """Imports what this plane uses later (gRPC is imported lazily in ``amain``)."""
    import grpc  # noqa: F401
    import uvloop  # noqa: F401

    import supervisor.control.service  # noqa: F401


def main() -> None:
    sys.exit(run_plane(*runstate.plane_argv(sys.argv)))


if __name__ == "__main__":
    main()
