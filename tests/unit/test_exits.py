"""supervisor.control.exits: an exit's reason, and crash versus crash loop.

Generated cases check the module docstring's rules: one reason per exit
(graceful only when clean, ``init_failed`` only before READY, ``oom`` from
the cgroup), a failure to initialize only before READY, a crash with work in
flight never starting a crash loop (a poison input, however often it comes),
``CRASH_LOOP_AFTER`` idle deaths in a row starting one, and one completed
invocation (or ``STABLE_S`` up) ending it.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from supervisor.control.exits import (
    CRASH_LOOP_AFTER,
    CRASH_REASONS,
    GRACEFUL_REASONS,
    STABLE_S,
    ExitFacts,
    Kind,
    Life,
    exit_reason,
    in_crash_loop,
    judge,
    proved,
    streak_while_alive,
)

SETTINGS = settings(max_examples=300, deadline=None)
ASKED = ["idle", "recycled", "disposable", "timeout", "shutdown", "init_failed", "oom", "crashed"]
REASONS = sorted({*ASKED, "crashed"})

exit_facts = st.builds(
    ExitFacts,
    end_reason=st.sampled_from([None, *ASKED]),
    exit_code=st.one_of(st.none(), st.integers(0, 255)),
    ready=st.booleans(),
    oom_killed=st.booleans(),
    disposable=st.booleans(),
    removed=st.booleans(),
)

lives = st.builds(
    Life,
    ready_for_s=st.one_of(st.none(), st.floats(0.0, 3 * STABLE_S, allow_nan=False)),
    completed=st.one_of(st.just(0), st.integers(0, 1000)),
    inflight=st.one_of(st.just(0), st.integers(0, 8)),
)


# ---- exit_reason ------------------------------------------------------------------


@SETTINGS
@given(exit_facts)
def test_every_exit_has_one_known_reason(facts: ExitFacts) -> None:
    assert exit_reason(facts) in REASONS


@SETTINGS
@given(exit_facts)
def test_a_graceful_reason_holds_only_for_a_clean_exit_of_a_ready_worker(facts: ExitFacts) -> None:
    reason = exit_reason(facts)
    if reason in GRACEFUL_REASONS and facts.ready:
        assert facts.exit_code == 0


@SETTINGS
@given(exit_facts)
def test_crashed_only_after_ready_and_init_failed_only_before(facts: ExitFacts) -> None:
    reason = exit_reason(facts)
    if reason == "crashed":
        assert facts.ready
    if reason == "init_failed":
        assert not facts.ready or facts.end_reason == "init_failed"  # (or it was killed for that)


@SETTINGS
@given(exit_facts)
def test_the_cgroups_oom_kill_is_the_reason_unless_it_was_a_timeout_or_shutdown_kill(facts: ExitFacts) -> None:
    reason = exit_reason(facts)
    if facts.oom_killed and facts.end_reason not in ("timeout", "shutdown"):
        assert reason == "oom"
    if reason == "oom":
        assert facts.oom_killed or facts.end_reason == "oom"


@SETTINGS
@given(exit_facts)
@example(ExitFacts(end_reason=None, exit_code=0, ready=True, removed=True, disposable=True))
def test_a_clean_exit_nobody_asked_for(facts: ExitFacts) -> None:
    reason = exit_reason(facts)
    if facts.end_reason is None and facts.exit_code == 0 and not facts.oom_killed:
        if facts.removed:
            assert reason == "shutdown"  # its function was removed: the data plane drained it
        elif facts.disposable:
            assert reason == "disposable"
        else:
            assert reason == ("crashed" if facts.ready else "init_failed")


@SETTINGS
@given(exit_facts)
def test_what_the_control_plane_asked_for_stands_when_nothing_contradicts_it(facts: ExitFacts) -> None:
    if facts.end_reason in ("timeout", "shutdown") or (
            facts.end_reason in GRACEFUL_REASONS and facts.exit_code == 0 and not facts.oom_killed):
        assert exit_reason(facts) == facts.end_reason


# ---- judge: one exit ----------------------------------------------------------------


@SETTINGS
@given(st.sampled_from(REASONS), lives, st.integers(0, 10))
def test_before_ready_only_a_failure_to_initialize_and_the_streak_stays(reason: str, life: Life,
                                                                       streak: int) -> None:
    life = Life(None, life.completed, life.inflight)
    verdict = judge(reason, life, streak)
    assert verdict.streak == streak
    assert verdict.kind == (Kind.INIT_FAILURE if reason in ("init_failed", "oom") else Kind.END)
    assert verdict.backs_off == (verdict.kind == Kind.INIT_FAILURE)


@SETTINGS
@given(st.sampled_from(REASONS), lives, st.integers(0, 10))
def test_after_ready_never_a_failure_to_initialize(reason: str, life: Life, streak: int) -> None:
    if life.ready_for_s is None:
        life = Life(0.0, life.completed, life.inflight)
    assert judge(reason, life, streak).kind != Kind.INIT_FAILURE


@SETTINGS
@given(st.sampled_from(REASONS), lives, st.integers(0, 10))
def test_a_worker_that_served_or_stayed_up_ends_the_streak(reason: str, life: Life, streak: int) -> None:
    if life.ready_for_s is None or not proved(life):
        return
    verdict = judge(reason, life, streak)
    assert verdict.streak == 0 and not verdict.crash_loop and not verdict.backs_off
    assert verdict.kind == (Kind.CRASH if reason in CRASH_REASONS else Kind.END)


@SETTINGS
@given(st.sampled_from(CRASH_REASONS), st.floats(0.0, STABLE_S, exclude_max=True), st.integers(1, 8),
       st.integers(0, CRASH_LOOP_AFTER - 1))
def test_a_crash_with_work_in_flight_never_starts_a_crash_loop(reason: str, ready_for: float, inflight: int,
                                                               streak: int) -> None:
    verdict = judge(reason, Life(ready_for, 0, inflight), streak)
    assert verdict == verdict.__class__(Kind.CRASH, streak, False, False)


@SETTINGS
@given(st.sampled_from(CRASH_REASONS), st.floats(0.0, STABLE_S, exclude_max=True), st.integers(0, 10))
def test_an_idle_death_before_serving_adds_to_the_streak(reason: str, ready_for: float, streak: int) -> None:
    verdict = judge(reason, Life(ready_for, 0, 0), streak)
    assert verdict.kind == Kind.IDLE_DEATH
    assert verdict.streak == streak + 1
    assert verdict.crash_loop == verdict.backs_off == (streak + 1 >= CRASH_LOOP_AFTER)


@SETTINGS
@given(st.sampled_from(CRASH_REASONS), st.floats(0.0, STABLE_S, exclude_max=True), st.integers(0, 8),
       st.integers(CRASH_LOOP_AFTER, 20))
def test_in_a_crash_loop_every_unproved_death_backs_off_again(reason: str, ready_for: float, inflight: int,
                                                             streak: int) -> None:
    verdict = judge(reason, Life(ready_for, 0, inflight), streak)
    assert verdict.backs_off and verdict.crash_loop and verdict.streak == streak + 1


@SETTINGS
@given(st.sampled_from([r for r in REASONS if r not in CRASH_REASONS]), lives, st.integers(0, 10))
def test_an_asked_for_end_of_an_unproved_worker_changes_nothing(reason: str, life: Life, streak: int) -> None:
    if life.ready_for_s is None or proved(life):
        return
    verdict = judge(reason, life, streak)
    assert verdict.kind == Kind.END and verdict.streak == streak and not verdict.backs_off
    assert verdict.crash_loop == in_crash_loop(streak)


@SETTINGS
@given(lives, st.integers(0, 10))
def test_a_live_worker_ends_the_streak_only_by_serving_or_staying_up(life: Life, streak: int) -> None:
    after = streak_while_alive(streak, life)
    assert after == (0 if proved(life) else streak)


# ---- judge: a pool's history ----------------------------------------------------------

# One exit: (reason, completed, inflight, ready_for_s or None for "before READY").
exits_seq = st.lists(st.tuples(
    st.sampled_from(REASONS),
    st.sampled_from([0, 0, 0, 1, 5]),
    st.sampled_from([0, 0, 1, 2]),
    st.one_of(st.none(), st.floats(0.0, 2 * STABLE_S, allow_nan=False)),
), max_size=40)


@SETTINGS
@given(exits_seq)
def test_a_crash_loop_needs_that_many_idle_deaths_since_the_last_proof(history: list[
        tuple[str, int, int, float | None]]) -> None:
    streak = 0
    idle_deaths = 0  # since the last worker that proved itself
    for reason, completed, inflight, ready_for in history:
        life = Life(ready_for, completed, inflight)
        verdict = judge(reason, life, streak)
        if ready_for is not None and proved(life):
            idle_deaths = 0
        elif verdict.kind == Kind.IDLE_DEATH:
            idle_deaths += 1
        if verdict.crash_loop:
            assert idle_deaths >= CRASH_LOOP_AFTER
        if verdict.backs_off and verdict.kind != Kind.INIT_FAILURE:
            assert verdict.crash_loop
        streak = verdict.streak


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(CRASH_REASONS), st.integers(1, 4),
                          st.floats(0.0, STABLE_S, exclude_max=True)), max_size=60),
       st.lists(st.integers(0, 60), max_size=10))
def test_a_poison_storm_never_backs_off(poisoned: list[tuple[str, int, float]], proofs: list[int]) -> None:
    """Workers killed by poison inputs (work in flight), some after serving: never a crash loop."""
    streak = 0
    for i, (reason, inflight, ready_for) in enumerate(poisoned):
        completed = 3 if i in proofs else 0
        verdict = judge(reason, Life(ready_for, completed, inflight), streak)
        assert not verdict.backs_off and not verdict.crash_loop and verdict.kind == Kind.CRASH
        streak = verdict.streak
    assert streak == 0


@SETTINGS
@given(st.integers(0, 3), st.sampled_from(CRASH_REASONS), st.floats(0.0, STABLE_S, exclude_max=True))
def test_that_many_idle_deaths_in_a_row_are_a_crash_loop_and_one_served_invocation_ends_it(
        extra: int, reason: str, ready_for: float) -> None:
    streak = 0
    for i in range(CRASH_LOOP_AFTER + extra):
        verdict = judge(reason, Life(ready_for, 0, 0), streak)
        assert verdict.backs_off == (i + 1 >= CRASH_LOOP_AFTER)
        streak = verdict.streak
    assert in_crash_loop(streak)
    assert streak_while_alive(streak, Life(ready_for, 1, 0)) == 0
    assert judge(reason, Life(ready_for, 1, 1), streak).streak == 0
