"""Generated broken configs against the validator (issue 11, item 8).

A valid config is mutated at real key paths: random values of random types
(huge and negative integers, NaN, infinities and huge floats, strings with NUL,
newlines, control characters and astral unicode, durations and sizes with
absurd numbers and units, lists, tables, deep nesting, integers of thousands
of digits), deleted keys and unknown ones, then written as TOML. What must hold:

* the validator never raises anything but ConfigError, and never hangs (every
  example runs under a real deadline);
* each problem is one printable line with a key path rooted where the file is
  (``supervisor``, ``functions``, ``env.`` or the file itself) and a message;
* a config it accepts can run: the values go through the real downstream code
  without error (the protobuf fields the router and manager fill, the worker's
  environment and command in an actual exec with the sandbox's rlimits set,
  the listening host through getaddrinfo), which is what failed before;
* `supervisor validate` (in process) exits 0 or 2, never anything else, and
  says every problem on its own "path: message" line.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from calink.messages import HttpRequest, Invoke
from supervisor.config import PULL_RUNTIMES, Config, ConfigError, load_config, parse_config_text
from supervisor.control.launcher import worker_env
from supervisor.control.policy import jittered_max_requests
from supervisor.control.sandbox import Capabilities, plan_function
from supervisor.v1 import control_pb2 as cpb
from worker.isolation import set_rlimits

EXAMPLE_DEADLINE_S = 60.0  # a hang detector, not a speed claim: a valid config takes milliseconds

BASE: dict[str, Any] = {
    "supervisor": {"ca_port": 9000, "metrics_port": 9464, "host": "127.0.0.1", "run_dir": "run",
                   "log_format": "json", "default_function": "py", "grace_period": "30s"},
    "functions": {
        "py": {"runtime": "python", "handler": "app:handler", "interface": "event", "code_dir": "code",
               "initializer": "app:init", "pre_freeze": "app:hook", "pre_stop": "app:hook", "timeout": "10s",
               "concurrency": 2, "min_warm": 1, "max_workers": 4, "max_queue": 64, "idle_ttl": "60s",
               "shrink_strategy": "lcc", "max_requests": 100, "recycle_memory_share": 0.9, "disposable": False,
               "seed": True, "max_body": "6MiB", "env": {"GREETING": "hi", "EMPTY": ""},
               "startup_timeout": "15s",
               "limits": {"memory": "256MiB", "cpu": 1.0, "pids": 64, "nofile": 1024, "user": "nobody",
                          "network": "inherit", "seccomp": True, "require_isolation": False}},
        "web": {"runtime": "custom", "command": ["./bootstrap", "--port", "9000"], "code_dir": "code",
                "ready": "http:/healthz", "hooks": ["initialize", "pre-stop"], "timeout": "30s",
                "startup_timeout": "5s", "env": {"MODE": "web"}},
        "lam": {"runtime": "lambda", "handler": "app.handler", "command": ["./bootstrap"], "code_dir": "code"},
    },
}


class Raw(str):
    """TOML text placed as it is (what a Python value cannot say)."""


def leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaf_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaf_paths(item, (*prefix, index))


PATHS = [path for path in leaf_paths(BASE) if path]
NEW_KEYS = [("supervisor", "timout"), ("functions", "py", "env", "NEW"), ("functions", "py", "limits", "swap"),
            ("functions", "new fn"), ("functions", "py", "name"), ("extra",), ("functions", "py", "env", "A B"),
            ("functions", "py", "env", "X\0")]

# ---- values -------------------------------------------------------------------------------

HUGE_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), 2**64,
             10**400, -(10**400), 10**4000]
ODD_TEXT = ["", " ", "\0", "a\0b", "\n", "a\nb", "\r\n", "\t", "\x7f", "\x1b[31m", "🙂", "é", "\u2028", "\ufeff",
            "x" * 200_000, "x" * 131_071, "x" * (131_072 - len("GREETING=") - 1), "../..", "/", "~", "~nosuchuser/x", "auto", "root", "0", "4294967295", "-1", "nan",
            "inf", "1e400", "http:/", "http:/a b", "tcp", "0.0.0.0", "::", "localhost", "a" * 300]
UNITS = ["", "ms", "s", "m", "h", "d", "B", "KiB", "MiB", "GiB", "TiB", "KB", "sec", " s", "s ", "µs"]
# Either side of every bound: where "accepted" and "runnable" must agree exactly.
NEAR_BOUNDS = [3, 4, 63, 64, 999, 1000, 1001, 65535, 65536, 100_000, 100_001, 1_000_000_000, 1_000_000_001,
               4_194_304, 4_194_305, 1 << 20, (1 << 20) + 1, 1 << 30, (1 << 30) + 1, 1 << 40, (1 << 40) + 1,
               0.0099, 0.01, 1024.0, 1024.001, "24h", "86400.001s", "1ms", "0.999ms", "1441m", "16MiB",
               "16383KiB", "1GiB", "1025MiB", "1TiB", "1025GiB", "4294967294", "4294967295", "nobody", "auto"]

numbers = st.one_of(st.integers(min_value=0, max_value=10**30).map(str),
                    st.integers(min_value=0, max_value=10**6).map(lambda n: f"{n}.{n % 997}"),
                    st.sampled_from(["9" * 400, "9" * 1200, ".5", "0", "0.0", "1e3", "-1", "nan", "inf", "0x10"]))
unit_strings = st.builds(lambda n, u: f"{n}{u}", numbers, st.sampled_from(UNITS))
texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from(HUGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e300, -1e300, 5e-324, -0.0, 0.001, 1024.5]),
    st.booleans(), texts, st.sampled_from(ODD_TEXT), unit_strings, st.sampled_from(NEAR_BOUNDS),
    st.sampled_from([Raw("[" * 40 + "]" * 40), Raw("[" * 3000 + "]" * 3000), Raw("9" * 5000),
                     Raw("{ a = " * 40 + "1" + " }" * 40)]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(texts, inner, max_size=3)),
                      max_leaves=8)
DURATION_KEYS = {"timeout", "idle_ttl", "startup_timeout", "grace_period"}
SIZE_KEYS = {"max_body", "memory"}
ints = st.one_of(st.sampled_from(HUGE_INTS), st.sampled_from([v for v in NEAR_BOUNDS if isinstance(v, int)]),
                 st.integers(min_value=-(2**70), max_value=2**70), st.integers(min_value=-5, max_value=2000))
good_numbers = st.one_of(numbers, st.integers(min_value=0, max_value=100_000).map(str),
                         st.decimals(min_value=0, max_value=10**7, places=4, allow_nan=False).map(str))


def typed(path: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    """Values of the type the key at ``path`` has in BASE, biased to the extremes."""
    base: Any = BASE
    for part in path:
        base = base[part] if isinstance(base, (dict, list)) and (isinstance(base, list) or part in base) else None
    name = next((part for part in reversed(path) if isinstance(part, str)), "")
    if isinstance(base, bool):
        return st.booleans()
    if isinstance(base, int):
        return ints
    if isinstance(base, float):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from([v for v in NEAR_BOUNDS if isinstance(v, float)]), ints)
    if name in DURATION_KEYS:
        return st.one_of(st.builds(lambda n, u: f"{n}{u}", good_numbers, st.sampled_from(["ms", "s", "m", "h"])),
                         st.sampled_from([v for v in NEAR_BOUNDS if isinstance(v, str)]), ints, st.floats())
    if name in SIZE_KEYS:
        return st.one_of(st.builds(lambda n, u: f"{n}{u}", good_numbers,
                                   st.sampled_from(["", "B", "KiB", "MiB", "GiB", "TiB"])), ints)
    if isinstance(base, list) or name == "command":
        return st.lists(st.one_of(texts, st.sampled_from(ODD_TEXT)), max_size=4)
    if isinstance(base, dict):
        return st.dictionaries(st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), texts),
                               st.one_of(texts, st.sampled_from(ODD_TEXT)), max_size=3)
    return st.one_of(texts, st.sampled_from(ODD_TEXT), st.sampled_from([v for v in NEAR_BOUNDS if isinstance(v, str)]))


mutations = st.lists(st.sampled_from(PATHS + NEW_KEYS).flatmap(
    lambda path: st.tuples(st.just(path), st.one_of(typed(path), values, st.just(None)))), min_size=1, max_size=4)
env_overrides = st.dictionaries(st.sampled_from(["FC_SERVER_PORT", "CA_PORT", "SUPERVISOR_METRICS_PORT",
                                                "SUPERVISOR_RUN_DIR"]),
                                st.one_of(st.sampled_from(["9000", "0", "65536", "x", "/var/tmp/" + "r" * 200]),
                                          texts.filter(lambda t: "\0" not in t)), max_size=2)


def mutate(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``data`` with ``value`` at ``path`` (None: the key deleted), making tables on the way."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        items = list(data) if isinstance(data, list) else []
        if head < len(items) and value is None and not rest:
            del items[head]
        elif head < len(items):
            items[head] = mutate(items[head], rest, value)
        return items
    table = dict(data) if isinstance(data, dict) else {}
    if value is None and not rest:
        table.pop(head, None)
    else:
        table[head] = mutate(table.get(head), rest, value)
    return table


# ---- TOML out -----------------------------------------------------------------------------

def toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_key(key: Any) -> str:
    text = str(key)
    return text if text and all(c.isascii() and (c.isalnum() or c in "_-") for c in text) else toml_string(text)


def toml_value(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def toml_text(data: dict[str, Any]) -> str:
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in data.items())


# ---- the oracle: what `run` does with an accepted config ----------------------------------

CAPS = Capabilities(root=True, uid=0, gid=0, mount="", network="", setuid="", seccomp="", cgroups="",
                    cgroup_controllers=frozenset({"memory", "cpu", "pids"}), cgroup_version=2)
PID_MAX_LIMIT = 4_194_304  # the kernel's bound on pids.max
MAX_CFS_QUOTA_US = (1 << 44) - 1  # the kernel's bound on a CFS quota


def assert_runnable(config: Config) -> None:
    """The accepted values through the code that uses them; any exception fails the example."""
    settings_ = config.supervisor
    with contextlib.suppress(socket.gaierror):  # a name (no DNS here): it must at least get that far
        socket.getaddrinfo(settings_.host, settings_.ca_port, flags=socket.AI_NUMERICHOST)
    assert math.isfinite(time.monotonic() + settings_.grace_period)
    for fn in config.functions.values():
        timeout_ms = int(fn.timeout * 1000)  # the router's expression, into uint32 fields
        assert Invoke.decode(Invoke(timeout_ms=timeout_ms).encode()).timeout_ms == timeout_ms >= 1
        assert HttpRequest.decode(HttpRequest(timeout_ms=timeout_ms).encode()).timeout_ms == timeout_ms
        assert math.isfinite(time.monotonic() + fn.timeout + fn.startup_timeout + fn.idle_ttl)
        cpb.WorkerAdded(max_requests=jittered_max_requests(fn.max_requests, 0.999999))
        cpb.FunctionStatus(min_warm=fn.min_warm, max_workers=fn.max_workers, concurrency=fn.concurrency,
                           queue_depth=fn.max_queue)
        sandbox = plan_function(fn, CAPS, others=[], needed=[], socket_dir=str(settings_.run_dir),
                                auto={fn.name: 20000}, lookup=pwd.getpwnam)
        if sandbox.problems:
            continue  # check_config refuses it (a user that does not exist here, an rlimit too high)
        limits = sandbox.cgroup_limits
        if limits is not None:
            assert limits.pids is None or 1 <= limits.pids <= PID_MAX_LIMIT
            assert limits.cpu is None or 1000 <= int(limits.cpu * 100_000) <= MAX_CFS_QUOTA_US
            assert limits.memory is None or 0 < limits.memory < 1 << 63
        env = worker_env(fn, "fuzz", {"PATH": "/usr/bin:/bin"})
        if fn.runtime in PULL_RUNTIMES:
            env["_HANDLER"] = fn.handler or ""
        rlimits = dict(sandbox.plan.get("rlimits") or {})
        # The exec a worker's start is, with its environment, its arguments and its rlimits.
        subprocess.run(["/bin/true", *(fn.command or ())], env=env, check=True, timeout=30,
                       preexec_fn=functools.partial(set_rlimits, rlimits))


# ---- running an example -------------------------------------------------------------------

class Hung(BaseException):
    """Raised in the test when an example outlives its deadline (BaseException: nothing swallows it)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """A real deadline (SIGALRM); a timer already set (pytest-timeout's) is put back as it was."""
    def expired(signum: int, frame: Any) -> None:
        raise Hung(f"validation did not finish within {seconds}s")

    started = time.monotonic()
    outer, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer) if outer > 0 else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001), outer_interval)


def assert_problems_are_lines(problems: list[Any], file: Path) -> None:
    assert problems, "a ConfigError without a problem"
    for problem in problems:
        line = f"{problem.path}: {problem.message}"
        assert problem.path and problem.message, problem
        assert line.isprintable(), f"not one printable line: {line!r}"
        root = problem.path.split(".", 1)[0]
        assert (problem.path.startswith(("supervisor", "functions", "env.", str(file))) or root == "extra"
                or root.startswith('"')), problem


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fuzz")
    code = base / "code"
    code.mkdir()
    code.chmod(0o755)
    (code / "app.py").write_text("def handler(event, context):\n    return event\n\n"
                                 "def init(context):\n    pass\n\ndef hook(context):\n    pass\n")
    (code / "bootstrap").write_text("#!/bin/sh\nexit 0\n")
    (code / "bootstrap").chmod(0o755)
    return base


def test_the_base_config_is_valid_and_runnable(base_dir: Path) -> None:
    """The starting point of every mutation passes, so what the mutations break is theirs."""
    config = parse_config_text(toml_text(BASE), base_dir, base_dir / "supervisor.toml", {})
    assert_runnable(config)


def check(data: Any, base_dir: Path, env: dict[str, str]) -> None:
    """ConfigError with good problems, or a config that runs; nothing else, and within the deadline."""
    file = base_dir / "supervisor.toml"
    with deadline(EXAMPLE_DEADLINE_S):
        try:
            config = parse_config_text(toml_text(data), base_dir, file, env)
        except ConfigError as exc:
            assert_problems_are_lines(exc.problems, file)
            event("refused")
            return
        event("accepted")
        assert_runnable(config)


@pytest.mark.parametrize("path", PATHS + NEW_KEYS, ids=[".".join(map(str, p)) for p in PATHS + NEW_KEYS])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_each_key_with_extreme_values_of_its_type_and_of_any_other(base_dir: Path, path: tuple[Any, ...],
                                                                   data: st.DataObject) -> None:
    value = data.draw(st.one_of(typed(path), values, st.just(None)), label=".".join(map(str, path)))
    check(mutate(BASE, path, value), base_dir, {})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(changes=mutations, env=env_overrides)
def test_generated_configs_raise_only_config_errors_and_pass_only_runnable_values(
        base_dir: Path, changes: list[tuple[tuple[Any, ...], Any]], env: dict[str, str]) -> None:
    data: Any = BASE
    for path, value in changes:
        data = mutate(data, path, value)
    check(data, base_dir, env)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(changes=mutations)
def test_validate_exits_0_or_2_and_never_raises(base_dir: Path, changes: list[tuple[tuple[Any, ...], Any]]) -> None:
    """The command itself, in process: an exception here is the traceback a user would see."""
    from supervisor.cli import dispatch

    data: Any = BASE
    for path, value in changes:
        data = mutate(data, path, value)
    file = base_dir / "supervisor.toml"
    file.write_text(toml_text(data), encoding="utf-8")
    stdout, stderr = io.StringIO(), io.StringIO()
    saved = {key: os.environ.pop(key) for key in ("FC_SERVER_PORT", "FC_CUSTOM_LISTEN_PORT", "CA_PORT",
                                                   "SUPERVISOR_RUN_DIR", "SUPERVISOR_METRICS_PORT") if key in os.environ}
    try:
        with deadline(EXAMPLE_DEADLINE_S), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = dispatch(["validate", "--config", str(file)])
    finally:
        os.environ.update(saved)
    assert code in (0, 2), (code, stderr.getvalue())
    event(f"exit {code}")
    if code == 2:
        lines = stderr.getvalue().splitlines()
        assert lines and all(": " in line and line.isprintable() for line in lines), lines
    else:
        assert stderr.getvalue() == ""
        assert_runnable(load_config(file, env={}))
