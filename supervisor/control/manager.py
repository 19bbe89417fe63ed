"""The control plane's pools: worker records, reconciliation, exits.

``PoolManager`` owns every worker's lifecycle. It decides with
``policy.workers_to_start`` and acts through ``launcher``; it learns what
the data plane sees (sessions, readiness, demand, timeouts) from the
``Attach`` session and tells the data plane which workers exist.

Worker lifecycle (the state machine, in ``WorkerRecord.state``)::

    starting --ready--> ready --retire/drain/kill--> draining --exit--> (removed)
       |                  |                                        ^
       +--- exit ---------+----------------------------------------+

A ready worker may also be *due*: it has done what it was started for
(``max_requests``, its memory high-water mark, its one ``disposable``
invocation, or its function changed in a reload). A due worker no longer
counts as live, so the policy starts its replacement, and it keeps serving
until the replacement is ready (a disposable one takes nothing more).

Rules:
- Every exit is counted once with one reason, and judged for its pool, by
  ``exits`` (pure): a failure to initialize backs the pool off; a crash while
  serving fails only the invocations on the worker (queued ones wait for the
  replacement); workers that keep dying right after READY without completing
  an invocation are a crash loop (backoff, ``InitializationError``, a failing
  ``/initialize``, and an error log line saying so). For a worker that died
  unasked, the data plane's word on what it did (``WorkerDisconnected``:
  invocations completed and in flight; its READY may reach us after its
  exit) is waited for, at most ``REPORT_WAIT_S``, before the exit is counted
  and judged.
- Replacements follow policy: the pool returns to ``min_warm`` after any
  exit unless it is stopped or backing off after failures.
- Retirement and recycling are graceful (drain, then exit); only a timeout,
  a start deadline or the end of a shutdown kill.
- Python workers are forked by the function's seed when it runs, else
  spawned; both are children of this process.
- Every deadline (start, idle) is in freeze-safe awake time
  (``supervisor.clock``): a thaw does not look like a hang, and it restarts
  every worker's idle time (FC thaws a container to send it a request).
- ``status`` counts what the data plane counts when it is asked:
  ``fresh_counts`` has the attached data plane report every function's
  counts first (``ReportCounts``), waited for at most ``COUNTS_WAIT_S``, so
  a worker's ``served`` includes every invocation answered before.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from supervisor.clock import AwakeClock
from supervisor.config import Config, ConfigError, FunctionConfig, Problem, check_handlers, parse_config_text
from supervisor.control import exits, launcher, policy
from supervisor.control.cgroups import Cgroup
from supervisor.control.output import WorkerOutput
from supervisor.control.sandbox import (
    CPU_WINDOW_S,
    Isolation,
    Sandbox,
    cpu_over_limit,
    function_problems,
    problems_of,
)
from supervisor.control.seeds import SeedProcess
from supervisor.logs import get_logger
from supervisor.metrics import ControlPlaneMetrics
from supervisor.runstate import RunPaths, write_accepted_config, write_seed_restarts
from supervisor.v1 import control_pb2 as cpb

log = get_logger()
MEMORY_POLL_S = 2.0
RECONCILE_S = 0.5
REPORT_WAIT_S = 0.5  # how long an unasked exit waits for the data plane's WorkerDisconnected
COUNTS_WAIT_S = 0.5  # how long `status` waits for the data plane's counts (then answers with the last ones)
SEED_WAIT_S = 3.0
STRAY_S = 2.0  # how long a pool waits for its starting seed before it spawns instead
GRACEFUL_REASONS = exits.GRACEFUL_REASONS
# [supervisor] keys a reload can apply; the others need a new container.
LIVE_SETTINGS = ("default_function",)
SURGE_SHARE = 0.25  # replacements of due workers may exceed max_workers by this share (at least 1)
FINGERPRINT_MAX_FILES = 20000


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
    ready_awake: float = 0.0  # awake time it became ready
    completed: int = 0  # invocations it completed, at least (demand reports, WorkerDisconnected)
    lost_inflight: int | None = None  # in flight when its connection ended (None: not reported)
    exit_awake: float = 0.0  # awake time its exit was seen
    oom_killed: bool = False  # its cgroup counted an OOM kill
    output: WorkerOutput | None = None
    sequence: int = 0
    due: str | None = None  # max_requests | memory | reload | disposable
    idle_since: float = 0.0  # awake time it last had work
    max_requests: int = 0  # jittered; 0: never
    disposable: bool = False
    draining_since: float | None = None  # awake time a graceful stop was asked
    cgroup: Cgroup | None = None
    born_in: Cgroup | None = None  # forked: the cgroup its seed sat in (it moves out as it starts)
    uid: int | None = None  # what it runs as (its connection must come from this uid)
    cpu_samples: list[tuple[float, float]] = field(default_factory=list)  # (awake time, CPU s), no cpu cgroup

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def added(self) -> cpb.WorkerAdded:
        return cpb.WorkerAdded(worker_id=self.worker_id, function=self.function, pid=self.pid,
                               token_digest=self.token_digest, max_requests=self.max_requests,
                               disposable=self.disposable, uid=self.uid)


@dataclass(slots=True)
class PoolRecord:
    config: FunctionConfig
    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    queued: int = 0
    inflight: int = 0
    failures: int = 0
    streak: int = 0  # ready workers in a row that died without completing an invocation (exits.judge)
    retry_at: float = 0.0
    last_error: cpb.WorkerInitFailed | None = None
    stopped: bool = False
    sequence: int = 0
    removed: bool = False  # by a reload: drains its queue, then its workers go
    removed_at: float = 0.0
    min_warm_override: int | None = None  # `supervisor scale`
    max_workers_override: int | None = None
    seed: SeedProcess | None = None
    fingerprint: str = ""
    load: policy.LoadWindow = field(default_factory=policy.LoadWindow)
    load_now: float = 0.0
    peak_load: float = 0.0
    last_expand_at: float = float("-inf")

    @property
    def min_warm(self) -> int:
        return self.config.min_warm if self.min_warm_override is None else self.min_warm_override

    @property
    def max_workers(self) -> int:
        return self.config.max_workers if self.max_workers_override is None else self.max_workers_override

    @property
    def crash_looping(self) -> bool:
        return exits.in_crash_loop(self.streak)

    def facts(self, now: float) -> policy.PoolFacts:
        live = [w for w in self.workers.values() if w.state != "draining" and not w.due]
        return policy.PoolFacts(
            min_warm=self.min_warm, max_workers=self.max_workers,
            concurrency=self.config.concurrency, live=len(live),
            starting=sum(1 for w in live if w.state == "starting"),
            # A disposable pool's in-flight invocations are all on spent workers:
            # only the queue needs new ones.
            inflight=0 if self.config.disposable else self.inflight, queued=self.queued, failures=self.failures,
            backing_off=now < self.retry_at, stopped=self.stopped, load=self.load_now,
            peak_load=self.peak_load, expand_ready=now - self.last_expand_at >= policy.EXPAND_COOLDOWN_S)

    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.state == "ready")

    def health(self) -> cpb.PoolHealth:
        error = self.last_error
        return cpb.PoolHealth(
            function=self.config.name, init_failed=self.failures > 0 and error is not None,
            error_type=error.error_type if error else "", error_message=error.error_message if error else "",
            warm=self.ready_count() >= self.min_warm, min_warm=self.min_warm)


class PoolManager:
    def __init__(self, config: Config, metrics: ControlPlaneMetrics, sink: Callable[[cpb.ControlEvent], None],
                 isolation: Isolation | None = None) -> None:
        self.config = config
        self.isolation = isolation
        self.sandboxes: dict[str, Sandbox] = isolation.plan(config) if isolation is not None else {}
        self._cgroups_to_remove: list[Cgroup] = []
        self._cgroup_sequence = 0
        self.metrics = metrics
        self.paths = RunPaths(config.supervisor.run_dir)
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
        self.pools: dict[str, PoolRecord] = {}
        self._reload_lock = asyncio.Lock()
        self._strays: dict[int, float] = {}  # unknown exited child -> when first seen
        # Exits waiting for the data plane's WorkerDisconnected (see _on_exit).
        self._awaiting: dict[str, tuple[PoolRecord, WorkerRecord, asyncio.TimerHandle]] = {}
        self._retired_seeds: list[SeedProcess] = []
        self._seed_restarts: dict[str, int] = {}
        self._frozen_seen = 0.0
        self._counts_asked = 0  # the last ReportCounts sequence number
        self._counts_waiters: dict[int, asyncio.Future[None]] = {}
        if isolation is not None:
            log.info("worker isolation", cgroups=isolation.describe_cgroups())
        self._log_sandboxes(list(config.functions))
        for fn in config.functions.values():
            self._add_pool(fn)

    def _log_sandboxes(self, names: list[str]) -> None:
        for name in names:
            sandbox = self.sandboxes.get(name)
            if sandbox is not None:
                # Something not enforced, or enforced by a fallback (no cgroup could): a warning.
                gaps = any("not enforced" in value or "cgroups: " in value for value in sandbox.summary.values())
                (log.warning if gaps else log.info)("function isolation", function=name, **sandbox.summary)

    def _new_cgroup(self, fn: FunctionConfig, kind: str = "w") -> Cgroup | None:
        """A cgroup with ``fn``'s limits for one of its processes (``kind``: ``w`` a
        worker, ``seed`` a seed), when cgroups are used here; its uid may move
        itself in. Raises OSError when it cannot be made.

        Every cgroup has a name of its own, a seed's too: a reload starts the new
        seed before the old one's exit is seen, and that exit removes the old
        seed's cgroup (it used to be the same ``<function>/seed``, removed under
        the new seed: "could not join the cgroup", workers by spawn)."""
        sandbox = self.sandboxes.get(fn.name)
        tree = self.isolation.tree if self.isolation is not None else None
        if sandbox is None or tree is None or sandbox.cgroup_limits is None:
            return None
        self._cgroup_sequence += 1
        owner = sandbox.identity.uid if sandbox.identity is not None else None
        return tree.create(fn.name, f"{kind}{self._cgroup_sequence}", sandbox.cgroup_limits, owner_uid=owner)

    def _seed_isolation(self, fn: FunctionConfig) -> tuple[Cgroup | None, dict[str, Any] | None]:
        cgroup = self._new_cgroup(fn, "seed")
        return cgroup, self.sandboxes[fn.name].worker_plan(cgroup.procs_files if cgroup is not None else [])

    def release_cgroups(self) -> None:
        """At shutdown, once the workers are gone: every cgroup this run made goes
        (whatever is still inside one is killed first)."""
        for seed in [*self.seeds(), *self._retired_seeds]:
            for cgroup in (seed.cgroup, seed.next):
                self._release_cgroup(cgroup)
            seed.cgroup = seed.next = None
        self._cgroups_to_remove = [cg for cg in self._cgroups_to_remove if not _removed(cg, set())]
        if self.isolation is not None and self.isolation.tree is not None:
            self.isolation.tree.close()

    def _seed_pids(self) -> set[int]:
        """Live seeds: one may wait in a cgroup a worker had (its next clone's)."""
        return {seed.pid for seed in [*self.seeds(), *self._retired_seeds] if seed.pid}

    def _cgroup_busy(self, cgroup: Cgroup) -> bool:
        """A seed sits in it, or a clone born there may not have moved out yet:
        killing what is inside would kill them (``seeds``' rule)."""
        return (any(seed.sits_in is cgroup for seed in [*self.seeds(), *self._retired_seeds])
                or any(w.born_in is cgroup and w.state == "starting" for w in self.by_id.values()))

    def _release_cgroup(self, cgroup: Cgroup | None) -> None:
        """Kills what is left in it (a process that left the worker's group is still
        in its cgroup) and removes it, now or on a later reconcile (also when it
        is busy: see ``_cgroup_busy``)."""
        if cgroup is None:
            return
        if self._cgroup_busy(cgroup):
            self._cgroups_to_remove.append(cgroup)
            return
        try:
            cgroup.kill(spare=self._seed_pids())
            if not cgroup.remove():
                self._cgroups_to_remove.append(cgroup)
        except OSError as exc:
            log.warning("could not remove a worker cgroup", error=str(exc))

    # ---- pools and seeds -----------------------------------------------------

    def _add_pool(self, fn: FunctionConfig) -> PoolRecord:
        pool = self.pools[fn.name] = PoolRecord(fn, fingerprint=code_fingerprint(fn.code_dir))
        self._start_seed(pool)
        return pool

    def _start_seed(self, pool: PoolRecord) -> None:
        fn = pool.config
        if fn.runtime != "python" or not fn.seed:
            return
        spec = {"function": fn.name, "code_dir": str(fn.code_dir), "handler": fn.handler,
                "initializer": fn.initializer, "pre_freeze": fn.pre_freeze, "pre_stop": fn.pre_stop,
                "interface": fn.interface, "parent_pid": os.getpid(), "event_loop": fn.event_loop,
                "python_packages": fn.python_packages}
        pool.seed = SeedProcess(fn.name, spec, launcher.worker_env(fn, self.instance_id, self.base_env),
                                str(fn.code_dir), self.config.supervisor.log_format, self._seed_changed,
                                isolate=(lambda: self._seed_isolation(fn)) if fn.name in self.sandboxes else None,
                                prepare=lambda: self._new_cgroup(fn), release=self._release_cgroup)
        pool.seed.start()
        self.metrics.seed_ready.labels(fn.name).set(0)

    def _retire_seed(self, pool: PoolRecord) -> None:
        """Stops the pool's seed; its pid stays known until its exit is observed."""
        if pool.seed is not None:
            pool.seed.stop()
            if pool.seed.pid:
                self._retired_seeds.append(pool.seed)
            pool.seed = None

    def _seed_changed(self) -> None:
        restarts = {}
        for pool in self.pools.values():
            if pool.seed is not None:
                self.metrics.seed_ready.labels(pool.config.name).set(1 if pool.seed.running else 0)
                restarts[pool.seed.name] = pool.seed.restarts
        if restarts != self._seed_restarts:
            self._seed_restarts = restarts
            try:
                write_seed_restarts(self.paths, restarts)
            except OSError as exc:
                log.warning("could not record seed restarts", error=str(exc))
        self.changed.set()

    def seeds(self) -> list[SeedProcess]:
        return [pool.seed for pool in self.pools.values() if pool.seed is not None]

    # ---- reconciliation ----------------------------------------------------

    def reconcile(self) -> None:
        now = time.monotonic()
        awake = self.clock.note(now)
        if self.clock.frozen_total != self._frozen_seen:
            # A thaw: FC wakes a container for a request. Idle time restarts
            # now, so a long freeze never empties the pool on the way back.
            self._frozen_seen = self.clock.frozen_total
            for record in self.by_id.values():
                record.idle_since = awake
            log.info("thawed; idle times restart", frozen_s=round(self.clock.frozen_total, 1))
        for name, pool in list(self.pools.items()):
            if pool.seed is not None:
                pool.seed.tick(now)
            pool.load_now, pool.peak_load = pool.load.note(awake, max(pool.config.idle_ttl, policy.LOAD_WINDOW_S))
            if pool.removed:
                self._enforce_deadlines(pool, awake)
                self._wind_down(name, pool)
                continue
            if pool.streak:
                for record in list(pool.workers.values()):
                    self._note_alive(pool, record)
            facts = pool.facts(now)
            count = policy.workers_to_start(facts)
            if count and policy.expands(facts) and policy.target_workers(facts) > max(
                    facts.min_warm, policy.backlog_workers(facts)):
                pool.last_expand_at = now  # a water-level growth: cool down before the next
                log.info("pool above its water level; adding headroom", function=name, load=round(pool.load_now, 2),
                         live=facts.live, starting=count)
            seed = pool.seed
            if count and seed is not None and seed.state == "starting" and now - seed.started_at < SEED_WAIT_S:
                count = 0  # it is about to fork them in milliseconds: wait for it rather than spawn
            if count:
                # Replacements of due workers may surge past max_workers, but only so far.
                alive = sum(1 for w in pool.workers.values() if w.state != "draining")
                surge = max(1, int(pool.max_workers * SURGE_SHARE + 0.999))
                count = min(count, max(0, pool.max_workers + surge - alive))
            for _ in range(count):
                self._start(pool)
            self._replace_due(pool, facts)
            self._retire_idle(pool, facts, awake)
            self._enforce_deadlines(pool, awake)
        self._reap_strays()
        if self._cgroups_to_remove:
            spare = self._seed_pids()
            self._cgroups_to_remove = [cg for cg in self._cgroups_to_remove
                                       if self._cgroup_busy(cg) or not _removed(cg, spare)]

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
                              decided_awake=self.clock.awake(), sequence=pool.sequence,
                              idle_since=self.clock.awake(), disposable=fn.disposable,
                              max_requests=0 if fn.disposable else
                              policy.jittered_max_requests(fn.max_requests, random.random()))
        spec: dict[str, Any] = {
            "worker_id": worker_id, "token": token.hex(), "socket": str(self.paths.worker_sock),
            "function": fn.name, "runtime": fn.runtime, "handler": fn.handler, "interface": fn.interface,
            "code_dir": str(fn.code_dir), "initializer": fn.initializer, "pre_freeze": fn.pre_freeze,
            "pre_stop": fn.pre_stop, "timeout_s": fn.timeout, "concurrency": fn.concurrency,
            "memory_limit_mb": (fn.limits.memory or 0) // (1024 * 1024),
            "max_frame": fn.max_body + 64 * 1024, "max_body": fn.max_body, "parent_pid": os.getpid(),
            "command": list(fn.command or ()), "ready": fn.ready, "startup_timeout_s": fn.startup_timeout,
            "hooks": list(fn.hooks), "ca_port": self.config.supervisor.ca_port, "event_loop": fn.event_loop,
            "python_packages": fn.python_packages,
        }
        sandbox = self.sandboxes.get(fn.name)
        record.uid = sandbox.identity.uid if sandbox is not None and sandbox.identity is not None else os.geteuid()
        seed = pool.seed
        try:
            # A seed waits in the cgroup of the worker it forks next: the clone is born there.
            record.cgroup = (seed.take_next() if seed is not None and seed.running else None) or self._new_cgroup(fn)
        except OSError as exc:
            log.error("could not make a cgroup for a worker", function=fn.name, worker=worker_id, error=str(exc))
            self._failed_to_start(pool, cpb.WorkerInitFailed(
                worker_id=worker_id, error_type="IsolationError", error_message=f"cgroup: {exc}"))
            return
        if sandbox is not None:
            spec["isolation"] = sandbox.worker_plan(record.cgroup.procs_files if record.cgroup is not None else [])
        pool.workers[worker_id] = record
        self.by_id[worker_id] = record
        if seed is not None and seed.running:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            try:
                asked = seed.fork(spec, out_w, err_w,
                                  lambda pid, error: self._forked(pool, record, spec, out_r, err_r, pid, error))
            finally:
                os.close(out_w)
                os.close(err_w)
            if asked:
                record.mode = "fork"
                record.born_in = seed.sits_in
                return
            os.close(out_r)
            os.close(err_r)
        self._spawn(pool, record, spec)

    def _spawn(self, pool: PoolRecord, record: WorkerRecord, spec: dict[str, Any]) -> None:
        fn = pool.config
        record.mode = "spawn"
        record.born_in = None
        env = launcher.worker_env(fn, self.instance_id, self.base_env)
        try:
            process = launcher.spawn(spec, env, str(fn.code_dir))
        except OSError as exc:
            log.error("could not start a worker", function=fn.name, error=str(exc))
            pool.workers.pop(record.worker_id, None)
            self.by_id.pop(record.worker_id, None)
            self._failed_to_start(pool, cpb.WorkerInitFailed(
                worker_id=record.worker_id, error_type=type(exc).__name__, error_message=str(exc)))
            return
        self._launched(pool, record, process)

    def _forked(self, pool: PoolRecord, record: WorkerRecord, spec: dict[str, Any], out_r: int, err_r: int,
                pid: int | None, error: str) -> None:
        if pid is None:
            os.close(out_r)
            os.close(err_r)
            if self.by_id.get(record.worker_id) is not record:
                return
            log.warning("the seed could not fork a worker; spawning it", function=record.function,
                        worker=record.worker_id, error=error)
            if record.end_reason is not None or pool.stopped:
                pool.workers.pop(record.worker_id, None)
                self.by_id.pop(record.worker_id, None)
                self.changed.set()
                return
            self._spawn(pool, record, spec)
            return
        self._launched(pool, record, launcher.Process(pid=pid, stdout_fd=out_r, stderr_fd=err_r))

    def _launched(self, pool: PoolRecord, record: WorkerRecord, process: launcher.Process) -> None:
        fn = pool.config
        record.process = process
        self.metrics.starts.labels(fn.name, record.mode).inc()
        record.output = WorkerOutput(process.stdout_fd, process.stderr_fd, function=fn.name,
                                     worker=record.worker_id, fmt=self.config.supervisor.log_format)
        launcher.watch_exit(process, lambda _process: self._on_exit(record), kill_group=True)
        if self.by_id.get(record.worker_id) is not record or record.end_reason is not None:
            self.kill(record, record.end_reason or "shutdown")  # ended while its start was on the way
            return
        self.sink(cpb.ControlEvent(added=record.added()))
        log.info("worker starting", function=fn.name, worker=record.worker_id, pid=record.pid, mode=record.mode)

    def _enforce_deadlines(self, pool: PoolRecord, awake: float) -> None:
        """Start deadlines for every worker not yet ready (also one already asked to
        stop: a stuck initializer never sees the SIGTERM), and a kill for a graceful
        stop that takes longer than grace_period + timeout."""
        fn = pool.config
        # A process of its own gets startup_timeout to listen, then its initialize hook runs.
        start_limit = (max(fn.startup_timeout, fn.timeout) if fn.runtime == "python"
                       else fn.startup_timeout + fn.timeout) + 5.0
        drain_limit = self.config.supervisor.grace_period + fn.timeout
        for record in list(pool.workers.values()):
            if record.process is None or record.process.exit is not None:
                continue
            if record.ready_at is None and awake - record.decided_awake > start_limit:
                if record.end_reason is None:
                    log.error("worker did not become ready in time; killing it", function=record.function,
                              worker=record.worker_id, limit_s=start_limit)
                    pool.last_error = cpb.WorkerInitFailed(
                        worker_id=record.worker_id, error_type="InitializationTimeout",
                        error_message=f"the worker was not ready within {start_limit:g}s")
                    self.kill(record, "init_failed")
                elif record.state == "draining" or record.end_reason is not None:
                    self.kill(record, record.end_reason)
            elif (record.draining_since is not None and awake - record.draining_since > drain_limit
                  and record.end_reason not in ("timeout", "oom")):
                log.warning("worker did not finish draining in time; killing it", function=record.function,
                            worker=record.worker_id, limit_s=drain_limit)
                self.kill(record, record.end_reason or "shutdown")

    def _replace_due(self, pool: PoolRecord, facts: policy.PoolFacts) -> None:
        """Stops due workers once what remains covers the pool's target without them."""
        due = [w for w in pool.workers.values()
               if w.due and w.due != "disposable" and w.state == "ready" and w.end_reason is None]
        if not due:
            return
        fresh_ready = sum(1 for w in pool.workers.values() if w.state == "ready" and not w.due)
        stoppable = fresh_ready + len(due) - policy.target_workers(facts)
        if pool.stopped:
            stoppable = len(due)
        due.sort(key=lambda w: (w.inflight, w.sequence))
        for record in due[:max(0, stoppable)]:
            log.info("recycling worker", function=record.function, worker=record.worker_id, why=record.due,
                     served=record.served)
            self.retire(record, "recycled")

    def _retire_idle(self, pool: PoolRecord, facts: policy.PoolFacts, awake: float) -> None:
        if pool.stopped or facts.starting:
            return  # never shrink while replacements are still on their way
        candidates = [policy.WorkerFacts(w.worker_id, w.sequence, w.inflight,
                                         0.0 if w.inflight else awake - w.idle_since)
                      for w in pool.workers.values() if w.state == "ready" and not w.due and w.end_reason is None]
        for worker_id in policy.workers_to_retire(facts, candidates, pool.config.idle_ttl,
                                                  pool.config.shrink_strategy):
            record = pool.workers[worker_id]
            log.info("retiring idle worker", function=record.function, worker=worker_id,
                     idle_s=round(awake - record.idle_since, 1))
            self.retire(record, "idle")

    def _wind_down(self, name: str, pool: PoolRecord) -> None:
        """A function removed by a reload: its queue drains onto its workers, then they go.

        The data plane drains them (only it knows when its queue is empty); the
        control plane steps in when no data plane is attached, or after the
        drain budget (``grace_period`` + the function's timeout).
        """
        overdue = time.monotonic() - pool.removed_at > self.config.supervisor.grace_period + pool.config.timeout
        for record in list(pool.workers.values()):
            record.due = record.due or "removed"  # expected to go: a clean exit is a shutdown
            if record.state != "draining" and (overdue or not self.data_plane_attached):
                self.retire(record, "shutdown")
        if not pool.workers:
            del self.pools[name]
            if self.isolation is not None and self.isolation.tree is not None:
                self.isolation.tree.function_cgroups_cleanup(name)
            try:
                self.metrics.seed_ready.remove(name)
            except KeyError:
                pass
            self._seed_changed()
            log.info("function removed", function=name)

    def _reap_strays(self) -> None:
        """Reaps children nobody watches: a worker cloned by a seed that died (or was
        stopped) before its answer arrived. Such a worker is refused by the data
        plane and exits; it is reaped here once it has been unknown for STRAY_S."""
        self._retired_seeds = [seed for seed in self._retired_seeds if seed.pid]
        known = ({w.pid for w in self.by_id.values()} | {s.pid for s in self.seeds()}
                 | {s.pid for s in self._retired_seeds})
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in known:
            self._strays.clear()
            return
        now = time.monotonic()
        first_seen = self._strays.setdefault(info.si_pid, now)
        if now - first_seen >= STRAY_S:
            del self._strays[info.si_pid]
            try:
                os.waitpid(info.si_pid, os.WNOHANG)
            except ChildProcessError:
                pass
            log.warning("reaped a worker nobody owned", pid=info.si_pid)

    # ---- events from the data plane -----------------------------------------

    def on_data_event(self, event: cpb.DataPlaneEvent) -> None:
        which = event.WhichOneof("event")
        if which == "demand":
            self._on_demand(event.demand)
        elif which == "session":
            record = self.by_id.get(event.session.worker_id)
            if record is not None:
                record.lost_inflight = None  # (re)connected: a loss reported before is over
                if event.session.next_token_digest:
                    record.token_digest = event.session.next_token_digest
        elif which == "ready":
            self._on_ready(event.ready.worker_id)
        elif which == "init_failed":
            self._on_init_failed(event.init_failed)
        elif which == "disconnected":
            self._on_disconnected(event.disconnected)
        elif which == "kill":
            record = self.by_id.get(event.kill.worker_id)
            if record is not None:
                self.kill(record, event.kill.reason or "crashed")
        elif which == "due":
            self._on_due(event.due)
        elif which == "reported":
            # Answers come in the order of the questions: every earlier one is answered too.
            for seq in [seq for seq in self._counts_waiters if seq <= event.reported.seq]:
                waiter = self._counts_waiters.pop(seq)
                if not waiter.done():
                    waiter.set_result(None)

    async def fresh_counts(self, timeout_s: float = COUNTS_WAIT_S) -> bool:
        """Has the attached data plane report its counts now (see the module
        docstring); False when none is attached or it did not within ``timeout_s``."""
        if not self.data_plane_attached:
            return False
        self._counts_asked += 1
        seq = self._counts_asked
        waiter = self._counts_waiters[seq] = asyncio.get_running_loop().create_future()
        self.sink(cpb.ControlEvent(report=cpb.ReportCounts(seq=seq)))
        try:
            await asyncio.wait_for(waiter, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._counts_waiters.pop(seq, None)

    def on_attach(self) -> None:
        """A (new) data plane session: disposable workers that served are drained here,
        since the new data plane cannot know they did."""
        for record in list(self.by_id.values()):
            if record.due == "disposable":
                self.stop(record, "disposable")

    def _on_demand(self, demand: cpb.Demand) -> None:
        pool = self.pools.get(demand.function)
        if pool is None:
            return
        awake = self.clock.awake()
        grew = demand.queue_depth > pool.queued
        pool.queued = demand.queue_depth
        pool.inflight = demand.inflight
        pool.load.observe(awake, demand.busy_seconds)
        for load in demand.workers:
            record = pool.workers.get(load.worker_id)
            if record is not None:
                if load.inflight or load.served != record.served:
                    record.idle_since = awake
                record.inflight = load.inflight
                record.served = load.served
                if load.completed > record.completed:
                    record.completed = load.completed
                    self._note_alive(pool, record)
        if grew or pool.removed:
            self.changed.set()

    def _on_due(self, due: cpb.WorkerDue) -> None:
        record = self.by_id.get(due.worker_id)
        if record is None or record.due or record.state == "draining":
            return
        record.due = due.reason or "max_requests"
        if record.due == "disposable":
            record.end_reason = "disposable"  # the data plane drains it after its one invocation
        self.changed.set()  # its replacement starts now

    def _on_ready(self, worker_id: str) -> None:
        record = self.by_id.get(worker_id)
        awaited = self._awaiting.get(worker_id)
        if record is None and awaited is not None and awaited[1].ready_at is None:
            # It died before this news reached us: it was ready all the same.
            awaited[1].ready_at, awaited[1].ready_awake = time.monotonic(), awaited[1].exit_awake
            return
        if record is None or record.state != "starting":
            return
        record.state = "ready"
        record.ready_at = time.monotonic()
        record.idle_since = record.ready_awake = self.clock.awake()
        pool = self.pools[record.function]
        # It initialized: the pool's failures are over, unless it is in a crash
        # loop (its workers get this far, then die): that ends with a worker
        # that completes an invocation or stays up (_note_alive).
        recovered = pool.failures > 0 and not pool.crash_looping
        if not pool.crash_looping:
            pool.failures = 0
            pool.retry_at = 0.0
            pool.last_error = None
        self._settle_seed(pool)
        self.metrics.start_seconds.labels(record.function, record.mode).observe(record.ready_at - record.decided_at)
        log.info("worker ready", function=record.function, worker=worker_id, pid=record.pid, mode=record.mode,
                 start_ms=round((record.ready_at - record.decided_at) * 1000, 2))
        if recovered or pool.ready_count() == pool.min_warm:
            self.sink(cpb.ControlEvent(health=pool.health()))
        self.changed.set()

    def _on_init_failed(self, failure: cpb.WorkerInitFailed) -> None:
        record = self.by_id.get(failure.worker_id)
        function = record.function if record is not None else self.recently_exited.get(failure.worker_id)
        if function is None or function not in self.pools:
            return
        if record is not None and record.due in ("reload", "removed"):
            record.end_reason = record.end_reason or "recycled"  # old config: its failure says nothing now
            return
        self.pools[function].last_error = failure
        if record is not None:
            record.end_reason = "init_failed"  # the worker exits by itself after reporting

    @staticmethod
    def _settle_seed(pool: PoolRecord) -> None:
        """Once no clone of the seed is starting, it moves into the next worker's cgroup."""
        if pool.seed is not None and not any(w.state == "starting" and w.mode == "fork"
                                             for w in pool.workers.values()):
            pool.seed.settle()

    def _failed_to_start(self, pool: PoolRecord, failure: cpb.WorkerInitFailed) -> None:
        pool.failures += 1
        pool.last_error = failure
        pool.retry_at = time.monotonic() + policy.backoff_delay(pool.failures)
        self.sink(cpb.ControlEvent(health=pool.health()))
        self.changed.set()

    # ---- exits, kills, retirement ---------------------------------------------

    def kill(self, record: WorkerRecord, reason: str) -> None:
        if record.end_reason not in ("timeout", "oom"):
            record.end_reason = reason
        record.state = "draining"
        if record.process is not None and record.process.exit is None:
            launcher.signal_group(record.pid, signal.SIGKILL)

    def stop(self, record: WorkerRecord, reason: str) -> None:
        """Graceful: the worker finishes what it has, then exits.

        Only the worker is signalled, not its group: a custom runtime's server
        must keep serving the worker's last invocations; the worker stops it
        once they are done (and its group is killed when the worker is reaped).
        """
        if record.end_reason is None:
            record.end_reason = reason
        record.state = "draining"
        if record.draining_since is None:
            record.draining_since = self.clock.awake()
        if record.process is not None and record.process.exit is None:
            try:
                os.kill(record.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def retire(self, record: WorkerRecord, reason: str) -> None:
        """Graceful, and the data plane stops giving it work at once."""
        self.sink(cpb.ControlEvent(drain=cpb.DrainWorker(worker_id=record.worker_id)))
        self.stop(record, reason)

    def _on_exit(self, record: WorkerRecord) -> None:
        process = record.process
        assert process is not None and process.exit is not None
        record.exit_awake = self.clock.awake()
        pool = self.pools.get(record.function)
        self.by_id.pop(record.worker_id, None)
        stale = record.due in ("reload", "removed")  # started under a config that is gone
        if not stale:
            self.recently_exited[record.worker_id] = record.function
        if len(self.recently_exited) > 256:
            del self.recently_exited[next(iter(self.recently_exited))]
        if pool is not None:
            pool.workers.pop(record.worker_id, None)
            self._settle_seed(pool)
        if record.output is not None:
            record.output.close_when_drained()
        if record.cgroup is not None:
            record.oom_killed = record.cgroup.oom_kills() > 0
            self._release_cgroup(record.cgroup)
            record.cgroup = None
        unasked = record.end_reason in (None, "crashed") or record.oom_killed
        if (pool is not None and not stale and unasked and not record.completed and record.lost_inflight is None
                and self.data_plane_attached):
            # What it did (ready? invocations completed, in flight) may still be on
            # its way from the data plane: its WorkerDisconnected says.
            timer = asyncio.get_running_loop().call_later(REPORT_WAIT_S, self._finish_awaited, record.worker_id)
            self._awaiting[record.worker_id] = (pool, record, timer)
        else:
            self._finish_exit(pool, record, stale)
        self.changed.set()

    def _on_disconnected(self, report: cpb.WorkerDisconnected) -> None:
        record = self.by_id.get(report.worker_id)
        awaited = self._awaiting.get(report.worker_id)
        if record is None and awaited is not None:
            record = awaited[1]
        if record is None:
            return
        record.completed = max(record.completed, report.completed)
        record.lost_inflight = report.inflight
        if awaited is not None:
            awaited[2].cancel()
            self._finish_awaited(report.worker_id)

    def _finish_awaited(self, worker_id: str) -> None:
        awaited = self._awaiting.pop(worker_id, None)
        if awaited is not None:
            self._finish_exit(awaited[0], awaited[1], stale=False)
            self.changed.set()

    def _finish_exit(self, pool: PoolRecord | None, record: WorkerRecord, stale: bool) -> None:
        """The exit's reason (metric, log line, the data plane's cause) and its judgement."""
        process = record.process
        assert process is not None and process.exit is not None
        # The data plane may have seen READY (it gave the worker work) before we did.
        ready = record.ready_at is not None or bool(record.lost_inflight) or record.completed > 0
        reason = exits.exit_reason(exits.ExitFacts(
            end_reason=record.end_reason, exit_code=process.exit.code, ready=ready,
            oom_killed=record.oom_killed, disposable=record.disposable, removed=record.due == "removed"))
        if reason == "disposable":
            record.served = max(record.served, 1)
        self.metrics.exits.labels(record.function, reason).inc()
        try:
            self.metrics.memory.remove(record.function, record.worker_id)
        except KeyError:
            pass
        level = log.info if reason in ("shutdown", *GRACEFUL_REASONS) else log.warning
        level("worker exited", function=record.function, worker=record.worker_id, pid=process.pid,
              reason=reason, status=process.exit.describe(), served=record.served)
        self.sink(cpb.ControlEvent(removed=cpb.WorkerRemoved(
            worker_id=record.worker_id, reason=f"{reason}: {process.exit.describe()}",
            crashed=reason in exits.CRASH_REASONS, oom=reason == "oom")))
        if pool is None or stale:
            return  # a failure under the old config says nothing about the new one
        ready_for = max(0.0, record.exit_awake - record.ready_awake) if ready else None
        inflight = record.lost_inflight if record.lost_inflight is not None else record.inflight
        life = exits.Life(ready_for_s=ready_for, completed=record.completed, inflight=inflight)
        was_looping = pool.crash_looping
        verdict = exits.judge(reason, life, pool.streak)
        pool.streak = verdict.streak
        if pool.stopped or pool.removed:
            return
        if verdict.kind == exits.Kind.INIT_FAILURE:
            # Its own report (INIT_ERROR, through the data plane) came before its
            # WorkerDisconnected, or it never connected.
            error = pool.last_error
            self._failed_to_start(pool, error if error is not None and error.worker_id == record.worker_id else
                                  cpb.WorkerInitFailed(worker_id=record.worker_id, error_type="WorkerExited",
                                                       error_message=f"the worker {process.exit.describe()} "
                                                                     "before it was ready"))
        elif verdict.backs_off:
            delay = policy.backoff_delay(pool.failures + 1)
            log.error("crash loop: workers keep dying right after they are ready, without completing an "
                      "invocation; backing off", function=record.function, worker=record.worker_id,
                      in_a_row=verdict.streak, last=process.exit.describe(), retry_in_s=delay)
            self._failed_to_start(pool, cpb.WorkerInitFailed(
                worker_id=record.worker_id, error_type="WorkerCrashLoop",
                error_message=f"crash loop: {verdict.streak} workers in a row died within {exits.STABLE_S:g}s "
                              f"of becoming ready without completing an invocation (the last one "
                              f"{process.exit.describe()}); retrying in {delay:g}s"))
        elif was_looping and not verdict.crash_loop:
            self._crash_loop_over(pool, "a worker completed an invocation or stayed up")

    def _note_alive(self, pool: PoolRecord, record: WorkerRecord) -> None:
        """A live ready worker that served or stayed up ends its pool's streak."""
        if not pool.streak or record.ready_at is None or record.state == "starting":
            return
        life = exits.Life(ready_for_s=self.clock.awake() - record.ready_awake, completed=record.completed,
                          inflight=record.inflight)
        was_looping = pool.crash_looping
        pool.streak = exits.streak_while_alive(pool.streak, life)
        if was_looping and not pool.crash_looping:
            self._crash_loop_over(pool, "a worker completed an invocation" if record.completed
                                  else f"a worker stayed up {exits.STABLE_S:g}s")

    def _crash_loop_over(self, pool: PoolRecord, why: str) -> None:
        log.info("crash loop over", function=pool.config.name, why=why)
        pool.failures, pool.retry_at, pool.last_error = 0, 0.0, None
        self.sink(cpb.ControlEvent(health=pool.health()))
        self.changed.set()

    # ---- reload and scale -------------------------------------------------------

    async def reload(self, wait_s: float = 0.0) -> cpb.ReloadReply:
        """Applies the config file again; refuses it whole when anything is wrong.

        ``wait_s`` > 0: then waits (at most that long) until every added or
        changed function serves the new config (``wait_serving``).
        """
        async with self._reload_lock:
            reply = await self._reload()
        if not reply.ok:  # also when nobody waits for the answer (SIGHUP)
            log.warning("reload refused; the running config stays", generation=reply.generation,
                        problems=[f"{p.path}: {p.message}" if p.path else p.message for p in reply.problems])
        elif wait_s > 0:
            why = await self.wait_serving([*reply.added, *reply.changed], wait_s)
            reply.waited, reply.serving, reply.not_serving = True, not why, why
            if why:
                log.warning("reload applied, but the new config does not serve yet", generation=reply.generation,
                            why=why)
        return reply

    async def wait_serving(self, names: list[str], timeout_s: float) -> str:
        """Waits until each named function serves its current config: none of its
        workers started under an older one is left (a worker exits only once the
        data plane has drained it, so no invocation reaches old code after that)
        and ``min_warm`` new ones are ready. Returns "" then, else why not: the
        timeout, or a function's failure to initialize (at once)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.draining:
                return "the supervisor is draining (pre-stop or shutdown)"
            waiting = []
            for name in names:
                pool = self.pools.get(name)
                if pool is None or pool.removed:
                    continue  # removed by a later reload: nothing of it is to serve
                old = sum(1 for w in pool.workers.values() if w.due in ("reload", "removed"))
                fresh = sum(1 for w in pool.workers.values()
                            if w.state == "ready" and w.due not in ("reload", "removed"))
                error = pool.last_error
                if pool.failures and error is not None and (fresh < pool.min_warm or pool.crash_looping):
                    return f"{name}: {error.error_type}: {error.error_message}"
                if old or fresh < pool.min_warm:
                    waiting.append(f"{name} ({fresh} of {pool.min_warm} new workers ready, {old} old ones left)")
            if not waiting:
                return ""
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"not serving the new config within {timeout_s:g}s: {'; '.join(waiting)}"
            await asyncio.sleep(min(0.02, remaining))

    async def _reload(self) -> cpb.ReloadReply:
        old = self.config
        if self.draining:
            return _refused([Problem("", "the supervisor is draining (pre-stop or shutdown); nothing reloaded")],
                            old.generation)
        path = old.path
        if path is None:
            return _refused([Problem("", "this supervisor was not started from a config file")], old.generation)
        try:
            text = await asyncio.to_thread(path.read_bytes)
            new = parse_config_text(text.decode("utf-8"), path.parent, path, generation=old.generation + 1)
        except OSError as exc:
            return _refused([Problem(str(path), f"cannot read the config file: {exc.strerror or exc}")],
                            old.generation)
        except UnicodeDecodeError as exc:
            return _refused([Problem(str(path), f"not valid TOML: the file is not UTF-8 ({exc})")], old.generation)
        except ConfigError as exc:
            return _refused(exc.problems, old.generation)
        problems = [Problem(f"supervisor.{key}", "cannot change while the supervisor runs (start a new container "
                                                  "for it); the rest of the file was not applied either")
                    for key in type(new.supervisor).model_fields
                    if key not in LIVE_SETTINGS and getattr(new.supervisor, key) != getattr(old.supervisor, key)]
        fingerprints = {name: await asyncio.to_thread(code_fingerprint, fn.code_dir)
                        for name, fn in new.functions.items()}
        added = [n for n in new.functions if n not in self.pools or self.pools[n].removed]
        removed = [n for n, p in self.pools.items() if n not in new.functions and not p.removed]
        changed = [n for n in new.functions if n not in added and (
            new.functions[n] != self.pools[n].config or fingerprints[n] != self.pools[n].fingerprint)]
        unchanged = [n for n in new.functions if n not in added and n not in changed]
        to_check = {n: new.functions[n] for n in added + changed}
        sandboxes = self.isolation.plan(new) if self.isolation is not None else {}
        problems += problems_of({n: sandboxes[n] for n in to_check if n in sandboxes})
        # Code its workers cannot read, requirements not installed (supervisor deps).
        problems += await asyncio.to_thread(function_problems, new, sandboxes, list(to_check))
        if to_check and not problems:
            problems += await asyncio.to_thread(check_handlers, new.model_copy(update={"functions": to_check}),
                                                plans={n: s.plan for n, s in sandboxes.items()})
        if problems:
            return _refused(problems, old.generation)

        assert new.text is not None
        try:  # first: a plane restarted from now on must run what is about to run
            await asyncio.to_thread(write_accepted_config, self.paths, new.text, path.parent, path,
                                    new.generation)
        except OSError as exc:
            return _refused([Problem(str(self.paths.accepted_config),
                                     f"cannot record the new config for the planes: {exc}")], old.generation)
        if self.draining:  # checked again: the checks above awaited
            return _refused([Problem("", "the supervisor is draining (pre-stop or shutdown); nothing reloaded")],
                            old.generation)
        self.config = new
        self.sandboxes = sandboxes
        self._log_sandboxes(added + changed)
        # A changed concurrency or max_body must not reach old workers (their slots
        # and frame limits are their own): those are drained before the data plane
        # applies the new table. Other changes keep old workers serving until the
        # new ones are ready.
        for name in changed:
            pool, fn = self.pools[name], new.functions[name]
            limits_changed = (fn.concurrency, fn.max_body) != (pool.config.concurrency, pool.config.max_body)
            for record in list(pool.workers.values()):
                if record.state == "draining":
                    continue
                record.due = record.due or "reload"
                if record.state == "starting" or limits_changed:
                    self.retire(record, "recycled")
        self.sink(cpb.ControlEvent(config=self.config_update()))
        for name in removed:
            pool = self.pools[name]
            pool.removed = pool.stopped = True
            pool.removed_at = time.monotonic()
            self._retire_seed(pool)
        for name in changed:
            pool = self.pools[name]
            fn = new.functions[name]
            if (fn.min_warm, fn.max_workers) != (pool.config.min_warm, pool.config.max_workers):
                pool.min_warm_override = pool.max_workers_override = None
            pool.config = fn
            pool.fingerprint = fingerprints[name]
            pool.failures, pool.retry_at, pool.last_error, pool.streak = 0, 0.0, None, 0
            self._retire_seed(pool)
            self._start_seed(pool)
        for name in added:
            stale = self.pools.pop(name, None)
            pool = self._add_pool(new.functions[name])
            if stale is not None:
                # Removed earlier and not gone yet: its workers run the old config,
                # so they are replaced like a changed function's.
                for record in stale.workers.values():
                    if record.state != "draining":
                        record.due = "reload"
                pool.workers.update(stale.workers)
        for name in unchanged:
            self.pools[name].config = new.functions[name]
        # Keep the file's order.
        self.pools = {n: self.pools[n] for n in new.functions} | {
            n: p for n, p in self.pools.items() if n not in new.functions}
        log.info("config reloaded", generation=new.generation, added=added, removed=removed, changed=changed,
                 unchanged=unchanged)
        self.changed.set()
        return cpb.ReloadReply(ok=True, added=added, removed=removed, changed=changed, unchanged=unchanged,
                               generation=new.generation)

    def config_update(self) -> cpb.ConfigUpdate | None:
        config = self.config
        if config.generation == 0 or config.text is None or config.path is None:
            return None
        return cpb.ConfigUpdate(toml=config.text, base_dir=str(config.path.parent), path=str(config.path),
                                generation=config.generation)

    def scale(self, request: cpb.ScaleRequest) -> cpb.ScaleReply:
        pool = self.pools.get(request.function)
        if pool is None or pool.removed:
            known = ", ".join(n for n, p in self.pools.items() if not p.removed)
            return cpb.ScaleReply(ok=False, error=f"no function named {request.function!r} (configured: {known})")
        min_warm = request.min_warm if request.HasField("min_warm") else pool.min_warm
        max_workers = request.max_workers if request.HasField("max_workers") else pool.max_workers
        if max_workers < 1:
            return cpb.ScaleReply(ok=False, error="max_workers must be at least 1",
                                  min_warm=pool.min_warm, max_workers=pool.max_workers)
        if min_warm > max_workers:
            return cpb.ScaleReply(ok=False, error=f"min_warm ({min_warm}) cannot exceed max_workers ({max_workers})",
                                  min_warm=pool.min_warm, max_workers=pool.max_workers)
        pool.min_warm_override, pool.max_workers_override = min_warm, max_workers
        log.info("pool scaled", function=request.function, min_warm=min_warm, max_workers=max_workers)
        self.sink(cpb.ControlEvent(health=pool.health()))  # the data plane's readiness follows min_warm
        self._shed_above_max(pool)
        self.changed.set()
        return cpb.ScaleReply(ok=True, min_warm=min_warm, max_workers=max_workers)

    def _shed_above_max(self, pool: PoolRecord) -> None:
        """A lower max_workers: the surplus goes, idle ones first, gracefully."""
        live = [w for w in pool.workers.values() if w.state != "draining" and not w.due]
        surplus = len(live) - pool.max_workers
        live.sort(key=lambda w: (w.state == "ready", w.inflight, -w.sequence))
        for record in live[:max(0, surplus)]:
            self.retire(record, "idle")

    # ---- whole-plane operations ----------------------------------------------

    async def stop_all(self, grace_s: float, reason: str) -> int:
        """Stops every worker gracefully (SIGKILL after ``grace_s``); no replacements."""
        for pool in self.pools.values():
            pool.stopped = True
            self._retire_seed(pool)
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
            p.ready_count() >= p.min_warm for p in self.pools.values() if not p.removed)

    async def wait_ready(self, timeout_s: float) -> cpb.WaitReadyReply:
        """For /initialize: min_warm everywhere, or the first failure.

        A pool that failed to initialize is retried at once (the platform asks
        again); one in a crash loop is not: it fails with the loop's error
        (its workers do get ready, then die) and keeps its backoff.
        """
        for pool in self.pools.values():
            if pool.failures and not pool.crash_looping:
                pool.retry_at = 0.0  # the platform asks again: retry now
                pool.last_error = None
        self.changed.set()
        deadline = time.monotonic() + timeout_s
        while True:
            pools = [p for p in self.pools.values() if not p.removed]
            for pool in pools:
                if pool.last_error is not None and (pool.ready_count() < pool.min_warm or pool.crash_looping):
                    error = pool.last_error
                    return cpb.WaitReadyReply(ok=False, function=pool.config.name,
                                              error_type=error.error_type, error_message=error.error_message)
            if all(p.ready_count() >= p.min_warm and not p.crash_looping for p in pools):
                return cpb.WaitReadyReply(ok=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pending = [p.config.name for p in pools if p.ready_count() < p.min_warm]
                return cpb.WaitReadyReply(ok=False, function=pending[0] if pending else "",
                                          error_type="InitializationTimeout",
                                          error_message=f"min_warm not reached within {timeout_s:g}s")
            await asyncio.sleep(min(0.01, remaining))

    def snapshot(self) -> cpb.Snapshot:
        return cpb.Snapshot(workers=[r.added() for r in self.by_id.values() if r.process is not None],
                            health=[p.health() for p in self.pools.values()], config=self.config_update())

    def _tree_pids(self) -> dict[int, list[int]] | None:
        """Children by parent pid, when a worker runs processes of its own (custom,
        lambda, scf: the server or runtime it starts); None when none does."""
        if all(pool.config.runtime == "python" for pool in self.pools.values()):
            return None
        children: dict[int, list[int]] = {}
        for process in psutil.process_iter(["ppid"]):
            children.setdefault(process.info["ppid"] or 0, []).append(process.pid)
        return children

    def _rss_of(self, record: WorkerRecord, children: dict[int, list[int]] | None) -> int:
        """The worker's RSS, with its descendants' when it runs processes of its own."""
        return sum(_rss(pid) for pid in self._tree_of(record, children))

    def _tree_of(self, record: WorkerRecord, children: dict[int, list[int]] | None) -> list[int]:
        """The worker's pid, and its descendants' when it runs processes of its own."""
        pool = self.pools.get(record.function)
        if children is None or pool is None or pool.config.runtime == "python":
            return [record.pid]
        found, stack = [], [record.pid]
        while stack:
            pid = stack.pop()
            found.append(pid)
            stack.extend(children.get(pid, ()))
        return found

    def _check_cpu(self, record: WorkerRecord, children: dict[int, list[int]] | None) -> None:
        """No cpu cgroup here: a worker above its cores for CPU_WINDOW_S is killed."""
        sandbox = self.sandboxes.get(record.function)
        if sandbox is None or not sandbox.poll_cpu or record.end_reason is not None:
            return
        now = self.clock.awake()
        record.cpu_samples.append((now, sum(_cpu(pid) for pid in self._tree_of(record, children))))
        while len(record.cpu_samples) > 2 and now - record.cpu_samples[1][0] >= CPU_WINDOW_S:
            del record.cpu_samples[0]  # keep just over a window
        if cpu_over_limit(record.cpu_samples, sandbox.poll_cpu):
            log.warning("worker used more CPU than its limit for too long; killing it", function=record.function,
                        worker=record.worker_id, cores=sandbox.poll_cpu, window_s=CPU_WINDOW_S)
            self.kill(record, "crashed")

    async def poll_memory(self) -> None:
        while True:
            children = self._tree_pids()
            for record in list(self.by_id.values()):
                rss = self._rss_of(record, children)
                if rss:
                    record.rss = rss
                    self.metrics.memory.labels(record.function, record.worker_id).set(rss)
                    self._check_memory(record)
                    self._check_cpu(record, children)
            await asyncio.sleep(MEMORY_POLL_S)

    def _check_memory(self, record: WorkerRecord) -> None:
        pool = self.pools.get(record.function)
        sandbox = self.sandboxes.get(record.function)
        if (sandbox is not None and sandbox.poll_memory and record.rss > sandbox.poll_memory
                and record.end_reason is None):
            # No memory cgroup here: the limit is enforced by polling (like Noslate's turf).
            log.warning("worker passed its memory limit; killing it", function=record.function,
                        worker=record.worker_id, rss_bytes=record.rss, limit_bytes=sandbox.poll_memory)
            self.kill(record, "oom")
            return
        if pool is None or record.due or record.state != "ready":
            return
        limit, share = pool.config.limits.memory, pool.config.recycle_memory_share
        if not (limit and share) or record.rss <= share * limit:
            return
        # RSS counts the pages a forked worker shares with its seed; what it holds
        # alone (USS) is what it would give back by being replaced. A worker
        # running its own server has no seed: its tree's RSS is what it holds.
        own = _uss(record.pid) if pool.config.runtime == "python" else record.rss
        if own > share * limit:
            log.warning("worker passed its memory high-water mark; recycling it", function=record.function,
                        worker=record.worker_id, uss_bytes=own, rss_bytes=record.rss,
                        high_water_bytes=int(share * limit))
            record.due = "memory"
            self.changed.set()

    def status(self) -> cpb.StatusReply:
        now = time.monotonic()
        functions = []
        children = self._tree_pids()
        for pool in self.pools.values():
            fn = pool.config
            workers = []
            for record in pool.workers.values():
                record.rss = self._rss_of(record, children) or record.rss
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
                name=fn.name, runtime=fn.runtime, min_warm=pool.min_warm, max_workers=pool.max_workers,
                concurrency=fn.concurrency, queue_depth=pool.queued, inflight=pool.inflight, workers=workers,
                init_error=f"{error.error_type}: {error.error_message}" if error and pool.failures else "",
                isolation=self.sandboxes[fn.name].summary if fn.name in self.sandboxes else {}))
        components = [cpb.ComponentStatus(name=seed.name, pid=seed.pid, state=seed.state, restarts=seed.restarts,
                                          uptime_s=seed.uptime(), detail=seed.detail) for seed in self.seeds()]
        return cpb.StatusReply(ready=self.ready(), functions=functions, components=components,
                               data_plane_attached=self.data_plane_attached, draining=self.draining)


def _refused(problems: list[Problem], generation: int) -> cpb.ReloadReply:
    return cpb.ReloadReply(ok=False, generation=generation,
                           problems=[cpb.ConfigProblem(path=p.path, message=p.message) for p in problems])


def code_fingerprint(code_dir: Path) -> str:
    """What the code in ``code_dir`` is, cheaply: names, sizes and mtimes of its files."""
    digest = hashlib.sha256()
    count = 0
    for root, dirs, files in os.walk(code_dir):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".git"))
        for name in sorted(files):
            if name.endswith((".pyc", ".pyo")):
                continue
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            digest.update(f"{os.path.relpath(full, code_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            count += 1
            if count >= FINGERPRINT_MAX_FILES:
                return digest.hexdigest()
    return digest.hexdigest()


def _removed(cgroup: Cgroup, spare: set[int]) -> bool:
    try:
        cgroup.kill(spare=spare)
        return cgroup.remove()
    except OSError:
        return False


def _uss(pid: int) -> int:
    """Memory only this process holds (reads smaps: slower than ``_rss``)."""
    return _memory(pid, lambda process: process.memory_full_info().uss)


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used; 0 when it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def _rss(pid: int) -> int:
    return _memory(pid, lambda process: process.memory_info().rss)


def _memory(pid: int, read: Callable[[psutil.Process], int]) -> int:
    if pid <= 0:
        return 0
    try:
        return int(read(psutil.Process(pid)))
    except (psutil.Error, ValueError):
        return 0
