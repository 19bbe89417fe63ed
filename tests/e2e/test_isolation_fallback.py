"""A container whose cgroup tree is not writable: the supervisor falls back to
rlimits and polling, says so, and refuses a config that requires cgroups.

The supervisor runs in a mount namespace of its own (``unshare -m``) where an
empty read-only tmpfs covers /sys/fs/cgroup, as in an unprivileged container.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import FUNCTIONS_DIR, free_port, started, write_config

UNSHARE = shutil.which("unshare")
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or UNSHARE is None,
                                reason="needs root and unshare(1) to hide the cgroup tree")
HIDE_CGROUPS = (UNSHARE or "unshare", "--mount", "sh", "-c",
                'mount -t tmpfs -o ro,size=4k none /sys/fs/cgroup && exec "$@"', "sh")
MEMORY_MIB = 128
HOSTILE = {"runtime": "python", "handler": "hostile:handler", "code_dir": str(FUNCTIONS_DIR / "hostile"),
           "min_warm": 1, "max_workers": 1, "timeout": "20s",
           "limits": {"user": "auto", "memory": f"{MEMORY_MIB}MiB", "pids": 16, "cpu": 0.5}}


def test_without_cgroups_memory_is_an_rlimit_and_status_says_so(tmp_path: Path) -> None:
    with started(tmp_path, {"evil": HOSTILE}, wrapper=HIDE_CGROUPS) as sup:
        [fn] = sup.status()["functions"]
        resources = fn["isolation"]["resources"]
        assert "memory by RLIMIT_DATA + RSS polling" in resources
        assert "pids by RLIMIT_NPROC" in resources and "cpu by polling" in resources
        assert any(r.get("event") == "function isolation" and r.get("level") == "warning" for r in sup.logs())
        response = sup.invoke({"try": "allocate", "arg": MEMORY_MIB * 3}, function="evil")
        assert response.status_code == 404 and response.json()["errorType"] == "MemoryError", response.text
        assert sup.invoke({"try": "whoami"}, function="evil").status_code == 200  # the worker lives on
        me = sup.invoke({"try": "whoami"}, function="evil").json()
        assert "ca-supervisor" not in me["cgroup"]  # no cgroup of its own here


def test_without_cgroups_rss_polling_kills_what_the_rlimit_does_not_count(tmp_path: Path) -> None:
    with started(tmp_path, {"evil": HOSTILE}, wrapper=HIDE_CGROUPS) as sup:
        response = sup.invoke({"try": "allocate_shared", "arg": MEMORY_MIB * 2}, function="evil", timeout=60)
        assert response.status_code == 502 and response.json()["errorType"] == "FunctionOOMError", response.text
        assert 'supervisor_worker_exits_total{function="evil",reason="oom"} 1.0' in sup.metrics()
        killed = [r for r in sup.logs() if r.get("event") == "worker passed its memory limit; killing it"]
        assert killed and killed[0]["limit_bytes"] == MEMORY_MIB << 20
        assert sup.invoke({"try": "whoami"}, function="evil").status_code == 200  # replaced


def test_without_cgroups_a_worker_spinning_past_its_cpu_for_a_window_is_killed(tmp_path: Path) -> None:
    with started(tmp_path, {"evil": {**HOSTILE, "timeout": "60s"}}, wrapper=HIDE_CGROUPS) as sup:
        # Two threads spinning: ~2 cores against a limit of 0.5, for longer than the window.
        response = sup.invoke({"try": "spin", "arg": 40}, function="evil", timeout=90)
        assert response.status_code == 502 and response.json()["errorType"] == "WorkerCrashedError", response.text
        killed = [r for r in sup.logs() if r.get("event") == "worker used more CPU than its limit for too long; "
                                                              "killing it"]
        assert killed and killed[0]["cores"] == 0.5
        assert sup.invoke({"try": "whoami"}, function="evil").status_code == 200  # replaced


def test_require_isolation_refuses_to_start_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "supervisor.toml"
    write_config(config, {"run_dir": str(tmp_path / "run"), "ca_port": free_port(), "metrics_port": 0},
                 {"evil": {**HOSTILE, "limits": {**HOSTILE["limits"], "require_isolation": True}}})
    done = subprocess.run([*HIDE_CGROUPS, sys.executable, "-m", "supervisor.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "functions.evil.limits.cpu: require_isolation: no cgroup can enforce cpu, memory, pids here" in done.stderr
    assert not (tmp_path / "run" / "control.sock").exists()  # nothing started


def test_validate_reports_the_same_problem(tmp_path: Path) -> None:
    config = tmp_path / "supervisor.toml"
    write_config(config, {"run_dir": str(tmp_path / "run")},
                 {"evil": {**HOSTILE, "limits": {**HOSTILE["limits"], "require_isolation": True}}})
    done = subprocess.run([*HIDE_CGROUPS, sys.executable, "-m", "supervisor.cli", "validate", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "functions.evil.limits.cpu: require_isolation" in done.stderr
