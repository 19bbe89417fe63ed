"""supervisor.control.policy: how many workers to have and to retire, the water level, backoff, jitter, load.

Generated cases check the module docstring's rules: never above max_workers,
never below min_warm, never more than the backlog (or the water level) can
use, retire only idle workers down to the floor, no oscillation under a
steady load, a backoff that grows to its cap, a recycle point jittered by up
to 10 %, and a load window that averages a cumulative busy counter.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from supervisor.control.policy import (
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    EXPAND_LEVEL,
    LOAD_WINDOW_S,
    STRATEGIES,
    TARGET_LEVEL,
    LoadWindow,
    PoolFacts,
    WorkerFacts,
    backlog_workers,
    backoff_delay,
    expands,
    floor_workers,
    headroom_workers,
    jittered_max_requests,
    target_workers,
    water_level,
    workers_to_retire,
    workers_to_start,
)

SETTINGS = settings(max_examples=200, deadline=None)


@st.composite
def pool_facts(draw: st.DrawFn, *, failures: st.SearchStrategy[int] | None = None,
               backing_off: st.SearchStrategy[bool] | None = None,
               stopped: st.SearchStrategy[bool] | None = None,
               loaded: bool = False) -> PoolFacts:
    """Any facts; ``loaded`` adds a time-averaged load (often past EXPAND_LEVEL), a peak and the cooldown.

    The peak is at least the load, as LoadWindow.note gives it.
    """
    max_workers = draw(st.integers(0, 16))
    live = draw(st.integers(0, 20))
    starting = draw(st.integers(0, live))
    concurrency = draw(st.integers(1, 8))
    load = peak_load = 0.0
    expand_ready = True
    if loaded:
        ready_slots = max(1, live - starting) * concurrency
        load = draw(st.one_of(
            st.just(0.0),
            st.floats(0.0, 200.0, allow_nan=False, allow_infinity=False),
            st.floats(0.0, 3.0).map(lambda level: level * ready_slots),  # around the water level
        ))
        peak_load = load + draw(st.one_of(st.just(0.0), st.floats(0.0, 100.0)))
        expand_ready = draw(st.booleans())
    return PoolFacts(
        min_warm=draw(st.integers(0, 16)),
        max_workers=max_workers,
        concurrency=concurrency,
        live=live,
        starting=starting,
        inflight=draw(st.integers(0, 100)),
        queued=draw(st.integers(0, 100)),
        failures=draw(failures if failures is not None else st.integers(0, 5)),
        backing_off=draw(backing_off if backing_off is not None else st.booleans()),
        stopped=draw(stopped if stopped is not None else st.booleans()),
        load=load,
        peak_load=peak_load,
        expand_ready=expand_ready,
    )


def healthy_facts(*, loaded: bool = True) -> st.SearchStrategy[PoolFacts]:
    """Not stopped, not backing off, no failures: the pool should reach its target at once."""
    return pool_facts(failures=st.just(0), backing_off=st.just(False), stopped=st.just(False), loaded=loaded)


def facts(**overrides: object) -> PoolFacts:
    base: dict[str, object] = dict(min_warm=1, max_workers=4, concurrency=1, live=0, starting=0,
                                   inflight=0, queued=0)
    base.update(overrides)
    return PoolFacts(**base)  # type: ignore[arg-type]


def needed(f: PoolFacts) -> int:
    return math.ceil((f.inflight + f.queued) / f.concurrency)


# ---- examples ----------------------------------------------------------------


def test_idle_pool_keeps_min_warm() -> None:
    assert workers_to_start(facts(min_warm=2, max_workers=4)) == 2
    assert workers_to_start(facts(min_warm=2, max_workers=4, live=2)) == 0


def test_min_warm_above_max_workers_is_capped() -> None:
    assert target_workers(facts(min_warm=8, max_workers=3)) == 3
    assert workers_to_start(facts(min_warm=8, max_workers=3)) == 3


def test_demand_adds_workers() -> None:
    assert workers_to_start(facts(min_warm=1, max_workers=10, concurrency=2, live=1, inflight=2, queued=3)) == 2


def test_demand_is_capped_by_max_workers() -> None:
    assert workers_to_start(facts(min_warm=0, max_workers=4, live=1, inflight=1, queued=50)) == 3


def test_surplus_workers_are_not_started_negative() -> None:
    assert workers_to_start(facts(min_warm=1, max_workers=4, live=4)) == 0


def test_stopped_pool_starts_nothing_and_targets_zero() -> None:
    stopped = facts(min_warm=3, queued=10, stopped=True)
    assert target_workers(stopped) == 0
    assert workers_to_start(stopped) == 0


def test_backing_off_starts_nothing() -> None:
    assert workers_to_start(facts(min_warm=3, queued=10, failures=2, backing_off=True)) == 0


def test_after_failures_one_probe_starts() -> None:
    assert workers_to_start(facts(min_warm=3, max_workers=4, queued=10, failures=1)) == 1
    assert workers_to_start(facts(min_warm=3, max_workers=4, queued=10, failures=1, live=1, starting=1)) == 0


def test_zero_concurrency_is_treated_as_one() -> None:
    assert target_workers(facts(min_warm=0, max_workers=10, concurrency=0, inflight=3)) == 3


def test_backoff_delay_examples() -> None:
    assert backoff_delay(0) == 0.0
    assert backoff_delay(-3) == 0.0
    assert backoff_delay(1) == BACKOFF_BASE_S
    assert backoff_delay(2) == 2 * BACKOFF_BASE_S
    assert backoff_delay(3) == 4 * BACKOFF_BASE_S
    assert backoff_delay(100) == BACKOFF_MAX_S


def test_backoff_delay_survives_very_many_failures() -> None:
    # PoolRecord.failures grows by one per failed start and is never capped
    # (manager._failed_to_start), so a function that stays broken reaches this.
    for failures in (1024, 1025, 2000, 10**6):
        assert backoff_delay(failures) == BACKOFF_MAX_S, (
            f"backoff_delay({failures}) must stay capped at BACKOFF_MAX_S, not overflow")


# ---- properties ----------------------------------------------------------------


@SETTINGS
@given(pool_facts())
def test_never_above_max_workers(f: PoolFacts) -> None:
    to_start = workers_to_start(f)
    assert to_start >= 0
    if to_start:
        assert f.live + to_start <= f.max_workers
    assert target_workers(f) <= max(0, f.max_workers)


@SETTINGS
@given(pool_facts())
def test_nothing_starts_when_stopped_or_backing_off(f: PoolFacts) -> None:
    if f.stopped or f.backing_off:
        assert workers_to_start(f) == 0


@SETTINGS
@given(pool_facts(failures=st.just(0), backing_off=st.just(False), stopped=st.just(False)))
def test_without_failures_min_warm_is_reached(f: PoolFacts) -> None:
    assert f.live + workers_to_start(f) >= min(f.max_workers, f.min_warm)


@SETTINGS
@given(pool_facts(failures=st.just(0), backing_off=st.just(False), stopped=st.just(False)))
def test_without_failures_demand_is_met_up_to_max_workers(f: PoolFacts) -> None:
    assert f.live + workers_to_start(f) >= min(f.max_workers, needed(f))


@SETTINGS
@given(pool_facts())
def test_never_more_than_the_backlog_can_use(f: PoolFacts) -> None:
    to_start = workers_to_start(f)
    useful = max(f.min_warm, needed(f))
    if to_start and useful <= f.max_workers:
        assert f.live + to_start <= useful


@SETTINGS
@given(pool_facts(failures=st.integers(1, 50)))
def test_with_failures_at_most_one_probe(f: PoolFacts) -> None:
    to_start = workers_to_start(f)
    assert to_start <= 1
    if f.starting:
        assert to_start == 0


@SETTINGS
@given(pool_facts(failures=st.just(0), backing_off=st.just(False)))
def test_steady_load_does_not_oscillate(f: PoolFacts) -> None:
    to_start = workers_to_start(f)
    after = dataclasses.replace(f, live=f.live + to_start, starting=f.starting + to_start)
    assert workers_to_start(after) == 0
    again = dataclasses.replace(after, live=after.live + workers_to_start(after))
    assert target_workers(again) == target_workers(f)


@SETTINGS
@given(pool_facts(failures=st.integers(1, 5), backing_off=st.just(False), stopped=st.just(False)))
def test_probing_converges_one_at_a_time(f: PoolFacts) -> None:
    # Each probe that becomes ready (starting -> 0) lets the next one start, never overshooting.
    f = dataclasses.replace(f, starting=0)
    target = target_workers(f)
    live = f.live
    for _ in range(40):
        to_start = workers_to_start(dataclasses.replace(f, live=live, starting=0))
        assert to_start in (0, 1)
        if not to_start:
            break
        live += 1
    assert live == max(f.live, target)


@SETTINGS
@given(n=st.integers(0, 200), concurrency=st.integers(1, 8), min_warm=st.integers(0, 4),
       max_workers=st.integers(1, 64))
def test_burst_from_idle(n: int, concurrency: int, min_warm: int, max_workers: int) -> None:
    # An idle pool at min_warm sees n concurrent invocations (all queued at first).
    min_warm = min(min_warm, max_workers)
    f = facts(min_warm=min_warm, max_workers=max_workers, concurrency=concurrency,
              live=min_warm, inflight=0, queued=n)
    total = f.live + workers_to_start(f)
    assert total == min(max_workers, max(min_warm, math.ceil(n / concurrency)))
    # As workers come up the queue turns into in-flight work: no further start.
    served = min(n, total * concurrency)
    steady = dataclasses.replace(f, live=total, inflight=served, queued=n - served)
    assert workers_to_start(steady) == 0


@SETTINGS
@given(st.integers(-5, 10**6))
@example(1024)
@example(1025)
def test_backoff_delay_bounded_and_zero_without_failures(failures: int) -> None:
    delay = backoff_delay(failures)
    assert 0.0 <= delay <= BACKOFF_MAX_S
    if failures <= 0:
        assert delay == 0.0
    else:
        assert delay >= min(BACKOFF_BASE_S, BACKOFF_MAX_S)


@SETTINGS
@given(st.integers(-5, 10**6))
def test_backoff_delay_monotone(failures: int) -> None:
    assert backoff_delay(failures) <= backoff_delay(failures + 1)


@SETTINGS
@given(st.integers(1, 10**6))
def test_backoff_delay_doubles_until_the_cap(failures: int) -> None:
    delay, following = backoff_delay(failures), backoff_delay(failures + 1)
    assert following == min(BACKOFF_MAX_S, 2 * delay)


# ==== 1. starting: max_workers, min_warm, the backlog, a burst, stop and backoff, with a load ====


@SETTINGS
@given(pool_facts(loaded=True))
def test_start_never_exceeds_max_workers_and_not_when_stopped_or_backing_off(f: PoolFacts) -> None:
    to_start = workers_to_start(f)
    assert to_start >= 0
    if f.live <= f.max_workers:
        assert f.live + to_start <= f.max_workers
    else:
        assert to_start == 0  # above max_workers (a lowered max): nothing more
    assert 0 <= target_workers(f) <= max(0, f.max_workers)
    if f.stopped or f.backing_off:
        assert to_start == 0
    if f.stopped:
        assert target_workers(f) == 0
        assert floor_workers(f) == 0
        assert not expands(f)


@SETTINGS
@given(healthy_facts())
def test_start_reaches_min_warm_and_the_target_at_once_with_a_load(f: PoolFacts) -> None:
    to_start = workers_to_start(f)
    assert f.live + to_start >= min(f.min_warm, f.max_workers)
    # Several at a time: a healthy pool gets its whole target (and the backlog) in one decision.
    assert f.live + to_start == max(f.live, target_workers(f))
    assert f.live + to_start >= min(f.max_workers, backlog_workers(f))


@SETTINGS
@given(pool_facts(loaded=True))
def test_start_never_more_than_the_backlog_can_use_unless_the_water_level_fires(f: PoolFacts) -> None:
    to_start = workers_to_start(f)
    useful = max(f.min_warm, backlog_workers(f))
    if not expands(f):
        if to_start:
            assert f.live + to_start <= useful
        assert target_workers(f) == min(f.max_workers, useful) or f.stopped
    else:
        # The water level may add headroom, but no more than TARGET_LEVEL asks for.
        assert f.live + to_start <= max(useful, headroom_workers(f.load, f.concurrency))


@SETTINGS
@given(n=st.integers(0, 10_000), concurrency=st.integers(1, 16), min_warm=st.integers(0, 8),
       max_workers=st.integers(1, 256), expand_ready=st.booleans())
@example(n=1, concurrency=1, min_warm=0, max_workers=1, expand_ready=True)
@example(n=7, concurrency=2, min_warm=1, max_workers=3, expand_ready=True)
def test_burst_from_idle_starts_exactly_what_the_burst_needs(n: int, concurrency: int, min_warm: int,
                                                            max_workers: int, expand_ready: bool) -> None:
    # An idle pool (time-averaged load 0) sees n concurrent invocations, all queued.
    min_warm = min(min_warm, max_workers)
    f = facts(min_warm=min_warm, max_workers=max_workers, concurrency=concurrency, live=min_warm,
              inflight=0, queued=n, load=0.0, peak_load=0.0, expand_ready=expand_ready)
    assert workers_to_start(f) == min(max_workers, max(min_warm, math.ceil(n / concurrency))) - min_warm


@SETTINGS
@given(pool_facts(failures=st.integers(1, 10**6), loaded=True))
def test_failures_probe_one_at_a_time_with_a_load(f: PoolFacts) -> None:
    to_start = workers_to_start(f)
    assert to_start in (0, 1)
    if f.starting:
        assert to_start == 0
    if not f.stopped and not f.backing_off and not f.starting and target_workers(f) > f.live:
        assert to_start == 1


# ==== 2. retiring =============================================================================


@st.composite
def retire_cases(draw: st.DrawFn, *, valid: bool = True,
                 stopped: bool | None = None) -> tuple[PoolFacts, list[WorkerFacts], float, str]:
    """Facts, the pool's ready workers (unique ids and sequences), an idle_ttl and a strategy.

    ``valid``: min_warm <= max_workers, as the config (and the scale CLI) demands.
    """
    concurrency = draw(st.integers(1, 4))
    idle_ttl = draw(st.sampled_from([0.0, 1.0, 30.0, 60.0, 90.5]))
    sequences = draw(st.lists(st.integers(0, 10_000), max_size=12, unique=True))  # in no particular order
    n = len(sequences)
    # Per worker: in flight (0 mostly), and how long idle: never, exactly idle_ttl, long, or anything.
    loads = draw(st.lists(st.sampled_from([0, 0, 0, 1, concurrency]), min_size=n, max_size=n))
    idles = draw(st.lists(st.sampled_from([0.0, idle_ttl / 2, idle_ttl, idle_ttl + 0.25, 1e6]),
                          min_size=n, max_size=n))
    workers = [WorkerFacts(worker_id=f"w-{sequence}", sequence=sequence, inflight=inflight,
                           idle_s=0.0 if inflight else idle_s)
               for sequence, inflight, idle_s in zip(sequences, loads, idles)]
    starting = draw(st.integers(0, 3))
    live = n + starting
    max_workers = draw(st.integers(1, 16))
    min_warm = draw(st.one_of(st.integers(0, 2), st.integers(0, max_workers if valid else 16)))
    load = draw(st.one_of(st.just(0.0), st.floats(0.0, 4.0), st.floats(0.0, 40.0)))
    peak_load = load + draw(st.one_of(st.just(0.0), st.floats(0.0, 4.0), st.floats(0.0, 40.0)))  # >= load
    f = PoolFacts(
        min_warm=min_warm, max_workers=max_workers, concurrency=concurrency, live=live, starting=starting,
        inflight=sum(w.inflight for w in workers), queued=draw(st.one_of(st.just(0), st.integers(0, 20))),
        failures=draw(st.sampled_from([0, 0, 0, 2])), backing_off=draw(st.booleans()),
        stopped=draw(st.booleans()) if stopped is None else stopped,
        load=load, peak_load=peak_load, expand_ready=draw(st.booleans()))
    return f, workers, idle_ttl, draw(st.sampled_from(STRATEGIES))


def eligible(workers: Sequence[WorkerFacts], idle_ttl: float) -> list[WorkerFacts]:
    return [w for w in workers if w.inflight == 0 and w.idle_s >= idle_ttl]


RetireCase = tuple[PoolFacts, list[WorkerFacts], float, str]


@SETTINGS
@given(retire_cases(valid=False))
@example((PoolFacts(min_warm=0, max_workers=4, concurrency=1, live=2, starting=0, inflight=0, queued=0),
          [WorkerFacts("a", 1, 0, 60.0), WorkerFacts("b", 2, 0, 59.999)], 60.0, "lcc"))
def test_retire_returns_existing_idle_workers_down_to_the_floor(case: RetireCase) -> None:
    f, workers, idle_ttl, strategy = case
    chosen = workers_to_retire(f, workers, idle_ttl, strategy)
    by_id = {w.worker_id: w for w in workers}
    # Ids that exist, once each; only idle workers, idle for idle_ttl.
    assert len(chosen) == len(set(chosen))
    for worker_id in chosen:
        assert worker_id in by_id
        assert by_id[worker_id].inflight == 0, "a worker with work is never chosen"
        assert by_id[worker_id].idle_s >= idle_ttl, "only workers idle for idle_ttl"
    if f.stopped:
        assert chosen == []  # stopping is not shrinking
        return
    # Never below the floor: min_warm, the backlog, the recent peak's headroom (all capped at max_workers).
    floor = floor_workers(f)
    assert len(chosen) <= max(0, f.live - floor)
    if chosen:
        left = f.live - len(chosen)
        assert left >= floor
        assert left >= min(f.min_warm, f.max_workers)
        assert left >= min(f.max_workers, backlog_workers(f))
        assert left >= min(f.max_workers, headroom_workers(f.peak_load, f.concurrency))
    if f.min_warm <= f.max_workers:  # as the config demands
        assert f.live - len(chosen) >= min(f.min_warm, f.live)
    # And down to it, as far as idle workers allow.
    assert len(chosen) == min(len(eligible(workers, idle_ttl)), max(0, f.live - floor))


@SETTINGS
@given(retire_cases(stopped=False), st.data())
def test_retire_order_follows_the_strategy(case: RetireCase, data: st.DataObject) -> None:
    f, workers, idle_ttl, strategy = case
    # A floor anywhere from none to all: often some idle workers go and some stay.
    f = dataclasses.replace(f, queued=0, load=0.0, peak_load=0.0, max_workers=max(f.max_workers, f.live),
                            min_warm=data.draw(st.integers(0, f.live)))
    chosen_ids = workers_to_retire(f, workers, idle_ttl, strategy)
    by_id = {w.worker_id: w for w in workers}
    chosen = [by_id[i] for i in chosen_ids]
    rest = [w for w in eligible(workers, idle_ttl) if w.worker_id not in set(chosen_ids)]
    if strategy == "fifo":  # oldest (lowest sequence) first
        assert [w.sequence for w in chosen] == sorted(w.sequence for w in chosen)
        assert all(c.sequence < r.sequence for c in chosen for r in rest)
    elif strategy == "filo":  # newest (highest sequence) first
        assert [w.sequence for w in chosen] == sorted((w.sequence for w in chosen), reverse=True)
        assert all(c.sequence > r.sequence for c in chosen for r in rest)
    else:  # lcc: all idle (no current concurrency), then the most recently idle first
        assert [w.idle_s for w in chosen] == sorted(w.idle_s for w in chosen)
        assert all(c.idle_s <= r.idle_s for c in chosen for r in rest)


@pytest.mark.parametrize(("strategy", "expected"), [
    ("fifo", ["a", "b"]),  # lowest sequence first
    ("filo", ["e", "d"]),  # highest sequence first
    ("lcc", ["d", "b"]),  # the smallest idle_s first
])
def test_retire_order_examples(strategy: str, expected: list[str]) -> None:
    workers = [
        WorkerFacts("c", sequence=3, inflight=1, idle_s=0.0),  # busy: never
        WorkerFacts("e", sequence=5, inflight=0, idle_s=70.0),
        WorkerFacts("a", sequence=1, inflight=0, idle_s=500.0),
        WorkerFacts("d", sequence=4, inflight=0, idle_s=61.0),
        WorkerFacts("b", sequence=2, inflight=0, idle_s=65.0),
        WorkerFacts("f", sequence=6, inflight=0, idle_s=10.0),  # not idle for idle_ttl: never
    ]
    f = facts(min_warm=4, max_workers=8, live=6, inflight=1)
    assert workers_to_retire(f, workers, 60.0, strategy) == expected


def test_retire_keeps_the_headroom_of_the_recent_peak() -> None:
    workers = [WorkerFacts(f"w{i}", i, 0, 1e6) for i in range(10)]
    # Load is gone now, but the peak within idle_ttl (6 in flight) needs 10 workers at TARGET_LEVEL.
    f = facts(min_warm=1, max_workers=16, live=10, load=0.0, peak_load=6.0)
    assert headroom_workers(6.0, 1) == 10
    assert workers_to_retire(f, workers, 60.0, "lcc") == []
    f = dataclasses.replace(f, peak_load=3.0)  # 5 workers carry 3 at 0.6
    assert len(workers_to_retire(f, workers, 60.0, "lcc")) == 5


def test_min_warm_above_max_workers_shrinks_to_max_workers() -> None:
    # The config refuses min_warm > max_workers; should facts carry it anyway (a run-time max
    # lowered under min_warm), the floor is capped like the target, so start and retire agree.
    workers = [WorkerFacts(f"w{i}", i, 0, 1e6) for i in range(3)]
    f = facts(min_warm=3, max_workers=2, live=3)
    assert target_workers(f) == floor_workers(f) == 2
    assert workers_to_start(f) == 0
    assert len(workers_to_retire(f, workers, 60.0, "fifo")) == 1


@SETTINGS
@given(retire_cases(valid=False))
def test_never_start_and_retire_at_once(case: RetireCase) -> None:
    # The peak is the highest load within idle_ttl, so it is at least the current load (LoadWindow.note).
    f, workers, idle_ttl, strategy = case
    if workers_to_start(f):
        assert workers_to_retire(f, workers, idle_ttl, strategy) == []
    assert target_workers(f) <= max(floor_workers(f), 0) or f.stopped


# ==== 3. no oscillation under a steady load =====================================================


def simulate(load: float | Sequence[float], concurrency: int, min_warm: int, max_workers: int, live: int,
             strategy: str, *, steps: int = 60, startup_steps: int = 0, cooldown_steps: int = 0,
             idle_ttl_steps: int | None = None) -> list[tuple[int, int, int]]:
    """A pool under a time-averaged load: (live, started, retired) after each step.

    ``load`` is constant, or a sequence repeated over and over. Workers become
    ready ``startup_steps`` after they are started; the water level waits
    ``cooldown_steps`` after growing. The busy workers are ceil(load /
    concurrency) of the ready ones (the oldest), carrying ceil(load) in-flight
    invocations (the rest queued). Without ``idle_ttl_steps`` every other
    ready worker has been idle long and the peak is the load; with it, a
    worker's idle time is counted in steps since it last had work, and the
    peak is the highest load within the last ``idle_ttl_steps`` steps.
    """
    loads = [load] if isinstance(load, float | int) else list(load)
    next_sequence = 0
    ready: dict[int, int] = {}  # sequence -> the last step it had work
    starting: list[tuple[int, int]] = []  # (sequence, ready at step)
    for _ in range(live):
        ready[next_sequence] = 0
        next_sequence += 1
    cooldown_until = 0
    history = []
    seen: list[float] = []
    for step in range(steps):
        for sequence, at in starting:
            if at <= step:
                ready[sequence] = step
        starting = [(sequence, at) for sequence, at in starting if at > step]
        now_load = loads[step % len(loads)]
        seen.append(now_load)
        demand = math.ceil(now_load - 1e-9) if now_load > 0 else 0
        inflight = min(demand, len(ready) * concurrency)
        busy = min(math.ceil(now_load / concurrency - 1e-9) if now_load > 0 else 0, len(ready))
        assert busy * concurrency >= inflight >= busy
        workers = []
        for index, sequence in enumerate(sorted(ready)):
            share = inflight // busy + (1 if index < inflight % busy else 0) if index < busy else 0
            if share:
                ready[sequence] = step
            idle_s = (0.0 if share else 1e6) if idle_ttl_steps is None else float(step - ready[sequence])
            workers.append(WorkerFacts(f"w{sequence}", sequence, share, idle_s))
        peak = now_load if idle_ttl_steps is None else max(seen[-idle_ttl_steps:])
        f = PoolFacts(min_warm=min_warm, max_workers=max_workers, concurrency=concurrency,
                      live=len(ready) + len(starting), starting=len(starting), inflight=inflight,
                      queued=demand - inflight, load=now_load, peak_load=peak,
                      expand_ready=step >= cooldown_until)
        to_start = workers_to_start(f)
        retired = workers_to_retire(f, workers, 60.0 if idle_ttl_steps is None else idle_ttl_steps, strategy)
        assert not (to_start and retired), f"step {step}: starts {to_start} and retires {retired} at once: {f}"
        if to_start and expands(f):
            cooldown_until = step + 1 + cooldown_steps
        for _ in range(to_start):
            if startup_steps:
                starting.append((next_sequence, step + startup_steps))
            else:
                ready[next_sequence] = step
            next_sequence += 1
        for worker_id in retired:
            del ready[int(worker_id[1:])]
        history.append((len(ready) + len(starting), to_start, len(retired)))
    return history


def settled_at(history: list[tuple[int, int, int]]) -> int:
    """The first step from which nothing starts or retires again."""
    moving = [step for step, (_, started, retired) in enumerate(history) if started or retired]
    return moving[-1] + 1 if moving else 0


steady_loads = st.one_of(
    st.just(0.0),
    st.floats(0.0, 100.0, allow_nan=False),
    st.integers(0, 100).map(float),
    st.tuples(st.integers(1, 60), st.sampled_from([EXPAND_LEVEL, TARGET_LEVEL, 0.7])).map(
        lambda nl: nl[0] * nl[1]),  # right at a level's boundary
)


@SETTINGS
@given(load=steady_loads, concurrency=st.integers(1, 8), min_warm=st.integers(0, 8),
       extra=st.integers(0, 64), initial=st.integers(0, 72), strategy=st.sampled_from(STRATEGIES))
@example(load=8.0, concurrency=1, min_warm=1, extra=63, initial=1, strategy="lcc")
@example(load=0.5, concurrency=1, min_warm=0, extra=1, initial=0, strategy="lcc")
def test_steady_load_reaches_a_fixed_point_and_stays(load: float, concurrency: int, min_warm: int, extra: int,
                                                     initial: int, strategy: str) -> None:
    max_workers = max(1, min_warm + extra)
    initial = min(initial, max_workers)
    history = simulate(load, concurrency, min_warm, max_workers, initial, strategy)
    settled = settled_at(history)
    assert settled <= 3, f"still moving at step {settled - 1}: {history[:settled + 1]}"
    live = history[-1][0]
    assert all(size == live for size, _, _ in history[settled:])
    # The fixed point: min_warm, what the backlog needs, and at most the water level's headroom.
    backlog = math.ceil(math.ceil(load - 1e-9) / concurrency) if load > 0 else 0
    low = min(max_workers, max(min_warm, backlog))
    high = min(max_workers, max(min_warm, backlog, headroom_workers(load, concurrency)))
    assert low <= live <= high
    if initial >= high:
        assert live == high  # shrunk to the floor, which the water level's growth equals
    if live < max_workers:
        assert live > 0 or backlog == 0
        if live:
            assert load / (live * concurrency) < EXPAND_LEVEL, "headroom kept under a steady load"


@SETTINGS
@given(load=steady_loads, concurrency=st.integers(1, 8), min_warm=st.integers(0, 8), extra=st.integers(0, 64),
       initial=st.integers(0, 72), strategy=st.sampled_from(STRATEGIES), startup_steps=st.integers(1, 4),
       cooldown_steps=st.integers(0, 4))
def test_steady_load_settles_with_slow_starts_and_a_cooldown(load: float, concurrency: int, min_warm: int,
                                                             extra: int, initial: int, strategy: str,
                                                             startup_steps: int, cooldown_steps: int) -> None:
    max_workers = max(1, min_warm + extra)
    initial = min(initial, max_workers)
    history = simulate(load, concurrency, min_warm, max_workers, initial, strategy, steps=80,
                       startup_steps=startup_steps, cooldown_steps=cooldown_steps)
    settled = settled_at(history)
    assert settled <= 3 * (startup_steps + cooldown_steps + 1), f"still moving: {history[:settled + 1]}"
    assert len(history) - settled >= 50
    live = history[-1][0]
    assert live <= max_workers
    if live < max_workers and live:
        assert load / (live * concurrency) < EXPAND_LEVEL


@settings(max_examples=150, deadline=None)
@given(loads=st.lists(st.floats(0.0, 40.0), min_size=1, max_size=6), concurrency=st.integers(1, 4),
       min_warm=st.integers(0, 4), extra=st.integers(0, 40), initial=st.integers(0, 44),
       strategy=st.sampled_from(STRATEGIES), startup_steps=st.integers(0, 3), cooldown_steps=st.integers(0, 3),
       slack=st.integers(0, 6))
def test_a_load_repeating_within_idle_ttl_settles(loads: list[float], concurrency: int, min_warm: int, extra: int,
                                                 initial: int, strategy: str, startup_steps: int,
                                                 cooldown_steps: int, slack: int) -> None:
    # The load varies, but repeats within idle_ttl: the peak covers it, so after a while nothing moves.
    max_workers = max(1, min_warm + extra)
    history = simulate(loads, concurrency, min_warm, max_workers, min(initial, max_workers), strategy,
                       steps=120, startup_steps=startup_steps, cooldown_steps=cooldown_steps,
                       idle_ttl_steps=len(loads) + slack)
    settled = settled_at(history)
    assert settled <= 60, f"still moving: {history[50:settled + 1]}"


# ==== 4. the water level =======================================================================


@st.composite
def expanding_facts(draw: st.DrawFn) -> PoolFacts:
    """Ready workers at or past EXPAND_LEVEL, past the cooldown, not stopped."""
    concurrency = draw(st.integers(1, 8))
    ready = draw(st.integers(1, 16))
    starting = draw(st.integers(0, 4))
    level = draw(st.one_of(st.just(EXPAND_LEVEL), st.floats(EXPAND_LEVEL, 4.0)))
    max_workers = draw(st.integers(1, 128))
    f = PoolFacts(min_warm=draw(st.integers(0, max_workers)), max_workers=max_workers, concurrency=concurrency,
                  live=ready + starting, starting=starting, inflight=draw(st.integers(0, 64)),
                  queued=draw(st.integers(0, 64)), load=level * ready * concurrency,
                  peak_load=level * ready * concurrency, expand_ready=True)
    assume(water_level(f) >= EXPAND_LEVEL)
    return f


@SETTINGS
@given(expanding_facts())
@example(PoolFacts(min_warm=1, max_workers=8, concurrency=1, live=5, starting=0, inflight=4, queued=0,
                   load=4.0, peak_load=4.0))
def test_past_the_expand_level_the_pool_grows_to_its_headroom(f: PoolFacts) -> None:
    headroom = headroom_workers(f.load, f.concurrency)
    target = target_workers(f)
    assert max(f.live, target) >= min(f.max_workers, headroom)
    assert f.live + workers_to_start(f) >= min(f.max_workers, headroom)
    if f.starting == 0:
        assert expands(f) == (headroom > f.live)
        assert headroom > f.live  # ready slots at >= EXPAND_LEVEL are short of TARGET_LEVEL's
    if expands(f) and headroom <= f.max_workers:
        assert target >= headroom
        assert f.load / (target * f.concurrency) <= TARGET_LEVEL + 1e-9
        grown = dataclasses.replace(f, live=target, starting=0)
        assert not expands(grown), "one growth brings the level under EXPAND_LEVEL"
        assert workers_to_start(grown) == 0


@SETTINGS
@given(pool_facts(loaded=True))
def test_water_level_rule_needs_the_level_and_the_cooldown(f: PoolFacts) -> None:
    if expands(f):
        assert not f.stopped and f.expand_ready
        assert water_level(f) >= EXPAND_LEVEL
        assert headroom_workers(f.load, f.concurrency) > f.live
    if not f.expand_ready or water_level(f) < EXPAND_LEVEL:
        assert not expands(f)
        if not f.stopped:
            assert target_workers(f) == min(f.max_workers, max(f.min_warm, backlog_workers(f)))


@SETTINGS
@given(load=st.floats(0.0, 1e4), concurrency=st.integers(1, 64))
def test_headroom_carries_the_load_at_target_level(load: float, concurrency: int) -> None:
    headroom = headroom_workers(load, concurrency)
    if load / (TARGET_LEVEL * concurrency) <= 1e-9:
        assert headroom == 0  # zero, or a float's dust (policy's _slots_for slack): no worker
        return
    assert headroom >= 1
    assert load / (headroom * concurrency) <= TARGET_LEVEL + 1e-9
    if headroom > 1:  # and not one more than needed
        assert load / ((headroom - 1) * concurrency) > TARGET_LEVEL - 1e-9


def test_water_level_examples() -> None:
    assert water_level(facts(live=0, load=3.0)) == 0.0
    assert water_level(facts(live=2, starting=2, load=3.0)) == 0.0  # none ready
    assert water_level(facts(live=4, starting=2, concurrency=2, load=3.0)) == 0.75
    # 4 in flight on 5 single-slot workers: 0.8, grow to ceil(4 / 0.6) = 7.
    f = facts(min_warm=1, max_workers=10, live=5, inflight=4, load=4.0, peak_load=4.0)
    assert expands(f) and target_workers(f) == 7 and workers_to_start(f) == 2
    assert not expands(dataclasses.replace(f, expand_ready=False))
    assert workers_to_start(dataclasses.replace(f, expand_ready=False)) == 0
    assert target_workers(dataclasses.replace(f, max_workers=6)) == 6
    assert workers_to_start(dataclasses.replace(f, load=3.9)) == 0  # 0.78: under the level


# ==== 5. backoff ===============================================================================


@SETTINGS
@given(st.integers(-10, 10**7), st.integers(-10, 10**7))
def test_backoff_delay_monotone_over_any_pair(a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert 0.0 <= backoff_delay(low) <= backoff_delay(high) <= BACKOFF_MAX_S


# ==== 6. recycle jitter ========================================================================


@SETTINGS
@given(st.integers(-1000, 10**9), st.floats(0.0, 1.0, exclude_max=True))
@example(10, 0.999999999)
@example(15, 0.99)
@example(1, 0.5)
def test_jittered_max_requests_within_ten_percent(max_requests: int, fraction: float) -> None:
    jittered = jittered_max_requests(max_requests, fraction)
    if max_requests <= 0:
        assert jittered == 0
        return
    assert max_requests <= jittered <= max_requests + -(-max_requests // 10)


@SETTINGS
@given(st.integers(1, 10**9), st.floats(allow_nan=False), st.floats(allow_nan=False))
def test_jittered_max_requests_clamps_and_grows_with_the_fraction(max_requests: int, a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert jittered_max_requests(max_requests, low) <= jittered_max_requests(max_requests, high)
    assert jittered_max_requests(max_requests, low) >= max_requests
    assert jittered_max_requests(max_requests, high) <= max_requests + -(-max_requests // 10)


def test_jittered_max_requests_zero_means_never() -> None:
    assert jittered_max_requests(0, 0.5) == 0
    assert jittered_max_requests(-5, 0.5) == 0


@SETTINGS
@given(st.integers(10, 10**9))
def test_jittered_max_requests_spreads_workers(max_requests: int) -> None:
    values = {jittered_max_requests(max_requests, i / 100) for i in range(100)}
    assert len(values) > 1
    assert min(values) == max_requests  # fraction 0: no jitter


# ==== 7. the load window =======================================================================


@SETTINGS
@given(rate=st.floats(0.0, 64.0), dt=st.floats(0.02, 1.0), t0=st.floats(0.0, 1e5),
       covered=st.floats(LOAD_WINDOW_S, 4 * LOAD_WINDOW_S))
def test_load_window_reads_a_steady_rate(rate: float, dt: float, t0: float, covered: float) -> None:
    window = LoadWindow()
    samples = math.ceil((covered + dt) / dt) + 1
    now = t0
    for i in range(samples):
        now = t0 + i * dt
        window.observe(now, rate * i * dt)
    tolerance = 1e-6 * max(1.0, rate)
    assert abs(window.load(now) - rate) <= tolerance  # at a sample
    assert abs(window.load(now) - rate) <= tolerance  # reading again changes nothing
    # Between samples the counter is taken as flat since the last one: short by at most dt / window.
    between = now + dt / 2
    assert rate * (1 - dt / LOAD_WINDOW_S) - tolerance <= window.load(between) <= rate + tolerance


@SETTINGS
@given(rate=st.floats(0.0, 64.0), dt=st.floats(0.02, 1.0), busy_for=st.floats(0.0, 10.0),
       idle_for=st.floats(LOAD_WINDOW_S + 1e-3, 30.0), keep_observing=st.booleans())
def test_load_window_falls_to_zero_after_the_counter_stops(rate: float, dt: float, busy_for: float,
                                                           idle_for: float, keep_observing: bool) -> None:
    window = LoadWindow()
    t = 0.0
    counter = 0.0
    window.observe(t, counter)
    while t < busy_for:
        t += dt
        counter += rate * dt
        window.observe(t, counter)
    stopped_at = t
    if keep_observing:
        while t < stopped_at + idle_for:
            t += dt
            window.observe(t, counter)
    now = max(t, stopped_at + idle_for)
    assert window.load(now) == 0.0


@st.composite
def counter_histories(draw: st.DrawFn) -> list[tuple[float, float]]:
    """(time, busy_seconds) with in-flight at most MAX_INFLIGHT and data plane restarts (counter drops)."""
    t = draw(st.floats(0.0, 1e4))
    counter = draw(st.floats(0.0, 1e4))
    history = [(t, counter)]
    for _ in range(draw(st.integers(1, 30))):
        t += draw(st.floats(0.0, 1.5))
        if draw(st.integers(0, 9)) == 0:
            counter = draw(st.floats(0.0, counter)) if counter > 0 else 0.0  # restarted: began again
        else:
            counter += draw(st.floats(0.0, 1.0)) * MAX_INFLIGHT * (t - history[-1][0])
        history.append((t, counter))
    return history


MAX_INFLIGHT = 50.0


@SETTINGS
@given(counter_histories(), st.floats(0.0, 3.0))
def test_load_window_never_negative_nor_above_the_real_peak(history: list[tuple[float, float]],
                                                           late: float) -> None:
    window = LoadWindow()
    for t, counter in history:
        window.observe(t, counter)
        load = window.load(t)
        assert 0.0 <= load <= MAX_INFLIGHT * (1 + 1e-9) + 1e-9
        later = copy.deepcopy(window).load(t + late * LOAD_WINDOW_S)  # a copy: load() trims what it read past
        assert 0.0 <= later <= MAX_INFLIGHT * (1 + 1e-9) + 1e-9


def test_load_window_restart_examples() -> None:
    window = LoadWindow()
    assert window.load(0.0) == 0.0  # nothing seen yet
    for i in range(11):
        window.observe(i * 0.2, i * 0.2 * 3)  # three in flight
    assert abs(window.load(2.0) - 3.0) < 1e-9
    window.observe(2.1, 0.0)  # the data plane restarted: its counter began again
    assert window.load(2.1) == 0.0
    window.observe(2.2, 0.1 * 3)
    assert 0.0 <= window.load(2.2) <= 3.0
    # One burst right after a restart is not read as a huge average.
    window = LoadWindow()
    window.observe(10.0, 0.0)
    window.observe(10.001, 0.001 * 8)  # 8 in flight for 1 ms
    assert window.load(10.001) <= 8.0 * 0.001 / (LOAD_WINDOW_S / 4) + 1e-12


@SETTINGS
@given(st.lists(st.tuples(st.floats(0.01, 1.0), st.floats(0.0, 20.0)), min_size=1, max_size=60),
       st.floats(0.5, 30.0))
def test_note_peak_covers_the_current_load_and_forgets_old_ones(steps: list[tuple[float, float]],
                                                               keep_s: float) -> None:
    window = LoadWindow()
    t, counter = 0.0, 0.0
    window.observe(t, counter)
    seen: list[tuple[float, float]] = []
    for dt, inflight in steps:
        t += dt
        counter += inflight * dt
        window.observe(t, counter)
        current, peak = window.note(t, keep_s)
        assert current == window.load(t)
        seen.append((t, current))
        assert peak >= current
        assert peak == max(value for when, value in seen if when >= t - keep_s)


def test_note_forgets_a_spike_after_keep_s() -> None:
    window = LoadWindow()
    t, counter = 0.0, 0.0
    window.observe(t, counter)
    peaks = []
    for step in range(200):
        t = step * 0.1
        counter += (10.0 if step < 30 else 0.0) * 0.1  # ten in flight for 3 s, then idle
        window.observe(t, counter)
        peaks.append(window.note(t, 5.0)[1])
    assert max(peaks) >= 9.0
    assert peaks[-1] == 0.0  # the spike is older than keep_s + the window
    assert peaks[80] >= 9.0  # at 8 s the high reading at 3 s (the window still held the spike) is within keep_s
