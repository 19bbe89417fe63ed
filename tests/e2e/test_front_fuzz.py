"""Hypothesis writes request bytes to a real supervisor's CA port.

For every example: each answer is contract-shaped (a worker's 200, or the
contract's JSON error with ``x-fc-status`` and ``x-fc-request-id``) or the
connection is closed without one; a request reaches a worker only when h11,
a strict HTTP/1.1 parser, reads the same request from the same bytes (same
method, target and body); no plane restarts; every log line stays JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import open_to_workers
from tests.e2e.harness import FUNCTIONS_DIR, Running, function, send_raw, started

EXAMPLES = int(os.environ.get("CA_FUZZ_EXAMPLES", "300"))


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Path]]:
    base = tmp_path_factory.getbasetemp()
    tmp = tmp_path_factory.mktemp("fuzz")
    records = tmp / "records"
    records.mkdir()
    open_to_workers(records, base)
    functions = {"rec": function("recorder:app", code_dir=str(FUNCTIONS_DIR / "recorder"), interface="asgi",
                                 concurrency=4, env={"RECORD_DIR": str(records)})}
    with started(tmp, functions, default_function="rec", client_header_timeout="1s",
                 client_body_timeout="1s", keep_alive_timeout="2s") as running:
        yield running, records
        status = running.status()
        assert all(c["restarts"] == 0 for c in status["components"]), status["components"]
        unparsed = [line["event"] for line in running.logs() if line.get("unparsed")]
        assert not unparsed, unparsed[:10]


TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                min_size=1, max_size=12)
NASTY = st.binary(min_size=0, max_size=40)
METHODS = st.one_of(st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH"]), TOKEN)
TARGETS = st.one_of(st.sampled_from(["/", "/invoke", "/x/y?q=1", "/initialize", "*", "http://h/a"]),
                    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30)
                    .map(lambda t: "/" + t))
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x", b"http/1.1", b""])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(METHODS).encode()
    target = draw(TARGETS).encode()
    version = draw(VERSIONS)
    headers: list[tuple[bytes, bytes]] = []
    if draw(st.integers(0, 9)):  # mostly present; an HTTP/1.1 request without one is refused
        headers.append((b"Host", draw(st.sampled_from([b"x", b"", b"a b", b"example.com:80"]))))
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(TOKEN.map(str.encode), NASTY))
        value = draw(st.one_of(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
                               .map(str.encode), NASTY))
        headers.append((name, value))
    body = draw(st.binary(max_size=64))
    framing = draw(st.sampled_from(["length", "chunked", "none", "wrong-length", "both", "gzip"]))
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "wrong-length":
        headers.append((b"Content-Length", draw(st.sampled_from([b"-1", b"1e3", b" 5", b"99999999999999999999",
                                                                  b"5, 6", str(len(body) + 1).encode()]))))
    elif framing in ("chunked", "both", "gzip"):
        if framing == "both":
            headers.append((b"Content-Length", str(len(body)).encode()))
        headers.append((b"Transfer-Encoding", b"gzip, chunked" if framing == "gzip" else b"chunked"))
        size = draw(st.sampled_from([b"%x" % len(body), b"zz", b"%x" % (len(body) + 3), b"-1"]))
        body = (size + b"\r\n" + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
    else:
        body = b""
    headers.append((b"Connection", b"close"))
    line_end = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n"]))
    data = b" ".join(filter(None, [method, target, version])) + line_end
    data += b"".join(n + b": " + v + line_end for n, v in headers) + line_end + body
    # Byte-level mutations on top of the structure.
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(st.binary(min_size=1, max_size=4))
        if action == "insert":
            data = data[:at] + chunk + data[at:]
        elif action == "delete":
            data = data[:at] + data[at + len(chunk):]
        else:
            data = data[:at] + chunk + data[at + len(chunk):]
    return data


def strict_requests(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(method, target, body) of every whole request h11 reads from ``data``, in order."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    conn.receive_data(b"")
    out: list[tuple[bytes, bytes, bytes]] = []
    current: list[bytes] = []
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                current = [event.method, event.target, b""]
            elif isinstance(event, h11.Data):
                current[2] += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                out.append((current[0], current[1], current[2]))
                return out  # Connection: close: one request at most
            elif event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
                return out
    except h11.RemoteProtocolError:
        return out


def responses(data: bytes, head: bool) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """The answers in ``data``, read as h11 reads answers to a GET (a HEAD: no bodies)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="HEAD" if head else "GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    out = []
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            status, headers, body = event.status_code, dict(event.headers), b""
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, headers, body))
            return out
        else:
            return out


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
@given(data=requests())
def test_every_answer_is_contract_shaped_and_workers_see_only_valid_requests(
        sup: tuple[Running, Path], data: bytes) -> None:
    running, records = sup
    before = {p: len(p.read_text().splitlines()) for p in records.iterdir()}
    received = send_raw(running.ca_port, data, timeout=15, shut_write=True)
    recorded = [json.loads(line) for p in records.iterdir()
                for line in p.read_text().splitlines()[before.get(p, 0):]]
    if received:
        answers = responses(received, head=data.startswith(b"HEAD "))
        assert answers, f"an answer h11 cannot read: {received[:300]!r}"
        status, headers, body = answers[0]
        assert headers.get(b"x-fc-request-id"), received[:300]
        if status != 200:
            # Not the worker's: the contract's JSON error.
            assert headers.get(b"x-fc-status") == b"404", received[:300]
            if body:
                assert "errorType" in json.loads(body), received[:300]
    # A request that reached the worker is one a strict parser reads the same way.
    strict = strict_requests(data)
    for record in recorded:
        assert strict, f"the worker got a request h11 refuses: {data!r} -> {record}"
        method, target, body = strict[0]
        assert record["method"].encode() == method
        assert bytes.fromhex(record["body"]) == body
        path = unquote(target.split(b"#")[0].split(b"?")[0].decode("latin-1"))
        assert path.endswith(record["path"]) or record["path"] == "/invoke"
