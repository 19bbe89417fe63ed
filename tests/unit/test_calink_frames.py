"""calink.frames: frame encoding and the incremental decoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calink.frames import HEADER, HEADER_SIZE, WINDOW_ACK, FrameDecoder, Kind, ProtocolError, encode, window_size

Frame = tuple[int, int, bytes]

frames_st = st.lists(
    st.tuples(st.integers(1, 9), st.integers(0, 2**32 - 1), st.binary(max_size=3000)),
    max_size=12)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def decode_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


# ---- examples -----------------------------------------------------------------


def test_header_layout() -> None:
    assert HEADER_SIZE == 9
    data = encode(Kind.INVOKE, 0x01020304, b"abc")
    assert data == b"\x00\x00\x00\x03" + b"\x06" + b"\x01\x02\x03\x04" + b"abc"
    assert encode(Kind.READY, 0) == b"\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def test_one_whole_frame_in_one_read() -> None:
    decoder = FrameDecoder(100)
    assert list(decoder.feed(encode(Kind.RESULT, 7, b"payload"))) == [(7, 7, b"payload")]
    assert list(decoder.feed(b"")) == []


def test_empty_payload_frames() -> None:
    decoder = FrameDecoder(0)
    data = encode(Kind.READY, 0) + encode(Kind.DRAINING, 0)
    assert list(decoder.feed(data)) == [(4, 0, b""), (9, 0, b"")]


def test_frame_split_byte_by_byte() -> None:
    decoder = FrameDecoder(100)
    data = encode(Kind.HELLO, 0, b"hello") + encode(Kind.INVOKE, 3, b"x")
    out = decode_all(decoder, [data[i : i + 1] for i in range(len(data))])
    assert out == [(1, 0, b"hello"), (6, 3, b"x")]


def test_frame_at_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(10)
    assert list(decoder.feed(encode(Kind.RESULT, 1, b"x" * 10))) == [(7, 1, b"x" * 10)]


def test_oversized_frame_in_one_read() -> None:
    decoder = FrameDecoder(10)
    with pytest.raises(ProtocolError, match="11 bytes exceeds the limit of 10"):
        list(decoder.feed(encode(Kind.RESULT, 1, b"x" * 11)))


def test_oversized_frame_announced_by_a_header_alone() -> None:
    decoder = FrameDecoder(10)
    with pytest.raises(ProtocolError):
        list(decoder.feed(HEADER.pack(2**32 - 1, Kind.RESULT, 1)))


def test_oversized_frame_with_split_header() -> None:
    decoder = FrameDecoder(10)
    header = HEADER.pack(1_000_000, Kind.RESULT, 1)
    assert list(decoder.feed(header[:4])) == []
    assert list(decoder.feed(header[4:8])) == []
    with pytest.raises(ProtocolError):
        list(decoder.feed(header[8:]))


def test_oversized_frame_after_good_ones_keeps_the_good_ones() -> None:
    decoder = FrameDecoder(10)
    data = encode(Kind.READY, 0) + encode(Kind.RESULT, 1, b"ok") + HEADER.pack(11, Kind.RESULT, 2)
    got: list[Frame] = []
    with pytest.raises(ProtocolError):
        for frame in decoder.feed(data):
            got.append(frame)
    assert got == [(4, 0, b""), (7, 1, b"ok")]


def test_partial_frame_waits_for_the_rest() -> None:
    decoder = FrameDecoder(100)
    data = encode(Kind.RESULT, 5, b"0123456789")
    assert list(decoder.feed(data[:12])) == []
    assert list(decoder.feed(data[12:])) == [(7, 5, b"0123456789")]


# ---- properties ----------------------------------------------------------------


@settings(max_examples=250, deadline=None)
@given(frames_st, st.lists(st.integers(0, 2**20), max_size=30))
def test_any_chunking_decodes_the_same_frames(frames: list[Frame], cuts: list[int]) -> None:
    data = b"".join(encode(k, s, p) for k, s, p in frames)
    max_frame = max((len(p) for _, _, p in frames), default=0)
    decoder = FrameDecoder(max_frame)
    out: list[Frame] = []
    for chunk in chunked(data, cuts):
        out.extend(decoder.feed(chunk))
        assert len(decoder._buf) <= max_frame + HEADER_SIZE, "the decoder buffered more than one frame"
    assert out == frames
    for _, _, payload in out:
        assert type(payload) is bytes
    assert len(decoder._buf) == 0


@settings(max_examples=250, deadline=None)
@given(frames_st, st.integers(0, 2000), st.integers(1, 2**32 - 1), st.lists(st.integers(0, 2**20), max_size=30))
def test_oversized_frame_is_a_protocol_error(frames: list[Frame], max_frame: int, excess: int,
                                            cuts: list[int]) -> None:
    # Frames within the limit first, then one frame announcing more than max_frame.
    good = [(k, s, p[:max_frame]) for k, s, p in frames]
    length = min(max_frame + excess, 2**32 - 1)
    bad = HEADER.pack(length, Kind.RESULT, 1) + b"z" * min(length, 64)
    data = b"".join(encode(*f) for f in good) + bad
    decoder = FrameDecoder(max_frame)
    out: list[Frame] = []
    with pytest.raises(ProtocolError):
        for chunk in chunked(data, cuts):
            for frame in decoder.feed(chunk):
                out.append(frame)
            assert len(decoder._buf) <= max_frame + HEADER_SIZE
    assert out == good  # the frames before the bad one were all delivered


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_encode_round_trips_through_the_header(kind: int, stream: int, payload: bytes) -> None:
    data = encode(kind, stream, payload)
    assert HEADER.unpack_from(data) == (len(payload), kind, stream)
    assert data[HEADER_SIZE:] == payload


def test_a_window_frame_is_four_bytes_or_a_protocol_error() -> None:
    assert window_size(WINDOW_ACK.pack(65536)) == 65536
    for payload in (b"", b"\x00\x01", b"\x00" * 5):
        with pytest.raises(ProtocolError):
            window_size(payload)
