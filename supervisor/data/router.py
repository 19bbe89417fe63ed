"""The data plane's request path and its view of the workers.

``Router`` executes what the pure ``PoolDispatch`` decides: it hands slots
to waiting invocations, sends frames to workers, answers with the contract's
errors, and keeps the control plane informed (worker sessions, readiness,
demand) through an outbox. It never spawns or kills a process itself: it
asks the control plane to.

Rules:
- Per invocation the path is: acquire a slot (or queue) -> one INVOKE frame
  -> await the RESULT future -> release the slot. No task, timer or gRPC call
  is created per invocation; deadlines are enforced by one sweeper that
  looks at all in-flight and queued invocations every ``SWEEP_S`` seconds,
  in freeze-safe awake time (``supervisor.clock``).
- A worker whose invocation timed out takes no more work and is killed by
  the control plane; only the invocations on it fail.
- When a worker's connection drops, its in-flight invocations fail with the
  cause the control plane reports (crash, OOM), waited for at most
  ``CAUSE_WAIT_S``.
- A disposable worker takes one invocation: the control plane hears of it
  when it is dispatched (its replacement starts at once) and the worker is
  drained after its result. A worker that reaches its ``max_requests`` is
  reported once and keeps serving until the control plane drains it (its
  replacement is ready first).
- An invocation's access record, when there is one (``access.py``), gets
  the worker it was given and how long it waited for a slot.
- The function table follows the control plane's config (``ConfigUpdate``,
  after a reload): new functions are served at once; a removed one takes no
  new invocation and finishes what it has.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calink import frames
from calink.messages import ErrorInfo, Header, HttpRequest, Invoke, ProtocolError, Result, WorkerHello
from supervisor.clock import AwakeClock
from supervisor.config import Config, ConfigError, FunctionConfig, parse_config_text
from supervisor.data import errors
from supervisor.data.dispatcher import PoolDispatch, Slotted, Waiter, WorkerState
from supervisor.data.links import HttpCall, WorkerLink
from supervisor.logs import get_logger
from supervisor.metrics import DataPlaneMetrics, FunctionSeries, PoolView
from supervisor.v1 import control_pb2 as cpb

SWEEP_S = 0.05
# How long a worker has to end a stream cancelled for a slow client before it is killed.
CANCEL_GRACE_S = 2.0
DISPATCH_ATTEMPTS = 3
CAUSE_WAIT_S = 0.5
UNKNOWN_WORKER_WAIT_S = 3.0
DEMAND_INTERVAL_S = 0.1
URGENT_INTERVAL_S = 0.02
DEMAND_HEARTBEAT_S = 2.0

log = get_logger()

Outbox = Callable[[cpb.DataPlaneEvent], None]

if TYPE_CHECKING:
    from supervisor.data.access import AccessRecord


class FunctionState:
    """Everything the data plane keeps for one function."""

    __slots__ = ("config", "pool", "series", "health", "demand_sent", "demand_at", "removed",
                 "running", "busy_started", "busy_done")

    def __init__(self, config: FunctionConfig, series: FunctionSeries) -> None:
        self.config = config
        self.pool = PoolDispatch(config.name, config.concurrency, config.max_queue)
        self.series = series
        self.health = cpb.PoolHealth(function=config.name)
        self.demand_sent: tuple[int, int, int] = (-1, -1, -1)
        self.demand_at = 0.0
        self.removed = False  # by a reload: finishes what it has, takes nothing new
        # In-flight time, integrated without a clock read of its own: the sum of
        # the dispatch times of running invocations and the total of finished ones.
        self.running = 0
        self.busy_started = 0.0
        self.busy_done = 0.0

    def min_warm(self) -> int:
        """The control plane's (``supervisor scale``), else the config's."""
        return self.health.min_warm if self.health.HasField("min_warm") else self.config.min_warm

    def busy_seconds(self, now: float) -> float:
        """In-flight invocations integrated over time (perf_counter seconds)."""
        return self.busy_done + self.running * now - self.busy_started


class Router:
    def __init__(self, config: Config, metrics: DataPlaneMetrics, clock: AwakeClock, outbox: Outbox) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.outbox = outbox
        self.functions: dict[str, FunctionState] = {
            name: FunctionState(fn, metrics.function(name)) for name, fn in config.functions.items()}
        self.expected: dict[str, cpb.WorkerAdded] = {}
        self.links: dict[str, WorkerLink] = {}
        self.causes: dict[str, cpb.WorkerRemoved] = {}
        self._known_waiters: dict[str, asyncio.Future[None]] = {}
        self._lost: dict[str, asyncio.Future[None]] = {}
        self.draining = False
        self.snapshot_seen = asyncio.Event()
        self.idle_changed = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    # ==== the request path ================================================

    async def _acquire(self, function: FunctionState, record: AccessRecord | None = None) -> WorkerLink:
        """A slot on a connected worker, now or after queueing; raises ``InvocationError``."""
        if self.draining:
            raise errors.shutting_down()
        pool = function.pool
        for _ in range(DISPATCH_ATTEMPTS):
            worker = pool.acquire()
            if worker is None:
                worker = await self._wait_for_slot(function, record)
            else:
                function.series.queue_wait.observe(0.0)
            assert isinstance(worker, WorkerLink)
            if worker.usable():
                break
            # Its connection dropped between the hand-over and now: the
            # invocation never reached it, so it may go to another worker.
            pool.drain(worker)
            self._give_back(function, worker)
        else:
            raise errors.worker_crashed(function.config.name, "workers kept disappearing before dispatch")
        if worker.limit and worker.taken >= worker.limit:
            self._due(worker, "disposable")  # its replacement starts now
        if record is not None:
            record.worker = worker.worker_id
        return worker

    def _begin(self, function: FunctionState) -> float:
        started = time.perf_counter()
        function.running += 1
        function.busy_started += started
        return started

    def _end(self, function: FunctionState, worker: WorkerLink, started: float) -> float:
        elapsed = time.perf_counter() - started
        function.running -= 1
        function.busy_started -= started
        function.busy_done += elapsed
        self._release(function, worker)
        function.series.duration.observe(elapsed)
        return elapsed

    async def invoke(self, function: FunctionState, kind: str, request_id: str,
                     headers: list[Header], body: bytes, record: AccessRecord | None = None) -> Result:
        """Runs one invocation on a worker; raises ``InvocationError``."""
        worker = await self._acquire(function, record)
        config = function.config
        started = self._begin(function)
        message = Invoke(request_id=request_id, kind=kind, headers=headers,
                         timeout_ms=int(config.timeout * 1000), body=body)
        future = worker.call(message, self.clock.awake() + config.timeout, self.loop)
        try:
            payload = await future
        finally:
            future.cancel()
            self._end(function, worker, started)
        try:
            return Result.decode(payload)
        except ProtocolError:
            self.on_protocol_error(worker, "undecodable RESULT")
            worker.close()
            raise errors.worker_crashed(function.config.name, "the worker sent an undecodable result") from None

    async def open_http(self, function: FunctionState, request: HttpRequest,
                        record: AccessRecord | None = None) -> HttpCall:
        """Sends an HTTP-trigger request to a worker; raises ``InvocationError``.

        The worker's slot is held until the stream ends (its RESULT, the
        timeout, or the worker's death), not until the front returns: a
        client that leaves early does not free a slot the application still
        uses.
        """
        worker = await self._acquire(function, record)
        started = self._begin(function)
        request.timeout_ms = int(function.config.timeout * 1000)
        call = worker.open_stream(request, self.clock.awake() + function.config.timeout, self.loop)
        call.future.add_done_callback(lambda _: self._end(function, worker, started))
        return call

    async def _wait_for_slot(self, function: FunctionState, record: AccessRecord | None = None) -> Slotted:
        pool = function.pool
        health = function.health
        if health.init_failed and not pool.ready_count():
            raise errors.init_failed(function.config.name, health.error_type, health.error_message)
        future: asyncio.Future[Slotted] = self.loop.create_future()
        waiter = Waiter(future, self.clock.awake())
        if not pool.enqueue(waiter):
            raise errors.too_many_requests(function.config.name,
                                           f"all workers are busy and the queue is full (max_queue={pool.max_queue})")
        self._report_demand(function, urgent=True)
        started = time.perf_counter()
        try:
            worker = await future
        except asyncio.CancelledError:
            pool.cancel(waiter)
            if future.done() and not future.cancelled() and future.exception() is None:
                self._give_back(function, future.result())
            raise
        except errors.InvocationError:  # it waited too long, or the pool failed
            if record is not None:
                record.queue_s += time.perf_counter() - started
            raise
        waited = time.perf_counter() - started
        function.series.queue_wait.observe(waited)
        if record is not None:
            record.queue_s += waited
        return worker

    def _release(self, function: FunctionState, worker: Slotted) -> None:
        self._hand_over(function, function.pool.release(worker, self.clock.awake()))
        if not worker.inflight:
            self.idle_changed.set()
        if isinstance(worker, WorkerLink) and (worker.limit or worker.max_requests):
            self._after_limited(function, worker)
        if function.pool.queue_depth or function.pool.inflight == 0:
            self._report_demand(function)

    def _after_limited(self, function: FunctionState, worker: WorkerLink) -> None:
        if worker.limit and worker.taken >= worker.limit and not worker.inflight:
            # A disposable worker's one invocation is done: it goes.
            if worker.state == WorkerState.READY:
                function.pool.drain(worker)
                worker.send(frames.Kind.DRAIN, 0)
        elif worker.max_requests and worker.served >= worker.max_requests:
            self._due(worker, "max_requests")

    def _drain_idle(self, function: FunctionState) -> None:
        """A removed function whose queue is empty: its idle workers go (busy ones when done)."""
        for worker in function.pool.iter_workers():
            if isinstance(worker, WorkerLink) and worker.state == WorkerState.READY and not worker.inflight:
                function.pool.drain(worker)
                worker.send(frames.Kind.DRAIN, 0)

    def _due(self, worker: Slotted, reason: str) -> None:
        if isinstance(worker, WorkerLink) and not worker.due_sent:
            worker.due_sent = True
            self.outbox(cpb.DataPlaneEvent(due=cpb.WorkerDue(worker_id=worker.worker_id, reason=reason)))

    def _give_back(self, function: FunctionState, worker: Slotted) -> None:
        self._hand_over(function, function.pool.give_back(worker))

    def _hand_over(self, function: FunctionState, assignments: list[tuple[Waiter, Slotted]]) -> None:
        for waiter, worker in assignments:
            future = waiter.token
            if future.done():  # its invocation was cancelled meanwhile
                self._give_back(function, worker)
            else:
                future.set_result(worker)

    # ==== deadlines =======================================================

    async def sweep(self) -> None:
        """Times out invocations and queue waits, in awake time."""
        while True:
            await asyncio.sleep(SWEEP_S)
            now = self.clock.note()
            for link in list(self.links.values()):
                if link.pending:
                    expired = [(s, c) for s, c in link.pending.items() if c.deadline <= now]
                    if expired:
                        self._timeout(link, expired)
            for function in self.functions.values():
                if function.pool.queue_depth:
                    limit = now - function.config.timeout
                    for waiter in function.pool.expire(limit):
                        if not waiter.token.done():
                            waiter.token.set_exception(errors.too_many_requests(
                                function.config.name,
                                f"no worker slot freed within {function.config.timeout:g}s (the function's timeout)"))

    def _timeout(self, link: WorkerLink, expired: list[tuple[int, Any]]) -> None:
        function = self.functions.get(link.function)
        if function is None:
            return
        killing = False
        for stream, call in expired:
            if isinstance(call, HttpCall) and call.client_waits and not call.cancelled:
                # The front is waiting on the client, not on the function: the
                # request fails as the client's, and the worker gets a grace
                # period to end the stream before it is killed like any other.
                call.fail(errors.client_timeout(link.function, function.config.timeout))
                call.deadline = self.clock.awake() + CANCEL_GRACE_S
                log.info("client too slow for the function's timeout; cancelled its request",
                         request_id=call.request_id, function=link.function, worker=link.worker_id,
                         timeout_s=function.config.timeout)
                continue
            killing = True
            link.pending.pop(stream, None)
            if not call.future.done():
                call.future.set_exception(errors.timed_out(link.function, function.config.timeout))
            log.warning("invocation timed out; killing its worker", request_id=call.request_id,
                        function=link.function, worker=link.worker_id, timeout_s=function.config.timeout)
        if killing and link.state != WorkerState.GONE:
            function.pool.drain(link)
            self.outbox(cpb.DataPlaneEvent(kill=cpb.KillWorker(worker_id=link.worker_id, reason="timeout")))

    # ==== worker links ====================================================

    def on_hello(self, link: WorkerLink, hello: WorkerHello) -> None:
        expected = self.expected.get(hello.worker_id)
        if expected is None:
            # The control plane's WorkerAdded may still be on its way.
            asyncio.ensure_future(self._hello_later(link, hello))
        else:
            self._authenticate(link, hello, expected)

    async def _wait_keyed(self, table: dict[str, asyncio.Future[None]], key: str, timeout_s: float) -> None:
        """Waits (at most ``timeout_s``) until ``table[key]`` is resolved by an event."""
        waiter = table.setdefault(key, self.loop.create_future())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            pass
        finally:
            table.pop(key, None)

    async def _hello_later(self, link: WorkerLink, hello: WorkerHello) -> None:
        # Checked again here: the WorkerAdded may have landed before this task ran.
        if hello.worker_id not in self.expected:
            await self._wait_keyed(self._known_waiters, hello.worker_id, UNKNOWN_WORKER_WAIT_S)
        expected = self.expected.get(hello.worker_id)
        if expected is None:
            self._refuse(link, hello.worker_id, "unknown worker")
        else:
            self._authenticate(link, hello, expected)

    def _authenticate(self, link: WorkerLink, hello: WorkerHello, expected: cpb.WorkerAdded) -> None:
        if link.transport is None or link.transport.is_closing():
            return
        if not secrets.compare_digest(hashlib.sha256(hello.token).digest(), expected.token_digest):
            return self._refuse(link, hello.worker_id, "bad credential")
        if link.peer_pid != expected.pid:
            return self._refuse(link, hello.worker_id, f"credential presented by pid {link.peer_pid}, "
                                                       f"issued to pid {expected.pid}")
        if expected.HasField("uid") and link.peer_uid != expected.uid:
            return self._refuse(link, hello.worker_id, f"credential presented by uid {link.peer_uid}, "
                                                       f"issued to uid {expected.uid}")
        if hello.worker_id in self.links:
            return self._refuse(link, hello.worker_id, "worker already connected")
        function = self.functions.get(expected.function)
        if function is None:
            return self._refuse(link, hello.worker_id, "unknown function")
        # Spend the credential: the next connection needs the new one.
        next_token = secrets.token_bytes(32)
        digest = hashlib.sha256(next_token).digest()
        expected.token_digest = digest
        self.outbox(cpb.DataPlaneEvent(session=cpb.WorkerSession(worker_id=hello.worker_id,
                                                                 next_token_digest=digest)))
        link.accept(hello.worker_id, expected.function, function.config.max_body + frames.FRAME_OVERHEAD,
                    next_token)
        link.max_requests = expected.max_requests
        link.limit = 1 if expected.disposable else 0
        self.links[hello.worker_id] = link
        function.pool.add(link)

    def _refuse(self, link: WorkerLink, worker_id: str, reason: str) -> None:
        log.warning("worker refused", worker=worker_id, reason=reason, peer_pid=link.peer_pid)
        link.reject(reason)

    def on_ready(self, link: WorkerLink) -> None:
        function = self.functions[link.function]
        self._hand_over(function, function.pool.ready(link))
        self.outbox(cpb.DataPlaneEvent(ready=cpb.WorkerReady(worker_id=link.worker_id)))
        self.idle_changed.set()
        self._report_demand(function)

    def on_draining(self, link: WorkerLink) -> None:
        function = self.functions[link.function]
        function.pool.drain(link)
        # The answer: every INVOKE for this worker was written before this frame.
        link.send(frames.Kind.DRAIN, 0)

    def on_init_error(self, link: WorkerLink, error: ErrorInfo) -> None:
        function = self.functions[link.function]
        function.pool.drain(link)
        log.error("worker failed to initialize", function=link.function, worker=link.worker_id,
                  error_type=error.error_type, error_message=error.error_message)
        self.outbox(cpb.DataPlaneEvent(init_failed=cpb.WorkerInitFailed(
            worker_id=link.worker_id, error_type=error.error_type, error_message=error.error_message,
            stack_trace=error.stack_trace)))
        link.close()  # tells the worker its error was passed on: it exits now

    def on_protocol_error(self, link: WorkerLink, detail: str) -> None:
        log.warning("worker link protocol error", worker=link.worker_id, function=link.function, error=detail)

    def on_lost(self, link: WorkerLink) -> None:
        if not link.authenticated or self.links.get(link.worker_id) is not link:
            return
        del self.links[link.worker_id]
        function = self.functions.get(link.function)
        if function is not None:
            function.pool.remove(link)
            self._report_demand(function)
        # What it did on this connection: the control plane tells a crash from a crash loop by it.
        self.outbox(cpb.DataPlaneEvent(disconnected=cpb.WorkerDisconnected(
            worker_id=link.worker_id, completed=link.completed, inflight=len(link.pending))))
        if link.pending:
            asyncio.ensure_future(self._fail_pending(link))

    async def _fail_pending(self, link: WorkerLink) -> None:
        cause = self.causes.get(link.worker_id)
        if cause is None:
            await self._wait_keyed(self._lost, link.worker_id, CAUSE_WAIT_S)
            cause = self.causes.get(link.worker_id)
        detail = cause.reason if cause is not None and cause.reason else "connection lost"
        oom = cause is not None and cause.oom
        for call in link.pending.values():
            if not call.future.done():
                call.future.set_exception(errors.worker_crashed(link.function, detail, oom=oom))
        link.pending.clear()

    # ==== the control plane's events ======================================

    def on_control_event(self, event: cpb.ControlEvent) -> None:
        which = event.WhichOneof("event")
        if which == "snapshot":
            self._on_snapshot(event.snapshot)
        elif which == "added":
            self._on_added(event.added)
        elif which == "removed":
            self._on_removed(event.removed)
        elif which == "drain":
            link = self.links.get(event.drain.worker_id)
            if link is not None:
                self.functions[link.function].pool.drain(link)
                link.send(frames.Kind.DRAIN, 0)
        elif which == "health":
            self._on_health(event.health)
        elif which == "config":
            self._on_config(event.config)
        elif which == "report":
            self._report_counts(event.report.seq)

    def _on_config(self, update: cpb.ConfigUpdate) -> None:
        """The control plane runs a reloaded config: take its function table."""
        if update.generation <= self.config.generation:
            return
        try:
            config = parse_config_text(update.toml, Path(update.base_dir), Path(update.path),
                                       generation=update.generation)
        except ConfigError as exc:  # it validated there: only the environment can differ
            log.error("cannot apply the control plane's config", generation=update.generation, error=str(exc))
            return
        for name, fn in config.functions.items():
            function = self.functions.get(name)
            if function is None:
                self.functions[name] = FunctionState(fn, self.metrics.function(name))
            else:
                function.config = fn
                function.removed = False
                self._hand_over(function, function.pool.reconfigure(fn.concurrency, fn.max_queue))
        for name, function in self.functions.items():
            function.removed = name not in config.functions
        self.config = config
        log.info("config applied", generation=config.generation, functions=list(config.functions))

    def _on_snapshot(self, snapshot: cpb.Snapshot) -> None:
        if snapshot.HasField("config"):
            self._on_config(snapshot.config)
        self.expected = {w.worker_id: w for w in snapshot.workers}
        for function in self.functions.values():
            for worker in list(function.pool.workers.values()):
                if not isinstance(worker, WorkerLink) and worker.worker_id not in self.expected:
                    function.pool.remove(worker)  # starting under a control plane that is gone
        for added in snapshot.workers:
            self._on_added(added)
        for worker_id, link in list(self.links.items()):
            if worker_id not in self.expected:
                # A worker the (restarted) control plane does not own: let it finish and go.
                self.functions[link.function].pool.drain(link)
                link.send(frames.Kind.DRAIN, 0)
        for health in snapshot.health:
            self._on_health(health)
        self.snapshot_seen.set()

    def _on_added(self, added: cpb.WorkerAdded) -> None:
        self.expected[added.worker_id] = added
        function = self.functions.get(added.function)
        if function is not None and added.worker_id not in function.pool.workers:
            placeholder = Slotted(added.worker_id, added.function)  # counted as "starting"
            function.pool.add(placeholder)
        self._known(added.worker_id)

    def _known(self, worker_id: str) -> None:
        waiter = self._known_waiters.get(worker_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_removed(self, removed: cpb.WorkerRemoved) -> None:
        self.expected.pop(removed.worker_id, None)
        self.causes[removed.worker_id] = removed
        if len(self.causes) > 1024:  # only recent causes matter
            for key in list(self.causes)[:512]:
                del self.causes[key]
        waiter = self._lost.get(removed.worker_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        for function in self.functions.values():
            worker = function.pool.workers.get(removed.worker_id)
            if worker is not None and not isinstance(worker, WorkerLink):
                function.pool.remove(worker)  # a placeholder that never connected
        link = self.links.get(removed.worker_id)
        if link is not None:
            link.close()  # the process is gone; do not wait for the socket to notice

    def _on_health(self, health: cpb.PoolHealth) -> None:
        function = self.functions.get(health.function)
        if function is None:
            return
        function.health = health
        if health.init_failed and not function.pool.ready_count():
            failure = errors.init_failed(health.function, health.error_type, health.error_message)
            for waiter in function.pool.take_waiters():
                if not waiter.token.done():
                    waiter.token.set_exception(failure)

    # ==== demand ==========================================================

    def _report_demand(self, function: FunctionState, urgent: bool = False) -> None:
        """Tells the control plane about demand, at a bounded rate.

        A queue starting to build is sent at once (scale-out must not wait);
        while it keeps changing, at most every URGENT_INTERVAL_S; anything
        else is left to the reporter task (every DEMAND_INTERVAL_S). Under a
        sustained queue this is a few messages per second, not one per request.
        """
        pool = function.pool
        key = (pool.queue_depth, pool.inflight, len(pool.workers))
        if key == function.demand_sent:
            return
        now = self.loop.time()
        since = now - function.demand_at
        if urgent:
            if function.demand_sent[0] > 0 and since < URGENT_INTERVAL_S:
                return
        elif since < DEMAND_INTERVAL_S:
            return  # the reporter task sends it shortly
        function.demand_sent = key
        function.demand_at = now
        self.outbox(cpb.DataPlaneEvent(demand=self.demand(function)))

    def _report_counts(self, seq: int) -> None:
        """``supervisor status`` asks: every function's counts now, then the answer
        (a worker's ``served`` grows before its invocation's answer is sent)."""
        now = self.loop.time()
        for function in self.functions.values():
            pool = function.pool
            function.demand_sent = (pool.queue_depth, pool.inflight, len(pool.workers))
            function.demand_at = now
            self.outbox(cpb.DataPlaneEvent(demand=self.demand(function)))
        self.outbox(cpb.DataPlaneEvent(reported=cpb.CountsReported(seq=seq)))

    def demand(self, function: FunctionState) -> cpb.Demand:
        pool = function.pool
        return cpb.Demand(
            function=function.config.name, queue_depth=pool.queue_depth, inflight=pool.inflight,
            draining=self.draining, busy_seconds=function.busy_seconds(time.perf_counter()),
            workers=[cpb.WorkerLoad(worker_id=w.worker_id, inflight=w.inflight, served=w.served,
                                    completed=w.completed)
                     for w in pool.workers.values() if isinstance(w, WorkerLink)])

    async def report_demand(self) -> None:
        """Coalesced demand reports, plus a heartbeat so status stays fresh."""
        heartbeat_at = 0.0
        while True:
            await asyncio.sleep(DEMAND_INTERVAL_S)
            now = self.loop.time()
            beat = now - heartbeat_at >= DEMAND_HEARTBEAT_S
            if beat:
                heartbeat_at = now
            for name, function in list(self.functions.items()):
                pool = function.pool
                if function.removed and not pool.queue_depth:
                    if not pool.workers and not function.running:
                        del self.functions[name]  # removed by a reload, and now finished
                        continue
                    self._drain_idle(function)
                key = (pool.queue_depth, pool.inflight, len(pool.workers))
                # While invocations run, every interval: the control plane's water level.
                if beat or key != function.demand_sent or function.running:
                    function.demand_sent = key
                    function.demand_at = now
                    self.outbox(cpb.DataPlaneEvent(demand=self.demand(function)))

    def resend_state(self) -> None:
        """After (re)attaching to a control plane: what this data plane knows."""
        for link in self.links.values():
            self.outbox(cpb.DataPlaneEvent(session=cpb.WorkerSession(
                worker_id=link.worker_id, next_token_digest=self.expected[link.worker_id].token_digest
                if link.worker_id in self.expected else b"")))
            if link.state == WorkerState.READY:
                self.outbox(cpb.DataPlaneEvent(ready=cpb.WorkerReady(worker_id=link.worker_id)))
        for function in self.functions.values():
            function.demand_sent = (-1, -1, -1)

    # ==== lifecycle hooks =================================================

    async def run_hook(self, kind: str, request_id: str, timeout_s: float) -> list[tuple[str, Result]]:
        """Runs ``kind`` (pre_freeze, pre_stop) on every ready worker that has it."""
        calls: list[tuple[str, asyncio.Future[bytes]]] = []
        for function in self.functions.values():
            if not function.config.has_hook(kind):
                continue
            for worker in function.pool.iter_workers():
                if isinstance(worker, WorkerLink) and worker.state in (WorkerState.READY, WorkerState.DRAINING):
                    message = Invoke(request_id=request_id, kind=kind, timeout_ms=int(timeout_s * 1000))
                    calls.append((worker.worker_id, worker.call(message, self.clock.awake() + timeout_s, self.loop)))
        if calls:
            # One deadline for all: the hooks run at once, one per worker.
            await asyncio.wait([future for _, future in calls], timeout=timeout_s)
        results: list[tuple[str, Result]] = []
        for worker_id, future in calls:
            if not future.done():
                future.cancel()
                error = ErrorInfo(error_type="FunctionTimeoutError",
                                  error_message=f"{kind} hook did not finish within {timeout_s:g}s")
                results.append((worker_id, Result(ok=False, error=error)))
            elif future.cancelled() or future.exception() is not None:
                exc = future.exception() if not future.cancelled() else None
                results.append((worker_id, Result(ok=False, error=ErrorInfo(
                    error_type=type(exc).__name__ if exc else "Cancelled", error_message=str(exc or "")))))
            else:
                results.append((worker_id, Result.decode(future.result())))
        return results

    async def wait_idle(self, deadline: float) -> bool:
        """Waits until nothing is in flight or queued, up to ``deadline`` (loop time)."""
        while any(f.pool.inflight or f.pool.queue_depth for f in self.functions.values()):
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return False
            self.idle_changed.clear()
            try:
                await asyncio.wait_for(self.idle_changed.wait(), min(remaining, 0.1))
            except TimeoutError:
                pass
        return True

    def abort_all(self, failure: errors.InvocationError) -> int:
        """Fails every invocation in flight or queued with ``failure`` (the end of a
        stop's grace period): each client gets its answer now. Returns how many."""
        count = 0
        for function in self.functions.values():
            for waiter in function.pool.take_waiters():
                if not waiter.token.done():
                    waiter.token.set_exception(failure)
                    count += 1
        for link in self.links.values():
            for call in link.pending.values():
                if not call.future.done():
                    call.future.set_exception(failure)
                    count += 1
        return count

    # ==== views ===========================================================

    def ready(self) -> bool:
        return not self.draining and all(
            f.pool.ready_count() >= f.min_warm() for f in self.functions.values() if not f.removed)

    def pool_views(self) -> Iterator[PoolView]:
        for name, function in self.functions.items():
            pool = function.pool
            yield name, pool.states(), pool.capacity(), pool.inflight, pool.queue_depth
