"""The control plane's pools: worker records, reconciliation, exits.

``PoolManager`` owns every worker's lifecycle. It decides with
``policy.workers_to_start`` and acts through ``launcher``; it learns what
the data plane sees (sessions, readiness, demand, timeouts) from the
``Attach`` session and tells the data plane which workers exist.

Worker lifecycle (the state machine, in ``WorkerRecord.state``)::

    starting --ready--> ready --drain/kill--> draining --exit--> (removed)
       |                  |                                  ^
       +--- exit ---------+----------------------------------+

Rules:
- Every exit is counted once with one reason: the reason the control plane
  had for ending it (timeout, shutdown, init_failed), else ``crashed``.
- Replacements follow policy: the pool returns to ``min_warm`` after any
  exit unless it is stopped or backing off after failures.
- A worker that is not ready within its start deadline (in freeze-safe awake
  time, ``supervisor.clock``) is killed and counts as a failure to start
  (``init_failed``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from supervisor.clock import AwakeClock
from supervisor.config import Config, FunctionConfig
from supervisor.control import launcher, policy
from supervisor.control.output import WorkerOutput
from supervisor.logs import get_logger
from supervisor.metrics import ControlPlaneMetrics
from supervisor.runstate import RunPaths
from supervisor.v1 import control_pb2 as cpb

log = get_logger()
MEMORY_POLL_S = 2.0
RECONCILE_S = 0.5
INIT_DETAIL_WAIT_S = 0.5
EARLY_CRASH_S = 1.0


@dataclass(slots=True)
class WorkerRecord:
    worker_id: str
    function: str
    mode: str
    token_digest: bytes
    decided_at: float  # monotonic: for start latency and age
    decided_awake: float = 0.0  # awake time: for the start deadline (freeze-safe)
    process: launcher.Process | None = None
    state: str = "starting"  # starting | ready | draining
    end_reason: str | None = None  # why the control plane is ending it
    inflight: int = 0
    served: int = 0
    rss: int = 0
    ready_at: float | None = None
    output: WorkerOutput | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def added(self) -> cpb.WorkerAdded:
        return cpb.WorkerAdded(worker_id=self.worker_id, function=self.function, pid=self.pid,
                               token_digest=self.token_digest)


@dataclass(slots=True)
class PoolRecord:
    config: FunctionConfig
    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    queued: int = 0
    inflight: int = 0
    failures: int = 0
    retry_at: float = 0.0
    last_error: cpb.WorkerInitFailed | None = None
    stopped: bool = False
    sequence: int = 0

    def facts(self, now: float) -> policy.PoolFacts:
        live = [w for w in self.workers.values() if w.state != "draining"]
        return policy.PoolFacts(
            min_warm=self.config.min_warm, max_workers=self.config.max_workers,
            concurrency=self.config.concurrency, live=len(live),
            starting=sum(1 for w in live if w.state == "starting"),
            inflight=self.inflight, queued=self.queued, failures=self.failures,
            backing_off=now < self.retry_at, stopped=self.stopped)

    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.state == "ready")

    def health(self) -> cpb.PoolHealth:
        error = self.last_error
        return cpb.PoolHealth(
            function=self.config.name, init_failed=self.failures > 0 and error is not None,
            error_type=error.error_type if error else "", error_message=error.error_message if error else "",
            warm=self.ready_count() >= self.config.min_warm)


class PoolManager:
    def __init__(self, config: Config, metrics: ControlPlaneMetrics, sink: Callable[[cpb.ControlEvent], None]) -> None:
        self.config = config
        self.metrics = metrics
        self.paths = RunPaths(config.supervisor.run_dir)
        self.pools = {name: PoolRecord(fn) for name, fn in config.functions.items()}
        self.by_id: dict[str, WorkerRecord] = {}
        self.sink = sink  # to the attached data plane (dropped when none is attached)
        self.changed = asyncio.Event()
        self.instance_id = os.environ.get("FC_INSTANCE_ID") or secrets.token_hex(8)
        self.base_env = dict(os.environ)
        self.data_plane_attached = False
        self.draining = False
        # Deadlines in awake time: a container frozen by FC while a worker was
        # starting must not kill that worker as "not ready in time" on thaw.
        self.clock = AwakeClock()
        self.recently_exited: dict[str, str] = {}  # worker id -> function, for late reports

    # ---- reconciliation ----------------------------------------------------

    def reconcile(self) -> None:
        now = time.monotonic()
        for pool in self.pools.values():
            for _ in range(policy.workers_to_start(pool.facts(now))):
                self._start(pool)
            self._enforce_start_deadlines(pool, self.clock.note(now))

    async def run(self) -> None:
        """Reconciles on every change, and at least every RECONCILE_S."""
        while True:
            self.reconcile()
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), RECONCILE_S)
            except TimeoutError:
                pass

    def _start(self, pool: PoolRecord) -> None:
        fn = pool.config
        pool.sequence += 1
        worker_id = f"{fn.name}-{pool.sequence}-{secrets.token_hex(3)}"
        token = secrets.token_bytes(32)
        record = WorkerRecord(worker_id=worker_id, function=fn.name, mode="spawn",
                              token_digest=hashlib.sha256(token).digest(), decided_at=time.monotonic(),
                              decided_awake=self.clock.awake())
        spec = {
            "worker_id": worker_id, "token": token.hex(), "socket": str(self.paths.worker_sock),
            "function": fn.name, "runtime": fn.runtime, "handler": fn.handler, "interface": fn.interface,
            "code_dir": str(fn.code_dir), "initializer": fn.initializer, "pre_freeze": fn.pre_freeze,
            "pre_stop": fn.pre_stop, "timeout_s": fn.timeout, "concurrency": fn.concurrency,
            "memory_limit_mb": (fn.limits.memory or 0) // (1024 * 1024),
            "max_frame": fn.max_body + 64 * 1024, "max_body": fn.max_body, "parent_pid": os.getpid(),
        }
        env = launcher.worker_env(fn, self.instance_id, self.base_env)
        try:
            record.process = launcher.spawn(spec, env, str(fn.code_dir))
        except OSError as exc:
            log.error("could not start a worker", function=fn.name, error=str(exc))
            self._failed_to_start(pool, cpb.WorkerInitFailed(
                worker_id=worker_id, error_type=type(exc).__name__, error_message=str(exc)))
            return
        pool.workers[worker_id] = record
        self.by_id[worker_id] = record
        self.metrics.starts.labels(fn.name, record.mode).inc()
        record.output = WorkerOutput(record.process.stdout_fd, record.process.stderr_fd, function=fn.name,
                                     worker=worker_id, fmt=self.config.supervisor.log_format)
        launcher.watch_exit(record.process, lambda _process: self._on_exit(record))
        self.sink(cpb.ControlEvent(added=record.added()))
        log.info("worker starting", function=fn.name, worker=worker_id, pid=record.pid, mode=record.mode)

    def _enforce_start_deadlines(self, pool: PoolRecord, awake: float) -> None:
        limit = max(pool.config.startup_timeout, pool.config.timeout) + 5.0
        for record in list(pool.workers.values()):
            if record.state == "starting" and record.end_reason is None and awake - record.decided_awake > limit:
                log.error("worker did not become ready in time; killing it", function=record.function,
                          worker=record.worker_id, limit_s=limit)
                pool.last_error = cpb.WorkerInitFailed(
                    worker_id=record.worker_id, error_type="InitializationTimeout",
                    error_message=f"the worker was not ready within {limit:g}s")
                self.kill(record, "init_failed")

    # ---- events from the data plane -----------------------------------------

    def on_data_event(self, event: cpb.DataPlaneEvent) -> None:
        which = event.WhichOneof("event")
        if which == "demand":
            self._on_demand(event.demand)
        elif which == "session":
            record = self.by_id.get(event.session.worker_id)
            if record is not None and event.session.next_token_digest:
                record.token_digest = event.session.next_token_digest
        elif which == "ready":
            self._on_ready(event.ready.worker_id)
        elif which == "init_failed":
            self._on_init_failed(event.init_failed)
        elif which == "kill":
            record = self.by_id.get(event.kill.worker_id)
            if record is not None:
                self.kill(record, event.kill.reason or "crashed")

    def _on_demand(self, demand: cpb.Demand) -> None:
        pool = self.pools.get(demand.function)
        if pool is None:
            return
        grew = demand.queue_depth > pool.queued
        pool.queued = demand.queue_depth
        pool.inflight = demand.inflight
        for load in demand.workers:
            record = pool.workers.get(load.worker_id)
            if record is not None:
                record.inflight = load.inflight
                record.served = load.served
        if grew:
            self.changed.set()

    def _on_ready(self, worker_id: str) -> None:
        record = self.by_id.get(worker_id)
        if record is None or record.state != "starting":
            return
        record.state = "ready"
        record.ready_at = time.monotonic()
        pool = self.pools[record.function]
        recovered = pool.failures > 0
        pool.failures = 0
        pool.retry_at = 0.0
        pool.last_error = None
        self.metrics.start_seconds.labels(record.function, record.mode).observe(record.ready_at - record.decided_at)
        log.info("worker ready", function=record.function, worker=worker_id, pid=record.pid,
                 start_ms=round((record.ready_at - record.decided_at) * 1000, 1))
        if recovered or pool.ready_count() == pool.config.min_warm:
            self.sink(cpb.ControlEvent(health=pool.health()))
        self.changed.set()

    def _on_init_failed(self, failure: cpb.WorkerInitFailed) -> None:
        record = self.by_id.get(failure.worker_id)
        function = record.function if record is not None else self.recently_exited.get(failure.worker_id)
        if function is None:
            return
        self.pools[function].last_error = failure
        if record is not None:
            record.end_reason = "init_failed"  # the worker exits by itself after reporting

    def _failed_to_start(self, pool: PoolRecord, failure: cpb.WorkerInitFailed) -> None:
        pool.failures += 1
        pool.last_error = failure
        pool.retry_at = time.monotonic() + policy.backoff_delay(pool.failures)
        self.sink(cpb.ControlEvent(health=pool.health()))
        self.changed.set()

    # ---- exits and kills -----------------------------------------------------

    def kill(self, record: WorkerRecord, reason: str) -> None:
        if record.end_reason is None or record.end_reason == "init_failed":
            record.end_reason = reason
        record.state = "draining"
        if record.process is not None and record.process.exit is None:
            launcher.signal_group(record.pid, signal.SIGKILL)

    def stop(self, record: WorkerRecord, reason: str) -> None:
        """Graceful: the worker finishes what it has, then exits."""
        if record.end_reason is None:
            record.end_reason = reason
        record.state = "draining"
        if record.process is not None and record.process.exit is None:
            launcher.signal_group(record.pid, signal.SIGTERM)

    def _on_exit(self, record: WorkerRecord) -> None:
        process = record.process
        assert process is not None and process.exit is not None
        pool = self.pools.get(record.function)
        self.by_id.pop(record.worker_id, None)
        self.recently_exited[record.worker_id] = record.function
        if len(self.recently_exited) > 256:
            del self.recently_exited[next(iter(self.recently_exited))]
        if pool is not None:
            pool.workers.pop(record.worker_id, None)
        if record.output is not None:
            record.output.close_when_drained()
        reason = record.end_reason or "crashed"
        was_starting = record.ready_at is None
        died_early = (reason == "crashed" and record.ready_at is not None
                      and time.monotonic() - record.ready_at < EARLY_CRASH_S)
        if reason == "crashed" and was_starting:
            reason = "init_failed"
        self.metrics.exits.labels(record.function, reason).inc()
        try:
            self.metrics.memory.remove(record.function, record.worker_id)
        except KeyError:
            pass
        level = log.info if reason in ("shutdown", "idle", "recycled", "disposable") else log.warning
        level("worker exited", function=record.function, worker=record.worker_id, pid=process.pid,
              reason=reason, status=process.exit.describe())
        self.sink(cpb.ControlEvent(removed=cpb.WorkerRemoved(
            worker_id=record.worker_id, reason=f"{reason}: {process.exit.describe()}",
            crashed=reason in ("crashed", "oom"), oom=reason == "oom")))
        if pool is not None and was_starting and reason == "init_failed" and not pool.stopped:
            generic = cpb.WorkerInitFailed(worker_id=record.worker_id, error_type="WorkerExited",
                                           error_message=f"the worker {process.exit.describe()} before it was ready")
            if pool.last_error is not None and pool.last_error.worker_id == record.worker_id:
                self._failed_to_start(pool, pool.last_error)
            else:
                # Its own report (through the data plane) may still be on the way.
                asyncio.get_running_loop().call_later(
                    INIT_DETAIL_WAIT_S, self._failed_late, pool, record.worker_id, generic)
        elif pool is not None and died_early and not pool.stopped:
            # Dying right after READY is a failure to start too: back off
            # instead of respawning in a tight loop.
            self._failed_to_start(pool, cpb.WorkerInitFailed(
                worker_id=record.worker_id, error_type="WorkerExited",
                error_message=f"the worker {process.exit.describe()} right after it was ready"))
        self.changed.set()

    def _failed_late(self, pool: PoolRecord, worker_id: str, generic: cpb.WorkerInitFailed) -> None:
        error = pool.last_error
        self._failed_to_start(pool, error if error is not None and error.worker_id == worker_id else generic)

    # ---- whole-plane operations ----------------------------------------------

    async def stop_all(self, grace_s: float, reason: str) -> int:
        """Stops every worker gracefully (SIGKILL after ``grace_s``); no replacements."""
        for pool in self.pools.values():
            pool.stopped = True
        records = list(self.by_id.values())
        for record in records:
            self.stop(record, reason)
        deadline = time.monotonic() + grace_s
        while self.by_id and time.monotonic() < deadline:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(0.1, deadline - time.monotonic()))
            except TimeoutError:
                pass
        for record in list(self.by_id.values()):
            self.kill(record, reason)
        while self.by_id and time.monotonic() < deadline + 5.0:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), 0.1)
            except TimeoutError:
                pass
        return len(records)

    def ready(self) -> bool:
        return self.data_plane_attached and not self.draining and all(
            p.ready_count() >= p.config.min_warm for p in self.pools.values())

    async def wait_ready(self, timeout_s: float) -> cpb.WaitReadyReply:
        """For /initialize: min_warm everywhere, or the first failure."""
        for pool in self.pools.values():
            if pool.failures:
                pool.retry_at = 0.0  # the platform asks again: retry now
                pool.last_error = None
        self.changed.set()
        deadline = time.monotonic() + timeout_s
        while True:
            if all(p.ready_count() >= p.config.min_warm for p in self.pools.values()):
                return cpb.WaitReadyReply(ok=True)
            for pool in self.pools.values():
                if pool.last_error is not None and pool.ready_count() < pool.config.min_warm:
                    error = pool.last_error
                    return cpb.WaitReadyReply(ok=False, function=pool.config.name,
                                              error_type=error.error_type, error_message=error.error_message)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pending = [p.config.name for p in self.pools.values() if p.ready_count() < p.config.min_warm]
                return cpb.WaitReadyReply(ok=False, function=pending[0] if pending else "",
                                          error_type="InitializationTimeout",
                                          error_message=f"min_warm not reached within {timeout_s:g}s")
            await asyncio.sleep(min(0.01, remaining))

    def snapshot(self) -> cpb.Snapshot:
        return cpb.Snapshot(workers=[r.added() for r in self.by_id.values() if r.process is not None],
                            health=[p.health() for p in self.pools.values()])

    async def poll_memory(self) -> None:
        while True:
            for record in list(self.by_id.values()):
                rss = _rss(record.pid)
                if rss:
                    record.rss = rss
                    self.metrics.memory.labels(record.function, record.worker_id).set(rss)
            await asyncio.sleep(MEMORY_POLL_S)

    def status(self) -> cpb.StatusReply:
        now = time.monotonic()
        functions = []
        for pool in self.pools.values():
            fn = pool.config
            workers = []
            for record in pool.workers.values():
                record.rss = _rss(record.pid) or record.rss
                if record.state == "ready":
                    state = "busy" if record.inflight else "idle"
                else:
                    state = record.state
                workers.append(cpb.WorkerStatus(
                    id=record.worker_id, pid=record.pid, state=state, inflight=record.inflight,
                    served=record.served, age_s=round(now - record.decided_at, 3), rss_bytes=record.rss,
                    mode=record.mode))
            error = pool.last_error
            functions.append(cpb.FunctionStatus(
                name=fn.name, runtime=fn.runtime, min_warm=fn.min_warm, max_workers=fn.max_workers,
                concurrency=fn.concurrency, queue_depth=pool.queued, inflight=pool.inflight, workers=workers,
                init_error=f"{error.error_type}: {error.error_message}" if error and pool.failures else ""))
        return cpb.StatusReply(ready=self.ready(), functions=functions,
                               data_plane_attached=self.data_plane_attached, draining=self.draining)


def _rss(pid: int) -> int:
    if pid <= 0:
        return 0
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, ValueError):
        return 0
