"""The function's own process: started, watched, heard and stopped by its worker.

A custom runtime (``worker.runtimes.custom``) or a Lambda/SCF runtime
(``worker.runtimes.pull``) runs the user's ``command`` as a child of the
worker. This module owns that child's whole life.

Rules and invariants:

- Spawned with ``subprocess.Popen`` (``_posixsubprocess``: vfork + exec done in
  C, no Python code between fork and exec, so it is safe in a worker that has
  threads; never ``preexec_fn``). stdin is ``/dev/null``; stdout and stderr are
  pipes this module reads; no other descriptor is inherited. The child stays in
  the worker's session and process group: the control plane ends a worker by
  signalling its group, which must reach the child too.
- The worker is a child subreaper (``PR_SET_CHILD_SUBREAPER``): a daemonized
  grandchild comes back to it instead of to PID 1, so ``stop`` can find and kill
  it and its exit is reaped here. Every child of this process that is not the
  main process of a live ``ChildProcess`` is such an adopted orphan: a worker
  runs no other children (the worker is dedicated to one function).
- Exit is observed through a pidfd on the event loop (no SIGCHLD handler:
  uvloop reserves SIGCHLD) and the child is reaped with ``waitpid`` on its own
  pid only, by ``Popen.poll``; adopted orphans are reaped by a sweep every
  ``SWEEP_S`` while a child lives and whenever one exits or is stopped.
  ``exited`` resolves only after the reap: no zombie is left behind.
- Output: each pipe is read in chunks of at most ``READ_CHUNK`` bytes when
  readable and re-written line by line to the worker's ``sys.stdout`` /
  ``sys.stderr`` with ``worker.output.current_request_id`` set to
  ``request_id`` so the lines are attributed to the request in flight. At most
  ``MAX_LINE`` bytes of a partial line are held: a longer line is split. The
  last ``LAST_LINES`` lines (each cut to ``LAST_LINE_CHARS``) are kept for
  startup errors. The bytes that delimit request tags on the worker's output
  are escaped: the child cannot attribute lines to another request.
- ``stop`` sends SIGTERM to the main process, waits up to its grace, then
  SIGKILLs it and every descendant (found through
  ``/proc/<pid>/task/*/children``, repeated until none is left so that a
  process forking while it is killed cannot escape), then waits until all of
  them are reaped. It is idempotent and shielded: a caller cancelled midway
  does not leave the tree half-killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from worker.host import StartupError
from worker.output import current_request_id

READ_CHUNK = 64 * 1024
MAX_LINE = 64 * 1024
LAST_LINES = 20
LAST_LINE_CHARS = 1024
SWEEP_S = 1.0
# How long ``stop`` waits for SIGKILLed processes to be reaped before giving up.
KILL_WAIT_S = 5.0
KILL_ROUNDS = 20
PR_SET_CHILD_SUBREAPER = 36
NOT_PROBED = "no probe finished"

# Bytes that delimit request tags and boundary records on the worker's output (see worker.output).
_TAG_CHARS = re.compile("[\x1c\x1d\x1e\x1f]")
_TAG_ESCAPES = {0x1C: "\\x1c", 0x1D: "\\x1d", 0x1E: "\\x1e", 0x1F: "\\x1f"}

# Main pids of the live ``ChildProcess`` objects of this process: the sweep
# reaps every other child of ours, never these (``Popen.poll`` does).
_owned: set[int] = set()
_subreaper = False


class RuntimeExitedError(Exception):
    """The function's process exited while its host was using it (the worker
    ends too, and the data plane reports the invocation as crashed)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the kernel's choice).

    There is a window between this call and the child's ``bind``: a child that
    loses the port to another process fails to listen and exits, which fails
    the startup (the worker is then replaced).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def describe_exit(status: int) -> str:
    """A ``Popen.returncode`` (negative: killed by that signal) in words."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit code {status}"


def become_subreaper() -> None:
    """Makes orphaned descendants come back to this process (once per process)."""
    global _subreaper
    if _subreaper:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except OSError:
        _subreaper = False


def children_of(pid: int) -> list[int]:
    """The direct children of ``pid`` (any of its threads' children)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as file:
                found.extend(int(part) for part in file.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended meanwhile
            return _children_by_scan(pid)  # a kernel without CONFIG_PROC_CHILDREN
        except (OSError, ValueError):
            continue
    return found


def _children_by_scan(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def descendants_of(pid: int) -> list[int]:
    """Every descendant of ``pid``, parents before their children."""
    found: list[int] = []
    frontier = [pid]
    seen = {pid}
    while frontier:
        parent = frontier.pop()
        for child in children_of(parent):
            if child not in seen:  # a pid reused mid-walk must not loop us
                seen.add(child)
                found.append(child)
                frontier.append(child)
    return found


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a pid from its reuse)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def sweep_orphans() -> int:
    """Reaps adopted orphans that have exited; returns how many are still alive."""
    alive = 0
    for pid in children_of(os.getpid()):
        if pid in _owned:
            continue
        try:
            reaped, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue  # not ours (a thread's view raced), or reaped already
        if reaped == 0:
            alive += 1
    return alive


class _LineSplitter:
    """One pipe of the child: bytes in, complete lines out to a stream."""

    __slots__ = ("fd", "stream", "pending", "owner")

    def __init__(self, fd: int, stream: TextIO, owner: ChildProcess) -> None:
        self.fd = fd
        self.stream = stream
        self.pending = bytearray()
        self.owner = owner

    def read(self) -> int:
        """Reads what is available now: how many bytes, 0 if none, -1 at end of file (or on error)."""
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""
        if not data:
            self.finish()
            return -1
        self.feed(data)
        return len(data)

    def feed(self, data: bytes) -> None:
        pending = self.pending
        pending += data
        last = pending.rfind(b"\n")
        if last >= 0:
            complete = bytes(pending[: last + 1])
            del pending[: last + 1]
            self.emit(complete.split(b"\n")[:-1])
        if len(pending) >= MAX_LINE:
            # A line this long is split: the part held is written as a line.
            lines = [bytes(pending[i : i + MAX_LINE]) for i in range(0, len(pending) - MAX_LINE + 1, MAX_LINE)]
            del pending[: len(lines) * MAX_LINE]
            self.emit(lines)

    def finish(self) -> None:
        if self.pending:
            line = bytes(self.pending)
            self.pending.clear()
            self.emit([line])

    def emit(self, lines: list[bytes]) -> None:
        if not lines:
            return
        texts = [line.rstrip(b"\r").decode("utf-8", "backslashreplace") for line in lines]
        self.owner._remember(texts)
        text = "\n".join(texts) + "\n"
        if _TAG_CHARS.search(text):
            # The log pump reads these as request tags: the child must not forge one.
            text = text.translate(_TAG_ESCAPES)
        token = current_request_id.set(self.owner.request_id)
        try:
            # One write: the tagged stream tags every line and sends them in one syscall.
            self.stream.write(text)
        except (OSError, ValueError):
            pass  # the worker's own output is gone; the child must not notice
        finally:
            current_request_id.reset(token)


class ChildProcess:
    """The function's process (see the module docstring for the rules)."""

    def __init__(self, command: Sequence[str], cwd: str, env: Mapping[str, str], name: str) -> None:
        if not command:
            raise ValueError("an empty command")
        self.command = list(command)
        self.cwd = cwd
        self.env = dict(env)
        self.name = name
        self.pid = 0
        self.request_id: str | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._popen: subprocess.Popen[bytes] | None = None
        self._loop = asyncio.get_running_loop()
        self._pipes: list[_LineSplitter] = []
        self._pidfd = -1
        self._sweeper: asyncio.TimerHandle | None = None
        self._last: deque[str] = deque(maxlen=LAST_LINES)
        self._stopping: asyncio.Task[None] | None = None

    # ---- starting ----------------------------------------------------------

    def describe(self) -> str:
        """The command as a shell would show it (for messages)."""
        return shlex.join(self.command)

    async def start(self) -> None:
        """Starts the command; raises ``StartupError`` when it cannot be executed."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} was already started")
        become_subreaper()
        out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # The child's ends must block: most programs do not expect EAGAIN on stdout.
        os.set_blocking(out_w, True)
        os.set_blocking(err_w, True)
        try:
            self._popen = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                close_fds=True, restore_signals=True, start_new_session=False)
        except OSError as exc:
            os.close(out_r)
            os.close(err_r)
            raise StartupError("RuntimeStartError", self._spawn_error(exc)) from None
        finally:
            os.close(out_w)
            os.close(err_w)
        self.pid = self._popen.pid
        _owned.add(self.pid)
        self._pipes = [_LineSplitter(out_r, sys.stdout, self), _LineSplitter(err_r, sys.stderr, self)]
        for pipe in self._pipes:
            self._loop.add_reader(pipe.fd, self._on_readable, pipe)
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:
            self._pidfd = -1  # no pidfd (old kernel): the periodic sweep polls instead
        else:
            self._loop.add_reader(self._pidfd, self._check_exit)
        self._sweeper = self._loop.call_later(SWEEP_S, self._sweep)

    def _spawn_error(self, exc: OSError) -> str:
        reason = exc.strerror or str(exc)
        if exc.filename is not None and os.fspath(exc.filename) == self.cwd:
            return f"cannot start {self.describe()}: its directory {self.cwd} is unusable ({reason})"
        hint = ""
        if isinstance(exc, FileNotFoundError):
            hint = " (is it installed, and on PATH or relative to code_dir?)"
        elif isinstance(exc, PermissionError):
            hint = " (is it executable? chmod +x)"
        elif exc.errno == errno.ENOEXEC:
            hint = " (a script needs a #! line)"
        return f"cannot execute {self.describe()} in {self.cwd}: {reason}{hint}"

    # ---- output ------------------------------------------------------------

    def _on_readable(self, pipe: _LineSplitter) -> None:
        if pipe.read() < 0:
            self._close_pipe(pipe)

    def _close_pipe(self, pipe: _LineSplitter) -> None:
        if pipe.fd < 0:
            return
        self._loop.remove_reader(pipe.fd)
        os.close(pipe.fd)
        pipe.fd = -1

    def flush_output(self) -> None:
        """Writes out what the child has printed so far (without waiting).

        Hosts call it before an invocation's end marker, so that lines printed
        while handling the request are attributed to it.
        """
        for pipe in self._pipes:
            # A bounded number of reads: a child printing without pause must not hold the loop.
            for _ in range(4):
                if pipe.fd < 0:
                    break
                size = pipe.read()
                if size < 0:
                    self._close_pipe(pipe)
                if size < READ_CHUNK:
                    break

    def _remember(self, lines: list[str]) -> None:
        for line in lines[-LAST_LINES:]:
            self._last.append(line if len(line) <= LAST_LINE_CHARS else line[:LAST_LINE_CHARS] + "...")

    def last_lines(self) -> list[str]:
        """The last lines the child printed, oldest first (at most ``LAST_LINES``)."""
        return list(self._last)

    # ---- exit --------------------------------------------------------------

    def _check_exit(self) -> None:
        popen = self._popen
        if popen is None or self.exited.done():
            return
        status = popen.poll()
        if status is None:
            return
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        _owned.discard(self.pid)
        # What it printed before exiting is in the pipes already: take it now,
        # so that ``last_lines`` explains the exit.
        self.flush_output()
        sweep_orphans()
        self.exited.set_result(status)

    def _sweep(self) -> None:
        self._sweeper = None
        self._check_exit()
        sweep_orphans()
        if not self.exited.done():
            # Orphans keep coming back while the child lives; once it has
            # exited, the worker ends and stop() sweeps the rest itself.
            self._sweeper = self._loop.call_later(SWEEP_S, self._sweep)

    # ---- stopping ----------------------------------------------------------

    async def stop(self, grace_s: float) -> None:
        """SIGTERM, up to ``grace_s`` to exit, then SIGKILL for the whole tree; idempotent."""
        if self._stopping is None:
            self._stopping = self._loop.create_task(self._stop(grace_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float) -> None:
        if self._popen is None:
            return
        # Who belonged to the tree before SIGTERM: once the child is gone, its
        # descendants are ours (adopted) and no longer reachable from its pid.
        # (Once reaped, its pid may be someone else's: no walk from it then.)
        tree = {} if self.exited.done() else {pid: start_time(pid) for pid in descendants_of(self.pid)}
        if not self.exited.done() and grace_s > 0:
            self._signal(self.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), grace_s)
        killed = self._kill_tree(tree)
        deadline = time.monotonic() + KILL_WAIT_S
        delay = 0.005
        while True:
            self._check_exit()
            orphans_alive = sweep_orphans()
            left = [pid for pid, started in killed.items() if started is not None and start_time(pid) == started]
            if self.exited.done() and not orphans_alive and not left:
                break
            if time.monotonic() > deadline:
                print(f"{self.name}: processes {sorted(left)} did not end after SIGKILL", file=sys.stderr)
                break
            if left or orphans_alive:
                self._kill_tree({})  # anything forked meanwhile
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pipe in self._pipes:
            if pipe.fd >= 0:
                # What is left in the pipe, without waiting for an end of file
                # that a surviving writer could hold back forever.
                for _ in range(16):
                    if pipe.read() <= 0:
                        break
                if pipe.fd >= 0:
                    pipe.finish()
                self._close_pipe(pipe)

    def _kill_tree(self, known: dict[int, int | None]) -> dict[int, int | None]:
        """SIGKILLs the child, its descendants, the processes in ``known`` that
        are still the same processes, their descendants and adopted orphans,
        in rounds until a walk finds nobody new. Returns who was signalled."""
        killed: dict[int, int | None] = {}
        targets = {pid: started for pid, started in known.items() if started is not None
                   and start_time(pid) == started}
        for _ in range(KILL_ROUNDS):
            roots = list(targets)
            if not self.exited.done():
                roots.append(self.pid)
            roots += [pid for pid in children_of(os.getpid()) if pid not in _owned]
            found = {pid: start_time(pid) for root in roots for pid in (root, *descendants_of(root))}
            fresh = {pid: started for pid, started in found.items() if pid not in killed}
            if not fresh:
                break
            for pid, started in fresh.items():
                if pid == self.pid or started is not None:
                    self._signal(pid, signal.SIGKILL)
                killed[pid] = started
            targets = {}
        killed.pop(self.pid, None)  # the main process is watched through ``exited``
        return killed

    def _signal(self, pid: int, sig: int) -> None:
        if pid == self.pid:
            if self.exited.done() or self._popen is None:
                return  # reaped: the pid may belong to someone else now
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(sig)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


async def wait_ready(child: ChildProcess, ready: str, host: str, port: int, timeout_s: float) -> None:
    """Returns once the child's server answers (``ready`` is "tcp" or "http:/PATH").

    Polls every 10 ms, backing off to 50 ms. Raises ``StartupError`` when the
    child exits first or ``timeout_s`` passes, with the child's last lines.
    """
    if ready == "tcp":
        path = None
    elif ready.startswith("http:/"):
        path = ready[len("http:"):]
    else:
        raise ValueError(f'ready must be "tcp" or "http:/PATH", not {ready!r}')
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    reason = NOT_PROBED
    while True:
        if child.exited.done():
            raise _not_ready(child, f"exited ({describe_exit(child.exited.result())}) before its HTTP server "
                                    f"listened on port {port}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = "start listening" if path is None else f"answer GET {path} with a status below 500"
            raise _not_ready(child, f"did not {what} on port {port} within {timeout_s:g}s (last probe: {reason})")
        probe = asyncio.ensure_future(_probe(host, port, path))
        waits: set[asyncio.Future[Any]] = {probe, child.exited}
        done, _ = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if probe not in done:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await probe
            if not child.exited.done() and reason == NOT_PROBED:
                reason = "no answer"  # else the last complete probe says more than one cut short
            continue
        reason = probe.result()
        if not reason:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(child.exited), min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.05)


async def _probe(host: str, port: int, path: str | None) -> str:
    """One readiness check: "" when ready, else why not."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    try:
        if path is None:
            return ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode("latin-1"))
        line = await reader.readline()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return f"not an HTTP answer: {line[:80]!r}" if line else "the connection closed without an answer"
        status = int(parts[1])
        return "" if status < 500 else f"GET {path} answered {status}"
    except (OSError, ValueError) as exc:  # ValueError: a status line beyond the reader's limit
        return getattr(exc, "strerror", None) or type(exc).__name__
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _not_ready(child: ChildProcess, what: str) -> StartupError:
    lines = child.last_lines()
    output = "\n".join(lines) if lines else "(nothing)"
    return StartupError("RuntimeStartError", f"{child.describe()}: {what}; last output:\n{output}")
