"""worker/python/wsgi.py's pure parts: ``wsgi.input`` over any chunking, PEP 3333's
``start_response`` / ``write`` / ``close`` rules, and the environ. The server on a
real exchange is tested in test_python_http_host.py (and end to end in test_runtimes).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.python.wsgi import Collected, ResponseTooLarge, WsgiCall, WsgiInput, build_environ


def chunked(chunks: list[bytes]) -> tuple[WsgiInput, list[int]]:
    """An input over ``chunks``; the list counts how many were fetched."""
    fetched: list[int] = []
    pending = list(chunks)

    def fetch() -> tuple[bytes, bool]:
        fetched.append(1)
        return (pending.pop(0) if pending else b""), bool(pending)

    return WsgiInput(fetch), fetched


reads = st.lists(st.one_of(st.tuples(st.just("read"), st.integers(-1, 40)),
                           st.tuples(st.just("readline"), st.integers(-1, 40))), max_size=30)


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"\n")), max_size=8), ops=reads)
def test_the_input_reads_like_a_file_over_any_chunking(chunks: list[bytes], ops: list[tuple[str, int]]) -> None:
    body = b"".join(chunks)
    stream, _ = chunked(chunks)
    reference = io.BytesIO(body)
    for op, size in ops:
        assert getattr(stream, op)(size) == getattr(reference, op)(size), (op, size)
    assert stream.read() == reference.read()
    assert stream.read(5) == b"" and stream.readline() == b""


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=30), max_size=8), hint=st.integers(-1, 60))
def test_readlines_and_iteration(chunks: list[bytes], hint: int) -> None:
    body = b"".join(chunks)
    assert list(chunked(chunks)[0]) == io.BytesIO(body).readlines()
    assert chunked(chunks)[0].readlines(hint) == io.BytesIO(body).readlines(hint)


def test_the_input_fetches_only_what_a_read_needs() -> None:
    stream, fetched = chunked([b"abc", b"def", b"ghi"])
    assert stream.read(2) == b"ab" and len(fetched) == 1
    assert stream.read(1) == b"c" and len(fetched) == 1
    assert stream.readline(4) == b"defg" and len(fetched) == 3
    assert stream.read(0) == b"" and len(fetched) == 3


class Sent:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, call: WsgiCall, data: bytes) -> None:
        self.chunks.append(data)
        call.head_sent = True  # what serve_exchange does with the first chunk


def run(app: Any) -> tuple[WsgiCall, Sent, list[bytes]]:
    sent = Sent()
    call = WsgiCall(app, {}, sent)
    rest = call.run()
    return call, sent, rest


def test_a_list_is_left_to_the_caller_and_a_generator_is_sent_as_it_goes() -> None:
    def listed(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-A", " b ")])
        return [b"one", b"", bytearray(b"two")]  # type: ignore[list-item]

    call, sent, rest = run(listed)
    assert call.head == (200, [("content-type", "text/plain"), ("x-a", "b")])
    assert sent.chunks == [] and rest == [b"one", b"two"]

    def generated(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("201 Created", [])  # inside the generator: allowed before its first chunk
        yield b""
        yield b"a"
        yield b"b"

    call, sent, rest = run(generated)
    assert call.head == (201, []) and sent.chunks == [b"a", b"b"] and rest == []


def test_write_sends_at_once() -> None:
    def legacy(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [])
        write(b"w1")
        write(b"")
        return [b"end"]

    _, sent, rest = run(legacy)
    assert sent.chunks == [b"w1"] and rest == [b"end"]


class Closing:
    def __init__(self, chunks: list[Any], fail_at: int | None = None) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.closed = 0

    def __iter__(self) -> Iterator[Any]:
        for index, chunk in enumerate(self.chunks):
            if index == self.fail_at:
                raise ValueError("the app failed mid-response")
            yield chunk

    def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize(("chunks", "fail_at", "error"), [
    ([b"a", b"b"], None, None),
    ([b"a", b"b"], 1, ValueError),
    ([b"a", "text"], None, TypeError),  # a WSGI app yields bytes
])
def test_close_is_called_however_the_response_ends(chunks: list[Any], fail_at: int | None,
                                                   error: type[Exception] | None) -> None:
    iterable = Closing(chunks, fail_at)

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response("200 OK", [])
        return iterable

    if error is None:
        run(app)
    else:
        with pytest.raises(error):
            run(app)
    assert iterable.closed == 1


def test_a_refused_send_closes_the_app() -> None:
    """The client is gone (or /invoke's max_body passed): the send raises into the app's thread."""
    iterable = Closing([b"x" * 10] * 5)

    def app(environ: dict[str, Any], start_response: Any) -> Closing:
        start_response("200 OK", [])
        return iterable

    collected = Collected(limit=25)
    call = WsgiCall(app, {}, lambda c, data: collected.add(data))
    with pytest.raises(ResponseTooLarge):
        call.run()
    assert iterable.closed == 1 and collected.too_large and collected.chunks == []


def test_start_response_rules() -> None:
    call = WsgiCall(lambda e, s: [], {}, Sent())
    with pytest.raises(AssertionError):
        call.write(b"before start_response")
    call.start_response("200 OK", [])
    with pytest.raises(AssertionError):
        call.start_response("500 Oops", [])  # a second call needs exc_info
    try:
        raise KeyError("while answering")
    except KeyError:
        call.start_response("500 Internal Server Error", [("a", "b")], sys.exc_info())  # not sent: replaced
    assert call.head == (500, [("a", "b")])
    call.head_sent = True
    with pytest.raises(KeyError, match="while answering"):
        try:
            raise KeyError("while answering")
        except KeyError:
            call.start_response("500 Internal Server Error", [], sys.exc_info())  # sent: re-raised
    for status in ("200", "OK 200", 200, "2000 x"):
        with pytest.raises(ValueError):
            WsgiCall(lambda e, s: [], {}, Sent()).start_response(status, [])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        WsgiCall(lambda e, s: [], {}, Sent()).start_response("200 OK", (("a", "b"),))  # type: ignore[arg-type]


@pytest.mark.parametrize("returns", ["list", "generator"])
def test_no_start_response_is_an_error(returns: str) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        return [b"x"] if returns == "list" else iter([b"x"])

    with pytest.raises(AssertionError, match="start_response"):
        run(app)


def test_the_environ() -> None:
    scope = {"method": "PUT", "raw_path": b"/a%20b/%C3%A9/%FF", "query_string": b"x=1&y=%20",
             "headers": [(b"content-type", b"text/plain"), (b"Content-Length", b"3"), (b"x-custom", b"a"),
                         (b"x-custom", b"b"), (b"x-latin", "é".encode("latin-1"))],
             "http_version": "1.1", "scheme": "https", "client": ("10.0.0.1", 5000), "server": ("127.0.0.1", 9000)}
    body = WsgiInput(lambda: (b"", False))
    environ = build_environ(scope, body)
    assert environ["REQUEST_METHOD"] == "PUT" and environ["SCRIPT_NAME"] == ""
    # bytes as latin-1: the path's bytes exactly, the invalid UTF-8 too
    assert environ["PATH_INFO"].encode("latin-1") == b"/a b/\xc3\xa9/\xff"
    assert environ["QUERY_STRING"] == "x=1&y=%20"
    assert (environ["CONTENT_TYPE"], environ["CONTENT_LENGTH"]) == ("text/plain", "3")
    assert environ["HTTP_X_CUSTOM"] == "a,b" and environ["HTTP_X_LATIN"] == "é"
    assert "HTTP_CONTENT_TYPE" not in environ and "HTTP_CONTENT_LENGTH" not in environ
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"], environ["SERVER_PROTOCOL"]) == ("127.0.0.1", "9000",
                                                                                           "HTTP/1.1")
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("10.0.0.1", "5000")
    assert environ["wsgi.url_scheme"] == "https" and environ["wsgi.input"] is body
    assert environ["wsgi.version"] == (1, 0) and environ["wsgi.input_terminated"] is True
    assert environ["wsgi.multithread"] is True and environ["wsgi.run_once"] is False
    assert build_environ({**scope, "server": None, "client": None}, body)["SERVER_NAME"] == "localhost"
