"""supervisor.entry.components: the planes' restart policy, driven with explicit times."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.entry.components import (
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    EXIT_CONFIG,
    FLAP_LIMIT,
    FLAP_WINDOW_S,
    STABLE_S,
    STARTUP_TIMEOUT_S,
    Component,
)


def component() -> Component:
    return Component("data-plane", ["python", "-m", "supervisor.data"])


def run_and_exit(c: Component, start: float, ran_for: float, code: int | None = 1,
                 ready: bool = True, restart: bool = True) -> float:
    """Starts ``c`` at ``start``, exits it after ``ran_for``; returns the exit time."""
    c.on_started(4242, start)
    if ready:
        c.on_ready(start + min(ran_for, 0.01))
    end = start + ran_for
    c.on_exit(code, end, restart=restart)
    return end


def restart_time(c: Component) -> float:
    assert c.next_start_at is not None, f"{c.name} has no restart scheduled (state {c.state})"
    return c.next_start_at


def expected_delay(failures: int) -> float:
    return 0.0 if failures <= 0 else min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (failures - 1))


# ---- lifecycle ---------------------------------------------------------------


def test_initial_state() -> None:
    c = component()
    assert c.state == "stopped"
    assert c.pid is None and c.restarts == 0 and c.failures == 0
    assert not c.due(0.0)
    assert not c.startup_overdue(1e9)
    assert c.backoff_delay() == 0.0


def test_started_then_ready() -> None:
    c = component()
    c.on_started(100, 5.0)
    assert (c.state, c.pid, c.started_at, c.ready_at, c.next_start_at) == ("starting", 100, 5.0, None, None)
    c.on_ready(6.0)
    assert c.state == "running" and c.ready_at == 6.0
    c.on_ready(7.0)  # only the first readiness counts
    assert c.ready_at == 6.0


def test_ready_is_ignored_unless_starting() -> None:
    c = component()
    c.on_ready(1.0)
    assert c.state == "stopped" and c.ready_at is None
    run_and_exit(c, 0.0, 1.0)
    c.on_ready(2.0)
    assert c.state == "backoff" and c.ready_at is not None  # the old run's


def test_startup_overdue() -> None:
    c = component()
    c.on_started(1, 100.0)
    assert not c.startup_overdue(100.0 + STARTUP_TIMEOUT_S)
    assert c.startup_overdue(100.0 + STARTUP_TIMEOUT_S + 0.001)
    c.on_ready(101.0)
    assert not c.startup_overdue(100.0 + 10 * STARTUP_TIMEOUT_S), "a running component is never overdue"


def test_restart_false_means_exited() -> None:
    c = component()
    run_and_exit(c, 0.0, 1.0, code=0, restart=False)
    assert c.state == "exited" and c.pid is None
    assert not c.due(1e9)
    assert c.failures == 0 and len(c.exits) == 0


def test_restart_false_wins_over_config_exit() -> None:
    c = component()
    run_and_exit(c, 0.0, 1.0, code=EXIT_CONFIG, ready=False, restart=False)
    assert c.state == "exited"


# ---- backoff -----------------------------------------------------------------


def test_backoff_doubles_and_is_capped() -> None:
    c = component()
    now = 0.0
    delays = []
    for _ in range(12):
        now = run_and_exit(c, now, 5.0)  # short runs, at most 6 exits a minute: no flapping
        assert c.state == "backoff"
        delays.append(restart_time(c) - now)
        assert restart_time(c) == now + c.backoff_delay()
        now = restart_time(c)
    assert delays[:4] == pytest.approx([BACKOFF_BASE_S, 2 * BACKOFF_BASE_S, 4 * BACKOFF_BASE_S, 8 * BACKOFF_BASE_S])
    assert all(b >= a for a, b in zip(delays, delays[1:]))
    assert max(delays) == BACKOFF_MAX_S
    assert delays[-1] == BACKOFF_MAX_S


def test_stable_run_resets_the_backoff() -> None:
    c = component()
    now = 0.0
    for _ in range(5):
        now = run_and_exit(c, now, 5.0)
        now = restart_time(c)
    assert c.failures == 5
    now = run_and_exit(c, now, STABLE_S)
    assert c.failures == 0
    assert c.backoff_delay() == 0.0
    assert c.next_start_at == now
    assert c.due(now)
    run_and_exit(c, now, 1.0)
    assert c.failures == 1 and c.backoff_delay() == BACKOFF_BASE_S


def test_due_only_in_backoff_after_the_delay() -> None:
    c = component()
    end = run_and_exit(c, 0.0, 1.0)
    start_at = end + BACKOFF_BASE_S
    assert c.next_start_at == pytest.approx(start_at)
    assert not c.due(end)
    assert c.due(restart_time(c))
    c.on_started(7, restart_time(c))
    assert c.state == "starting" and c.next_start_at is None
    assert not c.due(1e9)


# ---- fatal ---------------------------------------------------------------------


def test_config_exit_before_ready_is_fatal_at_once() -> None:
    c = component()
    run_and_exit(c, 0.0, 0.5, code=EXIT_CONFIG, ready=False)
    assert c.state == "fatal"
    assert "configuration" in c.fatal_reason
    assert c.pid is None
    assert not c.due(1e9)


def test_config_exit_after_ready_is_restarted() -> None:
    c = component()
    end = run_and_exit(c, 0.0, 0.5, code=EXIT_CONFIG, ready=True)
    assert c.state == "backoff"
    assert c.next_start_at == pytest.approx(end + BACKOFF_BASE_S)


def test_config_exit_before_ready_of_a_later_run_is_fatal() -> None:
    c = component()
    now = run_and_exit(c, 0.0, 40.0, code=1, ready=True)
    run_and_exit(c, now, 0.5, code=EXIT_CONFIG, ready=False)
    assert c.state == "fatal", "readiness of an earlier run must not excuse a config refusal"


def test_other_exit_codes_before_ready_are_restarted() -> None:
    for code in (None, 0, 1, 3, 137, -9):
        c = component()
        run_and_exit(c, 0.0, 0.5, code=code, ready=False)
        assert c.state == "backoff", code


def test_flapping_is_fatal() -> None:
    c = component()
    step = FLAP_WINDOW_S / FLAP_LIMIT  # FLAP_LIMIT + 1 exits spanning exactly the window
    for i in range(FLAP_LIMIT):
        run_and_exit(c, i * step, 0.0)
        assert c.state == "backoff", f"exit {i + 1} is within the limit"
    run_and_exit(c, FLAP_LIMIT * step, 0.0)
    assert c.state == "fatal"
    assert str(FLAP_LIMIT + 1) in c.fatal_reason


def test_exits_spread_over_more_than_the_window_are_not_flapping() -> None:
    c = component()
    step = FLAP_WINDOW_S / FLAP_LIMIT + 0.01
    for i in range(5 * FLAP_LIMIT):
        run_and_exit(c, i * step, 0.0)
        assert c.state == "backoff", f"exit {i + 1}"
    assert len(c.exits) <= FLAP_LIMIT


def test_record_keys() -> None:
    c = component()
    assert c.record() == {"name": "data-plane", "pid": None, "state": "stopped", "restarts": 0,
                          "started_monotonic": None}
    c.on_started(99, 12.5)
    c.restarts = 3
    assert c.record() == {"name": "data-plane", "pid": 99, "state": "starting", "restarts": 3,
                          "started_monotonic": 12.5}
    c.on_exit(1, 13.0, restart=True)
    assert c.record()["started_monotonic"] is None
    assert c.record()["pid"] is None


def test_slow_crash_loop_never_overflows_the_backoff() -> None:
    # A plane that crashes every ~10 s exits 6 times a minute, below the flapping
    # limit, so it is restarted forever and ``failures`` grows without bound.
    c = component()
    now = 0.0
    for _ in range(1100):
        now = run_and_exit(c, now, 10.0)
        assert c.state == "backoff"
        now = restart_time(c)
    assert c.failures == 1100
    assert c.backoff_delay() == BACKOFF_MAX_S, "the backoff must stay capped, not overflow (failures grow without bound here)"


# ---- a model of the whole policy ------------------------------------------------

runs = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=2 * STABLE_S, allow_nan=False),  # ran for
        st.booleans(),  # became ready
        st.sampled_from([None, 0, 1, EXIT_CONFIG, 137]),  # exit code
        st.floats(min_value=0.0, max_value=20.0, allow_nan=False),  # extra wait before the restart
    ),
    min_size=1, max_size=40)


@settings(max_examples=250, deadline=None)
@given(runs)
def test_policy_matches_its_rules(cycles: list[tuple[float, bool, int | None, float]]) -> None:
    c = component()
    now = 0.0
    failures = 0
    exits: list[float] = []
    for ran_for, ready, code, wait in cycles:
        c.on_started(1, now)
        if ready:
            c.on_ready(now)
        started = now
        now += ran_for
        ran_for = now - started  # as the component measures it (floating point)
        c.on_exit(code, now, restart=True)
        assert c.pid is None
        if code == EXIT_CONFIG and not ready:
            assert c.state == "fatal"
            return
        exits = [t for t in exits if now - t <= FLAP_WINDOW_S] + [now]
        if len(exits) > FLAP_LIMIT:
            assert c.state == "fatal"
            assert c.fatal_reason
            return
        failures = 0 if ran_for >= STABLE_S else failures + 1
        assert c.state == "backoff"
        assert c.failures == failures
        delay = c.backoff_delay()
        assert delay == pytest.approx(expected_delay(failures))
        assert 0.0 <= delay <= BACKOFF_MAX_S
        assert c.next_start_at == now + delay
        assert c.due(now + delay)
        if delay > 0:
            assert not c.due(now + delay / 2)
        now += delay + wait
