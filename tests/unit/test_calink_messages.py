"""calink.messages: every message round-trips, and untrusted bytes give a message or a ProtocolError.

The properties: ``decode(encode(m)) == m`` for any message; a payload that
decodes re-encodes to exactly the same bytes (one encoding per message, so
nothing a peer sends is read two ways); any prefix of a message, or a
message with bytes left over, is a ``ProtocolError``; mutated and random
bytes never raise anything else; a length or count pointing past the
payload is refused before anything is allocated for it.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calink.frames import ProtocolError
from calink.messages import (
    NO_ERROR,
    ErrorInfo,
    HttpRequest,
    HttpResponseStart,
    Invoke,
    Result,
    WorkerHello,
    WorkerReject,
    WorkerWelcome,
)

u32 = st.integers(0, 2**32 - 1)
text = st.text(max_size=40)  # hypothesis's text has no lone surrogates: all of it is UTF-8
ascii_text = st.text(st.characters(max_codepoint=127), max_size=40)
texts = st.one_of(text, ascii_text)
blob = st.binary(max_size=200)
headers = st.lists(st.tuples(texts, texts), max_size=12)

errors = st.builds(ErrorInfo, texts, texts, st.text(max_size=400))
messages: dict[type[Any], st.SearchStrategy[Any]] = {
    WorkerHello: st.builds(WorkerHello, texts, blob, st.integers(-(2**31), 2**31 - 1)),
    WorkerWelcome: st.builds(WorkerWelcome, blob, st.booleans()),
    WorkerReject: st.builds(WorkerReject, texts),
    ErrorInfo: errors,
    Invoke: st.builds(Invoke, texts, texts, headers, u32, blob),
    Result: st.one_of(st.builds(Result, st.just(True), blob, texts),
                      st.builds(Result, st.booleans(), blob, texts, st.one_of(st.none(), errors))),
    HttpRequest: st.builds(HttpRequest, texts, texts, blob, blob, headers, u32, blob, st.booleans(), texts, texts,
                           texts, st.integers(0, 65535)),
    HttpResponseStart: st.builds(HttpResponseStart, u32, headers),
}
any_message = st.one_of(*messages.values())


def decoder_of(message: Any) -> Callable[[bytes], Any]:
    decode: Callable[[bytes], Any] = type(message).decode
    return decode


# ---- round trips -----------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(any_message)
def test_every_message_round_trips(message: Any) -> None:
    payload = message.encode()
    assert type(payload) is bytes
    decoded = decoder_of(message)(payload)
    assert decoded == message
    assert decoded.encode() == payload


@settings(max_examples=200, deadline=None)
@given(any_message)
def test_decoded_fields_have_their_declared_types(message: Any) -> None:
    decoded = decoder_of(message)(message.encode())
    for name in type(message).__slots__:
        value, given_value = getattr(decoded, name), getattr(message, name)
        if name == "headers":
            assert all(type(n) is str and type(v) is str for n, v in value)
        elif name == "error":
            assert type(value) is ErrorInfo
        else:
            assert type(value) is type(given_value), name


def test_examples() -> None:
    invoke = Invoke("rid-1", "invoke", [("x-fc-request-id", "rid-1"), ("é", "ünïcode")], 86_400_000, b"{}")
    assert Invoke.decode(invoke.encode()) == invoke
    assert Invoke.decode(invoke.encode()).headers == [("x-fc-request-id", "rid-1"), ("é", "ünïcode")]
    request = HttpRequest(request_id="r", method="GET", raw_path=b"/a%20b", query=b"x=1", headers=[("host", "h")],
                          timeout_ms=1, body=b"", more_body=True, http_version="1.1", scheme="http",
                          client_host="127.0.0.1", client_port=65535)
    assert HttpRequest.decode(request.encode()) == request
    assert Result.decode(Result(ok=True).encode()) == Result(ok=True)
    assert Result.decode(Result(ok=True).encode()).error is NO_ERROR


def test_a_result_without_an_error_reads_an_empty_one() -> None:
    assert Result(ok=False).error == ErrorInfo() and Result(ok=True).error.error_type == ""
    failed = Result(ok=False, error=ErrorInfo("E", "message", "trace"))
    assert Result.decode(failed.encode()).error == ErrorInfo("E", "message", "trace")
    with pytest.raises(AttributeError):
        NO_ERROR.error_type = "changed"  # type: ignore[misc]  # shared by every result: immutable


def test_headers_compare_equal_as_lists_or_tuples() -> None:
    assert HttpResponseStart(200, [("a", "b")]) == HttpResponseStart(200, (("a", "b"),))
    assert HttpResponseStart(200, [("a", "b")]) != HttpResponseStart(200, [("a", "c")])
    assert Invoke() != Result()


def test_the_layouts_are_the_documented_ones() -> None:
    # docs/worker-protocol.md: fixed part | uint32 lengths | text fields | byte fields
    assert WorkerHello("w", b"tk", 7).encode() == struct.pack(">iII", 7, 1, 2) + b"w" + b"tk"
    assert WorkerWelcome(b"n", True).encode() == b"\x01" + struct.pack(">I", 1) + b"n"
    assert WorkerReject("no").encode() == struct.pack(">I", 2) + b"no"
    assert ErrorInfo("T", "m", "st").encode() == struct.pack(">III", 1, 1, 2) + b"Tmst"
    assert Invoke("r", "invoke", [("h", "vv")], 5, b"B").encode() == (
        struct.pack(">III", 5, 1, 1) + struct.pack(">4I", 1, 6, 1, 2) + b"rinvokehvv" + b"B")
    assert Result(True, b"B", "ct").encode() == struct.pack(">BIIIII", 1, 1, 2, 0, 0, 0) + b"ct" + b"B"
    assert Result(False, error=ErrorInfo("T", "m", "")).encode() == (
        struct.pack(">BIIIII", 0, 0, 0, 1, 1, 0) + b"Tm")
    assert HttpRequest("r", "GET", b"/p", b"q", [("h", "v")], 9, b"B", True, "1.1", "http", "::1", 80).encode() == (
        struct.pack(">IHBIIII", 9, 80, 1, 2, 1, 1, 1) + struct.pack(">7I", 1, 3, 3, 4, 3, 1, 1)
        + b"rGET1.1http::1hv" + b"/p" + b"q" + b"B")
    assert HttpResponseStart(204, [("a", "b")]).encode() == struct.pack(">II", 204, 1) + struct.pack(
        ">2I", 1, 1) + b"ab"


# ---- untrusted bytes -----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(any_message, st.data())
def test_every_prefix_and_any_surplus_is_a_protocol_error(message: Any, data: st.DataObject) -> None:
    payload = message.encode()
    decode = decoder_of(message)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(ProtocolError):
        decode(payload[:cut])
    with pytest.raises(ProtocolError):
        decode(payload + data.draw(st.binary(min_size=1, max_size=8)))


def decodes_or_refuses(decode: Callable[[bytes], Any], payload: bytes) -> None:
    """A payload is a message (whose encoding is the payload itself) or a ProtocolError."""
    try:
        message = decode(payload)
    except ProtocolError:
        return
    assert message.encode() == payload


@settings(max_examples=500, deadline=None)
@given(any_message, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_messages_decode_or_refuse(message: Any, flips: list[tuple[int, int]]) -> None:
    payload = bytearray(message.encode())
    for at, value in flips:
        payload[at % len(payload)] = value
    decodes_or_refuses(decoder_of(message), bytes(payload))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(messages)), st.binary(max_size=300))
def test_random_bytes_decode_or_refuse(cls: type[Any], payload: bytes) -> None:
    decodes_or_refuses(cls.decode, payload)


def test_invalid_utf8_and_bad_booleans_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="WorkerReject"):
        WorkerReject.decode(struct.pack(">I", 2) + b"\xc3\x28")
    # "é" split between two fields: each field must be UTF-8 on its own
    split = ErrorInfo("é", "", "").encode()
    with pytest.raises(ProtocolError):
        ErrorInfo.decode(struct.pack(">III", 1, 1, 0) + split[-2:])
    with pytest.raises(ProtocolError, match="boolean"):
        WorkerWelcome.decode(b"\x02" + struct.pack(">I", 0))
    with pytest.raises(ProtocolError, match="boolean"):
        Result.decode(struct.pack(">BIIIII", 7, 0, 0, 0, 0, 0))


@pytest.mark.parametrize("payload", [
    struct.pack(">III", 0, 0, 2**32 - 1),  # Invoke: four billion headers announced in 12 bytes
    struct.pack(">III", 0, 0, 2**20) + bytes(64),  # a million headers in 76 bytes
    struct.pack(">III", 0, 2**32 - 1, 0) + struct.pack(">2I", 0, 0),  # a body past the end
    struct.pack(">III", 0, 0, 0) + struct.pack(">2I", 2**32 - 1, 2**32 - 1),  # texts past the end
])
def test_lengths_past_the_payload_are_refused_before_allocating(payload: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            Invoke.decode(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"decoding {len(payload)} bytes allocated {peak} bytes"


def test_headers_counts_past_the_payload_are_refused() -> None:
    with pytest.raises(ProtocolError, match="overruns"):
        HttpResponseStart.decode(struct.pack(">II", 200, 2**31))
    with pytest.raises(ProtocolError, match="overruns"):
        HttpRequest.decode(struct.pack(">IHBIIII", 0, 0, 0, 0, 0, 0, 2**30))


# ---- encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: Invoke(timeout_ms=2**32),
    lambda: Invoke(timeout_ms=-1),
    lambda: HttpRequest(client_port=65536),
    lambda: HttpResponseStart(status=-1),
    lambda: WorkerHello(pid=2**31),
    lambda: HttpResponseStart(200, [("x", "\ud800")]),  # a lone surrogate is not UTF-8
    lambda: Result(ok=False, error=ErrorInfo("\udcff")),
])
def test_what_the_layout_cannot_carry_is_a_value_error(make: Callable[[], Any]) -> None:
    with pytest.raises(ValueError):
        make().encode()


def test_the_largest_timeout_a_config_allows_fits() -> None:
    day_ms = 86_400_000  # config.py bounds a function's timeout by 24h
    assert Invoke.decode(Invoke(timeout_ms=day_ms).encode()).timeout_ms == day_ms
    assert HttpRequest.decode(HttpRequest(timeout_ms=day_ms).encode()).timeout_ms == day_ms
