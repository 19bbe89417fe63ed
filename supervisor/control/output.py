"""A worker's captured stdout and stderr, re-emitted as log lines.

Both pipes of one worker share one ``Attributor`` (request ids follow the FC
markers on stdout) and all workers share one bounded, non-blocking writer to
the control plane's stdout: a flooding worker never stalls, and never grows
this process's memory; lines are dropped and counted instead.
"""

from __future__ import annotations

import asyncio

from supervisor.control.logpump import Attributor, pump
from supervisor.output import shared_sink

# After the worker exits, a child it started may still hold its pipes open:
# the pumps get this long to reach EOF, then stop.
DRAIN_GRACE_S = 1.0

class WorkerOutput:
    def __init__(self, stdout_fd: int, stderr_fd: int, *, function: str, worker: str, fmt: str,
                 component: str = "worker") -> None:
        attributor = Attributor()
        sink = shared_sink("control-plane")
        self.tasks = [
            asyncio.ensure_future(pump(fd, function=function, worker=worker, stream=stream, sink=sink, fmt=fmt,
                                       attributor=attributor, component=component))
            for fd, stream in ((stdout_fd, "stdout"), (stderr_fd, "stderr"))
        ]

    def close_when_drained(self) -> None:
        """The worker exited: stop the pumps once they are done or after a grace."""
        pending = [t for t in self.tasks if not t.done()]
        if not pending:
            return

        def stop() -> None:
            for task in pending:
                task.cancel()

        asyncio.get_running_loop().call_later(DRAIN_GRACE_S, stop)
