"""The isolation planner (supervisor/control/sandbox.py): pure decisions, no processes."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.config import FunctionConfig, parse_config
from supervisor.control.sandbox import (
    AUTO_UID_BASE,
    AUTO_UID_SPAN,
    Capabilities,
    Identity,
    auto_uids,
    blocked_at,
    cpu_over_limit,
    plan_function,
    resolve_user,
)

ROOT_ALL = Capabilities(root=True, uid=0, gid=0, mount="", network="", setuid="", seccomp="", cgroups="",
                        cgroup_controllers=frozenset({"memory", "cpu", "pids"}), cgroup_version=1)
UNPRIVILEGED = Capabilities(root=False, uid=1000, gid=1000, mount="unshare: Operation not permitted",
                            network="unshare: Operation not permitted", setuid="not running as root",
                            seccomp="", cgroups="cgroup v1 memory hierarchy is read-only (EROFS)")
USERS = {"nobody": SimpleNamespace(pw_uid=65534, pw_gid=65534), "app": SimpleNamespace(pw_uid=1001, pw_gid=1002)}


def lookup(name: str) -> Any:
    return USERS[name]


def function(tmp_path: Path, name: str = "fn", **body: Any) -> FunctionConfig:
    (tmp_path / name).mkdir(exist_ok=True)
    config = parse_config({"functions": {name: {"code_dir": name, "handler": "app:handler", **body}}}, tmp_path, {})
    return config.functions[name]


def open_stat(path: str) -> os.stat_result:
    """Every directory 0755 root, but /root 0700 and /srv/private 0700 owned by 1001."""
    mode, uid = 0o755, 0
    if path == "/root":
        mode = 0o700
    if path == "/srv/private":
        mode, uid = 0o700, 1001
    return os.stat_result((stat.S_IFDIR | mode, 0, 0, 2, uid, 0, 0, 0, 0, 0))


def plan(fn: FunctionConfig, caps: Capabilities = ROOT_ALL, **kw: Any) -> Any:
    options: dict[str, Any] = {"others": [], "needed": ["/usr/local/lib/python3.11"], "socket_dir": "/run/ca",
                               "auto": {}, "lookup": lookup, "stat_fn": open_stat}
    options.update(kw)
    return plan_function(fn, caps, **options)


# ---- identity ---------------------------------------------------------------------------


def test_root_runs_workers_as_nobody_by_default(tmp_path: Path) -> None:
    sandbox = plan(function(tmp_path))
    assert sandbox.identity == Identity(65534, 65534, "nobody")
    assert (sandbox.plan["uid"], sandbox.plan["gid"]) == (65534, 65534)
    assert sandbox.summary["identity"].startswith("uid 65534")
    assert sandbox.problems == []


def test_root_only_when_written(tmp_path: Path) -> None:
    sandbox = plan(function(tmp_path, limits={"user": "root"}))
    assert sandbox.identity is None and sandbox.plan["uid"] is None
    assert "root as configured" in sandbox.summary["identity"]


def test_named_and_numeric_users(tmp_path: Path) -> None:
    assert plan(function(tmp_path, limits={"user": "app"})).identity == Identity(1001, 1002, "app")
    assert plan(function(tmp_path, limits={"user": "4321"})).identity == Identity(4321, 4321, "4321")


def test_unknown_user_is_a_problem_naming_the_key(tmp_path: Path) -> None:
    sandbox = plan(function(tmp_path, limits={"user": "ghost"}))
    [problem] = sandbox.problems
    assert problem.path == "functions.fn.limits.user" and "'ghost'" in problem.message


def test_auto_user_gets_the_functions_own_uid(tmp_path: Path) -> None:
    sandbox = plan(function(tmp_path, limits={"user": "auto"}), auto={"fn": 23456})
    assert sandbox.identity == Identity(23456, 23456, "auto:fn")


def test_not_root_keeps_the_supervisors_uid_and_says_so(tmp_path: Path) -> None:
    sandbox = plan(function(tmp_path), UNPRIVILEGED)
    assert sandbox.identity is None and sandbox.plan["uid"] is None
    assert "not root" in sandbox.summary["identity"]
    assert sandbox.plan["mount"] is False and sandbox.plan["network"] is False
    assert sandbox.problems == []  # nothing required: it runs with what it has
    strict = plan(function(tmp_path, limits={"user": "auto", "require_isolation": True}), UNPRIVILEGED)
    assert [p.path for p in strict.problems] == ["functions.fn.limits.user"]


@given(st.lists(st.text(min_size=1, max_size=12), max_size=40), st.sets(st.integers(AUTO_UID_BASE,
                                                                                   AUTO_UID_BASE + 200)))
def test_auto_uids_are_distinct_free_and_stable(names: list[str], taken: set[int]) -> None:
    uids = auto_uids(names, taken)
    assert set(uids) == set(names)
    assert len(set(uids.values())) == len(uids)
    assert all(AUTO_UID_BASE <= uid < AUTO_UID_BASE + AUTO_UID_SPAN and uid not in taken for uid in uids.values())
    assert auto_uids(list(reversed(names)), taken) == uids  # the order of the file does not matter


def test_auto_uid_of_a_function_survives_other_functions_coming_and_going() -> None:
    # The name decides the slot: another function changes it only by colliding.
    alone = auto_uids(["orders"], set())["orders"]
    others = auto_uids(["billing", "search"], set())
    assert alone not in others.values()  # no collision among these names...
    assert auto_uids(["orders", "billing", "search"], set())["orders"] == alone  # ...so it stays


def test_resolve_user_messages() -> None:
    with pytest.raises(LookupError, match="no such user 'x'"):
        resolve_user("x", {}, "fn", lookup)


# ---- resources ---------------------------------------------------------------------------


def test_limits_go_to_the_cgroup_when_it_has_the_controllers(tmp_path: Path) -> None:
    sandbox = plan(function(tmp_path, limits={"memory": "64MiB", "cpu": 0.5, "pids": 16, "nofile": 256}))
    assert sandbox.cgroup_limits is not None
    assert (sandbox.cgroup_limits.memory, sandbox.cgroup_limits.cpu, sandbox.cgroup_limits.pids) == (64 << 20, 0.5, 16)
    assert sandbox.plan["rlimits"] == {"core": 0, "nofile": 256}
    assert sandbox.poll_memory == 0
    assert sandbox.summary["resources"].startswith("cgroup v1 (cpu, memory, pids)")


def test_without_cgroups_memory_falls_back_to_rlimit_and_polling(tmp_path: Path) -> None:
    caps = Capabilities(root=True, uid=0, gid=0, mount="", network="", setuid="", seccomp="", cgroups="read-only")
    sandbox = plan(function(tmp_path, limits={"memory": "64MiB", "cpu": 1.0, "pids": 8, "user": "auto"},
                            max_workers=3), caps, auto={"fn": 30000})
    assert sandbox.cgroup_limits is None
    assert sandbox.poll_memory == 64 << 20
    assert sandbox.plan["rlimits"]["data"] == 64 << 20
    assert sandbox.plan["rlimits"]["nproc"] == 8 * 5  # its own uid: every worker's processes, and the seed's
    assert "cpu by polling" in sandbox.summary["resources"] and "read-only" in sandbox.summary["resources"]
    assert sandbox.poll_cpu == 1.0
    assert sandbox.problems == []


def test_nproc_is_not_used_for_a_shared_uid(tmp_path: Path) -> None:
    caps = Capabilities(root=True, uid=0, gid=0, mount="", network="", setuid="", seccomp="", cgroups="read-only")
    sandbox = plan(function(tmp_path, limits={"pids": 8}), caps)  # nobody: shared with every other function
    assert "nproc" not in sandbox.plan["rlimits"]
    assert "pids not enforced" in sandbox.summary["resources"]


# ---- require_isolation -------------------------------------------------------------------------


def test_require_isolation_refuses_every_gap_naming_its_key(tmp_path: Path) -> None:
    caps = Capabilities(root=True, uid=0, gid=0, mount="unshare: EPERM", network="unshare: EPERM", setuid="",
                        seccomp="seccomp: OSError: libseccomp.so.2 missing", cgroups="read-only")
    sandbox = plan(function(tmp_path, limits={"memory": "64MiB", "network": "none", "require_isolation": True}),
                   caps, needed=[])
    paths = sorted(p.path for p in sandbox.problems)
    assert paths == ["functions.fn.limits.memory", "functions.fn.limits.network", "functions.fn.limits.seccomp"]
    assert all(p.message.startswith("require_isolation: ") for p in sandbox.problems)


def test_without_require_isolation_gaps_are_said_not_refused(tmp_path: Path) -> None:
    caps = Capabilities(root=True, uid=0, gid=0, mount="", network="unshare: EPERM", setuid="", seccomp="x",
                        cgroups="")
    sandbox = plan(function(tmp_path, limits={"network": "none"}), caps)
    assert sandbox.problems == []
    assert sandbox.plan["network"] is False and sandbox.plan["seccomp"] is False
    assert sandbox.summary["network"].startswith("not enforced")
    assert sandbox.summary["seccomp"].startswith("not enforced")


def test_seccomp_can_be_switched_off(tmp_path: Path) -> None:
    sandbox = plan(function(tmp_path, limits={"seccomp": False}))
    assert sandbox.plan["seccomp"] is False and sandbox.summary["seccomp"].startswith("off")


# ---- mounts --------------------------------------------------------------------------------------


def test_private_tmp_keeps_the_code_and_socket_when_they_live_there(tmp_path: Path) -> None:
    fn = function(tmp_path).model_copy(update={"code_dir": Path("/tmp/app")})
    sandbox = plan(fn, socket_dir="/tmp/ca-supervisor")
    [tmp] = [c for c in sandbox.plan["covers"] if c["path"] == "/tmp"]
    assert tmp["writable"] and tmp["mode"] == 0o1777
    assert set(tmp["keep"]) == {"/tmp/app", "/tmp/ca-supervisor"}
    assert sandbox.plan["readonly"] == []  # kept paths are bound read-only already


def test_code_dir_elsewhere_is_bound_read_only(tmp_path: Path) -> None:
    fn = function(tmp_path)
    fn = fn.model_copy(update={"code_dir": Path("/srv/app")})
    sandbox = plan(fn)
    assert sandbox.plan["readonly"] == ["/srv/app"]


def test_directories_the_user_cannot_traverse_are_covered_with_only_what_it_needs(tmp_path: Path) -> None:
    fn = function(tmp_path).model_copy(update={"code_dir": Path("/srv/app")})
    sandbox = plan(fn, needed=["/root/.pyenv/versions/3.11.7", "/usr/lib/python3"])
    covers = {c["path"]: c for c in sandbox.plan["covers"]}
    assert covers["/root"]["keep"] == ["/root/.pyenv/versions/3.11.7"]
    assert not covers["/root"].get("writable")
    assert "/usr" not in covers


def test_other_functions_code_is_hidden_but_never_an_ancestor_of_what_it_needs(tmp_path: Path) -> None:
    fn = function(tmp_path).model_copy(update={"code_dir": Path("/srv/app/b")})
    sandbox = plan(fn, others=["/srv/app", "/srv/other", "/srv/app/b/nested"])
    assert sandbox.plan["hide"] == ["/srv/app/b/nested", "/srv/other"]


def test_unreachable_paths_without_a_mount_namespace_are_a_problem(tmp_path: Path) -> None:
    caps = Capabilities(root=True, uid=0, gid=0, mount="unshare: EPERM", network="", setuid="", seccomp="",
                        cgroups="")
    fn = function(tmp_path).model_copy(update={"code_dir": Path("/srv/app")})
    sandbox = plan(fn, caps, needed=["/root/.pyenv/versions/3.11.7"])
    [problem] = sandbox.problems
    assert problem.path == "functions.fn.limits.user"
    assert "/root" in problem.message and "nobody" in problem.message


def test_blocked_at_follows_owner_and_group_bits() -> None:
    nobody = Identity(65534, 65534, "nobody")
    assert blocked_at("/root/.pyenv/x", nobody, open_stat) == "/root"
    assert blocked_at("/srv/private/x", nobody, open_stat) == "/srv/private"
    assert blocked_at("/srv/private/x", Identity(1001, 1001, "app"), open_stat) is None
    assert blocked_at("/root/x", None, open_stat) is None  # the supervisor's own user


# ---- cpu by polling (no cpu cgroup) ---------------------------------------------------------------


def test_cpu_over_limit_needs_a_whole_window_above_the_cores() -> None:
    spin = [(t, 2.0 * t) for t in range(0, 13, 2)]  # two cores busy for 12 s
    assert cpu_over_limit(spin, cores=1.0, window_s=10)
    assert not cpu_over_limit(spin[:5], cores=1.0, window_s=10)  # 8 s: not a whole window yet
    assert not cpu_over_limit(spin, cores=2.0, window_s=10)  # within its cores (and the tolerance)
    assert not cpu_over_limit([], cores=1.0)


def test_a_burst_shorter_than_the_window_is_not_over() -> None:
    samples = [(0.0, 0.0), (2.0, 0.1), (4.0, 0.2), (6.0, 4.2), (8.0, 4.3), (10.0, 4.4), (12.0, 4.5)]
    assert not cpu_over_limit(samples, cores=0.5, window_s=10)  # 4 s of CPU in 2 s, then idle: 0.44 cores


@given(st.lists(st.floats(0, 4), min_size=1, max_size=30), st.floats(0.1, 4))
def test_cpu_over_limit_agrees_with_the_average_over_the_window(rates: list[float], cores: float) -> None:
    samples, used = [(0.0, 0.0)], 0.0
    for i, rate in enumerate(rates, 1):
        used += 2.0 * rate
        samples.append((2.0 * i, used))
    over = cpu_over_limit(samples, cores, window_s=10, tolerance=1.0)
    end_t, end_cpu = samples[-1]
    start = next((s for s in reversed(samples) if end_t - s[0] >= 10), None)
    assert over == (start is not None and end_cpu - start[1] > cores * (end_t - start[0]))
