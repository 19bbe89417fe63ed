"""What isolation each function's workers get: decided here, done by ``worker/isolation.py``.

Pure decisions from two inputs: the function's ``limits`` and what this
container allows (``Capabilities``: a probe of the privileged steps plus
the cgroup tree). The result, a ``Sandbox`` per function, is the plan a
worker carries out on itself, a one-line summary per kind of isolation
for logs and ``supervisor status``, and the problems that make the config
unusable here.

Rules:
- Never root by accident: as root, workers run as ``user`` (default
  ``nobody``; ``"auto"``: a uid of the function's own, stable across runs
  and reloads; ``"root"`` only when written). Not root: they keep the
  supervisor's uid and the summary says so.
- What cannot be enforced here is said (a summary starting ``"not
  enforced"`` or naming the fallback), never silently skipped; with
  ``require_isolation = true`` each such gap is a problem and the config is
  refused, naming the key.
- Resources: cgroups when the tree is writable; else ``memory`` falls back
  to ``RLIMIT_DATA`` plus RSS polling with a kill, ``pids`` to
  ``RLIMIT_NPROC`` when the function has a uid of its own (it counts every
  process of that uid), ``cpu`` to polling with a kill after ``CPU_WINDOW_S``
  above it (like Noslate's turf: it cannot be throttled without a cgroup).
- The worker's user must reach the interpreter, the code and the data
  plane's socket. In a mount namespace, a directory on the way that it
  cannot traverse (``/root`` holding the interpreter, a 0700 temp dir) is
  covered by a tmpfs into which only those paths are bound back,
  read-only; without one, the function is refused with the path to fix.
- A pull runtime's API (Lambda, SCF) is private to its worker: inside the
  worker's network namespace when it has one (``network = "none"``), and
  always behind the worker's check that a connection comes from the
  runtime's own processes; ``runtime_api`` in the summary says which.
  A function that may use the network keeps the shared namespace (one of
  its own would have no route out).
"""

from __future__ import annotations

import os
import pwd
import resource
import stat
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.config import PULL_RUNTIMES, Config, FunctionConfig, Problem
from supervisor.control.cgroups import CgroupLimits, CgroupTree

NOBODY = "nobody"
AUTO_UID_BASE = 20000
AUTO_UID_SPAN = 30000
TMP_SIZE = 512 << 20  # FC gives a function 512 MB of /tmp
CPU_WINDOW_S = 10.0  # without a cpu cgroup: a worker above its cores for this long is killed
CPU_TOLERANCE = 1.2
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What this container lets a worker do ("" = available, else why not)."""

    root: bool
    uid: int
    gid: int
    mount: str = "not probed"
    network: str = "not probed"
    setuid: str = "not probed"
    seccomp: str = "not probed"
    cgroups: str = "not probed"  # "" when a cgroup tree is writable
    cgroup_controllers: frozenset[str] = frozenset()
    cgroup_version: int = 0


_probed: dict[str, Any] | None = None


def probe(timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Runs ``python -m worker.isolation --probe`` (a throwaway process), once per
    process: the planes, forked from the supervisor after it checked the config,
    inherit its answer (what the container allows does not change while it runs)."""
    global _probed
    if _probed is None:
        _probed = _run_probe(timeout_s)
    return dict(_probed)


def _run_probe(timeout_s: float) -> dict[str, Any]:
    import json

    try:
        done = subprocess.run([sys.executable, "-P", "-m", "worker.isolation", "--probe"], capture_output=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL, check=False)
        found: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        return found
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        why = f"the isolation probe failed: {exc}"
        return {"uid": os.getuid(), "root": os.geteuid() == 0, "mount": why, "network": why, "setuid": why,
                "seccomp": why}


def capabilities(found: Mapping[str, Any], cgroups: Any) -> Capabilities:
    """``found``: the probe's answer; ``cgroups``: a CgroupTree or an Unavailable."""
    reason = getattr(cgroups, "reason", None)
    return Capabilities(
        root=bool(found.get("root")), uid=int(found.get("uid", os.getuid())), gid=os.getgid(),
        mount=str(found.get("mount", "")), network=str(found.get("network", "")),
        setuid=str(found.get("setuid", "")), seccomp=str(found.get("seccomp", "")),
        cgroups="" if reason is None else str(reason),
        cgroup_controllers=frozenset(getattr(cgroups, "controllers", ())) if reason is None else frozenset(),
        cgroup_version=int(getattr(cgroups, "version", 0)) if reason is None else 0)


@dataclass(frozen=True, slots=True)
class Identity:
    uid: int
    gid: int
    name: str


@dataclass(slots=True)
class Sandbox:
    function: str
    identity: Identity | None  # None: the supervisor's own
    cgroup_limits: CgroupLimits | None  # None: no cgroup of its own
    poll_memory: int  # > 0: kill a worker whose RSS passes this (no memory cgroup)
    plan: dict[str, Any]  # worker/isolation.py's plan, less the cgroup
    summary: dict[str, str]
    problems: list[Problem] = field(default_factory=list)
    poll_cpu: float = 0.0  # > 0: kill a worker above these cores for CPU_WINDOW_S (no cpu cgroup)

    def worker_plan(self, cgroup_procs: list[str], stage: str = "full") -> dict[str, Any]:
        return {**self.plan, "cgroup_procs": cgroup_procs, "stage": stage}

    def describe(self) -> str:
        return "; ".join(f"{key}: {value}" for key, value in self.summary.items())


def auto_uids(names: Iterable[str], taken: set[int]) -> dict[str, int]:
    """A uid per function, from its name (stable while names stay), distinct,
    never one in ``taken`` (the system's users)."""
    out: dict[str, int] = {}
    used = set(taken)
    for name in sorted(set(names)):
        slot = zlib.crc32(name.encode()) % AUTO_UID_SPAN
        for step in range(AUTO_UID_SPAN):
            uid = AUTO_UID_BASE + (slot + step) % AUTO_UID_SPAN
            if uid not in used:
                break
        else:  # pragma: no cover - 30000 functions in one container
            raise ValueError("no free uid for user = 'auto'")
        out[name] = uid
        used.add(uid)
    return out


def system_uids() -> set[int]:
    return {entry.pw_uid for entry in pwd.getpwall()}


def resolve_user(value: str, auto: Mapping[str, int], function: str,
                 lookup: Callable[[str], Any] = pwd.getpwnam) -> Identity:
    """Raises LookupError with a user-facing message."""
    if value == "auto":
        return Identity(auto[function], auto[function], f"auto:{function}")
    if value == "root":
        return Identity(0, 0, "root")
    if value.isdigit():
        return Identity(int(value), int(value), value)
    try:
        entry = lookup(value)
    except KeyError:
        raise LookupError(f"no such user {value!r} in this image (a user name, a numeric uid, 'auto' or 'root')") from None
    return Identity(int(entry.pw_uid), int(entry.pw_gid), value)


def _traversable(mode: int, owner: int, group: int, who: Identity | None) -> bool:
    if who is None or who.uid == 0:
        return True
    if owner == who.uid:
        return bool(mode & stat.S_IXUSR)
    if group == who.gid:
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def blocked_at(path: str, who: Identity | None, stat_fn: Callable[[str], os.stat_result] = os.stat) -> str | None:
    """The first directory on the way to ``path`` that ``who`` cannot traverse."""
    parts = Path(path).parts
    for i in range(1, len(parts)):
        directory = str(Path(*parts[:i]))
        try:
            st = stat_fn(directory)
        except OSError:
            return None  # missing: reported by whatever needs it
        if not _traversable(st.st_mode, st.st_uid, st.st_gid, who):
            return directory
    return None


# An rlimit a plan sets, and the limits key it enforces.
RLIMIT_KEYS = {"nofile": "nofile", "data": "memory", "nproc": "pids"}
CAP_SYS_RESOURCE = 24


def rlimit_ceiling(name: str) -> tuple[int, str] | None:
    """The most a worker can set rlimit ``name`` to here, and why; None: no ceiling.

    A worker sets its rlimits (soft = hard) before it drops root: with
    CAP_SYS_RESOURCE up to anything (RLIMIT_NOFILE up to fs.nr_open), without
    it up to the hard limit it inherits from the supervisor.
    """
    try:
        with open("/proc/self/status") as status:
            caps = next((int(line.split()[1], 16) for line in status if line.startswith("CapEff:")), 0)
    except (OSError, ValueError, IndexError):
        caps = ~0 if os.geteuid() == 0 else 0
    if caps >> CAP_SYS_RESOURCE & 1:
        if name != "nofile":
            return None
        try:
            with open("/proc/sys/fs/nr_open") as nr_open:
                return int(nr_open.read()), "fs.nr_open"
        except (OSError, ValueError):
            return None
    hard = resource.getrlimit({"nofile": resource.RLIMIT_NOFILE, "data": resource.RLIMIT_DATA,
                               "nproc": resource.RLIMIT_NPROC}[name])[1]
    if hard == resource.RLIM_INFINITY:
        return None
    return hard, f"the supervisor's hard RLIMIT_{name.upper()}, which a worker cannot raise without CAP_SYS_RESOURCE"


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def plan_function(fn: FunctionConfig, caps: Capabilities, *, others: Iterable[str], needed: Iterable[str],
                  socket_dir: str, auto: Mapping[str, int],
                  lookup: Callable[[str], Any] = pwd.getpwnam,
                  stat_fn: Callable[[str], os.stat_result] = os.stat) -> Sandbox:
    """``others``: the other functions' code dirs; ``needed``: what every worker
    reads besides its code (the interpreter, the installed packages)."""
    limits = fn.limits
    key = f"functions.{fn.name}.limits"
    required = limits.require_isolation
    problems: list[Problem] = []
    summary: dict[str, str] = {}

    def gap(name: str, message: str) -> None:
        summary[name] = f"not enforced ({message})"
        if required:
            problems.append(Problem(f"{key}.{'user' if name == 'identity' else name}",
                                    f"require_isolation: {message}"))

    # ---- identity ----
    identity: Identity | None = None
    if caps.root and caps.setuid == "":
        try:
            identity = resolve_user(limits.user or NOBODY, auto, fn.name, lookup)
        except LookupError as exc:
            problems.append(Problem(f"{key}.user", str(exc)))
        if identity is not None:
            configured = " as configured" if identity.uid == 0 else ""
            summary["identity"] = f"uid {identity.uid} gid {identity.gid} ({identity.name}{configured})"
            if identity.uid == 0:
                identity = None if limits.user == "root" else identity
    elif caps.root:
        gap("identity", f"cannot change user here: {caps.setuid}")
    else:
        summary["identity"] = f"uid {caps.uid} (the supervisor's own: it is not root)"
        if limits.user is not None and required:
            problems.append(Problem(f"{key}.user", f"require_isolation: user = {limits.user!r} needs the supervisor "
                                                   "to run as root"))
    switched = identity is not None and identity.uid != caps.uid

    # ---- resources ----
    wanted = {name for name in ("memory", "cpu", "pids") if getattr(limits, name) is not None}
    in_cgroup = wanted & caps.cgroup_controllers if caps.cgroups == "" else set()
    rlimits: dict[str, int] = {"core": 0}
    if limits.nofile is not None:
        rlimits["nofile"] = limits.nofile
    poll_memory = 0
    parts = [f"cgroup v{caps.cgroup_version} ({', '.join(sorted(in_cgroup))})"] if in_cgroup else []
    if "memory" in wanted and "memory" not in in_cgroup:
        assert limits.memory is not None
        rlimits["data"] = limits.memory
        poll_memory = limits.memory
        parts.append("memory by RLIMIT_DATA + RSS polling")
    if "pids" in wanted and "pids" not in in_cgroup:
        if switched and limits.user == "auto":
            assert limits.pids is not None
            rlimits["nproc"] = limits.pids * (fn.max_workers + 2)
            parts.append("pids by RLIMIT_NPROC for the function's uid")
        else:
            parts.append("pids not enforced")
    poll_cpu = 0.0
    if "cpu" in wanted and "cpu" not in in_cgroup:
        assert limits.cpu is not None
        poll_cpu = limits.cpu
        parts.append(f"cpu by polling (killed above it for {CPU_WINDOW_S:g} s; not throttled)")
    for name, value in rlimits.items():
        ceiling = rlimit_ceiling(name) if name in RLIMIT_KEYS else None
        if ceiling is not None and value > ceiling[0]:
            problems.append(Problem(f"{key}.{RLIMIT_KEYS[name]}", f"needs RLIMIT_{name.upper()} = {value}, above what "
                                                                  f"a worker can set here: {ceiling[0]} ({ceiling[1]})"))
    fallback_reason = caps.cgroups or "controller missing"
    if wanted - in_cgroup:
        parts.append(f"cgroups: {fallback_reason}")
        if required:
            problems.append(Problem(f"{key}.{sorted(wanted - in_cgroup)[0]}",
                                    f"require_isolation: no cgroup can enforce {', '.join(sorted(wanted - in_cgroup))} "
                                    f"here ({fallback_reason})"))
    summary["resources"] = "; ".join(parts) if parts else "no limits set"
    if "nofile" in rlimits:
        summary["resources"] += f"; nofile {limits.nofile} by rlimit"
    cgroup_limits = (CgroupLimits(memory=limits.memory if "memory" in in_cgroup else None,
                                  cpu=limits.cpu if "cpu" in in_cgroup else None,
                                  pids=limits.pids if "pids" in in_cgroup else None)
                     if caps.cgroups == "" else None)

    # ---- namespaces ----
    mount = caps.root and caps.mount == ""
    network = limits.network == "none"
    if network and not (caps.root and caps.network == ""):
        network = False
        gap("network", "network = 'none' needs a network namespace: "
                       + (caps.network or "the supervisor is not root"))
    code_dir = str(fn.code_dir)
    paths = [code_dir, socket_dir, *needed]
    covers: list[dict[str, Any]] = []
    readonly: list[str] = []
    hide: list[str] = []
    if mount:
        tmp_keep = [p for p in paths if _under(p, "/tmp")]
        covers.append({"path": "/tmp", "mode": 0o1777, "size": TMP_SIZE, "writable": True, "keep": tmp_keep})
        blocked: dict[str, list[str]] = {}
        for path in paths:
            if _under(path, "/tmp"):
                continue
            where = blocked_at(path, identity, stat_fn)
            if where is not None:
                blocked.setdefault(where, []).append(path)
        covers += [{"path": where, "mode": 0o755, "keep": keep} for where, keep in sorted(blocked.items())]
        covered = ["/tmp", *blocked]
        readonly = [code_dir] if not any(_under(code_dir, c) for c in covered) else []
        hide = sorted({o for o in others if o != code_dir and not any(_under(p, o) for p in paths)})
        summary["namespaces"] = ", ".join(["mount (private /tmp, code read-only, other functions' code hidden)"]
                                          + (["network (empty)"] if network else []))
    else:
        why = caps.mount if caps.root else "the supervisor is not root"
        summary.setdefault("namespaces", f"none ({why})" if not network else "network (empty)")
        if network:
            summary["namespaces"] = f"network (empty); no mount namespace ({why})"
        if switched:
            for path in paths:
                where = blocked_at(path, identity, stat_fn)
                if where is not None:
                    assert identity is not None
                    problems.append(Problem(f"{key}.user", f"{runs_as(identity)}: make {where} traversable by "
                                                           f"them (chmod a+x {where}) so that they reach {path}; "
                                                           f"without a mount namespace ({why}) it cannot be bound "
                                                           f"in"))
                    break

    # ---- a pull runtime's API (worker/runtimes/gate.py) ----
    if fn.runtime in PULL_RUNTIMES:
        summary["runtime_api"] = (
            "in the worker's own network namespace (no other process can reach it); each connection also "
            "checked to come from the runtime's own processes" if network else
            "on the shared loopback; each connection admitted only from the runtime's own processes "
            "(its socket open in the worker's process tree), whatever the uid")

    # ---- seccomp ----
    seccomp = limits.seccomp and caps.seccomp == ""
    if not limits.seccomp:
        summary["seccomp"] = "off (seccomp = false)"
    elif seccomp:
        summary["seccomp"] = "deny-list"
    else:
        gap("seccomp", f"the syscall filter cannot be loaded: {caps.seccomp}")

    plan: dict[str, Any] = {
        "mount": mount, "network": network, "covers": covers, "readonly": readonly, "hide": hide,
        "rlimits": rlimits, "uid": identity.uid if switched and identity else None,
        "gid": identity.gid if switched and identity else None, "seccomp": seccomp,
    }
    return Sandbox(fn.name, identity if switched else None, cgroup_limits, poll_memory, plan, summary, problems,
                   poll_cpu)


def cpu_over_limit(samples: list[tuple[float, float]], cores: float, window_s: float = CPU_WINDOW_S,
                   tolerance: float = CPU_TOLERANCE) -> bool:
    """``samples``: (time, CPU seconds used so far), oldest first. True when the
    CPU used over the last ``window_s`` (at least; from the newest sample that far
    back) is above ``cores`` times the tolerance: a shorter burst never is."""
    if not samples:
        return False
    end_t, end_cpu = samples[-1]
    start = next((sample for sample in reversed(samples) if end_t - sample[0] >= window_s), None)
    if start is None:
        return False
    return (end_cpu - start[1]) > cores * tolerance * (end_t - start[0])


def runtime_paths() -> list[str]:
    """What every worker reads besides its code: the interpreter's prefixes and
    where this package and its dependencies are installed."""
    import supervisor

    found = {sys.base_prefix, sys.prefix, str(Path(supervisor.__file__).resolve().parent.parent)}
    found.update(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    return sorted(os.path.realpath(p) for p in found)


def plan_all(config: Config, caps: Capabilities, socket_dir: str) -> dict[str, Sandbox]:
    functions = list(config.functions.values())
    needs_auto = [f.name for f in functions if f.limits.user == "auto"]
    auto = auto_uids(needs_auto, system_uids()) if needs_auto else {}
    needed = runtime_paths()
    code_dirs = [str(f.code_dir) for f in functions]
    return {f.name: plan_function(f, caps, others=[d for d in code_dirs if d != str(f.code_dir)], needed=needed,
                                  socket_dir=socket_dir, auto=auto) for f in functions}


class Isolation:
    """This container's capabilities and cgroup tree, and the plans made from them."""

    def __init__(self, caps: Capabilities, tree: CgroupTree | None, socket_dir: str) -> None:
        self.caps = caps
        self.tree = tree
        self.socket_dir = socket_dir

    @classmethod
    def detect(cls, run_dir: Path, prepare_cgroups: bool = True) -> Isolation:
        """Probes this container; the cgroup tree is named after ``run_dir`` so that
        two supervisors on one machine never share (or clean up) each other's."""
        run_dir = run_dir.expanduser().absolute()
        name = f"ca-supervisor-{zlib.crc32(str(run_dir).encode()):08x}"
        tree = CgroupTree.detect(name, prepare=prepare_cgroups)
        caps = capabilities(probe(), tree)
        return cls(caps, tree if isinstance(tree, CgroupTree) else None, str(run_dir))

    def plan(self, config: Config) -> dict[str, Sandbox]:
        return plan_all(config, self.caps, self.socket_dir)

    def describe_cgroups(self) -> str:
        return self.tree.describe() if self.tree is not None else f"none ({self.caps.cgroups})"


def runs_as(who: Identity) -> str:
    """The start of a message about what the workers' user cannot do."""
    return f"workers run as uid {who.uid} ({who.name})"


def _readable(st: os.stat_result, who: Identity, directory: bool) -> bool:
    """Whether ``who`` (its uid and gid only: workers drop supplementary groups) can read
    the file, or list and traverse the directory, of ``st``."""
    if who.uid == 0:
        return True
    shift = 6 if st.st_uid == who.uid else 3 if st.st_gid == who.gid else 0
    wanted = (0o5 if directory else 0o4) << shift
    return st.st_mode & wanted == wanted


MAX_CODE_ENTRIES = 100_000  # what one function's code check looks at, at most (the rest is not)


def unreadable_code(code_dir: str, who: Identity, skip: Iterable[str] = (), limit: int = MAX_CODE_ENTRIES,
                    stat_fn: Callable[[str], os.stat_result] = os.stat) -> list[str]:
    """Whatever in ``code_dir`` (itself included) ``who`` cannot read: a file it cannot
    read, a directory it cannot list or traverse (what is inside one is not looked at),
    in walk order. ``skip``: directories left out (the run directory, if it is there)."""
    found: list[str] = []
    seen = 0
    skipped = {os.path.normpath(path) for path in skip}
    stack = [code_dir]
    while stack and seen < limit:
        directory = stack.pop()
        try:
            st = stat_fn(directory)
        except OSError:
            continue  # gone, or a link to nowhere: nothing a worker could read either way
        seen += 1
        if not _readable(st, who, True):
            found.append(directory)
            continue
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if os.path.normpath(entry.path) not in skipped:
                    stack.append(entry.path)
                continue
            try:
                st = stat_fn(entry.path)
            except OSError:
                continue
            seen += 1
            if stat.S_ISDIR(st.st_mode):  # a link to a directory: the worker may go there, the walk does not
                ok = _readable(st, who, True)
            else:
                ok = not stat.S_ISREG(st.st_mode) or _readable(st, who, False)
            if not ok:
                found.append(entry.path)
    return found


def code_problems(config: Config, sandboxes: Mapping[str, Sandbox], names: Iterable[str] | None = None) -> list[Problem]:
    """A problem for each function (of ``names``, default all) whose workers, running as
    another user than the supervisor, cannot read all of its code."""
    problems = []
    run_dir = os.path.abspath(config.supervisor.run_dir)
    for name in config.functions if names is None else names:
        sandbox, fn = sandboxes.get(name), config.functions[name]
        if sandbox is None or sandbox.identity is None:
            continue  # the supervisor's own user (or root, as configured)
        found = unreadable_code(str(fn.code_dir), sandbox.identity, skip=[run_dir])
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            problems.append(Problem(f"functions.{name}.code_dir", f"{runs_as(sandbox.identity)}: make {found[0]}"
                                                                  f"{more} readable by them (chmod -R a+rX "
                                                                  f"{fn.code_dir})"))
    return problems


def function_problems(config: Config, sandboxes: Mapping[str, Sandbox],
                      names: Iterable[str] | None = None) -> list[Problem]:
    """What makes functions (of ``names``, default all) unusable besides their sandbox: code
    their workers cannot read, requirements not installed (``supervisor.deps``)."""
    from supervisor.deps import requirements_problems

    names = list(config.functions if names is None else names)
    prefixes = tuple(f"functions.{name}." for name in names)
    return code_problems(config, sandboxes, names) + [problem for problem in requirements_problems(config)
                                                      if problem.path.startswith(prefixes)]


def problems_of(sandboxes: Mapping[str, Sandbox]) -> list[Problem]:
    return [problem for sandbox in sandboxes.values() for problem in sandbox.problems]


def check_config(config: Config) -> list[Problem]:
    """What ``run`` and ``validate`` refuse beyond the schema: isolation this
    container cannot give where the config requires it, users that do not
    exist, paths the workers' user cannot reach, code it cannot read,
    requirements that are not installed (``supervisor deps``), and handlers
    that do not import (imported as the function's workers will be:
    isolated)."""
    from supervisor.config import check_handlers

    isolation = Isolation.detect(Path(config.supervisor.run_dir), prepare_cgroups=False)
    if isolation.tree is not None:
        isolation.tree.close()  # made to see that it can be; the control plane makes its own
    sandboxes = isolation.plan(config)
    problems = problems_of(sandboxes)
    # A function whose sandbox cannot be made, whose code its workers cannot read or whose
    # requirements are not installed is not imported (that would only fail again).
    found = function_problems(config, sandboxes)
    problems += found
    unusable = {name for name in config.functions if (name in sandboxes and sandboxes[name].problems)
                or any(problem.path.startswith(f"functions.{name}.") for problem in found)}
    checkable = {name: f for name, f in config.functions.items() if name not in unusable}
    return problems + check_handlers(config.model_copy(update={"functions": checkable}),
                                     plans={name: s.plan for name, s in sandboxes.items()})
