"""A worker process: authenticate to the data plane, initialize, serve.

Started by the control plane with its spec (a JSON object) on file
descriptor 3, never in argv or the environment, because the spec holds the
worker's one-time credential: a Python function's worker as ``python -S -P
worker/boot.py worker.main`` (the standard library and the worker's own code
only; ``sys.path`` becomes the function's, see ``worker.python.paths``, and
the loop is asyncio's unless the function ships uvloop and asks for it with
``event_loop = "uvloop"``), a custom, lambda or scf runtime's as ``python
-m worker.main`` (no user Python runs there; it uses uvloop).

Lifecycle (the rules):
1. Dial the data plane's worker socket and present ``HELLO(worker_id,
   token)``. Only a ``WELCOME`` lets it go on; it carries the credential for
   the next connection. A ``REJECT`` ends the worker: it never serves
   unauthenticated traffic.
2. Import the function and run its initializer once, then send ``READY``
   (or ``INIT_ERROR`` and exit 78).
3. Serve ``INVOKE`` frames until ``DRAIN``, SIGTERM (also sent when the
   control plane dies, through the parent-death signal) or SIGINT: then
   announce ``DRAINING``, and once the data plane has answered ``DRAIN`` (so
   no INVOKE is still on its way) and in-flight work is done, flush and exit
   0. A worker whose control plane died cannot outlive it by more than the
   function's timeout plus ``ORPHAN_LINGER_S``: a watchdog thread ends it
   even when a handler is stuck (the event loop then never runs the drain).
   Whatever user code raises (``SystemExit`` and ``KeyboardInterrupt``
   too) is its invocation's or hook's result, never this process's end:
   hosts turn it into a ``Result`` and ``_invoke``/``_http`` catch what
   gets past them. An initializer's is the init error of step 2.
4. When the connection drops (the data plane restarted), dial again with
   backoff for up to ``reconnect_s`` and resume without re-initializing;
   give up and exit 75 after that.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from calink import frames
from calink.messages import ErrorInfo, HttpRequest, Invoke, Result, WorkerHello, WorkerReject, WorkerWelcome
from worker import output
from worker.host import ClientDisconnected, Host, HttpExchange, StartupError

EXIT_REJECTED = 77
EXIT_INIT_FAILED = 78
EXIT_LOST_DATA_PLANE = 75
EXIT_RUNTIME_EXITED = 70
EXIT_ISOLATION_FAILED = 71
STREAM_FRAMES = frozenset({frames.Kind.REQUEST_BODY, frames.Kind.REQUEST_END, frames.Kind.WINDOW, frames.Kind.CANCEL})
ORPHAN_LINGER_S = 5.0
ORPHAN_POLL_S = 0.5
PR_SET_PDEATHSIG = 1


def read_spec(fd: int = 3) -> dict[str, Any]:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    spec: dict[str, Any] = json.loads(b"".join(chunks))
    return spec


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM (a graceful drain) when the control plane goes away."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        return
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def watch_for_orphaning(parent_pid: int, limit_s: float) -> None:
    """Ends this process once it has been orphaned for ``limit_s``.

    Normally the parent-death SIGTERM drains the worker within its timeout.
    A handler stuck in a loop never lets that drain run, and the restarted
    control plane does not own this process: nobody else would end it.
    """

    def watch() -> None:
        orphaned_at: float | None = None
        while True:
            time.sleep(ORPHAN_POLL_S)
            if os.getppid() == parent_pid:
                continue
            orphaned_at = orphaned_at or time.monotonic()
            if time.monotonic() - orphaned_at > limit_s:
                # The whole group: a custom runtime's server goes with its worker.
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="orphan-watchdog", daemon=True).start()


class Link(asyncio.Protocol):
    """One connection to the data plane, feeding frames to the worker."""

    def __init__(self, worker: Worker, max_frame: int) -> None:
        self.worker = worker
        self.decoder = frames.FrameDecoder(max_frame)
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.authenticated = False
        self.writer = frames.FrameWriter()
        self.welcome: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        self.writer.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            for kind, stream, payload in self.decoder.feed(data):
                if not self.welcome.done():
                    self.welcome.set_result((kind, payload))
                else:
                    self.worker.on_frame(self, kind, stream, payload)
        except frames.ProtocolError as exc:
            output.log_error(f"worker link protocol error: {exc}")
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("data plane closed the connection"))

    def send(self, kind: frames.Kind, stream: int = 0, payload: bytes = b"") -> None:
        self.writer.send(kind, stream, payload)


def make_host(spec: dict[str, Any]) -> Host:
    """The host for the function's runtime (and, for Python, its interface)."""
    runtime = spec.get("runtime", "python")
    if runtime == "custom":
        from worker.runtimes.custom import CustomHost

        return CustomHost(spec)
    if runtime in ("lambda", "scf"):
        from worker.runtimes.pull import PullHost

        return PullHost(spec)
    if spec.get("interface", "event") != "event":
        from worker.python.http import HttpAppHost

        return HttpAppHost(spec)
    from worker.python.host import PythonHost

    return PythonHost(spec)


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.host = make_host(spec)
        # HTTP-trigger streams in flight on the current connection.
        self.exchanges: dict[int, HttpExchange] = {}
        self.token = bytes.fromhex(spec["token"])
        self.inflight: set[asyncio.Task[None]] = set()
        self.draining = False
        # The data plane's DRAIN (an answer to our DRAINING, or its own order):
        # after it, no INVOKE can still be on its way to us.
        self.drain_acked = False
        self.drained = asyncio.get_running_loop().create_future()
        self.link: Link | None = None

    # ---- connection ------------------------------------------------------

    async def connect(self) -> Link:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + float(self.spec.get("reconnect_s", 30.0))
        delay = 0.02
        while True:
            try:
                _, link = await loop.create_unix_connection(
                    lambda: Link(self, int(self.spec["max_frame"])), self.spec["socket"])
                return link
            except OSError:
                if time.monotonic() + delay > deadline or self.draining:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def authenticate(self, link: Link) -> WorkerWelcome:
        hello = WorkerHello(worker_id=self.spec["worker_id"], token=self.token, pid=os.getpid())
        link.send(frames.Kind.HELLO, 0, hello.encode())
        kind, payload = await asyncio.wait_for(link.welcome, 10.0)
        if kind != frames.Kind.WELCOME:
            reason = WorkerReject.decode(payload).reason if kind == frames.Kind.REJECT else f"frame {kind}"
            output.log_error(f"data plane refused this worker: {reason}")
            raise SystemExit(EXIT_REJECTED)
        welcome = WorkerWelcome.decode(payload)
        self.token = welcome.next_token
        link.authenticated = True
        return welcome

    async def initialize(self, link: Link) -> None:
        failure = await self._start_host()
        if failure is not None:
            await self.report_init_error(link, failure)

    async def _start_host(self) -> ErrorInfo | None:
        """Loads the function and runs its initializer: what failed, or None."""
        try:
            await self.host.start()
            if self.host.has("initialize"):
                rid = f"init-{self.spec['worker_id']}"
                result = await self._run("initialize", rid, {}, self.host.timeout_s, b"")
                return None if result.ok else result.error
        except StartupError as exc:  # the function's own process did not come up
            sys.stderr.write(f"{exc.info.error_type}: {exc.info.error_message}\n")
            return exc.info
        except BaseException as exc:  # import errors, SyntaxError, SystemExit: anything the user's module raises
            from worker.python.host import cancelled_from_outside, error_result

            if cancelled_from_outside(exc):
                raise
            info = error_result(exc).error
            sys.stderr.write(info.stack_trace)
            return info
        return None

    async def report_init_error(self, link: Link, info: ErrorInfo) -> None:
        """Reports the failure, waits (briefly) until the data plane has it, exits 78."""
        link.send(frames.Kind.INIT_ERROR, 0, info.encode())
        # The data plane closes the link once it has passed the error on, so the
        # control plane learns the cause before it sees this process exit.
        try:
            await asyncio.wait_for(asyncio.shield(link.closed), 2.0)
        except TimeoutError:
            pass
        await self.host.close()
        raise SystemExit(EXIT_INIT_FAILED)

    async def serve(self) -> int:
        initialized = False
        while True:
            try:
                link = await self.connect()
            except OSError:
                if self.draining:  # shutting down anyway: nothing was lost
                    return 0
                output.log_error("lost the data plane and could not reconnect; exiting")
                return EXIT_LOST_DATA_PLANE
            self.link = link
            try:
                await self.authenticate(link)
            except (TimeoutError, ConnectionError):
                if link.transport is not None:
                    link.transport.close()  # never two connections at once
                continue
            if not initialized:
                await self.initialize(link)
                initialized = True
            host_exit = self.host.exited()
            if host_exit is None or not host_exit.done():  # never READY for a runtime that is gone
                link.send(frames.Kind.DRAINING if self.draining else frames.Kind.READY)
            waits: list[asyncio.Future[Any]] = [link.closed, self.drained]
            if host_exit is not None:
                waits.append(host_exit)
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if host_exit is not None and host_exit in done:
                # The function's process ended on its own: so does this worker, at
                # once and without another frame, so that the data plane fails its
                # invocations as a crash (not with whatever the host answers now).
                if link.transport is not None:
                    link.transport.abort()
                from worker.runtimes.child import describe_exit

                output.log_error(f"the function's process exited ({describe_exit(host_exit.result())})")
                return EXIT_RUNTIME_EXITED
            for exchange in self.exchanges.values():  # their streams died with the connection
                exchange.on_cancel()
            self.exchanges.clear()
            if self.drained in done or self.draining:
                link.writer.flush()  # the last results go out before the close
                if link.transport is not None:
                    link.transport.close()
                return 0

    # ---- work ------------------------------------------------------------

    def on_frame(self, link: Link, kind: int, stream: int, payload: bytes) -> None:
        if kind == frames.Kind.INVOKE:
            msg = Invoke.decode(payload)
            headers = dict(msg.headers)
            timeout_s = msg.timeout_ms / 1000.0
            if self.host.runs_inline(msg.kind):
                result = self.host.run_inline(msg.kind, msg.request_id, headers, timeout_s, msg.body)
                link.send(frames.Kind.RESULT, stream, result.encode())
                self._maybe_drained()
            else:
                task = asyncio.ensure_future(self._invoke(link, stream, msg, headers, timeout_s))
                self.inflight.add(task)
                task.add_done_callback(self._done)
        elif kind == frames.Kind.HTTP_REQUEST:
            exchange = HttpExchange(link.send, stream, HttpRequest.decode(payload))
            if not self.host.serves_http():
                exchange.finish(ErrorInfo(error_type="FunctionNotFoundError",
                                          error_message="this function does not serve HTTP requests"))
                return
            self.exchanges[stream] = exchange
            task = asyncio.ensure_future(self._http(link, exchange))
            self.inflight.add(task)
            task.add_done_callback(self._done)
        elif kind in STREAM_FRAMES:
            current = self.exchanges.get(stream)
            if current is None:
                return  # the exchange has ended; a late frame for it means nothing
            if kind == frames.Kind.REQUEST_BODY:
                current.on_body(payload)
            elif kind == frames.Kind.REQUEST_END:
                current.on_end()
            elif kind == frames.Kind.WINDOW:
                current.on_window(payload)
            else:
                current.on_cancel()
        elif kind == frames.Kind.DRAIN:
            self.drain_acked = True
            self.drain()

    async def _run(self, kind: str, request_id: str, headers: dict[str, str], timeout_s: float,
                   body: bytes) -> Result:
        if self.host.runs_inline(kind):
            return self.host.run_inline(kind, request_id, headers, timeout_s, body)
        return await self.host.run(kind, request_id, headers, timeout_s, body)

    async def _invoke(self, link: Link, stream: int, msg: Invoke, headers: dict[str, str],
                      timeout_s: float) -> None:
        try:
            result = await self.host.run(msg.kind, msg.request_id, headers, timeout_s, msg.body)
        except BaseException as exc:  # hosts turn user code's failures into results; this is a last resort
            from worker.python.host import cancelled_from_outside, error_result

            if cancelled_from_outside(exc):
                raise
            result = error_result(exc)
            sys.stderr.write(result.error.stack_trace)
        # Answer on the current connection: after a data-plane restart the old
        # stream ids mean nothing, and the new data plane has no such stream.
        if self.link is link:
            link.send(frames.Kind.RESULT, stream, result.encode())

    async def _http(self, link: Link, exchange: HttpExchange) -> None:
        try:
            await self.host.http(exchange)
        except BaseException as exc:  # whatever the application raised is the exchange's result
            from worker.python.host import cancelled_from_outside, error_result

            if cancelled_from_outside(exc):
                raise
            if not exchange.finished and link is self.link:
                info = error_result(exc).error
                if not isinstance(exc, ClientDisconnected):
                    sys.stderr.write(info.stack_trace)
                exchange.finish(info)
        finally:
            if not exchange.finished and link is self.link:
                exchange.finish(ErrorInfo(error_type="IncompleteResponseError",
                                          error_message="the application returned without a complete response"))
            if self.exchanges.get(exchange.stream) is exchange:
                del self.exchanges[exchange.stream]

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            output.log_error(f"worker task failed: {task.exception()!r}")
        self._maybe_drained()

    def drain(self) -> None:
        """Finish what is in flight, then exit (SIGTERM, parent death, DRAIN)."""
        if self.draining:
            self._maybe_drained()
            return
        self.draining = True
        link = self.link
        if link is not None and link.authenticated and not self.drain_acked:
            link.send(frames.Kind.DRAINING)
        if link is None or link.closed.done():
            self.drain_acked = True  # nobody can send us work
        self._maybe_drained()

    def _maybe_drained(self) -> None:
        if self.draining and self.drain_acked and not self.inflight and not self.drained.done():
            self.drained.set_result(None)


async def amain(spec: dict[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    worker = Worker(spec)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.drain)
    try:
        return await worker.serve()
    finally:
        await worker.host.close()


def event_loop_factory(spec: dict[str, Any]) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The worker's loop (None: asyncio's own). A Python function gets asyncio's
    unless it says ``event_loop = "uvloop"``: then the uvloop it ships (found on its
    own ``sys.path``; the supervisor's packages are not on it). Custom, lambda and
    scf runtimes run no user Python here and keep the supervisor's uvloop."""
    if spec.get("runtime", "python") == "python" and spec.get("event_loop", "asyncio") != "uvloop":
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main() -> None:
    start(read_spec())


def start(spec: dict[str, Any]) -> None:
    """Runs the worker described by ``spec`` until it exits (never returns).

    The one path for both modes: after ``posix_spawn`` + ``read_spec``, and in
    a child cloned by the seed (``worker.seed``).
    """
    # Nothing the supervisor's processes had open reaches user code.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    if spec.get("isolation"):
        # Before any thread (unshare refuses a threaded process) and any user code.
        from worker import isolation

        try:
            isolation.apply(spec["isolation"])
        except isolation.IsolationError as exc:
            output.log_error(f"could not isolate this worker: {exc}")
            os._exit(EXIT_ISOLATION_FAILED)
    watch_for_orphaning(int(spec["parent_pid"]), float(spec["timeout_s"]) + ORPHAN_LINGER_S)
    die_with_parent(int(spec["parent_pid"]))
    output.install()
    os.chdir(spec["code_dir"])
    if spec.get("runtime", "python") == "python":
        from worker.python import paths

        paths.enter(spec)  # the function's own directories, then the standard library
    try:
        factory = event_loop_factory(spec)
    except (ImportError, AttributeError) as exc:  # the check at start and reload says so before a worker starts
        output.log_error(f"event_loop = \"uvloop\": the function ships no usable uvloop ({type(exc).__name__}: {exc})")
        os._exit(EXIT_INIT_FAILED)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            code = runner.run(amain(spec))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Threads of a sync handler stuck past its deadline must not hold the exit.
    os._exit(code)


if __name__ == "__main__":
    main()
