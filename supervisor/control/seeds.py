"""The control plane's side of a seed (``worker/seed.py``): start, ask, supervise.

One ``SeedProcess`` per Python function. It is started with ``posix_spawn``
like a worker, with one end of a ``SOCK_SEQPACKET`` pair on its fd 3, and is
asked for workers over it; each answer carries the new worker's pid (the
worker is this process's child: the seed clones with ``CLONE_PARENT``).

Rules:
- A seed is supervised like any process: an exit nobody asked for is
  restarted after ``policy.backoff_delay`` (reset once it has served for
  ``HEALTHY_S``); while it is not running, workers start by spawn, and the
  ``supervisor_seed_ready`` gauge and a log line say so.
- A seed that refuses to preload for a reason that will not change (the
  module starts threads at import) is ``failed`` until the function changes
  (a reload): workers start by spawn.
- A request in flight when the seed dies is answered with an error, and the
  caller starts that worker by spawn: no start is lost.
- Nothing here blocks: the socket is non-blocking and read on the loop.
- ``sits_in`` is the cgroup the seed was last told to wait in, until it is
  told another or exits: every clone it forks meanwhile is born there (one
  meant for another cgroup moves itself out as it starts). That cgroup is
  given to a worker too, so the caller neither kills nor removes it while the
  seed sits in it or a clone born there is starting.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from supervisor.control import launcher, policy
from supervisor.control.output import WorkerOutput
from supervisor.logs import get_logger

log = get_logger()

SEED_ARGV = launcher.python_argv("worker.seed")
HEALTHY_S = 30.0
FORK_TIMEOUT_S = 5.0  # a seed that does not answer a fork request in this long is killed (and restarted)
MAX_PACKET = 1 << 20

# done(pid, error): pid is None when the seed could not fork this worker.
ForkDone = Callable[[int | None, str], None]
# The seed's cgroup (or None) and its isolation plan; raises OSError.
Isolate = Callable[[], tuple[Any, dict[str, Any] | None]]
# A fresh cgroup for a worker to be (or None when cgroups are not used); raises OSError.
Prepare = Callable[[], Any]


class SeedProcess:
    def __init__(self, function: str, spec: Mapping[str, Any], env: Mapping[str, str], cwd: str,
                 log_format: str, on_change: Callable[[], None], isolate: Isolate | None = None,
                 prepare: Prepare | None = None, release: Callable[[Any], None] | None = None) -> None:
        self.function = function
        self.name = f"seed:{function}"
        self.spec = dict(spec)
        self.env = dict(env)
        self.cwd = cwd
        self.log_format = log_format
        self.on_change = on_change
        self.state = "stopped"  # starting | running | backoff | failed | stopped
        self.detail = ""
        self.restarts = 0
        self.failures = 0
        self.retry_at = 0.0
        self.started_at = 0.0
        self.running_since = 0.0
        self.load_ms = 0.0
        self.process: launcher.Process | None = None
        self.sock: socket.socket | None = None
        self.output: WorkerOutput | None = None
        self.pending: dict[str, tuple[ForkDone, float]] = {}
        self.stopping = False
        self.isolate = isolate
        self.prepare = prepare
        self.release = release
        self.cgroup: Any = None  # its own (what it imported is charged there)
        # The next worker's cgroup, which the seed waits in so that the clone is
        # born there (moving a process into a cgroup waits for an RCU grace period).
        self.next: Any = None
        self.next_sent = False
        self.sits_in: Any = None  # the cgroup it was last told to wait in (its clones are born there)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None and self.process.exit is None else 0

    @property
    def running(self) -> bool:
        return self.state == "running"

    # ---- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self.stopping = False
        if self.isolate is not None:
            # The seed imports the function (user code): it is isolated like a worker first.
            try:
                self.cgroup, plan = self.isolate()
            except OSError as exc:
                self._failed_to_run(f"could not make the seed's cgroup: {exc}")
                return
            if plan is not None:
                self.spec["isolation"] = plan
            self.next = self._prepare()
            self.next_sent = self.next is not None
            self.sits_in = self.next
            self.spec["next_cgroup"] = self.next.procs_files if self.next is not None else []
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setblocking(False)
            process = launcher.spawn_with_fd(SEED_ARGV, self.env, self.cwd, theirs.fileno())
        except OSError as exc:
            ours.close()
            self._failed_to_run(f"could not start the seed: {exc}")
            return
        finally:
            theirs.close()
        self.process = process
        self.sock = ours
        self.state = "starting"
        self.detail = ""
        self.started_at = time.monotonic()
        # What the module prints at import: logged as the seed's, component "seed:<function>".
        self.output = WorkerOutput(process.stdout_fd, process.stderr_fd, function=self.function,
                                   worker="", fmt=self.log_format, component=self.name)
        try:
            ours.send(json.dumps(self.spec).encode())
        except OSError:
            pass  # it died already: its exit is observed below
        loop = asyncio.get_running_loop()
        loop.add_reader(ours.fileno(), self._readable)
        launcher.watch_exit(process, self._on_exit)
        log.info("seed starting", function=self.function, pid=process.pid)

    def stop(self) -> None:
        """Ends the seed (no restart); its workers are not affected."""
        self.stopping = True
        if self.process is not None and self.process.exit is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)  # it holds nothing worth a drain
            except ProcessLookupError:
                pass
        # Killed first, so it clones nothing more; then the answers it sent are
        # read, so every worker it did clone is owned (and watched) by its record.
        self._readable()
        self._close_socket()
        if self.state in ("backoff", "failed", "starting", "running"):
            self.state = "stopped"

    def tick(self, now: float) -> None:
        """Restarts a seed whose backoff is over, kills one that stopped answering
        (called by the reconcile loop)."""
        if self.state == "backoff" and now >= self.retry_at and not self.stopping:
            self.restarts += 1
            self.start()
        elif self.pending and self.process is not None and self.process.exit is None and min(
                sent for _, sent in self.pending.values()) < now - FORK_TIMEOUT_S:
            log.error("seed did not answer a fork request; killing it (its workers start by spawn)",
                      function=self.function, pid=self.process.pid, timeout_s=FORK_TIMEOUT_S)
            self.detail = f"did not answer a fork request within {FORK_TIMEOUT_S:g}s"
            os.kill(self.process.pid, signal.SIGKILL)  # its exit fails the requests: they spawn

    # ---- forking --------------------------------------------------------------

    def fork(self, spec: Mapping[str, Any], stdout_w: int, stderr_w: int, done: ForkDone) -> bool:
        """Asks for a worker; False when the seed cannot take the request now."""
        if self.state != "running" or self.sock is None:
            return False
        message = json.dumps({"spec": dict(spec)}).encode()
        fds = array.array("i", [stdout_w, stderr_w])
        try:
            self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as exc:  # full (it is stuck) or gone: spawn instead
            log.warning("seed did not take a request; starting by spawn", function=self.function, error=str(exc))
            return False
        self.pending[str(spec["worker_id"])] = (done, time.monotonic())
        # While it clones: the next worker's cgroup. The seed moves there once this
        # worker is up (``settle``): a move blocks every fork and thread start on the
        # machine for its grace period, and this worker is starting threads now.
        if self.next is not None and self.release is not None:
            self.release(self.next)  # not taken: the seed never moved there
        self.next = self._prepare()
        self.next_sent = False
        return True

    def settle(self) -> None:
        """Moves the seed into the next worker's cgroup (when no clone of it is starting)."""
        if self.next is None or self.next_sent or self.sock is None or self.state != "running":
            return
        try:
            self.sock.send(json.dumps({"wait_in": self.next.procs_files}).encode())
            self.next_sent = True
            self.sits_in = self.next
        except OSError:
            pass  # it is gone or stuck: its next clone moves itself

    def take_next(self) -> Any:
        """The cgroup prepared for the next worker (or None). Its clone is born there
        when the seed has moved in; else it moves itself in (the seed knows which)."""
        taken, self.next = self.next, None
        return taken

    def _prepare(self) -> Any:
        if self.prepare is None:
            return None
        try:
            return self.prepare()
        except OSError as exc:
            log.warning("could not prepare the next worker's cgroup; it will move in itself",
                        function=self.function, error=str(exc))
            return None

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        while True:
            try:
                data = sock.recv(MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_socket()  # EOF: the exit is reported by the pidfd watch
                return
            try:
                reply = json.loads(data)
            except ValueError:
                log.error("seed sent an undecodable reply", function=self.function)
                continue
            self._on_reply(reply)

    def _on_reply(self, reply: dict[str, Any]) -> None:
        worker_id = reply.get("worker_id")
        if worker_id is not None:
            entry = self.pending.pop(str(worker_id), None)
            if entry is not None:
                pid = reply.get("pid")
                entry[0](int(pid) if isinstance(pid, int) else None, str(reply.get("error", "")))
            return
        if reply.get("ready"):
            self.state = "running"
            self.running_since = time.monotonic()
            self.load_ms = float(reply.get("load_ms") or 0.0)
            log.info("seed ready", function=self.function, pid=self.pid, preload_ms=self.load_ms,
                     tid_fixup=bool(reply.get("tid_fixup")))
            self.on_change()
        elif "error" in reply:
            self.detail = str(reply["error"])
            permanent = bool(reply.get("permanent"))
            log.error("seed could not preload the function; workers start by spawn", function=self.function,
                      error=self.detail, retry=not permanent)
            if permanent:
                self.stopping = True  # no restart: the same import would start threads again
                self.state = "failed"

    def _on_exit(self, process: launcher.Process) -> None:
        self._close_socket()
        if process is self.process:
            self.sits_in = None  # it forks nothing more
        if self.release is not None and process is self.process:
            for cgroup in (self.cgroup, self.next):
                self.release(cgroup)
            self.cgroup = self.next = None
        if self.output is not None:
            self.output.close_when_drained()
        self._fail_pending("the seed exited")
        if process is not self.process:
            return
        status = process.exit.describe() if process.exit is not None else "exited"
        if self.stopping:
            if self.state != "failed":
                self.state = "stopped"
            self.on_change()
            return
        healthy = self.state == "running" and time.monotonic() - self.running_since >= HEALTHY_S
        self.failures = 1 if healthy else self.failures + 1
        self.detail = self.detail or f"the seed {status}"
        self.state = "backoff"
        delay = policy.backoff_delay(self.failures)
        self.retry_at = time.monotonic() + delay
        log.warning("seed exited; workers start by spawn until it is back", function=self.function,
                    status=status, restart_in_s=round(delay, 2))
        self.on_change()

    def _failed_to_run(self, detail: str) -> None:
        self.detail = detail
        self.failures += 1
        self.state = "backoff"
        self.retry_at = time.monotonic() + policy.backoff_delay(self.failures)
        log.error("seed could not start; workers start by spawn", function=self.function, error=detail)

    def _close_socket(self) -> None:
        if self.sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            except (RuntimeError, ValueError):
                pass
            self.sock.close()
            self.sock = None
        if self.state in ("running", "starting") and self.stopping:
            self.state = "stopped"
        self._fail_pending("the seed went away")

    def _fail_pending(self, why: str) -> None:
        pending, self.pending = self.pending, {}
        for done, _ in pending.values():
            done(None, why)

    def uptime(self) -> float:
        return round(time.monotonic() - self.started_at, 3) if self.state in ("starting", "running") else 0.0
