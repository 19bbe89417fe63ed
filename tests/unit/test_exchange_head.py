"""``client_head``: what an application's response head becomes for the client.

Whatever the application sends, the result is either the contract's 502
(``InvalidResponseError``) or a head uvicorn writes without raising: that is
what keeps a bad head from leaving a stream (and its worker slot) hanging.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE

from calink.messages import HttpResponseStart
from supervisor.data.errors import InvocationError
from supervisor.data.exchange import client_head

RID = b"rid-1"


def head(status: int, *pairs: tuple[str, str]) -> HttpResponseStart:
    return HttpResponseStart(status=status, headers=list(pairs))


def test_a_valid_head_passes_with_the_request_id_added() -> None:
    status, headers = client_head(head(201, ("Content-Type", "text/plain"), ("Set-Cookie", "a=1"),
                                       ("Set-Cookie", "b=2")), RID)
    assert status == 201
    assert headers == [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
                       (b"x-fc-request-id", RID)]


def test_hop_by_hop_headers_and_a_forged_request_id_are_dropped() -> None:
    _, headers = client_head(head(200, ("Connection", "close"), ("Transfer-Encoding", "chunked"),
                                  ("X-FC-Request-Id", "forged"), ("Keep-Alive", "5")), RID)
    assert headers == [(b"x-fc-request-id", RID)]


def test_content_length_is_kept_once_and_dropped_where_there_is_no_body() -> None:
    assert client_head(head(200, ("Content-Length", " 3 "), ("content-length", "3")), RID)[1] == [
        (b"Content-Length", b"3"), (b"x-fc-request-id", RID)]
    for status in (204, 304):
        assert client_head(head(status, ("Content-Length", "3")), RID)[1] == [(b"x-fc-request-id", RID)]


@pytest.mark.parametrize("bad", [
    head(0), head(103), head(600), head(1000),
    head(200, ("bad name", "v")), head(200, ("", "v")), head(200, ("x:y", "v")),
    head(200, ("x", "a\r\nset-cookie: injected=1")), head(200, ("x", "nul\x00")),
    head(200, ("x", "\u20ac")),
    head(200, ("content-length", "ten")), head(200, ("content-length", "-1")),
    head(200, ("content-length", "\u0663")),  # a digit, but not an ASCII one
    head(200, ("content-length", "1"), ("content-length", "2")),
])
def test_an_invalid_head_is_the_contracts_502(bad: HttpResponseStart) -> None:
    with pytest.raises(InvocationError) as raised:
        client_head(bad, RID)
    assert raised.value.status == 502 and raised.value.error_type == "InvalidResponseError"
    assert raised.value.outcome == "error"


TEXT = st.text(st.characters(max_codepoint=0x2FF), max_size=12)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 1100), st.lists(st.tuples(TEXT | st.sampled_from(["content-length", "Content-Length"]),
                                                 TEXT | st.from_regex(r"[0-9]{1,3}", fullmatch=True)),
                                       max_size=6))
def test_any_head_is_either_refused_or_writable(status: int, pairs: list[tuple[str, str]]) -> None:
    try:
        out_status, headers = client_head(head(status, *pairs), RID)
    except InvocationError as exc:
        assert exc.status == 502
        return
    assert out_status in STATUS_LINE and 200 <= out_status <= 599
    lengths = set()
    for name, value in headers:
        assert not HEADER_RE.search(name) and not HEADER_VALUE_RE.search(value)
        if name.lower() == b"content-length":
            lengths.add(int(value))
    assert len(lengths) <= 1 and not (lengths and out_status in (204, 304))
    assert headers[-1] == (b"x-fc-request-id", RID)
