"""supervisor/control/cgroups.py on this machine's real cgroups, with real processes.

Root only (the cgroup tree is not writable otherwise). The limits themselves
are proved end to end by tests/e2e/test_hostile.py; here: that a process can
move itself in as the worker's uid, that kill() reaches what escaped the
process group, that an OOM kill is read back, and cleanup.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from supervisor.control.cgroups import CgroupLimits, CgroupTree, Unavailable

JOIN = "import sys\nfor f in sys.argv[1:]:\n    open(f, 'w').write('0')\n"


@pytest.fixture
def tree() -> Iterator[CgroupTree]:
    if os.geteuid() != 0:
        pytest.skip("cgroups are writable by root only here")
    found = CgroupTree.detect(f"ca-test-{os.getpid()}")
    if isinstance(found, Unavailable):
        pytest.skip(f"no writable cgroup tree: {found.reason}")
    try:
        yield found
    finally:
        found.close()
        assert all(not base.exists() for base in found.bases)


def run(code: str, *args: str, uid: int | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    prefix = f"import os\nos.setgroups([]); os.setgid({uid}); os.setuid({uid})\n" if uid is not None else ""
    return subprocess.run([sys.executable, "-c", prefix + code, *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_process_of_the_owner_uid_moves_itself_in(tree: CgroupTree) -> None:
    cgroup = tree.create("fn", "w1", CgroupLimits(pids=16), owner_uid=65534)
    try:
        done = run(JOIN + "print(open('/proc/self/cgroup').read())", *cgroup.procs_files, uid=65534)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("/fn/w1") == len(cgroup.procs_files)
        other = tree.create("fn", "w2", CgroupLimits(pids=16))  # not handed to that uid
        try:
            denied = run(JOIN, *other.procs_files, uid=65534)
            assert denied.returncode != 0 and "PermissionError" in denied.stderr
        finally:
            assert other.remove()
    finally:
        assert cgroup.remove()


def test_kill_reaches_processes_that_left_the_group(tree: CgroupTree) -> None:
    cgroup = tree.create("fn", "w", CgroupLimits())
    code = JOIN + ("import subprocess\n"
                   "child = subprocess.Popen(['sleep', '300'], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                   "print(child.pid, flush=True)\n")
    try:
        done = run(code, *cgroup.procs_files)
        assert done.returncode == 0, done.stderr
        escaped = int(done.stdout.split()[0])
        assert psutil.Process(escaped).ppid() != os.getpid()  # an orphan now, in its own session
        assert escaped in cgroup.pids()
        assert cgroup.kill() >= 1
        deadline = time.monotonic() + 10
        while psutil.pid_exists(escaped) and psutil.Process(escaped).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the escaped process survived kill()"
            time.sleep(0.02)
        assert cgroup.pids() == set() and cgroup.remove()
    finally:
        cgroup.kill()
        cgroup.remove()


def test_an_oom_kill_is_read_back(tree: CgroupTree) -> None:
    if "memory" not in tree.controllers:
        pytest.skip("no memory controller here")
    cgroup = tree.create("fn", "hog", CgroupLimits(memory=48 << 20))
    try:
        done = run(JOIN + "x = bytearray(400 << 20)\nprint('survived')", *cgroup.procs_files)
        assert done.returncode == -9 and "survived" not in done.stdout
        assert cgroup.oom_kills() >= 1
    finally:
        cgroup.kill()
        assert cgroup.remove()


def test_v2_mechanics_on_the_unified_mount() -> None:
    """On a hybrid machine the cgroup2 mount has no controllers, but making,
    joining, listing, killing and removing a cgroup there works the same."""
    unified = Path("/sys/fs/cgroup/unified")
    if os.geteuid() != 0 or not (unified / "cgroup.procs").exists():
        pytest.skip("no writable cgroup2 mount beside v1 here")
    mountinfo = Path(f"/tmp/ca-test-mountinfo-{os.getpid()}")
    mountinfo.write_text(f"1 1 0:1 / {unified} rw - cgroup2 cgroup2 rw\n")
    try:
        tree = CgroupTree.detect(f"ca-test-{os.getpid()}", mountinfo=str(mountinfo))
        assert isinstance(tree, CgroupTree) and tree.version == 2, tree
        cgroup = tree.create("fn", "w", CgroupLimits())
        try:
            done = run(JOIN + "import subprocess\nprint(subprocess.Popen(['sleep', '300'], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)",
                       *cgroup.procs_files)
            assert done.returncode == 0, done.stderr
            assert int(done.stdout.split()[0]) in cgroup.pids()
            cgroup.kill()
            assert cgroup.pids() == set()
        finally:
            cgroup.kill()
            assert cgroup.remove()
            tree.close()
    finally:
        mountinfo.unlink()
