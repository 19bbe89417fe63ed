"""``supervisor status`` counts what the data plane has counted when it asks
(issue 12, item 6: ``served`` counts at the end of each invocation).

A real ``PoolManager`` and a real ``Router`` joined by their event sinks as the
Attach session joins them (each event delivered on a later loop turn, in
order): ``fresh_counts`` has the data plane report every function's counts,
then its answer; the control plane's records hold them before it returns.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from supervisor.clock import AwakeClock
from supervisor.config import Config, parse_config
from supervisor.control.manager import PoolManager, WorkerRecord
from supervisor.data.links import WorkerLink
from supervisor.data.router import Router
from supervisor.metrics import ControlPlaneMetrics, DataPlaneMetrics
from supervisor.v1 import control_pb2 as cpb


def config_of(tmp_path: Path) -> Config:
    (tmp_path / "fn").mkdir()
    return parse_config({"supervisor": {"run_dir": str(tmp_path / "run")},
                         "functions": {"fn": {"code_dir": "fn", "handler": "app:handler", "seed": False}}},
                        tmp_path, {})


def planes(config: Config, deliver: bool = True) -> tuple[PoolManager, Router, WorkerRecord, WorkerLink]:
    """Both planes, joined; one ready worker known to both."""
    loop = asyncio.get_running_loop()
    router: Router | None = None

    def to_data_plane(event: cpb.ControlEvent) -> None:
        if deliver and router is not None:
            loop.call_soon(router.on_control_event, event)

    manager = PoolManager(config, ControlPlaneMetrics(CollectorRegistry()), to_data_plane)
    router = Router(config, DataPlaneMetrics(CollectorRegistry()), AwakeClock(),
                    lambda event: loop.call_soon(manager.on_data_event, event))
    manager.data_plane_attached = True
    record = WorkerRecord(worker_id="fn-1", function="fn", mode="spawn", token_digest=b"",
                          decided_at=time.monotonic(), state="ready")
    manager.pools["fn"].workers[record.worker_id] = record
    manager.by_id[record.worker_id] = record
    link = WorkerLink(router)
    link.worker_id, link.function = record.worker_id, "fn"
    pool = router.functions["fn"].pool
    pool.add(link)
    pool.ready(link)
    return manager, router, record, link


def serve(router: Router, times: int) -> None:
    """Invocations that ended on the data plane (a slot taken, then released)."""
    pool = router.functions["fn"].pool
    for _ in range(times):
        worker = pool.acquire()
        assert worker is not None
        pool.release(worker, 0.0)


def test_fresh_counts_brings_the_data_planes_served_before_status_answers(tmp_path: Path) -> None:
    async def main() -> None:
        manager, router, record, _ = planes(config_of(tmp_path))
        serve(router, 3)
        assert record.served == 0  # the periodic reports have not run
        assert await manager.fresh_counts(5.0)
        assert record.served == 3
        serve(router, 2)
        assert await manager.fresh_counts(5.0)
        (function,) = manager.status().functions
        assert [(w.id, w.served, w.mode) for w in function.workers] == [("fn-1", 5, "spawn")]
        assert not manager._counts_waiters  # nothing left behind

    asyncio.run(main())


def test_concurrent_askers_are_all_answered(tmp_path: Path) -> None:
    async def main() -> None:
        manager, router, record, _ = planes(config_of(tmp_path))
        serve(router, 4)
        assert await asyncio.gather(*(manager.fresh_counts(5.0) for _ in range(5))) == [True] * 5
        assert record.served == 4 and not manager._counts_waiters

    asyncio.run(main())


def test_without_an_answer_status_gives_the_last_counts_in_time(tmp_path: Path) -> None:
    async def main() -> None:
        manager, router, record, _ = planes(config_of(tmp_path), deliver=False)
        serve(router, 1)
        assert not await manager.fresh_counts(0.05)  # its timeout ends the wait
        assert record.served == 0 and not manager._counts_waiters
        manager.data_plane_attached = False
        assert not await manager.fresh_counts(5.0)  # nobody to ask: at once

    asyncio.run(main())
