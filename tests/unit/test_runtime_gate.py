"""worker.runtimes.gate: the pull runtimes' API admits only the worker's own processes.

The netlink messages are checked as bytes (hypothesis), the lookups on real
loopback connections of this process and of child processes, and the server
end to end: a child of the serving process gets its answer, the serving
process's own (not a descendant) connection is reset before it is read.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_sandbox import UNPRIVILEGED, function, plan
from worker.runtimes import gate
from worker.runtimes.gate import PeerGate, PrivateApiServer, diag_request, holder_of, parse_diag_reply, tcp_socket_owner

ips = st.ip_addresses(v=4).map(str)
ports = st.integers(1, 65535)


def reply(family: int, state: int, local: tuple[str, int], remote: tuple[str, int], uid: int, inode: int) -> bytes:
    body = (struct.pack("=BBBB", family, state, 0, 0)
            + struct.pack("!HH16s16s", local[1], remote[1], socket.inet_aton(local[0]).ljust(16, b"\0"),
                          socket.inet_aton(remote[0]).ljust(16, b"\0"))
            + struct.pack("=III", 0, 1, 2) + struct.pack("=IIIII", 0, 0, 0, uid, inode))
    return struct.pack("=IHHII", 16 + len(body), gate.SOCK_DIAG_BY_FAMILY, 0, 1, 0) + body


@given(ips, ports, ips, ports, st.integers(0, 2**32 - 1), st.integers(1, 2**32 - 1))
def test_a_reply_for_the_asked_socket_gives_its_owner(lip: str, lport: int, rip: str, rport: int, uid: int,
                                                       inode: int) -> None:
    request = diag_request((lip, lport), (rip, rport))
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", request)
    assert length == len(request) == 16 + 56 and kind == gate.SOCK_DIAG_BY_FAMILY and flags == gate.NLM_F_REQUEST
    established = reply(socket.AF_INET, 1, (lip, lport), (rip, rport), uid, inode)
    assert parse_diag_reply(established, (lip, lport), (rip, rport)) == (uid, inode)


@given(ips, ports, ips, ports)
def test_anything_but_the_asked_connected_socket_is_none(lip: str, lport: int, rip: str, rport: int) -> None:
    local, remote = (lip, lport), (rip, rport)
    other_port = (lip, lport % 65535 + 1)
    assert parse_diag_reply(reply(socket.AF_INET, gate.TCP_LISTEN, local, remote, 0, 5), local, remote) is None
    assert parse_diag_reply(reply(socket.AF_INET, 1, other_port, remote, 0, 5), local, remote) is None
    assert parse_diag_reply(reply(socket.AF_INET6, 1, local, remote, 0, 5), local, remote) is None
    assert parse_diag_reply(reply(socket.AF_INET, 6, local, remote, 0, 0), local, remote) is None  # TIME_WAIT
    error = struct.pack("=IHHII", 36, gate.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -2) + b"\0" * 16
    assert parse_diag_reply(error, local, remote) is None
    assert parse_diag_reply(b"\0" * 8, local, remote) is None
    assert parse_diag_reply(reply(socket.AF_INET, 1, local, remote, 0, 5)[:-4], local, remote) is None


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server


def test_the_kernel_names_the_owner_of_a_connections_other_end(listener: socket.socket) -> None:
    with socket.create_connection(listener.getsockname()) as client:
        accepted, peer = listener.accept()
        with accepted:
            owner = tcp_socket_owner(peer, accepted.getsockname())
            assert owner == (os.geteuid(), os.fstat(client.fileno()).st_ino)
            assert holder_of(owner[1], [os.getpid()]) == os.getpid()
            assert holder_of(owner[1], [1, 2**22 + 7]) is None  # not theirs (or not there)
        client.close()
    assert tcp_socket_owner(peer, listener.getsockname()) is None  # the connection is gone


CONNECTOR = """
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(sock.getsockname()[1], flush=True)
sys.stdin.read()
"""


def test_the_gate_admits_a_descendant_and_nobody_else(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c", CONNECTOR, str(port)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        child_port = int(child.stdout.readline())
        accepted, peer = listener.accept()
        with accepted:
            assert peer[1] == child_port
            assert PeerGate().check(peer, accepted.getsockname()) is None  # a child of this process
            refusal = PeerGate(tree=lambda root: []).check(peer, accepted.getsockname())
            assert refusal is not None and "belongs to no process of this worker" in refusal
        with socket.create_connection(("127.0.0.1", port)) as own:  # this process: not its own descendant
            accepted, peer = listener.accept()
            with accepted:
                assert "no process of this worker" in str(PeerGate().check(peer, accepted.getsockname()))
            own.close()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)


async def _hello(scope: dict[str, object], receive: object, send: object) -> None:
    assert callable(send)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


FETCHER = """
import http.client, sys
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=5)
try:
    conn.request("GET", "/")
    print(conn.getresponse().read().decode())
except OSError as exc:
    print(type(exc).__name__)
"""


def test_the_server_answers_its_descendants_and_resets_anyone_else() -> None:
    async def main() -> tuple[str, str, int]:
        server = PrivateApiServer(_hello)
        await server.start()
        try:
            fetch = await asyncio.create_subprocess_exec(sys.executable, "-c", FETCHER, str(server.port),
                                                         stdout=subprocess.PIPE)
            out, _ = await asyncio.wait_for(fetch.communicate(), 20)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # this process itself
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            try:
                own = (await asyncio.wait_for(reader.read(), 5)).decode() or "closed"
            except ConnectionResetError:
                own = "reset"
            writer.close()
            return out.decode().strip(), own, server.gate.refusals
        finally:
            await server.shutdown(1.0)

    child, own, refusals = asyncio.run(main())
    assert child == "hello"
    assert own in ("reset", "closed") and refusals == 1


# ---- what status says (supervisor/control/sandbox.py) ------------------------------------


@pytest.mark.parametrize("runtime", ["lambda", "scf"])
def test_the_plan_says_which_gate_guards_a_pull_runtimes_api(tmp_path: Path, runtime: str) -> None:
    fn = function(tmp_path, runtime=runtime, command=["./bootstrap"])
    assert "shared loopback" in plan(fn).summary["runtime_api"]
    assert "shared loopback" in plan(fn, UNPRIVILEGED).summary["runtime_api"]  # no root needed
    isolated = function(tmp_path, runtime=runtime, command=["./bootstrap"], limits={"network": "none"})
    assert "own network namespace" in plan(isolated).summary["runtime_api"]
    # Without a namespace to have, network = "none" is a gap, and the peer check remains.
    assert "shared loopback" in plan(isolated, UNPRIVILEGED).summary["runtime_api"]
    assert "runtime_api" not in plan(function(tmp_path)).summary  # a Python function serves no such API
