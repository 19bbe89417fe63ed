"""What a worker does to itself before any user code runs: the sandbox.

The control plane decides (``supervisor/control/sandbox.py``); this module
carries it out, in the process that will run the function: a spawned worker
right after it starts, a Python function's seed before it imports the
function (the import is user code), and a worker cloned by that seed, which
inherits everything but its cgroup and so only joins that.

The plan is a JSON object (``spec["isolation"]``):
``{"stage": "full" | "fork", "cgroup_procs": [...], "mount": bool,
"network": bool, "covers": [...], "readonly": [...], "hide": [...],
"rlimits": {"nofile": n, "core": 0, ...}, "uid": n | null, "gid": n | null,
"seccomp": bool}`` (see ``private_mounts`` for ``covers``).

The order is the point (each step needs what the previous ones still allow):
1. join the worker's cgroup (its pid into each ``cgroup.procs``), so that
   everything after is accounted and limited; a seed's clone is usually
   born in it already (``cgroup_inherited``: the seed waits in the next
   worker's cgroup, since moving a process costs an RCU grace period);
2. new mount and network namespaces (root only): a private ``/tmp``
   (tmpfs; the code dir and the data plane's socket directory are bound
   back read-only when they live there), directories the worker's user
   could not traverse covered the same way with only what it needs bound
   back (the interpreter under ``/root``, say), code dirs read-only, other
   functions' code dirs covered by an empty read-only tmpfs, loopback up
   in the empty network namespace;
3. rlimits (``nofile``, ``core`` 0, and the fallbacks for memory and pids
   when cgroups are not writable);
4. identity: no supplementary groups, then gid, then uid (the order that
   leaves no way back); ``dumpable`` is restored (the uid change cleared it,
   which would make ``/proc/self`` unreadable to the worker itself);
5. ``no_new_privs`` (always, also when nothing else could be done): no
   setuid binary can give back what was dropped;
6. the seccomp deny-list (``DENIED``; ``clone3`` answers ENOSYS so that the
   C library falls back to ``clone``, whose namespace flags the filter can
   see and refuses). libseccomp is called over ctypes (its C API): this
   module is standard library only, like everything a Python worker runs
   before the function's code.
The parent-death signal is set by the caller afterwards (a uid change
clears it). Every step that was asked for and fails raises
``IsolationError``: a worker never runs with less than it was told.

``python -m worker.isolation --probe`` tries the privileged steps in a
throwaway process and prints what this container allows (JSON), for the
control plane's plan and ``require_isolation``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import resource
import socket
import struct
import sys
from collections.abc import Mapping
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

# Syscalls a function never needs and an attacker often does: tracing other
# processes, changing the mount table or namespaces, loading kernel code,
# kernel keyrings, eBPF, perf, rebooting, swap, clocks, raw I/O ports.
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "unshare", "setns",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "vhangup",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "iopl", "ioperm", "uselib", "ustat", "sysfs", "nfsservctl", "_sysctl",
    "fanotify_init", "io_uring_setup", "io_uring_enter", "io_uring_register",
    # Its flags sit in a struct seccomp cannot read, so namespace flags would pass
    # where clone's are refused: refused whole (ENOSYS: libc falls back to clone).
    "clone3",
)
# Answered ENOSYS ("not here"), so that callers fall back instead of failing.
UNAVAILABLE = ("clone3", "io_uring_setup", "io_uring_enter", "io_uring_register")

_libc = ctypes.CDLL(None, use_errno=True)


class IsolationError(Exception):
    """A step the plan asked for could not be done (the worker must not run)."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise IsolationError(f"{what}: {os.strerror(err)} (errno {err})")


def _prctl(option: int, value: int, what: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), what)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def arg(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    _check(_libc.mount(arg(source), arg(target), arg(fstype), ctypes.c_ulong(flags), arg(data)),
           f"mount {fstype or 'bind'} on {target}")


# ---- the steps -----------------------------------------------------------------


def join_cgroup(procs_files: list[str]) -> None:
    for path in procs_files:
        try:
            with open(path, "w") as f:
                f.write("0")  # "0": the writing process
        except OSError as exc:
            raise IsolationError(f"could not join the cgroup {os.path.dirname(path)}: {exc.strerror}") from None


def unshare(mount: bool, network: bool) -> None:
    flags = (CLONE_NEWNS if mount else 0) | (CLONE_NEWNET if network else 0)
    if flags:
        _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def private_mounts(covers: list[Mapping[str, Any]], readonly: list[str], hide: list[str]) -> None:
    """In a new mount namespace (nothing propagates back): ``hide`` paths are
    covered by an empty, read-only, mode-000 tmpfs; each cover
    ``{"path", "mode", "size", "writable", "keep": [...]}`` puts a fresh tmpfs
    on ``path`` (a private ``/tmp``; or a directory the worker's user could
    not traverse, such as ``/root`` holding the interpreter) into which only
    its ``keep`` paths are bound back, read-only; ``readonly`` paths are bound
    read-only in place."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Hidden first: a path to hide may lie under one bound below, and a
    # recursive bind copies whatever is mounted beneath it.
    for path in hide:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=000,size=4k")
    for cover in covers:
        held = []
        try:
            for path in cover.get("keep") or ():  # opened before the cover hides them
                try:
                    held.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC)))
                except FileNotFoundError:
                    continue  # not made yet (the run_dir, when a config is checked first): nothing to keep
            target = cover["path"]
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV,
                   f"mode={int(cover.get('mode', 0o755)):o},size={int(cover.get('size') or (1 << 20))}")
            for path, fd in held:
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.makedirs(path, mode=0o755, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
                _bind_readonly(f"/proc/self/fd/{fd}", path)
            if not cover.get("writable"):
                _mount(None, target, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        finally:
            for _, fd in held:
                os.close(fd)
    for path in readonly:
        _bind_readonly(path, path)


def _bind_readonly(source: str, target: str) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def loopback_up() -> None:
    """A new network namespace has only ``lo``, down: up, so that a runtime can
    serve and be reached on 127.0.0.1 inside it (and nothing else)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH14x", ifreq)[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


RLIMITS = {"nofile": resource.RLIMIT_NOFILE, "core": resource.RLIMIT_CORE, "data": resource.RLIMIT_DATA,
           "nproc": resource.RLIMIT_NPROC}


def set_rlimits(limits: Mapping[str, int]) -> None:
    for name, value in limits.items():
        try:
            resource.setrlimit(RLIMITS[name], (value, value))
        except (ValueError, OSError) as exc:
            raise IsolationError(f"setrlimit {name}={value}: {exc}") from None


def change_identity(uid: int, gid: int) -> None:
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise IsolationError(f"could not become uid {uid} gid {gid}: {exc.strerror}") from None
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid or os.getgroups():
        raise IsolationError(f"still uid {os.getuid()}/{os.geteuid()} gid {os.getgid()} after setuid({uid})")
    _prctl(PR_SET_DUMPABLE, 1, "prctl(PR_SET_DUMPABLE)")


def no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


# libseccomp's C API (seccomp.h), called over ctypes: a worker imports nothing
# outside the standard library before the function's code, so no binding package.
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_FLTATR_CTL_OPTIMIZE = 8
SCMP_CMP_MASKED_EQ = 7
NR_SCMP_ERROR = -1
LIBSECCOMP = ("libseccomp.so.2", "libseccomp.so")


def scmp_act_errno(errno_value: int) -> int:
    return 0x00050000 | (errno_value & 0xFFFF)


class ScmpArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


_libseccomp: ctypes.CDLL | None = None


def libseccomp() -> ctypes.CDLL:
    """libseccomp, loaded once (by its soname: no search that runs programs). Raises OSError."""
    global _libseccomp
    if _libseccomp is None:
        errors = []
        for name in LIBSECCOMP:
            try:
                lib = ctypes.CDLL(name, use_errno=True)
                break
            except OSError as exc:
                errors.append(str(exc))
        else:
            raise OSError(f"libseccomp is not installed ({'; '.join(errors)})")
        lib.seccomp_init.argtypes = (ctypes.c_uint32,)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_release.argtypes = (ctypes.c_void_p,)
        lib.seccomp_release.restype = None
        lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
        lib.seccomp_attr_set.restype = ctypes.c_int
        lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
        lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
        lib.seccomp_rule_add_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(ScmpArgCmp))
        lib.seccomp_rule_add_array.restype = ctypes.c_int
        lib.seccomp_load.argtypes = (ctypes.c_void_p,)
        lib.seccomp_load.restype = ctypes.c_int
        _libseccomp = lib
    return _libseccomp


def load_seccomp() -> None:
    try:
        lib = libseccomp()
    except OSError as exc:
        raise IsolationError(f"seccomp: {exc}") from None
    rules = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not rules:
        raise IsolationError("seccomp: seccomp_init failed")
    try:
        # A binary search over syscall numbers instead of a list: every allowed call passes it.
        lib.seccomp_attr_set(rules, SCMP_FLTATR_CTL_OPTIMIZE, 2)  # libseccomp < 2.5 refuses: the list it is
        for name in DENIED:
            _add_rule(lib, rules, scmp_act_errno(errno.ENOSYS if name in UNAVAILABLE else errno.EPERM), name)
        # clone with any namespace flag: the same as unshare. A masked comparison
        # tests equality, so one rule per flag ("this bit set"); rules OR together.
        for bit in range(32):
            if NAMESPACE_FLAGS & (1 << bit):
                flag = ScmpArgCmp(arg=0, op=SCMP_CMP_MASKED_EQ, datum_a=1 << bit, datum_b=1 << bit)
                if not _add_rule(lib, rules, scmp_act_errno(errno.EPERM), "clone", flag):
                    raise IsolationError("seccomp: could not add the rule for clone's namespace flags")
        status = lib.seccomp_load(rules)
        if status < 0:
            raise IsolationError(f"seccomp: loading the filter failed: {os.strerror(-status)}")
    finally:
        lib.seccomp_release(rules)


def _add_rule(lib: ctypes.CDLL, rules: int, action: int, name: str, *args: ScmpArgCmp) -> bool:
    """False for a syscall this architecture (or this libseccomp) does not know: nothing to deny."""
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number == NR_SCMP_ERROR:
        return False
    array = (ScmpArgCmp * len(args))(*args) if args else None
    return int(lib.seccomp_rule_add_array(rules, action, number, len(args), array)) == 0


# ---- the whole sequence ---------------------------------------------------------------


def apply(plan: Mapping[str, Any]) -> None:
    """Carries out ``plan`` on this process (see the module docstring)."""
    if not plan.get("cgroup_inherited"):  # born in it: a clone of a seed that waited there
        join_cgroup(list(plan.get("cgroup_procs") or ()))
    if plan.get("stage", "full") == "fork":
        return  # everything else came with the clone from the seed
    mount, network = bool(plan.get("mount")), bool(plan.get("network"))
    unshare(mount, network)
    if mount:
        private_mounts(list(plan.get("covers") or ()), list(plan.get("readonly") or ()),
                       list(plan.get("hide") or ()))
    if network:
        try:
            loopback_up()
        except OSError as exc:
            raise IsolationError(f"could not bring up lo in the new network namespace: {exc}") from None
    set_rlimits(plan.get("rlimits") or {})
    uid, gid = plan.get("uid"), plan.get("gid")
    if uid is not None and gid is not None:
        change_identity(int(uid), int(gid))
    no_new_privs()
    if plan.get("seccomp"):
        load_seccomp()


# ---- the probe ------------------------------------------------------------------------


def probe() -> dict[str, Any]:
    """What this container lets a worker do, found by doing it here (a throwaway
    process): "" when a step works, else why not."""
    found: dict[str, Any] = {"uid": os.getuid(), "root": os.geteuid() == 0}
    try:  # loaded first: the mount step below covers /tmp, where the library may live
        libseccomp()
    except OSError:
        pass  # reported by the seccomp step
    try:
        unshare(mount=True, network=False)
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=1m")
        found["mount"] = ""
    except IsolationError as exc:
        found["mount"] = str(exc)
    try:
        unshare(mount=False, network=True)
        loopback_up()
        found["network"] = ""
    except (IsolationError, OSError) as exc:
        found["network"] = str(exc)
    if found["root"]:
        try:
            os.setgroups([])
            found["setuid"] = ""
        except OSError as exc:
            found["setuid"] = f"setgroups: {exc.strerror}"
    else:
        found["setuid"] = "not running as root"
    try:
        no_new_privs()
        load_seccomp()
        found["seccomp"] = ""
    except IsolationError as exc:
        found["seccomp"] = str(exc)
    return found


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        sys.stdout.write(json.dumps(probe()) + "\n")
    else:
        sys.exit("usage: python -m worker.isolation --probe")
