"""supervisor.clock: awake time, driven with explicit ``now`` values."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.clock import AwakeClock


def started(max_gap: float = 2.0) -> tuple[AwakeClock, float, float]:
    """A clock with a first note at a known time: (clock, t0, awake at t0)."""
    clock = AwakeClock(tick=0.25, max_gap=max_gap)
    t0 = time.monotonic()  # at or just after the clock's own start: a gap of microseconds
    return clock, t0, clock.note(t0)


def test_fresh_clock_is_near_zero() -> None:
    clock, _, awake0 = started()
    assert 0.0 <= awake0 < 0.5
    assert clock.frozen_total == 0.0


def test_normal_ticks_accumulate() -> None:
    clock, t0, a0 = started()
    for i in range(1, 9):
        clock.note(t0 + 0.25 * i)
    assert clock.note(t0 + 2.0) - a0 == pytest.approx(2.0)
    assert clock.frozen_total == 0.0


def test_gap_of_exactly_max_gap_counts_fully() -> None:
    clock, t0, a0 = started(max_gap=2.0)
    assert clock.note(t0 + 2.0) - a0 == pytest.approx(2.0)
    assert clock.frozen_total == 0.0


def test_large_gap_counts_as_max_gap_and_adds_to_frozen_total() -> None:
    clock, t0, a0 = started(max_gap=2.0)
    assert clock.note(t0 + 3600.0) - a0 == pytest.approx(2.0)
    assert clock.frozen_total == pytest.approx(3598.0)
    assert clock.note(t0 + 3600.5) - a0 == pytest.approx(2.5)
    assert clock.frozen_total == pytest.approx(3598.0)


def test_awake_between_notes_counts_at_most_max_gap() -> None:
    clock, t0, a0 = started(max_gap=2.0)
    clock.note(t0 + 1.0)
    assert clock.awake(t0 + 1.5) - a0 == pytest.approx(1.5)
    assert clock.awake(t0 + 100.0) - a0 == pytest.approx(3.0)
    assert clock.frozen_total == 0.0, "awake() must not record anything"
    assert clock.note(t0 + 1.5) - a0 == pytest.approx(1.5)


def test_time_never_goes_backwards() -> None:
    clock, t0, a0 = started()
    clock.note(t0 + 1.0)
    assert clock.note(t0 + 0.5) - a0 == pytest.approx(1.0)
    assert clock.awake(t0 + 0.2) - a0 == pytest.approx(1.0)
    assert clock.frozen_total == 0.0
    # The later note is measured from the latest time seen, not from the earlier one.
    assert clock.note(t0 + 1.5) - a0 == pytest.approx(1.5)


def test_default_now_reads_the_monotonic_clock() -> None:
    clock = AwakeClock(max_gap=5.0)
    first = clock.awake()
    second = clock.note()
    assert 0.0 <= first <= second < 5.0


steps = st.lists(st.floats(min_value=-5.0, max_value=30.0, allow_nan=False, allow_infinity=False),
                 min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps, st.floats(min_value=0.1, max_value=10.0))
def test_note_model(deltas: list[float], max_gap: float) -> None:
    """awake grows by min(gap, max_gap) per forward step; backward steps add nothing."""
    clock, t0, a0 = started(max_gap=max_gap)
    now = latest = t0
    expected_awake = 0.0
    expected_frozen = 0.0
    previous = a0
    for delta in deltas:
        now += delta
        gap = now - latest
        if gap > 0:
            expected_awake += min(gap, max_gap)
            expected_frozen += max(0.0, gap - max_gap)
        latest = max(latest, now)
        peek = clock.awake(now)
        awake = clock.note(now)
        assert peek == pytest.approx(awake, abs=1e-9), "awake(now) must agree with note(now)"
        assert awake >= previous, "awake time went backwards"
        previous = awake
        assert awake - a0 == pytest.approx(expected_awake, abs=1e-6)
        assert clock.frozen_total == pytest.approx(expected_frozen, abs=1e-6)
        # Awake and frozen time together are exactly the time seen.
        assert (awake - a0) + clock.frozen_total == pytest.approx(latest - t0, abs=1e-6)


@settings(max_examples=300, deadline=None)
@given(steps, st.floats(min_value=0.1, max_value=10.0), st.data())
def test_awake_is_monotone_and_bounded(deltas: list[float], max_gap: float, data: st.DataObject) -> None:
    clock, t0, a0 = started(max_gap=max_gap)
    now = t0
    last_noted = t0
    previous = a0
    for delta in deltas:
        now += abs(delta)
        if data.draw(st.booleans()):
            value = clock.note(now)
            last_noted = now
        else:
            value = clock.awake(now)
            noted = clock.awake(last_noted)
            assert value - noted <= max_gap + 1e-9, "awake() between notes counts at most max_gap"
        assert value >= previous - 1e-9
        assert value - a0 <= now - t0 + 1e-6, "awake time cannot exceed elapsed time"
        previous = value
