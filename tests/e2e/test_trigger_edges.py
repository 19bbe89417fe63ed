"""The front's HTTP-trigger edges, on real processes and sockets: what an
application or a client can get wrong, and what it must not break.

- A response head that is not valid HTTP is the contract's 502
  (``InvalidResponseError``); a body that breaks its own Content-Length cuts
  the connection. Either way the worker lives on and serves the next request.
- The request id is the supervisor's: an application cannot forge it.
- A client too slow to send its body, or to take the response, fails as the
  client's (408, or a cut): the worker, and what else it runs, live on.
- A request head over the limit is refused at the front (431 / 414), and one
  just under it reaches the worker without breaking the worker's link.
- Every exchange counts exactly one outcome.

Apps: ``functions/runtimes/web.py`` (ASGI ``app``: /head, /big, /sleep,
/upload) and ``functions/runtimes/server.py`` (custom runtime: /bighead).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cahttp.server import MAX_REQUEST_HEAD
from supervisor.metrics import OUTCOMES
from tests.e2e.harness import Running, started, wait_for
from tests.e2e.test_pools import exits, metric
from tests.e2e.test_runtimes import KINDS, http_fn

INVALID_HEADS = ["status", "informational", "name", "value", "length", "two-lengths", "non-latin-1"]


def outcomes(sup: Running, fn: str) -> dict[str, float]:
    return {o: n for o in OUTCOMES if (n := metric(sup, "supervisor_invocations_total", function=fn, outcome=o))}


def fresh_get(sup: Running, path: str, **kwargs: Any) -> httpx.Response:
    """A GET on a connection of its own."""
    return httpx.get(sup.base + path, timeout=30, trust_env=False, **kwargs)


def read_until_closed(sock: socket.socket, deadline_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or resets it)."""
    sock.settimeout(deadline_s)
    data = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data.append(chunk)
    else:
        raise AssertionError(f"the server did not close the connection within {deadline_s}s")
    return b"".join(data)


@pytest.mark.parametrize("case", INVALID_HEADS)
def test_an_invalid_response_head_is_502_and_the_worker_lives(tmp_path: Path, case: str) -> None:
    with started(tmp_path, {"web": http_fn("asgi", max_workers=1)}) as sup, sup.client() as client:
        pid = client.get("/pid").text
        response = client.get("/head", params={"case": case})
        assert response.status_code == 502, response.text
        assert response.json()["errorType"] == "InvalidResponseError"
        assert response.headers["x-fc-status"] == "404"
        assert "injected" not in response.headers.get("set-cookie", "")
        assert client.get("/pid").text == pid
        assert outcomes(sup, "web") == {"success": 2, "error": 1}
        assert not [line for line in sup.logs() if line.get("unparsed")]


def test_an_application_cannot_forge_the_request_id(tmp_path: Path) -> None:
    with started(tmp_path, {"web": http_fn("asgi")}) as sup, sup.client() as client:
        response = client.get("/head", params={"case": "request-id"}, headers={"x-fc-request-id": "rid-1"})
        assert response.status_code == 200 and response.text == "ok"
        assert response.headers.get_list("x-fc-request-id") == ["rid-1"]


def test_a_204_loses_its_length_and_body_and_the_connection_stays_usable(tmp_path: Path) -> None:
    with started(tmp_path, {"web": http_fn("asgi")}) as sup, sup.client() as client:
        response = client.get("/head", params={"case": "no-content"})
        assert response.status_code == 204 and response.content == b""
        assert "content-length" not in response.headers
        assert client.get("/pid").status_code == 200  # same keep-alive connection, still in step


def test_a_body_that_breaks_its_content_length_cuts_the_connection(tmp_path: Path) -> None:
    # A client per request: each cut connection is of no use to the next one.
    with started(tmp_path, {"web": http_fn("asgi", max_workers=1)}) as sup:
        pid = fresh_get(sup, "/pid").text
        longer = fresh_get(sup, "/head", params={"case": "longer"})
        assert longer.status_code == 200 and longer.content == b"abc"  # what it announced, no more
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete|without sending complete"):
            fresh_get(sup, "/head", params={"case": "shorter"})
        assert fresh_get(sup, "/pid").text == pid
        assert outcomes(sup, "web") == {"success": 2, "error": 2}


@pytest.mark.parametrize("kind", KINDS)
def test_a_slow_uploader_gets_408_and_the_worker_lives(tmp_path: Path, kind: str) -> None:
    fn = http_fn(kind, tmp_path, timeout="2s", max_workers=1, concurrency=2)
    with started(tmp_path, {"web": fn}) as sup, sup.client() as client:
        pid = client.get("/pid").text
        with socket.create_connection(("127.0.0.1", sup.ca_port), timeout=10) as sock:
            sock.sendall(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
            # Meanwhile the same worker serves others.
            assert client.get("/sleep", params={"s": "0.5"}).text == "slept"
            answer = read_until_closed(sock, 15)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"ClientTimeoutError" in answer
        assert client.get("/pid").text == pid
        assert exits(sup, "web", "timeout") == 0
        assert outcomes(sup, "web") == {"success": 3, "cancelled": 1}


def test_a_client_that_stops_reading_is_cut_and_the_worker_lives(tmp_path: Path) -> None:
    fn = http_fn("asgi", timeout="2s", max_workers=1, concurrency=2)
    with started(tmp_path, {"web": fn}) as sup, sup.client() as client:
        pid = client.get("/pid").text
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", sup.ca_port))
            sock.sendall(b"GET /big?mib=256 HTTP/1.1\r\nhost: x\r\n\r\n")
            assert client.get("/sleep", params={"s": "0.5"}).text == "slept"
            # Not reading: past the timeout the front gives up on this client.
            wait_for(lambda: outcomes(sup, "web").get("cancelled") == 1, 15, "the slow reader to be cancelled")
            received = read_until_closed(sock, 15)
        assert len(received) < 256 << 20  # cut, not completed
        assert client.get("/pid").text == pid
        assert exits(sup, "web", "timeout") == 0
        wait_for(lambda: metric(sup, "supervisor_inflight_requests", function="web") == 0, 10,
                 "the cancelled stream's slot to be free")


def test_a_client_that_leaves_while_its_body_waits_is_noticed(tmp_path: Path) -> None:
    # /sleep never reads its body: past the stream window the front waits for the
    # worker, not for the client, and must still learn at once that the client left.
    # (The whole body is sent: a server that has stopped reading sees no departure.)
    with started(tmp_path, {"web": http_fn("asgi", timeout="30s")}) as sup:
        with socket.create_connection(("127.0.0.1", sup.ca_port), timeout=10) as sock:
            size = 300 * 1024
            sock.sendall(f"POST /sleep?s=5 HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n".encode())
            sock.sendall(b"x" * size)
            wait_for(lambda: metric(sup, "supervisor_inflight_requests", function="web") == 1, 10,
                     "the request to reach the worker")
        wait_for(lambda: outcomes(sup, "web").get("cancelled") == 1, 3, "the departure to be counted")
        wait_for(lambda: metric(sup, "supervisor_inflight_requests", function="web") == 0, 10,
                 "the slot to be free once the app returns")


@pytest.mark.parametrize("kind", KINDS)
def test_a_request_head_just_under_the_limit_reaches_the_worker(tmp_path: Path, kind: str) -> None:
    # max_body is tiny: the worker's frame limit is the smallest it can be.
    headers = {f"x-h{i}": "v" * 1000 for i in range(MAX_REQUEST_HEAD // 1100)}
    with started(tmp_path, {"web": http_fn(kind, tmp_path, max_body=16)}) as sup, sup.client() as client:
        pid = client.get("/pid").text
        response = client.post("/echo", content=b"0123456789", headers=headers)
        assert response.status_code == 200, response.text
        echoed = dict(response.json()["headers"])
        assert all(echoed[name] == value for name, value in headers.items())
        assert client.get("/pid").text == pid


def test_a_request_head_over_the_limit_is_refused_at_the_front(tmp_path: Path) -> None:
    with started(tmp_path, {"web": http_fn("asgi")}) as sup, sup.client() as client:
        pid = client.get("/pid").text
        big_headers = {f"x-h{i}": "v" * 1000 for i in range(MAX_REQUEST_HEAD // 1000 + 1)}
        response = client.get("/echo", headers=big_headers)
        assert response.status_code == 431
        assert response.json()["errorType"] == "RequestHeaderFieldsTooLargeError"
        long_url = client.get("/echo?" + "q" * MAX_REQUEST_HEAD)
        assert long_url.status_code == 414 and long_url.json()["errorType"] == "URITooLongError"
        invoke = client.post("/invoke", headers=big_headers)
        assert invoke.status_code == 431
        assert client.get("/pid").text == pid
        assert outcomes(sup, "web") == {"success": 2}


def test_a_custom_runtime_response_head_too_large_fails_only_its_request(tmp_path: Path) -> None:
    with started(tmp_path, {"web": http_fn("custom", tmp_path, max_workers=1)}) as sup, sup.client() as client:
        pid = client.get("/pid").text
        response = client.get("/bighead")
        assert response.json()["errorType"] == "InvalidResponseError", response.text
        assert client.get("/pid").text == pid
        assert exits(sup, "web", "crashed") == 0
