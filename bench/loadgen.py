#!/usr/bin/env python3
"""Steady HTTP load that records what happened to every request: bench/chaos.py's load client.

    .venv/bin/python bench/loadgen.py --port 9000 --out /var/tmp/x/load [--connections 8] [--rate 0]

Why not wrk: wrk counts "connect errors" without saying whether the port refused the connection or the
connection broke later, does not keep the time of each failure (so failures cannot be laid against the
moment of a kill) and cannot read the contract's ``errorType``. This client is asyncio on uvloop with
one raw socket per connection and httptools (the parser uvicorn uses) reading the answers; one
process of its own, so it does not share a GIL with the script that kills things.

Rules:

- ``--connections`` (8) connections, each a loop of POST requests, keep-alive. ``--rate`` 0 is a
  closed loop (the next request as soon as the answer is read); a positive rate paces the
  connections to that many requests per second in total (a late request is not made up for).
- Every request has a deadline (``--deadline``, 15 s) over everything it does: connecting, writing,
  reading the whole answer. Nothing waits without one.
- After any failure the connection is dropped and the next request opens a new one, at once. After a
  refused connection the loop pauses ``--refused-pause`` (10 ms), so a closed port costs about
  connections / pause attempts per second and the number of refusals measures how long it was closed.
- What each request came to (its ``outcome``): ``ok`` (200); ``http <status> <errorType>`` (any other
  status, errorType from the contract's JSON body, ``-`` when there is none); ``refused`` (connect()
  got ECONNREFUSED); ``reset`` (ECONNRESET or EPIPE); ``closed`` (the peer closed before a complete
  answer); ``timeout`` (the deadline passed); ``bad answer`` (httptools could not parse it);
  ``error <name>`` (any other OSError).
- Records: every failure in full (start, end, outcome, whether it was the connection's first request),
  every ``ok`` as (start, end) in a binary array of doubles; times are ``time.monotonic()``, which is
  the same clock in every process of the machine, so the caller can lay them against its own events.
- Every ``--progress`` seconds (0.5) one JSON line on stdout: ``{"t", "ok", "failed"}`` so far.
- SIGTERM or SIGINT: no new request; requests in flight get ``--stop-grace`` (2 s) to finish, the rest
  are cancelled and counted as ``cancelled_at_stop`` (not recorded as outcomes). Then ``<out>.json``
  (failures, counts, options) and ``<out>.ok`` (the ok pairs) are written and one last JSON line
  ``{"done": true, ...}`` is printed; exit 0.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools

BODY = b'{"name":"bench","n":42}'  # bench/common.py's BODY (this file runs without bench/ on the path)


@dataclass
class Answer:
    """What httptools has parsed of one answer so far."""

    status: int = 0
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False

    def on_body(self, chunk: bytes) -> None:
        if len(self.body) < 4096:  # enough for the contract's errorType; a large body is not kept
            self.body += chunk[: 4096 - len(self.body)]

    def on_message_complete(self) -> None:
        self.complete = True


def error_type(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return "-"
    return str(doc.get("errorType", "-")) if isinstance(doc, dict) else "-"


class Stats:
    def __init__(self) -> None:
        self.ok = array.array("d")  # start, end, start, end, ...
        self.failures: list[tuple[float, float, str, bool]] = []
        self.cancelled = 0

    @property
    def n_ok(self) -> int:
        return len(self.ok) // 2


class Connection:
    """One keep-alive connection and its request loop."""

    def __init__(self, args: argparse.Namespace, stats: Stats, stop: asyncio.Event, index: int) -> None:
        self.args = args
        self.stats = stats
        self.stop = stop
        self.index = index
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        head = (f"POST {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n")
        head += "".join(f"{h}\r\n" for h in args.header)
        self.request = head.encode() + b"\r\n" + BODY

    def drop(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    async def once(self) -> tuple[str, bool]:
        """One request; its outcome and whether it opened the connection it went over."""
        fresh = self.reader is None
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.args.host, self.args.port)
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader, writer = self.reader, self.writer
        answer = Answer()
        parser = httptools.HttpResponseParser(answer)
        writer.write(self.request)
        while not answer.complete:
            data = await reader.read(65536)
            if not data:
                self.drop()
                return "closed", fresh
            parser.feed_data(data)
        answer.status = parser.get_status_code()
        if not parser.should_keep_alive():
            self.drop()
        if answer.status == 200:
            return "ok", fresh
        return f"http {answer.status} {error_type(bytes(answer.body))}", fresh

    async def run(self) -> None:
        args, stats = self.args, self.stats
        interval = args.connections / args.rate if args.rate > 0 else 0.0
        next_at = time.monotonic() + (interval * self.index / args.connections if interval else 0.0)
        clock = time.monotonic
        while not self.stop.is_set():
            if interval:
                delay = next_at - clock()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), delay)
                    if self.stop.is_set():
                        break
                next_at = max(next_at + interval, clock())
            t0 = clock()
            fresh = self.reader is None
            pause = 0.0
            try:
                async with asyncio.timeout(args.deadline):
                    outcome, fresh = await self.once()
            except ConnectionRefusedError:
                outcome, pause = "refused", args.refused_pause
                self.drop()
            except (ConnectionResetError, BrokenPipeError):
                outcome = "reset"
                self.drop()
            except TimeoutError:
                outcome = "timeout"
                self.drop()
            except httptools.HttpParserError:
                outcome = "bad answer"
                self.drop()
            except OSError as exc:
                outcome = f"error {errno.errorcode.get(exc.errno or 0, type(exc).__name__)}"
                self.drop()
            t1 = clock()
            if outcome == "ok":
                stats.ok.append(t0)
                stats.ok.append(t1)
            else:
                stats.failures.append((t0, t1, outcome, fresh))
            if pause:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), pause)
        self.drop()


def emit(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def progress(stats: Stats, stop: asyncio.Event, every: float) -> None:
    while not stop.is_set():
        emit({"t": time.monotonic(), "ok": stats.n_ok, "failed": len(stats.failures)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def amain(args: argparse.Namespace) -> Stats:
    stats = Stats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    conns = [Connection(args, stats, stop, i) for i in range(args.connections)]
    tasks = [asyncio.create_task(c.run()) for c in conns]
    reporter = asyncio.create_task(progress(stats, stop, args.progress))
    await stop.wait()
    done, pending = await asyncio.wait(tasks, timeout=args.stop_grace)
    for task in pending:
        task.cancel()
    stats.cancelled = len(pending)
    await asyncio.gather(*tasks, reporter, return_exceptions=True)
    for c in conns:
        c.drop()
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/invoke")
    ap.add_argument("--header", action="append", default=[], help="an extra request header, 'Name: value'")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s in total; 0: closed loop")
    ap.add_argument("--deadline", type=float, default=15.0, help="seconds per request, all included")
    ap.add_argument("--refused-pause", type=float, default=0.010, help="seconds after a refused connection")
    ap.add_argument("--progress", type=float, default=0.5, help="seconds between progress lines")
    ap.add_argument("--stop-grace", type=float, default=2.0, help="seconds in-flight requests get at the stop")
    ap.add_argument("--out", required=True, help="writes OUT.json and OUT.ok")
    args = ap.parse_args(argv)
    if args.connections < 1 or args.deadline <= 0:
        ap.error("--connections >= 1 and --deadline > 0")
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency of the project
        pass
    started = time.monotonic()
    cpu0 = os.times()
    stats = asyncio.run(amain(args))
    cpu1 = os.times()
    out = Path(args.out)
    Path(f"{out}.ok").write_bytes(stats.ok.tobytes())
    summary = {"options": {k: v for k, v in vars(args).items() if k != "out"}, "started": started,
               "stopped": time.monotonic(), "ok": stats.n_ok, "failed": len(stats.failures),
               "cancelled_at_stop": stats.cancelled,
               "cpu_s": round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 3)}
    Path(f"{out}.json").write_text(json.dumps({**summary, "failures": stats.failures}))
    emit({"done": True, **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
