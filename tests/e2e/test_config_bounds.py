"""`validate` accepts only what `run` can run, and never prints a traceback
(issue 11, item 8), on real processes.

* A config at every documented maximum validates, and `supervisor run`
  starts it and serves /invoke; with the longest timeout (24h) a worker's
  slot is released after each invocation.
* The values just past every bound are refused by `supervisor validate` and
  by `supervisor run` with exit 2, each problem on its own line with its key
  path and the bound, and no traceback.
* The configs reported in the issue (deep nesting, a 400-digit duration,
  NUL in `env`, `limits.user` or `host`, `timeout = "1200h"`, 2**63-1
  counts, `cpu = 1e300`, `user = ""`) are refused the same way.
* A reload with such a file is refused with its key paths; the control
  plane lives on and the running config keeps serving.

The bounds are the README's ("Configuration bounds"); this file states them
again on purpose, as the contract seen from outside.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.control.sandbox import rlimit_ceiling
from tests.e2e.harness import Raw, free_port, function, started, wait_for, write_config

MAX_TIMEOUT = "24h"


def write(path: Path, settings: Mapping[str, Any], functions: Mapping[str, Mapping[str, Any]]) -> Path:
    write_config(path, settings, functions)
    return path


def settings(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"ca_port": free_port(), "metrics_port": free_port(), "host": "127.0.0.1",
                            "run_dir": str(tmp_path / "run"), "grace_period": "10s"}
    base.update(overrides)
    return base


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`supervisor ARGS` in its own session; killed whole (and failed) if it outlives ``timeout``."""
    process = subprocess.Popen([sys.executable, "-m", "supervisor.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={k: v for k, v in os.environ.items()
                                    if k not in ("FC_SERVER_PORT", "FC_CUSTOM_LISTEN_PORT", "CA_PORT",
                                                 "SUPERVISOR_RUN_DIR", "SUPERVISOR_METRICS_PORT")})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # It started: end its whole tree (planes and workers have sessions of their own).
        tree = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
        for pid in tree:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=30)
        raise AssertionError(f"`supervisor {' '.join(args)}` still ran after {timeout}s "
                             f"(it accepted the config?); stdout={stdout[-2000:]!r} stderr={stderr[-2000:]!r}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_refused(result: subprocess.CompletedProcess[str], expected: Mapping[str, str]) -> None:
    """Exit 2, no traceback, and for every key path a line naming it (with ``expected``'s words)."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    for key, words in expected.items():
        hits = [line for line in lines if line.strip().startswith(f"{key}: ")]
        assert hits, f"no problem reported for {key}:\n{result.stderr}"
        assert any(words in line for line in hits), f"{key}: expected {words!r} in {hits}"


# ---- every maximum at once runs ---------------------------------------------------------

def nofile_ceiling() -> int:
    """The schema's 1048576, or less where a worker cannot raise RLIMIT_NOFILE that far
    (no CAP_SYS_RESOURCE: the supervisor's hard limit; `validate` says so, see below)."""
    ceiling = rlimit_ceiling("nofile")
    return min(1 << 20, ceiling[0]) if ceiling is not None else 1 << 20


def at_max(**overrides: Any) -> dict[str, Any]:
    return function(timeout=MAX_TIMEOUT, startup_timeout="24h", idle_ttl="24h", concurrency=1000,
                    min_warm=1, max_workers=1000, max_queue=100_000, max_requests=1_000_000_000,
                    max_body="1GiB", env={"GREETING": "x" * 100_000},
                    limits={"memory": "1TiB", "cpu": 1024.0, "pids": 4_194_304, "nofile": nofile_ceiling()},
                    **overrides)


def test_a_config_at_every_maximum_validates_runs_and_serves(tmp_path: Path) -> None:
    functions = {"edge": at_max(),
                 # One slot only: if an invocation with the longest timeout leaked its slot,
                 # the next one would wait forever.
                 "one": function(timeout=MAX_TIMEOUT, concurrency=1, min_warm=1, max_workers=1),
                 # The smallest limits still start a worker (cpu's 0.01 is left out: it only slows it).
                 "low": function(limits={"memory": "16MiB", "pids": 4, "nofile": 64})}
    config = write(tmp_path / "supervisor.toml", settings(tmp_path, grace_period="24h"), functions)
    validated = cli("validate", "--config", str(config))
    assert validated.returncode == 0, validated.stderr
    assert "Traceback" not in validated.stderr

    with started(tmp_path / "run-it", functions, grace_period="24h") as sup:
        for _ in range(3):
            response = sup.invoke({"op": "pid"}, "edge")
            assert response.status_code == 200, response.text
        for i in range(5):
            response = sup.invoke({"echo": i}, "one", timeout=30)
            assert response.status_code == 200, (i, response.text)
            assert response.json() == {"echo": i}
        assert sup.invoke({"echo": "low"}, "low").json() == {"echo": "low"}
        context = sup.invoke({"op": "context"}, "edge").json()
        assert context["env_greeting"] == "x" * 100_000 and context["timeout_s"] == 86400


# ---- just past every bound: refused, with the key path and the bound --------------------

JUST_PAST: dict[str, str] = {
    "supervisor.grace_period": "at most 24h",
    "functions.high.timeout": "at most 24h",
    "functions.high.startup_timeout": "at most 24h",
    "functions.high.idle_ttl": "at most 24h",
    "functions.high.concurrency": "at most 1000",
    "functions.high.max_workers": "at most 1000",
    "functions.high.min_warm": "at most 1000",
    "functions.high.max_queue": "at most 100000",
    "functions.high.max_requests": "at most 1000000000",
    "functions.high.max_body": "at most 1GiB",
    "functions.high.env": "at most 1MiB",
    "functions.high.limits.memory": "at most 1TiB",
    "functions.high.limits.cpu": "at most 1024",
    "functions.high.limits.pids": "at most 4194304",
    "functions.high.limits.nofile": "at most 1048576",
    "functions.high.limits.user": "at most 4294967294",
    "functions.low.timeout": "at least 1ms",
    "functions.low.startup_timeout": "at least 1ms",
    "functions.low.limits.memory": "at least 16MiB",
    "functions.low.limits.pids": "at least 4",
    "functions.low.limits.cpu": "at least 0.01",
    "functions.low.limits.nofile": "at least 64",
    "functions.low.limits.user": "must not be an empty string",
    "functions.low.env.HUGE": "128KiB",
}


def just_past(tmp_path: Path) -> Path:
    high = function(timeout="86400.001s", startup_timeout="1441m", idle_ttl="25h", concurrency=1001,
                     max_workers=1001, min_warm=1001, max_queue=100_001, max_requests=1_000_000_001,
                     max_body=(1 << 30) + 1, env={f"V{i}": "x" * 100_000 for i in range(11)},
                     limits={"memory": (1 << 40) + 1, "cpu": 1024.001, "pids": 4_194_305, "nofile": 1_048_577,
                             "user": "4294967295"})
    low = function(timeout="0.9ms", startup_timeout="0.5ms", env={"HUGE": "x" * (128 << 10)},
                   limits={"memory": "16383KiB", "cpu": 0.0099, "pids": 3, "nofile": 63, "user": ""})
    return write(tmp_path / "supervisor.toml", settings(tmp_path, grace_period="86401s"), {"high": high, "low": low})


def test_values_just_past_every_bound_are_refused_by_validate(tmp_path: Path) -> None:
    assert_refused(cli("validate", "--config", str(just_past(tmp_path))), JUST_PAST)


def test_values_just_past_every_bound_are_refused_by_run(tmp_path: Path) -> None:
    result = cli("run", "--config", str(just_past(tmp_path)))
    assert "nothing started" in result.stderr
    assert_refused(result, JUST_PAST)


# ---- the configs reported in the issue ---------------------------------------------------

DEEP = Raw("[" * 5000 + "]" * 5000)

REPORTED: dict[str, tuple[dict[str, Any], dict[str, Any], str, str]] = {
    # name: (supervisor overrides, function overrides, key path, words)
    "deep nesting": ({}, {"env": Raw("{ X = " + str(DEEP) + " }")}, "supervisor.toml", "nested more than"),
    "a 400-digit duration": ({}, {"timeout": "9" * 400 + "s"}, "functions.f.timeout", "at most 24h"),
    "a 5000-digit integer": ({}, {"max_queue": Raw("9" * 5000)}, "supervisor.toml", "integer"),
    "NUL in an env value": ({}, {"env": {"A": "x\0y"}}, "functions.f.env.A", "NUL"),
    "NUL in limits.user": ({}, {"limits": {"user": "no\0body"}}, "functions.f.limits.user", "user name"),
    "NUL in host": ({"host": "127.0.0.1\0x"}, {}, "supervisor.host", "address or host name"),
    "timeout 1200h": ({}, {"timeout": "1200h"}, "functions.f.timeout", "at most 24h"),
    "max_requests 2**63-1": ({}, {"max_requests": 2**63 - 1}, "functions.f.max_requests", "at most 1000000000"),
    "pids 2**63-1": ({}, {"limits": {"pids": 2**63 - 1}}, "functions.f.limits.pids", "at most 4194304"),
    "cpu 1e300": ({}, {"limits": {"cpu": 1e300}}, "functions.f.limits.cpu", "at most 1024"),
    "user empty": ({}, {"limits": {"user": ""}}, "functions.f.limits.user", "must not be an empty string"),
    "a run_dir too long for a socket": ({"run_dir": "/var/tmp/" + "d" * 120}, {}, "supervisor.run_dir", "bytes"),
    "a newline in ready": ({}, {"runtime": "custom", "handler": None, "command": ["/bin/true"],
                               "ready": "http:/x\r\nHost: evil"}, "functions.f.ready", "printable ASCII"),
    "NUL in a command": ({}, {"runtime": "custom", "handler": None, "command": ["/bin/true", "a\0b"]},
                         "functions.f.command[1]", "NUL"),
}


@pytest.mark.parametrize("case", list(REPORTED))
def test_the_reported_configs_are_refused_with_their_key_path(tmp_path: Path, case: str) -> None:
    supervisor, overrides, key, words = REPORTED[case]
    fn = {k: v for k, v in function(**overrides).items() if v is not None}
    config = write(tmp_path / "supervisor.toml", settings(tmp_path, **supervisor), {"f": fn})
    key = str(config) if key == "supervisor.toml" else key
    assert_refused(cli("validate", "--config", str(config)), {key: words})


def test_nofile_above_what_a_worker_can_raise_is_refused(tmp_path: Path) -> None:
    """Below the schema's bound, the container's: without CAP_SYS_RESOURCE a worker cannot
    raise its hard RLIMIT_NOFILE (it used to validate, then fail in every worker)."""
    if nofile_ceiling() >= 1 << 20:
        pytest.skip("workers here can set RLIMIT_NOFILE up to the schema's bound")
    config = write(tmp_path / "supervisor.toml", settings(tmp_path),
                   {"f": function(limits={"nofile": nofile_ceiling() + 1})})
    assert_refused(cli("validate", "--config", str(config)), {"functions.f.limits.nofile": "above what a worker"})


def test_run_refuses_the_leaking_timeout_instead_of_starting(tmp_path: Path) -> None:
    """`timeout = "1200h"` used to start, then answer 500 "Value out of range" and keep the slot."""
    config = write(tmp_path / "supervisor.toml", settings(tmp_path), {"f": function(timeout="1200h")})
    result = cli("run", "--config", str(config))
    assert_refused(result, {"functions.f.timeout": "at most 24h"})


# ---- reload ----------------------------------------------------------------------------

def test_a_reload_with_a_broken_config_is_refused_and_the_control_plane_lives(tmp_path: Path) -> None:
    functions = {"f": function(min_warm=1, max_workers=2)}
    with started(tmp_path, functions) as sup:
        control_pid = sup.component_pid("control-plane")
        text = sup.config_path.read_text()
        broken = {
            "deep nesting": (text + "\n[functions.f.env]\nX = " + str(DEEP) + "\n", str(sup.config_path)),
            "NUL in env": (text + '\n[functions.f.env]\nX = "a\\u0000b"\n', "functions.f.env.X"),
            "timeout 1200h": (text.replace('timeout = "10s"', 'timeout = "1200h"'), "functions.f.timeout"),
            "pids 2**63-1": (text + f"\n[functions.f.limits]\npids = {2**63 - 1}\n", "functions.f.limits.pids"),
        }
        for case, (content, key) in broken.items():
            sup.config_path.write_text(content)
            refused = sup.cli("reload", "--run-dir", str(sup.run_dir))
            stderr = refused.stderr.decode()
            assert refused.returncode == 2, (case, refused.returncode, stderr)
            assert key in stderr, (case, stderr)
            assert "Traceback" not in stderr, (case, stderr)
            assert sup.component_pid("control-plane") == control_pid, case
            response = sup.invoke({"echo": case})
            assert response.status_code == 200 and response.json() == {"echo": case}, (case, response.text)
        sup.config_path.write_text(text)
        tracebacks = [line for line in sup.logs() if line.get("unparsed") or "Traceback" in json.dumps(line)]
        assert not tracebacks, tracebacks[:5]
        wait_for(lambda: sup.ready_workers("f"), 10, "a ready worker still")
