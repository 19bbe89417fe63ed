"""Output capture end to end: a real child process flooding its pipes through the
log pump, and the bounded writer against a reader that stops reading."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil

from supervisor.control.logpump import Attributor, pump
from supervisor.output import BoundedLineWriter

ROOT = Path(__file__).resolve().parents[2]
MAX_LINE = 16 * 1024
# What the JSON envelope adds around a line's text (plain ASCII text here).
ENVELOPE = 512
HUGE = 10_000_000
FLOOD = 200_000

CHILD = f"""
import os, sys
from worker.output import current_request_id, install, marker

install()
marker("Invoke", "req-1", "Start")
current_request_id.set("req-1")
print("x" * {HUGE})
for i in range({FLOOD}):
    print("line", i)
os.write(1, b"untagged from C\\n")
print("to stderr", file=sys.stderr)
print("done")
current_request_id.set(None)
marker("Invoke", "req-1", "End")
"""


def test_a_flooding_child_is_never_blocked_and_memory_stays_flat(tmp_path: Path) -> None:
    log_path = tmp_path / "out.log"

    async def main() -> tuple[int, float]:
        me = psutil.Process()
        baseline = me.memory_info().rss
        peak = baseline
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        with open(log_path, "wb") as log_file:
            # A regular file never stalls: every drop here would be the pump's fault.
            sink = BoundedLineWriter(log_file.fileno())
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CHILD, stdout=out_w, stderr=err_w, env=env
            )
            os.close(out_w)
            os.close(err_w)
            attributor = Attributor()
            pumps = [
                asyncio.create_task(
                    pump(fd, function="f", worker="w1", stream=name, sink=sink, fmt="json", attributor=attributor)
                )
                for fd, name in ((out_r, "stdout"), (err_r, "stderr"))
            ]
            exited = asyncio.create_task(child.wait())
            deadline = time.monotonic() + 60
            while not exited.done():
                assert time.monotonic() < deadline, "the child was blocked by its logging"
                peak = max(peak, me.memory_info().rss)
                await asyncio.wait({exited}, timeout=0.01)  # an RSS sample every 10 ms
            await asyncio.wait_for(asyncio.gather(*pumps), 10)
            peak = max(peak, me.memory_info().rss)
            assert await asyncio.to_thread(sink.flush, 10)
            sink.close()
            assert sink.dropped_total == 0
            return exited.result(), peak - baseline

    code, growth = asyncio.run(main())
    assert code == 0
    assert growth < 50 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"

    flood = 0
    seen: dict[str, dict[str, object]] = {}
    with open(log_path, "rb") as lines:
        for raw in lines:
            assert len(raw) <= MAX_LINE + ENVELOPE
            record = json.loads(raw)
            assert record["component"] == "worker" and record["function"] == "f" and record["worker"] == "w1"
            event = record["event"]
            assert isinstance(event, str)
            if event.startswith("line "):
                assert int(event[5:]) == flood  # in order, none missing
                assert record["request_id"] == "req-1"
                flood += 1
            else:
                seen[event[:40]] = record
    assert flood == FLOOD
    huge = seen["x" * 40]
    tag = len(b"\x1ereq-1\x1f")
    assert huge["truncated_bytes"] == tag + HUGE - MAX_LINE
    assert huge["event"] == "x" * (MAX_LINE - tag) and huge["request_id"] == "req-1"
    assert seen["done"]["request_id"] == "req-1"
    assert seen["untagged from C"]["request_id"] == "req-1"  # by the boundary records
    assert seen["to stderr"]["level"] == "warning" and seen["to stderr"]["stream"] == "stderr"
    assert sorted(seen) == sorted(["x" * 40, "done", "untagged from C", "to stderr"])  # records are not lines


class PipeReader:
    """Reads a pipe in a thread once resumed; collects lines."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: list[bytes] = []
        self.resumed = threading.Event()
        self.got_notice = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.resumed.wait()
        partial = b""
        while chunk := os.read(self.fd, 1 << 16):
            *complete, partial = (partial + chunk).split(b"\n")
            for line in complete:
                self.lines.append(line)
                if b'"log lines dropped"' in line:
                    self.got_notice.set()


def test_writer_drops_and_counts_while_the_reader_is_paused_and_never_blocks_the_loop() -> None:
    read_fd, write_fd = os.pipe()
    reader = PipeReader(read_fd)
    max_buffer = 256 * 1024
    writer = BoundedLineWriter(write_fd, max_buffer=max_buffer, component="control-plane")
    total = 20_000
    produced = [b"%08d " % i + b"y" * 90 + b"\n" for i in range(total)]

    async def main() -> float:
        max_gap = 0.0
        done = False

        async def ticker() -> None:
            nonlocal max_gap
            last = time.monotonic()
            while not done:
                await asyncio.sleep(0.001)
                now = time.monotonic()
                max_gap = max(max_gap, now - last)
                last = now

        tick = asyncio.create_task(ticker())
        for start in range(0, total, 500):
            for line in produced[start : start + 500]:
                writer.write_line(line)
            assert writer.pending_bytes <= max_buffer
            await asyncio.sleep(0)
        done = True
        await tick
        return max_gap

    max_gap = asyncio.run(main())
    assert max_gap < 0.5, f"the loop stalled for {max_gap:.3f}s"
    assert os.get_blocking(write_fd)  # the shared fd's flags were left alone
    dropped = writer.dropped_total
    # 2 MB into a 64 KiB pipe plus a 256 KiB buffer: most lines cannot fit.
    assert dropped > total // 2

    reader.resumed.set()
    assert reader.got_notice.wait(10), "no 'log lines dropped' line after the reader resumed"
    assert writer.flush(10)
    writer.close()
    os.close(write_fd)
    (notice,) = [json.loads(line) for line in reader.lines if b'"log lines dropped"' in line]
    assert notice["dropped"] == dropped
    assert (notice["level"], notice["component"]) == ("warning", "control-plane")
    assert "timestamp" in notice
    got = [line + b"\n" for line in reader.lines if b'"log lines dropped"' not in line]
    assert len(got) + dropped == total
    assert set(got) <= set(produced)  # whole lines only, never a torn one
    assert got == sorted(got)  # in order
    os.close(read_fd)


def test_writer_survives_a_vanished_reader() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    writer = BoundedLineWriter(write_fd)
    for _ in range(1000):
        writer.write_line(b"into the void\n")
    assert writer.flush(10)  # EPIPE swallowed, everything accounted for
    writer.close()
    os.close(write_fd)
