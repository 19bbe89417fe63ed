"""supervisor.data.dispatcher: which worker takes an invocation, FIFO queue, drain/remove.

Example tests for each rule of the module docstring, then a hypothesis state
machine that drives random sequences of pool events against a plain model and
checks the invariants after every step.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from supervisor.data.dispatcher import PoolDispatch, Slotted, Waiter, WorkerState


def ready_pool(n: int, concurrency: int = 1, max_queue: int = 4) -> tuple[PoolDispatch, list[Slotted]]:
    pool = PoolDispatch("fn", concurrency, max_queue)
    workers = [Slotted(f"w{i}", "fn") for i in range(n)]
    for worker in workers:
        pool.add(worker)
        assert pool.ready(worker) == []
    return pool, workers


def queued(pool: PoolDispatch, count: int, start: float = 0.0) -> list[Waiter]:
    waiters = [Waiter(f"t{i}", start + i) for i in range(count)]
    for waiter in waiters:
        assert pool.acquire() is None
        assert pool.enqueue(waiter)
    return waiters


# ---- workers ---------------------------------------------------------------


def test_new_worker_is_starting_and_takes_nothing() -> None:
    pool = PoolDispatch("fn", 2, 4)
    worker = Slotted("w0", "fn")
    pool.add(worker)
    assert worker.state == WorkerState.STARTING
    assert worker.status == "starting"
    assert pool.acquire() is None
    assert pool.ready_count() == 0
    assert pool.capacity() == 0
    assert pool.states() == {"starting": 1, "idle": 0, "busy": 0, "draining": 0}


def test_ready_worker_takes_up_to_concurrency() -> None:
    pool, (worker,) = ready_pool(1, concurrency=3)
    assert worker.status == "idle"
    assert pool.capacity() == 3
    assert [pool.acquire() for _ in range(3)] == [worker, worker, worker]
    assert worker.inflight == 3 and pool.inflight == 3
    assert worker.status == "busy"
    assert pool.acquire() is None
    assert worker.inflight == 3, "inflight must never exceed concurrency"


def test_ready_registers_a_worker_that_was_not_added() -> None:
    pool = PoolDispatch("fn", 1, 4)
    worker = Slotted("w0", "fn")
    pool.ready(worker)
    assert pool.workers == {"w0": worker}
    assert pool.acquire() is worker


def test_most_recently_freed_worker_is_taken_first() -> None:
    pool, (a, b) = ready_pool(2, concurrency=1)
    assert pool.acquire() is b  # b was listed last
    assert pool.acquire() is a
    pool.release(b, 1.0)
    pool.release(a, 2.0)
    assert pool.acquire() is a  # a freed last
    assert pool.acquire() is b


def test_load_is_packed_onto_few_workers() -> None:
    pool, (a, b) = ready_pool(2, concurrency=2)
    assert pool.acquire() is b
    assert pool.acquire() is b
    assert pool.acquire() is a
    assert pool.states() == {"starting": 0, "idle": 0, "busy": 2, "draining": 0}


def test_drained_worker_takes_nothing_new_and_cannot_become_ready_again() -> None:
    pool, (worker,) = ready_pool(1, concurrency=2)
    assert pool.acquire() is worker
    pool.drain(worker)
    assert worker.state == WorkerState.DRAINING
    assert worker.status == "draining"
    assert pool.acquire() is None
    assert pool.ready(worker) == []
    assert worker.state == WorkerState.DRAINING
    assert pool.ready_count() == 0
    waiter = queued(pool, 1)[0]
    assert pool.release(worker, 5.0) == [], "a draining worker's freed slot must not go to the queue"
    assert worker.inflight == 0 and pool.inflight == 0
    assert worker.served == 1
    assert pool.queue_depth == 1
    assert not waiter.cancelled


def test_drain_of_a_gone_worker_keeps_it_gone() -> None:
    pool, (worker,) = ready_pool(1)
    pool.remove(worker)
    pool.drain(worker)
    assert worker.state == WorkerState.GONE


def test_remove_forgets_the_worker_and_its_inflight() -> None:
    pool, (a, b) = ready_pool(2, concurrency=2)
    assert pool.acquire() is b
    assert pool.acquire() is b
    assert pool.acquire() is a
    pool.remove(b)
    assert b.state == WorkerState.GONE
    assert b.inflight == 0
    assert pool.inflight == 1
    assert "w1" not in pool.workers
    # The caller fails b's invocations; a late release or give_back changes nothing.
    assert pool.release(b, 1.0) == []
    assert pool.give_back(b) == []
    assert pool.inflight == 1 and b.inflight == 0 and b.served == 0
    assert pool.ready(b) == []
    assert pool.acquire() is a
    assert pool.acquire() is None


def test_remove_keeps_a_replacement_registered_under_the_same_id() -> None:
    pool = PoolDispatch("fn", 1, 4)
    placeholder = Slotted("w0", "fn")
    pool.add(placeholder)
    link = Slotted("w0", "fn")
    pool.add(link)
    pool.remove(placeholder)
    assert pool.workers == {"w0": link}


# ---- the queue -------------------------------------------------------------


def test_acquire_returns_none_while_anybody_is_queued() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1)
    assert pool.acquire() is worker
    waiters = queued(pool, 1)
    assignments = pool.release(worker, 1.0)
    assert assignments == [(waiters[0], worker)]
    assert pool.queue_depth == 0
    # The queue is empty again: a new arrival takes a free slot directly.
    pool.release(worker, 2.0)
    assert pool.acquire() is worker


def test_queue_is_bounded_by_max_queue() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1, max_queue=2)
    pool.acquire()
    assert pool.enqueue(Waiter("a", 0.0))
    assert pool.enqueue(Waiter("b", 0.0))
    assert not pool.enqueue(Waiter("c", 0.0))
    assert pool.queue_depth == 2


def test_max_queue_zero_rejects_every_waiter() -> None:
    pool = PoolDispatch("fn", 1, 0)
    assert not pool.enqueue(Waiter("a", 0.0))
    assert pool.queue_depth == 0


def test_waiters_are_served_first_in_first_out() -> None:
    pool, (a, b) = ready_pool(2, concurrency=1, max_queue=10)
    pool.acquire()
    pool.acquire()
    waiters = queued(pool, 4)
    served: list[Waiter] = []
    served += [w for w, _ in pool.release(a, 1.0)]
    served += [w for w, _ in pool.release(b, 2.0)]
    served += [w for w, _ in pool.release(a, 3.0)]
    served += [w for w, _ in pool.release(b, 4.0)]
    assert served == waiters


def test_freed_slot_is_handed_over_without_leaving_the_worker() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1)
    pool.acquire()
    (waiter,) = queued(pool, 1)
    assert pool.release(worker, 7.5) == [(waiter, worker)]
    assert worker.inflight == 1 and pool.inflight == 1
    assert worker.served == 1
    assert worker.last_used == 7.5


def test_cancelled_waiter_no_longer_counts_and_is_never_served() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1, max_queue=2)
    pool.acquire()
    first, second = queued(pool, 2)
    pool.cancel(first)
    assert first.cancelled
    assert pool.queue_depth == 1
    pool.cancel(first)  # idempotent
    assert pool.queue_depth == 1
    assert pool.enqueue(Waiter("third", 3.0)), "a cancelled waiter must free its queue place"
    assert pool.release(worker, 1.0) == [(second, worker)]


def test_cancelling_every_waiter_lets_arrivals_take_slots_directly() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1)
    pool.acquire()
    (waiter,) = queued(pool, 1)
    pool.cancel(waiter)
    assert pool.queue_depth == 0
    assert pool.release(worker, 1.0) == []
    assert pool.acquire() is worker


def test_ready_serves_queued_waiters_first() -> None:
    pool = PoolDispatch("fn", 2, 10)
    worker = Slotted("w0", "fn")
    pool.add(worker)
    waiters = queued(pool, 3)
    assignments = pool.ready(worker)
    assert assignments == [(waiters[0], worker), (waiters[1], worker)]
    assert worker.inflight == 2
    assert pool.queue_depth == 1
    assert pool.acquire() is None


def test_ready_twice_does_not_double_list() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1)
    assert pool.ready(worker) == []
    assert pool.acquire() is worker
    assert pool.acquire() is None


def test_give_back_returns_an_unused_slot_to_the_next_waiter() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1)
    pool.acquire()
    first, second = queued(pool, 2)
    assert pool.release(worker, 1.0) == [(first, worker)]
    # first's client left after the assignment: the slot goes to second.
    assert pool.give_back(worker) == [(second, worker)]
    assert worker.served == 1, "give_back must not count as served"
    assert worker.inflight == 1 and pool.inflight == 1


def test_give_back_with_empty_queue_frees_the_slot() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1)
    pool.acquire()
    assert pool.give_back(worker) == []
    assert worker.inflight == 0 and pool.inflight == 0
    assert pool.acquire() is worker


def test_expire_removes_old_waiters_oldest_first() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1, max_queue=10)
    pool.acquire()
    waiters = queued(pool, 5, start=10.0)  # enqueued at 10, 11, 12, 13, 14
    pool.cancel(waiters[1])
    expired = pool.expire(13.0)
    assert expired == [waiters[0], waiters[2]]
    assert all(w.cancelled for w in expired)
    assert pool.queue_depth == 2
    assert pool.expire(13.0) == []
    assert pool.release(worker, 20.0) == [(waiters[3], worker)]


def test_expire_with_nothing_old_enough_keeps_the_queue() -> None:
    pool, _ = ready_pool(1, concurrency=1)
    pool.acquire()
    waiters = queued(pool, 2, start=5.0)
    assert pool.expire(5.0) == []  # strictly older than
    assert pool.queue_depth == 2
    assert not any(w.cancelled for w in waiters)


def test_cancel_after_expire_does_not_count_twice() -> None:
    pool, _ = ready_pool(1, concurrency=1)
    pool.acquire()
    (waiter,) = queued(pool, 1)
    assert pool.expire(100.0) == [waiter]
    pool.cancel(waiter)
    assert pool.queue_depth == 0


def test_take_waiters_empties_the_queue() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1, max_queue=10)
    pool.acquire()
    waiters = queued(pool, 3)
    pool.cancel(waiters[1])
    assert pool.take_waiters() == [waiters[0], waiters[2]]
    assert all(w.cancelled for w in waiters)
    assert pool.queue_depth == 0
    assert pool.release(worker, 1.0) == []
    assert pool.acquire() is worker


def test_cancel_of_a_served_waiter_changes_nothing() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1, max_queue=10)
    pool.acquire()
    first, second = queued(pool, 2)
    assert pool.release(worker, 1.0) == [(first, worker)]
    assert pool.queue_depth == 1
    assert first.served and not second.served
    # The client of `first` leaves after the assignment (its task was cancelled
    # after, or just before, the hand-over): the router calls cancel, then give_back.
    pool.cancel(first)
    assert pool.queue_depth == 1, (
        "PoolDispatch.cancel() on a waiter already handed a slot must not count it again "
        f"(queue_depth is {pool.queue_depth}; the still-queued waiter would no longer be counted)")
    assert pool.give_back(worker) == [(second, worker)]
    assert pool.queue_depth == 0
    pool.cancel(second)
    assert pool.queue_depth == 0


# ---- reconfiguration -------------------------------------------------------


def test_raising_concurrency_serves_the_queue() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1, max_queue=10)
    pool.acquire()
    waiters = queued(pool, 3)
    assignments = pool.reconfigure(3, 10)
    assert assignments == [(waiters[0], worker), (waiters[1], worker)]
    assert worker.inflight == 3
    assert pool.queue_depth == 1


def test_lowering_concurrency_takes_nothing_until_below_it() -> None:
    pool, (worker,) = ready_pool(1, concurrency=3, max_queue=10)
    for _ in range(3):
        pool.acquire()
    assert pool.reconfigure(1, 10) == []
    assert pool.capacity() == 1
    assert pool.acquire() is None
    pool.release(worker, 1.0)
    assert worker.inflight == 2
    assert pool.acquire() is None, "a worker above the lowered concurrency must take nothing"
    pool.release(worker, 2.0)
    assert pool.acquire() is None
    pool.release(worker, 3.0)
    assert worker.inflight == 0
    assert pool.acquire() is worker
    assert pool.acquire() is None


def test_lowering_max_queue_keeps_existing_waiters_and_rejects_new_ones() -> None:
    pool, (worker,) = ready_pool(1, concurrency=1, max_queue=5)
    pool.acquire()
    waiters = queued(pool, 4)
    assert pool.reconfigure(1, 2) == []
    assert pool.queue_depth == 4
    assert not pool.enqueue(Waiter("late", 9.0))
    assert pool.release(worker, 1.0) == [(waiters[0], worker)]


# ---- the state machine -----------------------------------------------------


class DispatchMachine(RuleBasedStateMachine):
    """Random pool events against a model of slots and the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = PoolDispatch("fn", 2, 3)
        self.in_pool: list[Slotted] = []
        self.removed: list[Slotted] = []
        self.slots: Counter[str] = Counter()  # worker_id -> outstanding slots (acquired or assigned)
        self.queue: list[Waiter] = []  # live waiters, in arrival order
        self.dead_waiters: list[Waiter] = []  # cancelled, expired or taken
        self.served_waiters: list[Waiter] = []  # given a slot
        self.served: Counter[str] = Counter()
        self.now = 0.0
        self.next_id = 0
        self.before: dict[str, int] = {}

    # ---- helpers ---------------------------------------------------------

    def snapshot(self) -> None:
        self.before = {w.worker_id: w.inflight for w in self.in_pool}

    def check_growth(self) -> None:
        """A worker's inflight only grows while below concurrency."""
        for worker in self.in_pool:
            before = self.before.get(worker.worker_id, 0)
            if worker.inflight > before:
                assert worker.inflight <= self.pool.concurrency, (
                    f"{worker.worker_id} was given slots up to {worker.inflight} > concurrency "
                    f"{self.pool.concurrency}")

    def apply(self, assignments: list[tuple[Waiter, Slotted]]) -> None:
        count = len(assignments)
        assert [w for w, _ in assignments] == self.queue[:count], "waiters must be served strictly FIFO"
        for waiter, worker in assignments:
            assert not waiter.cancelled, "a cancelled waiter was served"
            assert waiter.served
            self.served_waiters.append(waiter)
            assert worker.state == WorkerState.READY, f"waiter assigned to a {worker.state} worker"
            assert worker in self.in_pool, "waiter assigned to a worker not in the pool"
            self.slots[worker.worker_id] += 1
        del self.queue[:count]

    # ---- workers ---------------------------------------------------------

    @initialize(concurrency=st.integers(1, 3), max_queue=st.integers(0, 4), ready=st.integers(0, 3))
    def start(self, concurrency: int, max_queue: int, ready: int) -> None:
        self.pool = PoolDispatch("fn", concurrency, max_queue)
        for _ in range(ready):
            self.add_worker(True)

    @precondition(lambda self: len(self.in_pool) < 5)
    @rule(ready=st.booleans())
    def add_worker(self, ready: bool) -> None:
        worker = Slotted(f"w{self.next_id}", "fn")
        self.next_id += 1
        self.pool.add(worker)
        self.in_pool.append(worker)
        assert worker.state == WorkerState.STARTING
        if ready:
            self.snapshot()
            self.apply(self.pool.ready(worker))
            self.check_growth()

    @precondition(lambda self: self.in_pool)
    @rule(data=st.data())
    def make_ready(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from(self.in_pool))
        was = worker.state
        self.snapshot()
        assignments = self.pool.ready(worker)
        if was == WorkerState.DRAINING:
            assert assignments == [] and worker.state == WorkerState.DRAINING
        else:
            assert worker.state == WorkerState.READY
        self.apply(assignments)
        self.check_growth()

    @precondition(lambda self: self.in_pool)
    @rule(data=st.data(), gone=st.booleans())
    def retire(self, data: st.DataObject, gone: bool) -> None:
        """A worker drains (takes nothing new), or is gone (its invocations are the caller's to fail)."""
        worker = data.draw(st.sampled_from(self.in_pool))
        if not gone:
            self.pool.drain(worker)
            assert worker.state == WorkerState.DRAINING
            return
        self.pool.remove(worker)
        assert worker.state == WorkerState.GONE and worker.inflight == 0
        self.in_pool.remove(worker)
        self.removed.append(worker)
        del self.slots[worker.worker_id]

    # ---- invocations -----------------------------------------------------

    @rule()
    def arrive(self) -> None:
        depth = self.pool.queue_depth
        self.snapshot()
        worker = self.pool.acquire()
        if depth:
            assert worker is None, "acquire must return None while waiters are queued"
        if worker is not None:
            assert worker.state == WorkerState.READY and worker in self.in_pool
            self.slots[worker.worker_id] += 1
            self.check_growth()
            return
        self.now += 1.0
        waiter = Waiter(object(), self.now)
        accepted = self.pool.enqueue(waiter)
        assert accepted == (depth < self.pool.max_queue)
        if accepted:
            self.queue.append(waiter)
        else:
            assert self.pool.queue_depth == depth

    @precondition(lambda self: self.queue or self.dead_waiters or self.served_waiters)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """A waiter's client leaves: a queued one stops counting; a dead or served one changes nothing."""
        waiter = data.draw(st.sampled_from(self.queue + self.dead_waiters + self.served_waiters))
        self.pool.cancel(waiter)
        if waiter in self.served_waiters:
            return  # queue_depth is checked by the invariants
        assert waiter.cancelled
        if waiter in self.queue:
            self.queue.remove(waiter)
            self.dead_waiters.append(waiter)

    def busy_workers(self) -> list[Slotted]:
        return [w for w in self.in_pool if self.slots[w.worker_id] > 0]

    @precondition(lambda self: self.busy_workers())
    @rule(data=st.data(), used=st.booleans())
    def finish(self, data: st.DataObject, used: bool) -> None:
        """An invocation ends (release), or an assigned slot goes unused (give_back)."""
        worker = data.draw(st.sampled_from(self.busy_workers()))
        self.now += 0.5
        self.snapshot()
        if used:
            assignments = self.pool.release(worker, self.now)
            self.served[worker.worker_id] += 1
            assert worker.last_used == self.now
        else:
            assignments = self.pool.give_back(worker)
        self.slots[worker.worker_id] -= 1
        if worker.state != WorkerState.READY:
            assert assignments == []
        self.apply(assignments)
        self.check_growth()

    @precondition(lambda self: self.removed)
    @rule(data=st.data())
    def late_events_on_gone(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from(self.removed))
        inflight = self.pool.inflight
        assert self.pool.ready(worker) == []
        assert self.pool.release(worker, self.now) == []
        assert self.pool.give_back(worker) == []
        self.pool.drain(worker)
        assert worker.state == WorkerState.GONE and worker.inflight == 0
        assert worker.worker_id not in self.pool.workers
        assert self.pool.inflight == inflight

    @rule(age=st.floats(min_value=0.0, max_value=10.0), everything=st.booleans())
    def time_out_waiters(self, age: float, everything: bool) -> None:
        """The sweep expires old waiters, or a failing pool answers them all."""
        if everything:
            taken = self.pool.take_waiters()
            assert taken == self.queue
            self.dead_waiters += taken
            self.queue = []
            return
        older_than = self.now - age
        expected = [w for w in self.queue if w.enqueued_at < older_than]
        expired = self.pool.expire(older_than)
        assert expired == expected
        for waiter in expired:
            assert waiter.cancelled
            self.queue.remove(waiter)
            self.dead_waiters.append(waiter)

    @rule(concurrency=st.integers(1, 4), max_queue=st.integers(0, 5))
    def reconfigure(self, concurrency: int, max_queue: int) -> None:
        self.snapshot()
        assignments = self.pool.reconfigure(concurrency, max_queue)
        assert self.pool.concurrency == concurrency and self.pool.max_queue == max_queue
        self.apply(assignments)
        self.check_growth()

    # ---- invariants ------------------------------------------------------

    @invariant()
    def counts_match_the_model(self) -> None:
        pool = self.pool
        for worker in self.in_pool:
            assert worker.inflight == self.slots[worker.worker_id], worker.worker_id
            assert worker.inflight >= 0
            assert worker.served == self.served[worker.worker_id]
            assert pool.workers[worker.worker_id] is worker
        assert set(pool.workers) == {w.worker_id for w in self.in_pool}
        assert pool.inflight == sum(w.inflight for w in self.in_pool)
        assert pool.queue_depth == len(self.queue)
        assert pool.queue_depth >= 0
        for worker in self.removed:
            assert worker.state == WorkerState.GONE and worker.inflight == 0

    @invariant()
    def queue_within_bound(self) -> None:
        # Only a reconfigure that lowers max_queue leaves more than it; then
        # enqueue refuses (checked in ``arrive``) until the queue shrinks.
        if self.pool.queue_depth > self.pool.max_queue:
            assert not self.pool.enqueue(Waiter("probe", self.now))

    @invariant()
    def no_idle_capacity_while_queued(self) -> None:
        if self.pool.queue_depth:
            for worker in self.in_pool:
                if worker.state == WorkerState.READY:
                    assert worker.inflight >= self.pool.concurrency, (
                        f"{worker.worker_id} is READY with {worker.inflight} < {self.pool.concurrency} "
                        f"in flight while {self.pool.queue_depth} waiters are queued")

    @invariant()
    def free_capacity_is_taken(self) -> None:
        """A READY worker below concurrency must be reachable by acquire (it is on the free stack)."""
        for worker in self.in_pool:
            if worker.state == WorkerState.READY and worker.inflight < self.pool.concurrency:
                assert worker.listed, f"{worker.worker_id} has free slots but is not on the free stack"

    @invariant()
    def states_add_up(self) -> None:
        states = self.pool.states()
        assert sum(states.values()) == len(self.in_pool)
        assert self.pool.ready_count() == sum(1 for w in self.in_pool if w.state == WorkerState.READY)
        assert self.pool.capacity() == self.pool.ready_count() * self.pool.concurrency


DispatchMachine.TestCase.settings = settings(
    max_examples=250, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestDispatchMachine = DispatchMachine.TestCase
