"""supervisor.control.policy: how many workers to start, and the failure backoff."""

from __future__ import annotations

import dataclasses
import math

from hypothesis import example, given, settings
from hypothesis import strategies as st

from supervisor.control.policy import (
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    PoolFacts,
    backoff_delay,
    target_workers,
    workers_to_start,
)

SETTINGS = settings(max_examples=300, deadline=None)


@st.composite
def pool_facts(draw: st.DrawFn, *, failures: st.SearchStrategy[int] | None = None,
               backing_off: st.SearchStrategy[bool] | None = None,
               stopped: st.SearchStrategy[bool] | None = None) -> PoolFacts:
    max_workers = draw(st.integers(0, 16))
    live = draw(st.integers(0, 20))
    return PoolFacts(
        min_warm=draw(st.integers(0, 16)),
        max_workers=max_workers,
        concurrency=draw(st.integers(1, 8)),
        live=live,
        starting=draw(st.integers(0, live)),
        inflight=draw(st.integers(0, 100)),
        queued=draw(st.integers(0, 100)),
        failures=draw(failures if failures is not None else st.integers(0, 5)),
        backing_off=draw(backing_off if backing_off is not None else st.booleans()),
        stopped=draw(stopped if stopped is not None else st.booleans()),
    )


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
