"""Per-worker cgroups (v1 and v2): limits, OOM detection, kill-all, removal.

The control plane makes ``<own cgroup>/<name>/<function>/<leaf>`` for every
worker (and each seed) in every hierarchy it uses, writes the function's
limits there, and the process moves itself in (``worker/isolation.py``
writes its pid into ``procs_files``) before any user code runs.

Rules:
- v1 when the memory, cpu or pids controllers are mounted as v1 (this
  machine: v1 beside an empty unified hierarchy); else v2, from the
  cgroup2 mount. Where nothing is writable, ``detect`` returns
  ``Unavailable`` with the reason, and the caller falls back.
- v2 forbids processes in a cgroup whose controllers are delegated to its
  children ("no internal processes"). In a v2 container the supervisor
  starts in the namespace's root cgroup with its processes in it, so
  ``detect(prepare=True)`` first moves every process of that cgroup into a
  leaf ``<own>/<name>-self``, then enables the controllers down to
  ``<own>/<name>``.
- A worker's cgroup is handed to its uid only as far as it needs: the
  leaf's ``cgroup.procs`` (and, v2, its function's, the common ancestor of
  two leaves a forked worker moves between) are chowned to it. It cannot
  make cgroups, change limits, or enter another function's.
- ``kill`` reaches every process inside (also one that left the worker's
  process group with setsid): ``cgroup.kill`` where the kernel has it, else
  SIGKILL to each listed pid until none is left, within a deadline.
- Every loop has a deadline; nothing here sleeps to wait for a condition
  except between kill rounds, bounded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000
KILL_DEADLINE_S = 1.0
KILL_ROUND_S = 0.01


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    memory: int | None = None  # bytes
    cpu: float | None = None  # cores
    pids: int | None = None


@dataclass(frozen=True, slots=True)
class Unavailable:
    reason: str


@dataclass(frozen=True, slots=True)
class Mount:
    path: str
    fstype: str  # cgroup | cgroup2
    options: frozenset[str]  # v1: the controllers (super options)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(Mount(_unescape(fields[4]), tail[0], frozenset(tail[2].split(","))))
    return mounts


def parse_self_cgroup(text: str) -> dict[str, str]:
    """``{controller: path}`` for v1 lines, ``{"": path}`` for the v2 line."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            found[""] = path
        for controller in controllers.split(","):
            if controller:
                found[controller] = path
    return found


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {value!r} to {path}: {exc.strerror}") from None


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


class CgroupTree:
    """The cgroup directories this supervisor may use: ``bases`` maps each
    hierarchy's directory (``<mount><own cgroup>/<name>``) to the controllers
    enforced through it."""

    def __init__(self, version: int, bases: dict[Path, frozenset[str]]) -> None:
        self.version = version
        self.bases = bases
        self.controllers = frozenset(c for controllers in bases.values() for c in controllers)

    @classmethod
    def detect(cls, name: str = "ca-supervisor", *, mountinfo: str = "/proc/self/mountinfo",
               self_cgroup: str = "/proc/self/cgroup", prepare: bool = True) -> CgroupTree | Unavailable:
        try:
            mounts = parse_mountinfo(_read(Path(mountinfo)))
            own = parse_self_cgroup(_read(Path(self_cgroup)))
        except OSError as exc:
            return Unavailable(f"cannot read the cgroup mounts: {exc}")
        v1 = {c: m for m in mounts if m.fstype == "cgroup" for c in m.options if c in CONTROLLERS}
        if any(c in v1 for c in CONTROLLERS):
            return cls._detect_v1(name, v1, own)
        v2 = [m for m in mounts if m.fstype == "cgroup2"]
        if not v2:
            return Unavailable("no cgroup hierarchy is mounted")
        return cls._detect_v2(name, Path(v2[0].path), own.get("", "/"), prepare)

    @classmethod
    def _detect_v1(cls, name: str, v1: dict[str, Mount], own: dict[str, str]) -> CgroupTree | Unavailable:
        bases: dict[Path, set[str]] = {}
        for controller in CONTROLLERS:
            mount = v1.get(controller)
            if mount is None:
                continue
            base = Path(mount.path) / own.get(controller, "/").lstrip("/") / name
            bases.setdefault(base, set()).add(controller)
        problems = []
        usable: dict[Path, frozenset[str]] = {}
        for base, controllers in bases.items():
            try:
                base.mkdir(exist_ok=True)
                _clean_stale(base)
                usable[base] = frozenset(controllers)
            except OSError as exc:
                problems.append(f"{', '.join(sorted(controllers))}: {base}: {exc.strerror or exc}")
        if not usable:
            return Unavailable("cgroup v1 is not writable here (" + "; ".join(problems) + ")")
        return cls(1, usable)

    @classmethod
    def _detect_v2(cls, name: str, mount: Path, own: str, prepare: bool) -> CgroupTree | Unavailable:
        home = mount / own.lstrip("/")
        base = home / name
        try:
            available = set(_read(home / "cgroup.controllers").split()) & set(CONTROLLERS)
            base.mkdir(exist_ok=True)
        except OSError as exc:
            return Unavailable(f"cgroup v2 at {home} is not writable here ({exc.strerror or exc})")
        wanted = " ".join(f"+{c}" for c in sorted(available))
        enabled = set()
        if available:
            try:
                _enable(home, wanted)
            except OSError as exc:
                if exc.errno != errno.EBUSY or not prepare:
                    return Unavailable(f"cannot delegate {wanted} below {home}: {exc.strerror or exc}")
                # "No internal processes": move ours into a leaf, then delegate.
                try:
                    _evacuate(home, home / f"{name}-self")
                    _enable(home, wanted)
                except OSError as exc2:
                    return Unavailable(f"cannot delegate {wanted} below {home}: {exc2.strerror or exc2}")
            try:
                _enable(base, wanted)
                enabled = available
            except OSError as exc:
                return Unavailable(f"cannot delegate {wanted} below {base}: {exc.strerror or exc}")
        try:
            _clean_stale(base)
        except OSError:
            pass
        return cls(2, {base: frozenset(enabled)})

    def describe(self) -> str:
        where = ", ".join(str(base) for base in self.bases)
        return f"cgroup v{self.version} ({', '.join(sorted(self.controllers)) or 'no controllers'}) under {where}"

    def create(self, function: str, leaf: str, limits: CgroupLimits, owner_uid: int | None = None) -> Cgroup:
        dirs: dict[Path, frozenset[str]] = {}
        try:
            for base, controllers in self.bases.items():
                parent = base / function
                parent.mkdir(exist_ok=True)
                if self.version == 2 and controllers:
                    _enable(parent, " ".join(f"+{c}" for c in sorted(controllers)))
                path = parent / leaf
                path.mkdir(exist_ok=True)
                dirs[path] = controllers
                self._limit(path, controllers, limits)
                if owner_uid is not None:
                    os.chown(path / "cgroup.procs", owner_uid, -1)
                    if self.version == 2:
                        os.chown(parent / "cgroup.procs", owner_uid, -1)
        except OSError as exc:
            Cgroup(self.version, dirs).remove()
            raise OSError(exc.errno, f"cannot make the cgroup {function}/{leaf}: {exc}") from None
        return Cgroup(self.version, dirs)

    def _limit(self, path: Path, controllers: frozenset[str], limits: CgroupLimits) -> None:
        if self.version == 1:
            if "memory" in controllers and limits.memory is not None:
                _write(path / "memory.limit_in_bytes", str(limits.memory))
                if (path / "memory.memsw.limit_in_bytes").exists():
                    _write(path / "memory.memsw.limit_in_bytes", str(limits.memory))  # swap does not bypass it
                with contextlib.suppress(OSError):
                    _write(path / "memory.swappiness", "0")
            if "cpu" in controllers and limits.cpu is not None:
                _write(path / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(path / "cpu.cfs_quota_us", str(max(1000, int(limits.cpu * CPU_PERIOD_US))))
            if "pids" in controllers and limits.pids is not None:
                _write(path / "pids.max", str(limits.pids))
            return
        if "memory" in controllers and limits.memory is not None:
            _write(path / "memory.max", str(limits.memory))
            for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                if (path / name).exists():
                    _write(path / name, value)
        if "cpu" in controllers and limits.cpu is not None:
            _write(path / "cpu.max", f"{max(1000, int(limits.cpu * CPU_PERIOD_US))} {CPU_PERIOD_US}")
        if "pids" in controllers and limits.pids is not None:
            _write(path / "pids.max", str(limits.pids))

    def close(self) -> None:
        """At the end of a run: removes every empty cgroup below the bases, and the bases."""
        for base in self.bases:
            with contextlib.suppress(OSError):
                _clean_stale(base)
                base.rmdir()

    def function_cgroups_cleanup(self, function: str) -> None:
        for base in self.bases:
            with contextlib.suppress(OSError):
                (base / function).rmdir()


class Cgroup:
    """One worker's (or seed's) cgroup, in each hierarchy used."""

    def __init__(self, version: int, dirs: dict[Path, frozenset[str]]) -> None:
        self.version = version
        self.dirs = dirs
        self.procs_files = [str(path / "cgroup.procs") for path in dirs]

    def join(self, pid: int) -> None:
        for path in self.procs_files:
            _write(Path(path), str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.dirs:
            with contextlib.suppress(OSError):
                found.update(int(line) for line in _read(path / "cgroup.procs").split())
        return found

    def kill(self, spare: Collection[int] = ()) -> int:
        """SIGKILL to everything inside but ``spare`` (a seed waiting there for its next clone)."""
        killed: set[int] = set()
        if self.version == 2 and not spare:
            for path in self.dirs:
                if (path / "cgroup.kill").exists():
                    with contextlib.suppress(OSError):
                        killed |= self.pids()
                        _write(path / "cgroup.kill", "1")
        deadline = time.monotonic() + KILL_DEADLINE_S
        while True:
            left = self.pids() - set(spare)
            if not left or time.monotonic() > deadline:
                return len(killed | left)
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            killed |= left
            time.sleep(KILL_ROUND_S)  # bounded by the deadline: the kernel needs a moment to empty it

    def oom_kills(self) -> int:
        for path, controllers in self.dirs.items():
            if "memory" not in controllers:
                continue
            name = "memory.oom_control" if self.version == 1 else "memory.events"
            with contextlib.suppress(OSError):
                return _counter(_read(path / name), "oom_kill")
        return 0

    def memory_current(self) -> int | None:
        for path, controllers in self.dirs.items():
            if "memory" in controllers:
                name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
                with contextlib.suppress(OSError, ValueError):
                    return int(_read(path / name))
        return None

    def cpu_usage_s(self) -> float | None:
        for path in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                if self.version == 1 and (path / "cpuacct.usage").exists():
                    return int(_read(path / "cpuacct.usage")) / 1e9
                if self.version == 2:
                    return _counter(_read(path / "cpu.stat"), "usage_usec") / 1e6
        return None

    def remove(self) -> bool:
        gone = True
        for path in self.dirs:
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                gone = False
        return gone


def _enable(cgroup: Path, controllers: str) -> None:
    current = set(_read(cgroup / "cgroup.subtree_control").split())
    if all(c.lstrip("+") in current for c in controllers.split()):
        return
    with open(cgroup / "cgroup.subtree_control", "w") as f:
        f.write(controllers)


def _evacuate(home: Path, leaf: Path) -> None:
    leaf.mkdir(exist_ok=True)
    for pid in _read(home / "cgroup.procs").split():
        with contextlib.suppress(ProcessLookupError, OSError):
            _write(leaf / "cgroup.procs", pid)


def _clean_stale(base: Path) -> None:
    """Removes empty cgroups left below ``base`` by an earlier run (deepest first)."""
    for root, dirs, _ in os.walk(base, topdown=False):
        for name in dirs:
            with contextlib.suppress(OSError):
                (Path(root) / name).rmdir()
