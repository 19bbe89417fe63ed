"""The seed (zygote): one per Python function, forks its workers in milliseconds.

Started by the control plane as ``python -m worker.seed`` with a
``SOCK_SEQPACKET`` socket on fd 3. It imports the worker runtime and the
user's module once, freezes what it allocated (``gc.freeze``, so the
collector never touches the shared pages and copy-on-write keeps them
shared), then clones a worker per request.

Protocol on fd 3 (one JSON object per packet):
- control plane -> seed, first packet: the function's spec (``function``,
  ``code_dir``, ``handler``, the hooks, ``parent_pid``, ``isolation``: its
  own sandbox, and ``next_cgroup``: where to wait for the first clone);
- seed -> control plane: ``{"ready": true, "pid": P, "load_ms": T}``, or
  ``{"error": "...", "permanent": bool}`` (then it exits: workers start by
  spawn; a permanent error is not retried until the function changes);
- control plane -> seed: ``{"spec": WORKER_SPEC}`` with the worker's stdout
  and stderr pipe ends as SCM_RIGHTS;
- control plane -> seed: ``{"wait_in": [cgroup.procs files]}``: the seed
  moves into the next worker's cgroup (sent after a fork request, so the
  move happens after that clone and its answer);
- seed -> control plane: ``{"worker_id": ID, "pid": P}`` or
  ``{"worker_id": ID, "error": "..."}``.
The seed exits when the socket closes, and with the control plane
(parent-death signal).

Rules:
- Single-threaded, always: no event loop, no gRPC object, no thread is ever
  started here, and a user module that starts one at import is refused
  (forking a threaded process copies locks held by threads that do not exist
  in the child). The seed then reports the error and workers start by spawn.
- Workers are cloned with ``CLONE_PARENT``: each is a child of the control
  plane, exactly like a spawned worker, so the control plane reaps it, reads
  its exit status, and its parent-death signal follows the control plane,
  not the seed. A seed that dies or is replaced takes no worker with it.
- The seed is started like a worker (``worker/boot.py``): before the
  function's module it imports only the standard library and the worker's
  own code, with ``sys.path`` the function's (``worker.python.paths``).
  ``event_loop = "uvloop"`` imports the function's uvloop here, so its
  workers have it already.
- The child does what ``os.fork`` does after a fork (``PyOS_AfterFork_Child``:
  fresh locks, at-fork handlers, which also re-seed ``random``), becomes its
  own session, takes its pipes as stdout/stderr and then runs exactly the
  code path of a spawned worker (``worker.main.start``): its event loop,
  connection and initializer are all created after the fork.
"""

from __future__ import annotations

import array
import ctypes
import gc
import json
import os
import platform
import random
import signal
import socket
import sys
import threading
import time
from typing import Any

CONTROL_FD = 3
MAX_PACKET = 1 << 20
CLONE_PARENT = 0x00008000
CLONE_CHILD_SETTID = 0x01000000
SYS_CLONE3 = 435  # the same number on every architecture
SYS_CLONE = {"x86_64": 56, "aarch64": 220}
SYS_GETTID = {"x86_64": 186, "aarch64": 178}
# glibc keeps the calling thread's tid in its thread descriptor (``pthread_self()``)
# and uses it for raise() and pthread_kill(); glibc's own fork refreshes it with
# CLONE_CHILD_SETTID. These are the offsets glibc uses; the one in use is verified
# at start-up by reading it back, and without a match the seed does without.
TID_OFFSETS = {"x86_64": (0x2D0,), "aarch64": (0xD0,)}
RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD)
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15

_libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL stays held across the call, as in os.fork
_libc.syscall.restype = ctypes.c_long
_pythonapi = ctypes.pythonapi
for _name in ("PyOS_BeforeFork", "PyOS_AfterFork_Parent", "PyOS_AfterFork_Child"):
    getattr(_pythonapi, _name).restype = None
    getattr(_pythonapi, _name).argtypes = []


class Unforkable(Exception):
    """This function cannot be a seed, now or after a restart (threads or descriptors
    its import left behind, or a C library whose fork state cannot be fixed up)."""


class CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls")]


def _set_name(name: str) -> None:
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def _still_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False  # the listing's own descriptor, gone already
    return True


def _describe_fd(fd: int) -> str:
    try:
        return f"fd {fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return f"fd {fd}"


def _tid_address() -> int:
    """Where glibc keeps this thread's tid, verified; 0 when unknown."""
    machine = platform.machine()
    if machine not in SYS_GETTID:
        return 0
    tid = int(_libc.syscall(SYS_GETTID[machine]))
    _libc.pthread_self.restype = ctypes.c_void_p
    base = _libc.pthread_self()
    for offset in TID_OFFSETS.get(machine, ()):
        if base and ctypes.c_int32.from_address(base + offset).value == tid:
            return int(base + offset)
    return 0


def _raw_clone(flags: int, tid_address: int) -> int:
    """clone3 (else clone) with ``flags``; returns like fork(). Raises OSError."""
    if tid_address:
        flags |= CLONE_CHILD_SETTID
    args = CloneArgs(flags=flags, child_tid=tid_address)
    pid = int(_libc.syscall(SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))))
    if pid == -1 and ctypes.get_errno() == 38:  # ENOSYS: an old kernel, or a seccomp profile that hides clone3
        machine = platform.machine()
        if machine not in SYS_CLONE:
            raise OSError(38, f"clone3 is unavailable and clone's arguments on {machine} are not known here")
        # x86_64: (flags, stack, parent_tid, child_tid, tls); aarch64: (flags, stack, parent_tid, tls, child_tid)
        tail = (0, tid_address, 0) if machine == "x86_64" else (0, 0, tid_address)
        exit_signal = int(signal.SIGCHLD)
        pid = int(_libc.syscall(SYS_CLONE[machine], ctypes.c_ulong(flags | exit_signal), ctypes.c_ulong(0),
                                *(ctypes.c_ulong(v) for v in tail)))
    if pid == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return pid


class Seed:
    def __init__(self, sock: socket.socket, spec: dict[str, Any]) -> None:
        self.sock = sock
        self.spec = spec
        self.tid_address = _tid_address()
        # The cgroup this seed sits in, made for its next worker: a clone is born
        # there and need not move (moving a process between cgroups waits for an
        # RCU grace period, ~10 ms; being born in one costs nothing).
        self.waiting_in: list[str] = []

    def wait_in(self, procs_files: list[str]) -> None:
        """Moves this seed into the next worker's cgroup (after a clone, off its path)."""
        from worker import isolation

        try:
            isolation.join_cgroup(procs_files)
            self.waiting_in = list(procs_files)
        except isolation.IsolationError:
            self.waiting_in = []  # its next clone moves itself instead

    def preload(self) -> float:
        """Imports the runtime and the function; returns the milliseconds it took."""
        started = time.perf_counter()
        os.chdir(self.spec["code_dir"])
        from worker.python import paths

        paths.enter(self.spec)  # the function's own directories, then the standard library
        # The worker's whole runtime, so that a forked worker imports nothing of ours.
        import asyncio  # noqa: F401

        import worker.main  # noqa: F401
        from worker.python import host, log

        log.install()  # what the function logs at import is a record too
        if self.spec.get("event_loop") == "uvloop":
            import uvloop  # noqa: F401  # the function's own (its directories come first); imported, never run here

        if self.spec.get("interface", "event") != "event":
            import worker.python.http  # noqa: F401  # the ASGI/WSGI host

        for key in ("handler", "initializer", "pre_freeze", "pre_stop"):
            if self.spec.get(key):
                host.resolve(self.spec[key])
        threads = threading.active_count()
        tasks = len(os.listdir("/proc/self/task"))
        if threads > 1 or tasks > 1:
            raise Unforkable(f"importing the function started threads ({max(threads, tasks) - 1} besides the "
                             "main one); a threaded process cannot be forked safely, so its workers start by "
                             "spawn (set seed = false for this function to say so in the config)")
        # A file or socket opened at import would be shared by every worker, and
        # closed under its Python object when the worker closes inherited fds.
        opened = sorted(int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > CONTROL_FD)
        opened = [fd for fd in opened if _still_open(fd)]
        if opened:
            targets = ", ".join(_describe_fd(fd) for fd in opened[:3])
            raise Unforkable(f"importing the function left {len(opened)} file descriptor(s) open ({targets}); "
                             "every forked worker would share them, so its workers start by spawn (open them "
                             "in the initializer instead, or set seed = false for this function)")
        return (time.perf_counter() - started) * 1000

    def send(self, message: dict[str, Any]) -> None:
        self.sock.send(json.dumps(message).encode())

    def serve(self) -> None:
        fds_size = socket.CMSG_SPACE(2 * array.array("i").itemsize)
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(MAX_PACKET, fds_size)
            except InterruptedError:
                continue
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if not data:
                for fd in fds:
                    os.close(fd)
                return  # the control plane closed its end (or is gone)
            try:
                request = json.loads(data)
                if "wait_in" in request and not fds:
                    self.wait_in(list(request["wait_in"]))
                    continue
                spec = request["spec"]
                worker_id = str(spec["worker_id"])
            except (ValueError, KeyError, TypeError) as exc:
                for fd in fds:
                    os.close(fd)
                self.send({"error": f"bad request: {exc!r}"})
                continue
            if len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                self.send({"worker_id": worker_id, "error": "expected the worker's stdout and stderr pipes"})
                continue
            try:
                pid = self.fork(spec, fds[0], fds[1])
            except OSError as exc:
                self.send({"worker_id": worker_id, "error": f"clone failed: {exc}"})
            else:
                self.send({"worker_id": worker_id, "pid": pid})
            finally:
                os.close(fds[0])
                os.close(fds[1])

    def fork(self, spec: dict[str, Any], stdout_fd: int, stderr_fd: int) -> int:
        plan = spec.get("isolation")
        if plan:  # the rest of its isolation comes with the clone
            born_in_place = bool(self.waiting_in) and plan.get("cgroup_procs") == self.waiting_in
            spec["isolation"] = {**plan, "stage": "fork", "cgroup_inherited": born_in_place}
        for stream in (sys.stdout, sys.stderr):  # nothing buffered may be written twice
            stream.flush()
        gc.freeze()  # all that exists now is never scanned again: its pages stay shared
        _pythonapi.PyOS_BeforeFork()
        try:
            pid = _raw_clone(CLONE_PARENT, self.tid_address)
        except BaseException:
            _pythonapi.PyOS_AfterFork_Parent()
            raise
        if pid:
            _pythonapi.PyOS_AfterFork_Parent()
            return pid
        # ---- the child: never returns ----
        try:
            _pythonapi.PyOS_AfterFork_Child()
            become_worker(spec, stdout_fd, stderr_fd, self.sock)
        except BaseException as exc:  # report on the worker's own stderr, never return into the seed's loop
            try:
                os.write(stderr_fd, f"forked worker failed to start: {exc!r}\n".encode())
            finally:
                os._exit(70)
        os._exit(0)


def become_worker(spec: dict[str, Any], stdout_fd: int, stderr_fd: int, seed_sock: socket.socket) -> None:
    """In the freshly cloned child: the state of a newly spawned worker, then run it."""
    os.setsid()  # its own session and process group: a kill reaches all it starts
    _set_name(f"worker:{spec.get('function', '')}")  # its argv stays the seed's; ps shows this
    for sig in RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # As Python sets it at start-up: a write to a closed pipe (its control plane
    # died and the log pipe with it) is an error to handle, not a silent death.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    seed_sock.detach()  # closed below with every other inherited descriptor
    gc.enable()  # for the worker's own objects; the seed's stay frozen (and shared)
    random.seed()  # also done by the at-fork hook; explicit, because it matters
    from worker import main

    main.start(spec)  # closes every descriptor above 2, then serves; never returns


def main() -> None:
    # No collection in the seed: freeing objects would leave holes in pages the
    # workers share, and a collection in a worker would write into every
    # object's header (gc.freeze before each fork keeps them out of reach).
    gc.disable()
    sock = socket.socket(fileno=CONTROL_FD)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # nothing to drain here
    first = sock.recv(MAX_PACKET)
    if not first:
        return
    spec = json.loads(first)
    _set_name(f"seed:{spec.get('function', '')}")
    if os.getppid() != int(spec.get("parent_pid", os.getppid())):
        return  # the control plane died before the parent-death signal was armed
    os.closerange(CONTROL_FD + 1, os.sysconf("SC_OPEN_MAX"))
    if spec.get("isolation"):
        # The import below is user code: the seed is isolated exactly like a
        # worker first, and its clones inherit all of it but their cgroup.
        from worker import isolation

        try:
            isolation.apply(spec["isolation"])
        except isolation.IsolationError as exc:
            sock.send(json.dumps({"error": f"isolation: {exc}"}).encode())
            return
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a uid change clears it
        if os.getppid() != int(spec.get("parent_pid", os.getppid())):
            return
    seed = Seed(sock, spec)
    try:
        if not seed.tid_address:
            raise Unforkable(f"this C library's thread descriptor ({platform.machine()}) is not one the seed can "
                             "fix up after a clone; its workers start by spawn")
        load_ms = seed.preload()
    except Unforkable as exc:
        seed.send({"error": str(exc), "permanent": True})
        return
    except BaseException as exc:  # the import failed: spawned workers will report it in detail
        seed.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    if spec.get("next_cgroup"):
        seed.wait_in(spec["next_cgroup"])
    seed.send({"ready": True, "pid": os.getpid(), "load_ms": round(load_ms, 1),
               "tid_fixup": bool(seed.tid_address)})
    seed.serve()


if __name__ == "__main__":
    main()
