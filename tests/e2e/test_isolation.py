"""Worker cgroups on a real supervisor (root): a forked worker is born in the
cgroup its seed waited in, and no cgroup outlives the run."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import psutil
import pytest

from supervisor.control.cgroups import CgroupTree, Unavailable
from tests.e2e.harness import FUNCTIONS_DIR, started, wait_for

TREE = CgroupTree.detect(f"ca-probe-{os.getpid()}", prepare=False) if os.geteuid() == 0 else Unavailable("not root")
if isinstance(TREE, CgroupTree):
    TREE.close()
pytestmark = pytest.mark.skipif(not isinstance(TREE, CgroupTree), reason=f"no writable cgroup tree: {TREE}")

FN = {"runtime": "python", "handler": "victim:handler", "code_dir": str(FUNCTIONS_DIR / "victim"),
      "min_warm": 1, "max_workers": 3, "timeout": "10s", "limits": {"memory": "128MiB", "pids": 32}}


def cgroup_of(pid: int) -> str:
    """The process's cgroup in the pids hierarchy (v1), or its v2 path."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return path
    return lines[-1].split(":", 2)[2]


def seed_pid(sup: object) -> int:
    return int(sup.component_pid("seed:fn"))  # type: ignore[attr-defined]


def test_a_forked_worker_is_born_in_the_cgroup_its_seed_waited_in(tmp_path: Path) -> None:
    with started(tmp_path, {"fn": FN}) as sup:
        [first] = sup.ready_workers("fn")
        seed = seed_pid(sup)
        # Once its clone is up, the seed moves into the next worker's cgroup and waits there.
        waiting = wait_for(lambda: (c := cgroup_of(seed)) != cgroup_of(first["pid"]) and "/fn/w" in c and c, 20,
                           "the seed waiting in the next worker's cgroup")
        assert sup.cli("scale", "fn", "--min-warm", "2", "--run-dir", str(sup.run_dir)).returncode == 0
        second = wait_for(lambda: [w for w in sup.ready_workers("fn") if w["id"] != first["id"]], 20,
                          "a second worker")[0]
        assert cgroup_of(second["pid"]) == waiting
        assert psutil.Process(second["pid"]).ppid() == sup.component_pid("control-plane")
        wait_for(lambda: cgroup_of(seed) not in (waiting, cgroup_of(first["pid"])), 20, "the seed moving on")


def test_no_cgroup_outlives_the_run(tmp_path: Path) -> None:
    run_dir = (tmp_path / "run").absolute()
    name = f"ca-supervisor-{zlib.crc32(str(run_dir).encode()):08x}"
    assert isinstance(TREE, CgroupTree)
    bases = [base.parent / name for base in TREE.bases]
    with started(tmp_path, {"fn": {**FN, "disposable": True}}) as sup:
        assert any(base.exists() for base in bases)
        for _ in range(3):  # each invocation spends a worker: its cgroup goes with it
            assert sup.invoke({}, function="fn").status_code == 200
        leaves = lambda: sorted({p.name for base in bases for p in (base / "fn").glob("w*")})  # noqa: E731
        # The live worker's, the one its seed waits in, and a spent one not removed yet at most.
        wait_for(lambda: len(leaves()) <= 3, 20, f"spent workers' cgroups removed (left: {leaves()})")
    assert not any(base.exists() for base in bases)
