"""The pull runtimes' API is private: only the worker's own runtime may use it.

A Lambda or SCF runtime reaches its API over TCP on loopback (it knows
``AWS_LAMBDA_RUNTIME_API`` = host:port and nothing else: no secret can be
put where ``awslambdaric`` or SCF's bash + curl bootstrap would present it).
Loopback is shared by every process in the network namespace, so the API
would serve any local process: another function could take this one's
events or post its results. Two gates, the first where it can be had:

1. *The network namespace.* A function with ``network = "none"`` has a
   namespace of its own (``worker/isolation.py``): the worker and its
   runtime are its only processes, and nothing else can reach the port.
   A function that may use the network keeps the shared one, since a namespace
   of its own would cut it off (it has no route out, and building one needs
   veth pairs and NAT that a container rarely allows).
2. *The peer's process* (always applied, the only gate in a shared
   namespace). On each accepted connection the kernel is asked, through
   ``NETLINK_SOCK_DIAG`` (what ``ss`` uses; no privilege needed), which
   socket is the connection's other end: its owner uid and inode. The
   connection is admitted only when that socket is open in a process of
   the worker's own tree (its descendants: the runtime and whatever it
   started; the worker is their subreaper, so a daemonized one still
   counts), read from ``/proc/<pid>/fd``. Anything else is refused before
   a byte is read: the connection is reset, and the refusal logged (at most
   once per ``LOG_EVERY_S``, with a count).

What the second gate still allows: it is as strong as the separation
between this worker's processes and the others. A process that can trace
or inject into the runtime (same uid and no seccomp, or root) can act
through it, which no credential would prevent either; the listening port
itself is visible to all (``/proc/net/tcp``). Processes of other uids cannot
read this worker's ``/proc/<pid>/fd``, and the lookup runs in the worker,
which can. A kernel without ``NETLINK_SOCK_DIAG`` for TCP makes every
connection refused (fail closed): the runtime then never becomes ready,
and its start fails with the cause.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from cahttp.server import CoalescingHttpToolsProtocol, HttpServer
from worker.output import log_error
from worker.runtimes.child import descendants_of

LOOPBACK = "127.0.0.1"
LOG_EVERY_S = 10.0

# <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 0x2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
TCP_LISTEN = 10
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ_HEAD = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (network order)
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2]
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
MSG_SIZE = _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size + _MSG_TAIL.size

Address = tuple[str, int]


def _address(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed.ljust(16, b"\0")


def diag_request(local: Address, remote: Address, seq: int = 1) -> bytes:
    """The netlink message that asks for the TCP socket bound to ``local`` and
    connected to ``remote`` (IPv4), by its exact address pair."""
    body = (_REQ_HEAD.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
            + _SOCKID.pack(local[1], remote[1], _address(local[0]), _address(remote[0]))
            + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + body


def parse_diag_reply(data: bytes, local: Address, remote: Address) -> tuple[int, int] | None:
    """``(uid, inode)`` of the socket in a reply to ``diag_request(local, remote)``;
    None when there is no such socket (or the kernel found another one: a
    listener the lookup falls back to is not the connection's end)."""
    if len(data) < _NLMSGHDR.size:
        return None
    length, kind, _, _, _ = _NLMSGHDR.unpack_from(data)
    if kind != SOCK_DIAG_BY_FAMILY or length < _NLMSGHDR.size + MSG_SIZE or len(data) < length:
        return None  # NLMSG_ERROR: ENOENT (no such socket), or anything unexpected
    offset = _NLMSGHDR.size
    family, state, _, _ = _MSG_HEAD.unpack_from(data, offset)
    offset += _MSG_HEAD.size
    sport, dport, src, dst = _SOCKID.unpack_from(data, offset)
    offset += _SOCKID.size + _SOCKID_TAIL.size
    _, _, _, uid, inode = _MSG_TAIL.unpack_from(data, offset)
    # Inode 0: a TIME_WAIT leftover, nobody's socket.
    if (family != socket.AF_INET or state == TCP_LISTEN or inode == 0 or (sport, dport) != (local[1], remote[1])
            or src[:4] != _address(local[0])[:4] or dst[:4] != _address(remote[0])[:4]):
        return None
    return uid, inode


def tcp_socket_owner(local: Address, remote: Address) -> tuple[int, int] | None:
    """The owner uid and inode of this network namespace's TCP socket bound to
    ``local`` and connected to ``remote``; None when there is none. Raises
    ``OSError`` when the kernel cannot be asked."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(1.0)  # the kernel answers within the send; this only bounds a broken one
        sock.send(diag_request(local, remote))
        return parse_diag_reply(sock.recv(8192), local, remote)


def holder_of(inode: int, pids: list[int]) -> int | None:
    """The first of ``pids`` that has the socket ``inode`` open, or None."""
    target = f"socket:[{inode}]"
    for pid in pids:
        directory = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(directory)
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                if os.readlink(f"{directory}/{fd}") == target:
                    return pid
            except OSError:
                continue  # closed meanwhile
    return None


class PeerGate:
    """Admits a loopback connection only from a process of ``root``'s tree."""

    def __init__(self, root: int | None = None, tree: Callable[[int], list[int]] = descendants_of) -> None:
        self.root = os.getpid() if root is None else root
        self.tree = tree
        self.refusals = 0
        self._unlogged = 0
        self._logged_at = -LOG_EVERY_S

    def check(self, peer: Any, local: Any) -> str | None:
        """None when the connection from ``peer`` to ``local`` is admitted, else why not."""
        if not (isinstance(peer, tuple) and isinstance(local, tuple)):
            return f"not a TCP/IPv4 connection ({peer!r})"
        try:
            owner = tcp_socket_owner((str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])))
        except OSError as exc:
            return f"the kernel could not be asked who connected (sock_diag: {exc})"
        if owner is None:
            return f"no socket of {peer[0]}:{peer[1]} is connected to this API any more"
        uid, inode = owner
        if holder_of(inode, self.tree(self.root)) is None:
            return f"the connection from port {peer[1]} (uid {uid}) belongs to no process of this worker"
        return None

    def refused(self, why: str) -> None:
        """Counts a refusal and logs it, at most once per ``LOG_EVERY_S``."""
        self.refusals += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            more = f" ({self._unlogged - 1} more refused since the last report)" if self._unlogged > 1 else ""
            log_error(f"runtime API: refused a connection: {why}{more}")
            self._logged_at, self._unlogged = now, 0


class _GatedProtocol(CoalescingHttpToolsProtocol):
    """uvicorn's protocol (as the front uses it) behind ``PeerGate``: a refused
    connection is reset before anything it sent is read."""

    gate: PeerGate
    refused_here = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        why = self.gate.check(transport.get_extra_info("peername"), transport.get_extra_info("sockname"))
        if why is not None:
            self.refused_here = True
            transport.abort()
            self.gate.refused(why)
            return
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.refused_here:
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.refused_here:
            super().connection_lost(exc)


def _report(event: str, fields: Mapping[str, Any]) -> None:
    """What the API's server reports (clients it refused or timed out), as the worker's own line."""
    log_error(f"runtime API: {event} ({', '.join(f'{k}={v}' for k, v in fields.items())})")


class PrivateApiServer:
    """An ASGI app served on a port of 127.0.0.1 the kernel picks, to this
    worker's own processes only (see the module docstring): the front's
    ``HttpServer`` (timeouts, contract-shaped refusals) with ``PeerGate``
    in front of each connection."""

    def __init__(self, app: Any, gate: PeerGate | None = None) -> None:
        self.gate = gate or PeerGate()
        protocol = type("PrivateApiProtocol", (_GatedProtocol,), {"gate": self.gate})
        # Port 0: the kernel picks a free port at bind time, so no other process
        # can take it between choosing and binding.
        self.server = HttpServer(app, LOOPBACK, 0, protocol_base=protocol, name="runtime-api", report=_report)
        self.port = 0

    async def start(self) -> None:
        await self.server.start()
        self.port = int(self.server.servers[0].sockets[0].getsockname()[1])

    async def shutdown(self, timeout_s: float) -> None:
        """Stops accepting, lets in-flight requests finish, closes the rest."""
        await self.server.shutdown(timeout_s)
