"""supervisor/control/cgroups.py on a fake cgroupfs (plain directories and files):
mount discovery, layout, the limits written, v2 delegation and evacuation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor.control.cgroups import (
    CgroupLimits,
    CgroupTree,
    Unavailable,
    parse_mountinfo,
    parse_self_cgroup,
)

V1_MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
31 30 0:27 / {root}/memory rw,relatime - cgroup cgroup rw,memory
32 30 0:28 / {root}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
33 30 0:29 / {root}/pids rw,relatime - cgroup cgroup rw,pids
34 30 0:30 / {root}/systemd rw,relatime - cgroup cgroup rw,name=systemd
35 30 0:31 / {root}/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_SELF = "5:name=systemd:/\n4:pids:/\n3:cpu,cpuacct:/\n2:memory:/box/one\n0::/\n"
V2_MOUNTINFO = "40 1 0:40 / {root} rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"


def fake_v1(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "cg"
    for hierarchy in ("memory/box/one", "cpu,cpuacct", "pids", "systemd", "unified"):
        (root / hierarchy).mkdir(parents=True)
    mountinfo, self_cgroup = tmp_path / "mountinfo", tmp_path / "cgroup"
    mountinfo.write_text(V1_MOUNTINFO.format(root=root))
    self_cgroup.write_text(V1_SELF)
    return mountinfo, self_cgroup


class FakeV2:
    """A cgroup2 tree in plain files: mkdir does not create the interface files, so
    ``mkdir`` here is followed by ``populate``; subtree_control accepts writes."""

    def __init__(self, tmp_path: Path, controllers: str = "cpu memory pids io", procs: str = "1\n7\n") -> None:
        self.root = tmp_path / "cg2"
        self.root.mkdir()
        self.mountinfo = tmp_path / "mountinfo"
        self.mountinfo.write_text(V2_MOUNTINFO.format(root=self.root))
        self.self_cgroup = tmp_path / "cgroup"
        self.self_cgroup.write_text("0::/\n")
        (self.root / "cgroup.controllers").write_text(controllers + "\n")
        (self.root / "cgroup.subtree_control").write_text("")
        (self.root / "cgroup.procs").write_text(procs)
        (self.root / "ca-x").mkdir()  # as the kernel would fill it on mkdir
        (self.root / "ca-x/cgroup.subtree_control").write_text("")


def test_mountinfo_finds_cgroup_mounts_with_their_controllers() -> None:
    text = V1_MOUNTINFO.format(root="/sys/fs/cgroup") + r"36 30 0:32 / /mnt/with\040space rw - cgroup cgroup rw,pids" + "\n"
    mounts = parse_mountinfo(text)
    assert [m.path for m in mounts] == ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu,cpuacct",
                                        "/sys/fs/cgroup/pids", "/sys/fs/cgroup/systemd",
                                        "/sys/fs/cgroup/unified", "/mnt/with space"]
    assert mounts[1].options >= {"cpu", "cpuacct"} and mounts[3].options >= {"name=systemd"}
    assert mounts[4].fstype == "cgroup2"


def test_self_cgroup_maps_each_controller_and_the_v2_line() -> None:
    found = parse_self_cgroup(V1_SELF)
    assert found["memory"] == "/box/one" and found["cpu"] == found["cpuacct"] == "/"
    assert found[""] == "/" and found["name=systemd"] == "/"


def test_v1_uses_each_controllers_hierarchy_under_its_own_cgroup(tmp_path: Path) -> None:
    mountinfo, self_cgroup = fake_v1(tmp_path)
    tree = CgroupTree.detect("ca-x", mountinfo=str(mountinfo), self_cgroup=str(self_cgroup))
    assert isinstance(tree, CgroupTree) and tree.version == 1
    root = tmp_path / "cg"
    assert tree.bases == {root / "memory/box/one/ca-x": frozenset({"memory"}),
                          root / "cpu,cpuacct/ca-x": frozenset({"cpu"}), root / "pids/ca-x": frozenset({"pids"})}
    assert tree.controllers == {"memory", "cpu", "pids"}
    assert "cgroup v1 (cpu, memory, pids)" in tree.describe()


def test_v1_limits_are_written_where_they_belong(tmp_path: Path) -> None:
    mountinfo, self_cgroup = fake_v1(tmp_path)
    tree = CgroupTree.detect("ca-x", mountinfo=str(mountinfo), self_cgroup=str(self_cgroup))
    assert isinstance(tree, CgroupTree)
    cgroup = tree.create("fn", "fn-1", CgroupLimits(memory=64 << 20, cpu=0.25, pids=16))
    root = tmp_path / "cg"
    memory, cpu, pids = root / "memory/box/one/ca-x/fn/fn-1", root / "cpu,cpuacct/ca-x/fn/fn-1", root / "pids/ca-x/fn/fn-1"
    assert (memory / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "25000"
    assert (pids / "pids.max").read_text() == "16"
    assert cgroup.procs_files == [str(memory / "cgroup.procs"), str(cpu / "cgroup.procs"), str(pids / "cgroup.procs")]


def test_an_unset_limit_writes_nothing(tmp_path: Path) -> None:
    mountinfo, self_cgroup = fake_v1(tmp_path)
    tree = CgroupTree.detect("ca-x", mountinfo=str(mountinfo), self_cgroup=str(self_cgroup))
    assert isinstance(tree, CgroupTree)
    tree.create("fn", "fn-1", CgroupLimits(memory=1 << 30))
    assert not (tmp_path / "cg/pids/ca-x/fn/fn-1/pids.max").exists()
    assert not (tmp_path / "cg/cpu,cpuacct/ca-x/fn/fn-1/cpu.cfs_quota_us").exists()


def test_detect_removes_empty_leftovers_of_an_earlier_run_and_keeps_busy_ones(tmp_path: Path) -> None:
    mountinfo, self_cgroup = fake_v1(tmp_path)
    stale = tmp_path / "cg/pids/ca-x/old-fn/old-worker"
    stale.mkdir(parents=True)
    busy = tmp_path / "cg/pids/ca-x/fn/w"
    busy.mkdir(parents=True)
    (busy / "cgroup.procs").write_text("123\n")  # a file: rmdir fails, as for a cgroup with processes
    CgroupTree.detect("ca-x", mountinfo=str(mountinfo), self_cgroup=str(self_cgroup))
    assert not stale.parent.exists() and busy.exists()


def test_no_writable_hierarchy_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    mountinfo, self_cgroup = fake_v1(tmp_path)
    mountinfo.write_text(V1_MOUNTINFO.format(root=tmp_path / "missing"))
    found = CgroupTree.detect("ca-x", mountinfo=str(mountinfo), self_cgroup=str(self_cgroup))
    assert isinstance(found, Unavailable) and "not writable" in found.reason


def test_no_cgroup_mount_at_all(tmp_path: Path) -> None:
    mountinfo, self_cgroup = tmp_path / "mountinfo", tmp_path / "cgroup"
    mountinfo.write_text("22 1 0:21 / / rw - overlay overlay rw\n")
    self_cgroup.write_text("0::/\n")
    found = CgroupTree.detect(mountinfo=str(mountinfo), self_cgroup=str(self_cgroup))
    assert isinstance(found, Unavailable) and "no cgroup hierarchy" in found.reason


def test_v2_delegates_the_controllers_down_to_the_worker(tmp_path: Path) -> None:
    fake = FakeV2(tmp_path, procs="")
    tree = CgroupTree.detect("ca-x", mountinfo=str(fake.mountinfo), self_cgroup=str(fake.self_cgroup))
    assert isinstance(tree, CgroupTree) and tree.version == 2
    assert tree.controllers == {"cpu", "memory", "pids"}  # io is not one of ours
    assert (fake.root / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    base = fake.root / "ca-x"
    assert (base / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    (base / "fn").mkdir()
    (base / "fn/cgroup.subtree_control").write_text("")
    tree.create("fn", "w1", CgroupLimits(memory=32 << 20, cpu=1.5, pids=8))
    leaf = base / "fn/w1"
    assert (base / "fn/cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (leaf / "memory.max").read_text() == str(32 << 20)
    assert (leaf / "cpu.max").read_text() == "150000 100000"
    assert (leaf / "pids.max").read_text() == "8"


def test_v2_container_root_with_processes_is_evacuated_into_a_leaf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from supervisor.control import cgroups

    fake = FakeV2(tmp_path, procs="1\n7\n")
    real_enable = cgroups._enable

    def enable(cgroup: Path, controllers: str) -> None:
        """The kernel's "no internal processes" rule, for any root with processes."""
        if cgroup.name.startswith("cg2") and (cgroup / "cgroup.procs").read_text().split():
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_enable(cgroup, controllers)

    def write(path: Path, value: str) -> None:  # a write to a leaf's procs moves the pid out of the root
        if path.name == "cgroup.procs" and not path.parent.name.startswith("cg2"):
            source = path.parent.parent / "cgroup.procs"
            source.write_text("\n".join(p for p in source.read_text().split() if p != value))
            with open(path, "a") as f:
                f.write(value + "\n")
            return
        path.write_text(value)

    monkeypatch.setattr(cgroups, "_enable", enable)
    monkeypatch.setattr(cgroups, "_write", write)
    tree = CgroupTree.detect("ca-x", mountinfo=str(fake.mountinfo), self_cgroup=str(fake.self_cgroup))
    assert isinstance(tree, CgroupTree), tree
    assert (fake.root / "cgroup.procs").read_text().split() == []
    assert (fake.root / "ca-x-self/cgroup.procs").read_text().split() == ["1", "7"]
    assert (fake.root / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    # Without prepare, the same container is reported, not changed.
    (tmp_path / "again").mkdir()
    fake2 = FakeV2(tmp_path / "again", procs="1\n")
    found = CgroupTree.detect("ca-x", mountinfo=str(fake2.mountinfo), self_cgroup=str(fake2.self_cgroup),
                              prepare=False)
    assert isinstance(found, Unavailable) and "cannot delegate" in found.reason
    assert (fake2.root / "cgroup.procs").read_text().split() == ["1"]


def test_oom_kills_are_read_from_the_memory_controller(tmp_path: Path) -> None:
    mountinfo, self_cgroup = fake_v1(tmp_path)
    tree = CgroupTree.detect("ca-x", mountinfo=str(mountinfo), self_cgroup=str(self_cgroup))
    assert isinstance(tree, CgroupTree)
    cgroup = tree.create("fn", "w", CgroupLimits(memory=1 << 20))
    memory = tmp_path / "cg/memory/box/one/ca-x/fn/w"
    assert cgroup.oom_kills() == 0  # no file yet: unknown counts as none
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cgroup.oom_kills() == 2


def test_owner_gets_only_the_procs_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mountinfo, self_cgroup = fake_v1(tmp_path)
    tree = CgroupTree.detect("ca-x", mountinfo=str(mountinfo), self_cgroup=str(self_cgroup))
    assert isinstance(tree, CgroupTree)
    chowned: list[str] = []
    monkeypatch.setattr(os, "chown", lambda path, uid, gid: chowned.append(f"{Path(path).name}:{uid}"))
    tree.create("fn", "w", CgroupLimits(pids=4), owner_uid=4321)
    assert chowned == ["cgroup.procs:4321"] * 3
