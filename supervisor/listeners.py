"""The listening sockets of the CA port and the metrics port, owned by the supervisor.

The supervisor binds them once, before any plane starts, and hands them to
every data plane it starts (a forked plane keeps the descriptors, a spawned
one inherits them); ``$SUPERVISOR_LISTEN_FDS`` names them, e.g.
``ca_port=5,6;metrics_port=7``. The supervisor keeps its own copies open, so
a listening socket lives as long as the supervisor, not as long as one data
plane: while a killed data plane is replaced, clients' connections wait in
the kernel's backlog and the next plane accepts them. Nothing is refused.

Rules:
- Only the data plane gets them: the control plane, seeds and workers never
  hold a listening socket (a worker could otherwise accept the platform's
  traffic). The descriptors are close-on-exec in every process.
- At shutdown the supervisor closes its copies first; when the data plane
  then closes its own, the port closes for real (a stopping instance refuses
  new connections instead of keeping them in a backlog nobody serves).
- A host that resolves to several addresses (``localhost``: 127.0.0.1 and
  ::1) gets one socket per address, like ``asyncio``'s ``create_server``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Mapping

LISTEN_FDS_ENV = "SUPERVISOR_LISTEN_FDS"
BACKLOG = 2048
BIND_RETRY_S = 3.0


class CannotListen(Exception):
    """A port that could not be bound; the message names the config key."""


def bind(host: str, port: int, key: str, retry_s: float = BIND_RETRY_S) -> list[socket.socket]:
    """Listening sockets for ``host:port``, retrying for ``retry_s`` while the
    address is in use (a previous instance may still hold it)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return _bind_once(host, port)
        except OSError as exc:
            if time.monotonic() >= deadline or exc.errno not in (98, 99):  # EADDRINUSE, EADDRNOTAVAIL
                raise CannotListen(f"cannot listen on {host}:{port} (supervisor.{key}): "
                                   f"{exc.strerror or exc}") from exc
            time.sleep(0.1)


def bind_all(host: str, ports: Mapping[str, int]) -> dict[str, list[socket.socket]]:
    """Every port of ``ports`` (config key -> port) bound, or none (``CannotListen``)."""
    bound: dict[str, list[socket.socket]] = {}
    try:
        for key, port in ports.items():
            bound[key] = bind(host, port, key)
    except BaseException:
        close(bound)
        raise
    return bound


def close(listeners: Mapping[str, Iterable[socket.socket]]) -> None:
    for socks in listeners.values():
        for sock in socks:
            sock.close()


def _bind_once(host: str, port: int) -> list[socket.socket]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def encode(listeners: Mapping[str, Iterable[socket.socket]]) -> str:
    """``$SUPERVISOR_LISTEN_FDS`` for these sockets."""
    return ";".join(f"{key}={','.join(str(s.fileno()) for s in socks)}" for key, socks in listeners.items())


def fds(listeners: Mapping[str, Iterable[socket.socket]]) -> list[int]:
    return [s.fileno() for socks in listeners.values() for s in socks]


def take_inherited(environ: dict[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """The listening sockets this process was handed (and forgets the variable,
    so nothing this process starts sees it)."""
    env = os.environ if environ is None else environ
    text = env.pop(LISTEN_FDS_ENV, "")
    listeners: dict[str, list[socket.socket]] = {}
    for part in filter(None, text.split(";")):
        key, _, numbers = part.partition("=")
        socks = []
        for number in filter(None, numbers.split(",")):
            fd = int(number)
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            socks.append(sock)
        listeners[key] = socks
    return listeners
