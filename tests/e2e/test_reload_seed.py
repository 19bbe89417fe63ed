"""A reload that changes code forks the new workers from the new seed, and
``supervisor reload --wait`` returns once the new code serves (issue 11, item 10).

On real processes, with the isolation the machine allows (cgroups as root):
- After a code change and a reload, the function's new workers are forked
  (``supervisor_worker_starts_total{mode="fork"}``, their "worker ready"
  lines), by a new seed
  that did not restart, and nothing is logged at level error (the new seed's
  cgroup used to be removed under it by the old seed's exit: "could not join
  the cgroup .../seed").
- ``reload --wait``: the next invocation gets the new code, every time;
  when the new workers cannot serve (an initializer that hangs, or fails)
  it exits 5 after ``--timeout`` (or at once for the failure), saying why,
  and the old workers keep serving.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from tests.e2e.harness import Running, started, wait_for
from tests.e2e.test_pools import POOLS_DIR, ctl, edit_config, metric, pids, pool_fn, running_seed

EXTRA = '''

def stuck_init(context: Any) -> None:
    time.sleep(120)


def failing_init(context: Any) -> None:
    raise RuntimeError("the new initializer fails")
'''


def code_copy(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(POOLS_DIR / "pooled.py", code / "pooled.py")
    with (code / "pooled.py").open("a") as f:
        f.write(EXTRA)
    return code


def set_version(code: Path, version: str) -> None:
    source = code / "pooled.py"
    text = source.read_text()
    start = text.index('VERSION = "')
    end = text.index('"', start + len('VERSION = "'))
    source.write_text(text[:start] + f'VERSION = "{version}' + text[end:])
    later = time.time() + 10  # a later mtime for sure (the fingerprint sees sizes and mtimes)
    os.utime(source, (later, later))


def version(sup: Running) -> str:
    answer = sup.invoke({"op": "version"})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["version"])


def errors_logged(sup: Running) -> list[dict[str, Any]]:
    return [line for line in sup.logs() if line.get("level") in ("error", "critical")]


def test_a_reload_forks_the_new_workers_from_the_new_seed(tmp_path: Path) -> None:
    code = code_copy(tmp_path)
    with started(tmp_path, {"hello": pool_fn(code_dir=str(code), min_warm=2, max_workers=4)}) as sup:
        old_seed = wait_for(lambda: running_seed(sup, "hello"), 10, "the seed running")
        old = pids(wait_for(lambda: len(w := sup.ready_workers("hello")) == 2 and w, 10, "two ready workers"))
        assert version(sup) == "v1"
        forks = metric(sup, "supervisor_worker_starts_total", function="hello", mode="fork")
        assert forks >= 2 and metric(sup, "supervisor_worker_starts_total", function="hello", mode="spawn") == 0

        set_version(code, "v2")
        reloaded = ctl(sup, "reload")
        assert reloaded.returncode == 0, reloaded.stderr
        assert "changed hello" in reloaded.stdout.decode(), reloaded.stdout
        new_seed = wait_for(lambda: (s := running_seed(sup, "hello")) and s["pid"] != old_seed["pid"] and s, 15,
                            "the new seed running")
        workers = wait_for(lambda: len(w := sup.ready_workers("hello")) == 2 and not (pids(w) & old) and w, 15,
                           "two new ready workers, the old ones gone")
        ready = {line["worker"]: line["mode"] for line in sup.logs() if line.get("event") == "worker ready"}
        assert {ready[w["id"]] for w in workers} == {"fork"}, (workers, ready)
        assert metric(sup, "supervisor_worker_starts_total", function="hello", mode="spawn") == 0
        assert metric(sup, "supervisor_worker_starts_total", function="hello", mode="fork") >= forks + 2
        assert new_seed["restarts"] == 0, new_seed
        assert version(sup) == "v2"
        assert not errors_logged(sup), errors_logged(sup)


def test_reload_wait_returns_once_the_new_code_serves(tmp_path: Path) -> None:
    code = code_copy(tmp_path)
    with started(tmp_path, {"hello": pool_fn(code_dir=str(code), min_warm=2, max_workers=4)}) as sup:
        wait_for(lambda: len(sup.ready_workers("hello")) == 2, 10, "two ready workers")
        for new in ("v2", "v3", "v4"):
            set_version(code, new)
            reloaded = ctl(sup, "reload", "--wait")
            assert reloaded.returncode == 0, reloaded.stderr
            assert [version(sup) for _ in range(5)] == [new] * 5
        assert not errors_logged(sup), errors_logged(sup)


def test_reload_wait_exits_5_when_the_new_workers_do_not_serve(tmp_path: Path) -> None:
    code = code_copy(tmp_path)
    with started(tmp_path, {"hello": pool_fn(code_dir=str(code), min_warm=1, max_workers=2, timeout="3s")},
                 grace_period="2s") as sup:
        wait_for(lambda: len(sup.ready_workers("hello")) == 1, 10, "a ready worker")

        def initializer(name: str) -> Any:
            return lambda _settings, functions: functions["hello"].update(initializer=f"pooled:{name}")

        edit_config(sup, initializer("stuck_init"))
        started_at = time.monotonic()
        reloaded = ctl(sup, "reload", "--wait", "--timeout", "2")
        assert reloaded.returncode == 5, (reloaded.returncode, reloaded.stderr)
        assert time.monotonic() - started_at >= 2
        assert b"hello" in reloaded.stderr and b"2s" in reloaded.stderr, reloaded.stderr
        assert version(sup) == "v1"  # the old worker serves on

        edit_config(sup, initializer("failing_init"))
        reloaded = ctl(sup, "reload", "--wait", "--timeout", "30")
        assert reloaded.returncode == 5, (reloaded.returncode, reloaded.stderr)
        assert b"the new initializer fails" in reloaded.stderr, reloaded.stderr
        assert version(sup) == "v1"
