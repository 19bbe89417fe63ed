"""Which worker takes an invocation, what waits, what is turned away.

Pure bookkeeping in the manner of httpcore's connection pool: no I/O, no
event loop. The async layer (``router.py``) asks and executes; these classes
only count.

Rules and invariants, per function:
- A worker takes work only when it is READY and has fewer than
  ``concurrency`` invocations in flight. ``inflight`` never exceeds
  ``concurrency`` and never goes negative.
- Free workers are kept on a stack: the most recently freed worker is taken
  first, which packs the load onto few workers so that the surplus ones go
  idle and can be retired, and keeps the busy ones' caches warm.
- Waiters are served strictly first-in first-out. At most ``max_queue`` live
  waiters; beyond that an invocation is rejected. A cancelled waiter (its
  client left, or it waited too long) no longer counts and is never served.
- Whenever a slot frees or a worker becomes ready, queued waiters are given
  slots before any new arrival could take them (a new arrival only takes a
  slot directly when nobody is queued).
- A worker with a ``limit`` (a disposable one: 1) is given at most that
  many invocations in its life.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any


class WorkerState:
    STARTING = "starting"  # known (spawned), not yet ready
    READY = "ready"  # takes work: idle or busy by its in-flight count
    DRAINING = "draining"  # finishing what it has, takes nothing new
    GONE = "gone"


class Slotted:
    """The dispatcher's view of one worker (the link subclasses it)."""

    __slots__ = ("worker_id", "function", "state", "inflight", "served", "listed", "last_used", "limit", "taken")

    def __init__(self, worker_id: str, function: str) -> None:
        self.worker_id = worker_id
        self.function = function
        self.state = WorkerState.STARTING
        self.inflight = 0
        self.served = 0
        self.listed = False  # on the free stack
        self.last_used = 0.0
        self.limit = 0  # invocations it may ever take (0: no limit)
        self.taken = 0

    @property
    def status(self) -> str:
        """The contract's worker state: starting | idle | busy | draining."""
        if self.state == WorkerState.READY:
            return "busy" if self.inflight else "idle"
        if self.state == WorkerState.STARTING:
            return "starting"
        return "draining"


class Waiter:
    """A queued invocation; ``token`` is the async layer's (a future)."""

    __slots__ = ("token", "cancelled", "served", "enqueued_at")

    def __init__(self, token: Any, enqueued_at: float) -> None:
        self.token = token
        self.cancelled = False
        self.served = False  # given a slot: no longer counted in the queue
        self.enqueued_at = enqueued_at


Assignment = tuple[Waiter, Slotted]


class PoolDispatch:
    """One function's workers and queue."""

    def __init__(self, function: str, concurrency: int, max_queue: int) -> None:
        self.function = function
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.workers: dict[str, Slotted] = {}
        self._free: list[Slotted] = []
        self._waiters: deque[Waiter] = deque()
        self.queue_depth = 0  # live waiters
        self.inflight = 0

    # ---- configuration ---------------------------------------------------

    def reconfigure(self, concurrency: int, max_queue: int) -> list[Assignment]:
        self.concurrency = concurrency
        self.max_queue = max_queue
        for worker in self.workers.values():
            self._list(worker)
        return self._drain_queue()

    # ---- workers ---------------------------------------------------------

    def add(self, worker: Slotted) -> None:
        self.workers[worker.worker_id] = worker

    def ready(self, worker: Slotted) -> list[Assignment]:
        """``worker`` is ready for work: queued waiters get it first."""
        if worker.state not in (WorkerState.STARTING, WorkerState.READY):
            return []
        self.workers[worker.worker_id] = worker
        worker.state = WorkerState.READY
        self._list(worker)
        return self._drain_queue()

    def drain(self, worker: Slotted) -> None:
        """``worker`` takes nothing new (it is draining or being killed)."""
        if worker.state != WorkerState.GONE:
            worker.state = WorkerState.DRAINING

    def remove(self, worker: Slotted) -> None:
        """``worker`` is gone; its in-flight invocations are the caller's to fail."""
        if self.workers.get(worker.worker_id) is worker:
            del self.workers[worker.worker_id]
        self.inflight -= worker.inflight
        worker.inflight = 0
        worker.state = WorkerState.GONE

    # ---- invocations -----------------------------------------------------

    def acquire(self) -> Slotted | None:
        """A slot for a new arrival, or None (then ``enqueue`` it)."""
        if self.queue_depth:
            return None  # first come, first served
        return self._take_free()

    def enqueue(self, waiter: Waiter) -> bool:
        """Queues ``waiter``; False when the queue is full (reject it)."""
        if self.queue_depth >= self.max_queue:
            return False
        self._waiters.append(waiter)
        self.queue_depth += 1
        return True

    def cancel(self, waiter: Waiter) -> None:
        """``waiter`` left the queue (a no-op once it was served)."""
        if not waiter.cancelled and not waiter.served:
            waiter.cancelled = True
            self.queue_depth -= 1

    def release(self, worker: Slotted, now: float) -> list[Assignment]:
        """An invocation on ``worker`` ended; the slot goes to the queue first."""
        if worker.state == WorkerState.GONE:
            return []
        worker.served += 1
        worker.last_used = now
        return self._free_slot(worker)

    def give_back(self, worker: Slotted) -> list[Assignment]:
        """Returns a slot that was assigned but not used (its waiter had left)."""
        if worker.state == WorkerState.GONE:
            return []
        worker.taken -= 1  # not used: it does not count against the worker's limit
        return self._free_slot(worker)

    def _free_slot(self, worker: Slotted) -> list[Assignment]:
        worker.inflight -= 1
        self.inflight -= 1
        self._list(worker)
        return self._drain_queue()

    def expire(self, older_than: float) -> list[Waiter]:
        """Removes the waiters queued before ``older_than`` (oldest are first)."""
        expired: list[Waiter] = []
        waiters = self._waiters
        while waiters and (waiters[0].cancelled or waiters[0].enqueued_at < older_than):
            waiter = waiters.popleft()
            if not waiter.cancelled:
                waiter.cancelled = True
                self.queue_depth -= 1
                expired.append(waiter)
        return expired

    def take_waiters(self) -> list[Waiter]:
        """Empties the queue (a failing pool): the caller answers them all."""
        live = [w for w in self._waiters if not w.cancelled]
        for waiter in live:
            waiter.cancelled = True
        self._waiters.clear()
        self.queue_depth = 0
        return live

    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.state == WorkerState.READY)

    def capacity(self) -> int:
        return self.ready_count() * self.concurrency

    def states(self) -> dict[str, int]:
        counts = {"starting": 0, "idle": 0, "busy": 0, "draining": 0}
        for worker in self.workers.values():
            counts[worker.status] += 1
        return counts

    # ---- internals -------------------------------------------------------

    def _list(self, worker: Slotted) -> None:
        if (not worker.listed and worker.state == WorkerState.READY and worker.inflight < self.concurrency
                and not (worker.limit and worker.taken >= worker.limit)):
            worker.listed = True
            self._free.append(worker)

    def _drain_queue(self) -> list[Assignment]:
        assignments: list[Assignment] = []
        waiters = self._waiters
        while waiters and self.queue_depth:
            if waiters[0].cancelled:
                waiters.popleft()
                continue
            worker = self._take_free()
            if worker is None:
                break
            waiter = waiters.popleft()
            waiter.served = True
            self.queue_depth -= 1
            assignments.append((waiter, worker))
        while waiters and waiters[0].cancelled:
            waiters.popleft()
        return assignments

    def _take_free(self) -> Slotted | None:
        free = self._free
        while free:
            worker = free[-1]
            if (worker.state != WorkerState.READY or worker.inflight >= self.concurrency
                    or (worker.limit and worker.taken >= worker.limit)):
                free.pop()
                worker.listed = False
                continue
            worker.inflight += 1
            self.inflight += 1
            worker.taken += 1
            if worker.inflight >= self.concurrency or (worker.limit and worker.taken >= worker.limit):
                free.pop()
                worker.listed = False
            return worker
        return None

    def iter_workers(self) -> Iterator[Slotted]:
        return iter(list(self.workers.values()))
