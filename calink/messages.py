"""The messages of the worker link: what a frame's payload says, and its bytes.

One class per message, written by hand over ``struct`` (no protobuf: the
worker imports this before the function's code, and a function may bring
any protobuf it likes). ``encode()`` gives a frame's payload;
``Class.decode(payload)`` reads one. The layouts, byte by byte, are in
``docs/worker-protocol.md``; in short, every message is

    fixed part | lengths | fields

- the fixed part: the message's integers (big-endian) and the counts (how
  many headers);
- the lengths: one ``uint32`` per variable field (text or bytes), header
  names and values included, in the order the message lists them;
- the fields: their bytes back to back in the same order, text as UTF-8,
  the text fields first (one decode for all of them), then the byte fields.

Rules:
- ``decode`` takes untrusted bytes: whatever it is given, it returns a
  message or raises ``ProtocolError`` (never ``struct.error``,
  ``IndexError`` or ``UnicodeDecodeError``). The payload must be the
  message exactly: a length that points past its end, or bytes left over,
  is an error. Nothing is allocated for a length or count before it has
  been checked against the payload's size, so a peer cannot make the
  decoder hold more than the frame it sent (itself bounded by
  ``FrameDecoder``'s ``max_frame``).
- ``encode`` raises ``ValueError`` for what the layout cannot carry (an
  integer out of its range, a text that is not encodable as UTF-8: a lone
  surrogate). Headers are ``(name, value)`` pairs of text.
- Booleans are one byte, 0 or 1; anything else is a protocol error.
- ``ErrorInfo`` is immutable: a ``Result`` without an error shares
  ``NO_ERROR`` (so ``result.error.error_type`` reads "" on any result, as
  it did over protobuf).
- This is the request path (``Invoke``, ``Result``, ``HttpRequest`` and
  ``HttpResponseStart`` are per request): precompiled ``struct`` objects,
  one decode of all the text of a message when it is ASCII (the usual case:
  fields are then cut from the decoded text), no intermediate objects.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Final

from calink.frames import ProtocolError

__all__ = [
    "NO_ERROR",
    "ErrorInfo",
    "Header",
    "Headers",
    "HttpRequest",
    "HttpResponseStart",
    "Invoke",
    "ProtocolError",
    "Result",
    "WorkerHello",
    "WorkerReject",
    "WorkerWelcome",
]

Header = tuple[str, str]
Headers = Sequence[Header]

# The fixed parts. Lengths that belong to a header list follow them (``_lengths``).
_HELLO: Final = struct.Struct(">iII")  # pid, len worker_id, len token
_WELCOME: Final = struct.Struct(">BI")  # resumed, len next_token
_REJECT: Final = struct.Struct(">I")  # len reason
_ERROR: Final = struct.Struct(">III")  # len error_type, len error_message, len stack_trace
_INVOKE: Final = struct.Struct(">III")  # timeout_ms, len body, header count
_RESULT: Final = struct.Struct(">BIIIII")  # ok, len body, len content_type, error_type, error_message, stack_trace
_REQUEST: Final = struct.Struct(">IHBIIII")  # timeout_ms, client_port, more_body, len raw_path, query, body, count
_START: Final = struct.Struct(">II")  # status, header count

_LENGTHS: dict[int, struct.Struct] = {}
_CACHED_COUNTS = 256  # lengths tables of up to this many entries keep their Struct


def _lengths(count: int) -> struct.Struct:
    """The ``struct`` of ``count`` uint32 lengths."""
    table = _LENGTHS.get(count)
    if table is None:
        table = struct.Struct(f">{count}I")
        if count <= _CACHED_COUNTS:
            _LENGTHS[count] = table
    return table


def _encode_texts(strings: list[str]) -> tuple[list[int], bytes]:
    """The UTF-8 bytes of ``strings`` back to back, and each one's length in bytes."""
    text = "".join(strings)
    if text.isascii():  # O(1) in CPython: lengths in characters are lengths in bytes
        return [len(s) for s in strings], text.encode("ascii")
    parts = [s.encode() for s in strings]
    return [len(p) for p in parts], b"".join(parts)


def _decode_texts(payload: bytes, start: int, end: int, lengths: Sequence[int]) -> list[str]:
    """The UTF-8 fields of ``payload[start:end]``, cut at ``lengths`` (which sum to ``end - start``)."""
    text = payload[start:end].decode()
    out: list[str] = []
    append = out.append
    if text.isascii():
        offset = 0
        for length in lengths:
            stop = offset + length
            append(text[offset:stop])
            offset = stop
    else:  # a field boundary may fall inside a character: each field must be UTF-8 of its own
        offset = start
        for length in lengths:
            stop = offset + length
            append(payload[offset:stop].decode())
            offset = stop
    return out


def _header_lengths(payload: bytes, offset: int, count: int) -> tuple[int, ...]:
    """``count`` uint32 lengths at ``offset``, checked to lie within ``payload`` first."""
    if offset + 4 * count > len(payload):
        raise ProtocolError(f"a lengths table of {count} entries overruns a {len(payload)}-byte message")
    lengths: tuple[int, ...] = _lengths(count).unpack_from(payload, offset)
    return lengths


def _flatten(first: Sequence[str], headers: Headers) -> list[str]:
    strings = list(first)
    append = strings.append
    for name, value in headers:
        append(name)
        append(value)
    return strings


def _decode_fields(payload: bytes, start: int, end: int, lengths: Sequence[int],
                   leading: int) -> tuple[list[str], list[Header]]:
    """The UTF-8 fields of ``payload[start:end]`` (cut as ``_decode_texts`` does): the first
    ``leading`` ones, and the rest as (name, value) pairs, built in one pass."""
    text = payload[start:end].decode()
    if not text.isascii():
        strings = _decode_texts(payload, start, end, lengths)
        rest = iter(strings[leading:])
        return strings[:leading], list(zip(rest, rest))
    fields: list[str] = []
    offset = 0
    it = iter(lengths)
    for _ in range(leading):
        stop = offset + next(it)
        fields.append(text[offset:stop])
        offset = stop
    headers: list[Header] = []
    append = headers.append
    for name_length, value_length in zip(it, it):
        middle = offset + name_length
        stop = middle + value_length
        append((text[offset:middle], text[middle:stop]))
        offset = stop
    return fields, headers


def _exact(kind: str, payload: bytes, size: int) -> None:
    if size != len(payload):
        raise ProtocolError(f"{kind}: the fields add up to {size} bytes, the message has {len(payload)}")


def _bool(kind: str, value: int) -> bool:
    if value > 1:
        raise ProtocolError(f"{kind}: a boolean of {value}")
    return value == 1


def _protocol_error(kind: str, exc: Exception) -> ProtocolError:
    return ProtocolError(f"undecodable {kind}: {exc}")


def _value_error(kind: str, exc: struct.error) -> ValueError:
    return ValueError(f"{kind} cannot be encoded: {exc}")


class _Message:
    """Equality and ``repr`` for the slotted messages (a header list equals the
    same pairs in a tuple)."""

    __slots__: tuple[str, ...] = ()
    __hash__ = None  # type: ignore[assignment]  # mutable: not hashable

    def _fields(self) -> tuple[Any, ...]:
        return tuple(list(v) if isinstance(v, (list, tuple)) else v
                     for v in (getattr(self, name) for name in self.__slots__))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Message)
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={_short(getattr(self, name))}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


def _short(value: Any) -> str:
    if isinstance(value, bytes) and len(value) > 64:
        return f"{value[:64]!r}... ({len(value)} bytes)"
    return repr(value)


class WorkerHello(_Message):
    """Frame HELLO, the worker's first: who it is and its one-time credential."""

    __slots__ = ("worker_id", "token", "pid")

    def __init__(self, worker_id: str = "", token: bytes = b"", pid: int = 0) -> None:
        self.worker_id = worker_id
        self.token = token
        self.pid = pid

    def encode(self) -> bytes:
        worker_id = self.worker_id.encode()
        try:
            return _HELLO.pack(self.pid, len(worker_id), len(self.token)) + worker_id + self.token
        except struct.error as exc:
            raise _value_error("WorkerHello", exc) from None

    @classmethod
    def decode(cls, payload: bytes) -> WorkerHello:
        try:
            pid, n_id, n_token = _HELLO.unpack_from(payload)
            start = _HELLO.size
            _exact("WorkerHello", payload, start + n_id + n_token)
            return cls(payload[start : start + n_id].decode(), payload[start + n_id :], pid)
        except (struct.error, ValueError, IndexError) as exc:
            raise _protocol_error("WorkerHello", exc) from None


class WorkerWelcome(_Message):
    """Frame WELCOME: the worker is accepted. ``next_token`` replaces the spent
    credential for its next connection; ``resumed``: it had initialized before."""

    __slots__ = ("next_token", "resumed")

    def __init__(self, next_token: bytes = b"", resumed: bool = False) -> None:
        self.next_token = next_token
        self.resumed = resumed

    def encode(self) -> bytes:
        try:
            return _WELCOME.pack(self.resumed, len(self.next_token)) + self.next_token
        except struct.error as exc:
            raise _value_error("WorkerWelcome", exc) from None

    @classmethod
    def decode(cls, payload: bytes) -> WorkerWelcome:
        try:
            resumed, n_token = _WELCOME.unpack_from(payload)
            _exact("WorkerWelcome", payload, _WELCOME.size + n_token)
            return cls(payload[_WELCOME.size :], _bool("WorkerWelcome", resumed))
        except (struct.error, ValueError, IndexError) as exc:
            raise _protocol_error("WorkerWelcome", exc) from None


class WorkerReject(_Message):
    """Frame REJECT: why the worker is refused (the connection closes next)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str = "") -> None:
        self.reason = reason

    def encode(self) -> bytes:
        reason = self.reason.encode()
        try:
            return _REJECT.pack(len(reason)) + reason
        except struct.error as exc:
            raise _value_error("WorkerReject", exc) from None

    @classmethod
    def decode(cls, payload: bytes) -> WorkerReject:
        try:
            (n_reason,) = _REJECT.unpack_from(payload)
            _exact("WorkerReject", payload, _REJECT.size + n_reason)
            return cls(payload[_REJECT.size :].decode())
        except (struct.error, ValueError, IndexError) as exc:
            raise _protocol_error("WorkerReject", exc) from None


class ErrorInfo(_Message):
    """What failed: frame INIT_ERROR, and the error of a failed ``Result``. Immutable."""

    __slots__ = ("error_type", "error_message", "stack_trace")
    error_type: str
    error_message: str
    stack_trace: str

    def __init__(self, error_type: str = "", error_message: str = "", stack_trace: str = "") -> None:
        setter = object.__setattr__
        setter(self, "error_type", error_type)
        setter(self, "error_message", error_message)
        setter(self, "stack_trace", stack_trace)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ErrorInfo is immutable (setting {name})")

    def __hash__(self) -> int:  # type: ignore[override]  # immutable, unlike the other messages
        return hash(self._fields())

    def encode(self) -> bytes:
        lengths, text = _encode_texts([self.error_type, self.error_message, self.stack_trace])
        try:
            return _ERROR.pack(*lengths) + text
        except struct.error as exc:
            raise _value_error("ErrorInfo", exc) from None

    @classmethod
    def decode(cls, payload: bytes) -> ErrorInfo:
        try:
            lengths = _ERROR.unpack_from(payload)
            end = _ERROR.size + sum(lengths)
            _exact("ErrorInfo", payload, end)
            return cls(*_decode_texts(payload, _ERROR.size, end, lengths))
        except (struct.error, ValueError, IndexError) as exc:
            raise _protocol_error("ErrorInfo", exc) from None


NO_ERROR: Final = ErrorInfo()


class Invoke(_Message):
    """Frame INVOKE: an invocation (``kind`` "invoke") or a lifecycle hook
    ("initialize", "pre_freeze", "pre_stop"). ``timeout_ms``: what the
    handler has, counted from when the frame was sent."""

    __slots__ = ("request_id", "kind", "headers", "timeout_ms", "body")

    def __init__(self, request_id: str = "", kind: str = "", headers: Headers = (), timeout_ms: int = 0,
                 body: bytes = b"") -> None:
        self.request_id = request_id
        self.kind = kind
        self.headers = headers
        self.timeout_ms = timeout_ms
        self.body = body

    def encode(self) -> bytes:
        headers = self.headers
        lengths, text = _encode_texts(_flatten((self.request_id, self.kind), headers))
        body = self.body
        try:
            fixed = _INVOKE.pack(self.timeout_ms, len(body), len(headers))
        except struct.error as exc:
            raise _value_error("Invoke", exc) from None
        return b"".join((fixed, _lengths(len(lengths)).pack(*lengths), text, body))

    @classmethod
    def decode(cls, payload: bytes) -> Invoke:
        try:
            timeout_ms, n_body, count = _INVOKE.unpack_from(payload)
            start = _INVOKE.size + 8 + 8 * count
            lengths = _header_lengths(payload, _INVOKE.size, 2 + 2 * count)
            end = start + sum(lengths)
            _exact("Invoke", payload, end + n_body)
            (request_id, kind), headers = _decode_fields(payload, start, end, lengths, 2)
            return cls(request_id, kind, headers, timeout_ms, payload[end:])
        except (struct.error, ValueError, IndexError) as exc:
            raise _protocol_error("Invoke", exc) from None


class Result(_Message):
    """Frame RESULT: how an invocation, a hook or an HTTP exchange ended.

    ``ok`` with ``body`` and ``content_type``; or not ``ok`` with ``error``
    (``NO_ERROR`` when none was given)."""

    __slots__ = ("ok", "body", "content_type", "error")

    def __init__(self, ok: bool = False, body: bytes = b"", content_type: str = "",
                 error: ErrorInfo | None = None) -> None:
        self.ok = ok
        self.body = body
        self.content_type = content_type
        self.error = NO_ERROR if error is None else error

    def encode(self) -> bytes:
        body = self.body
        error = self.error
        try:
            if error is NO_ERROR:
                content_type = self.content_type.encode()
                return b"".join((_RESULT.pack(self.ok, len(body), len(content_type), 0, 0, 0), content_type,
                                 body))
            lengths, text = _encode_texts([self.content_type, error.error_type, error.error_message,
                                           error.stack_trace])
            return b"".join((_RESULT.pack(self.ok, len(body), *lengths), text, body))
        except struct.error as exc:
            raise _value_error("Result", exc) from None

    @classmethod
    def decode(cls, payload: bytes) -> Result:
        try:
            ok, n_body, n_type, n_error_type, n_message, n_trace = _RESULT.unpack_from(payload)
            start = _RESULT.size
            if not (n_error_type or n_message or n_trace) and ok < 2:  # the usual answer, inline
                end = start + n_type
                if end + n_body != len(payload):
                    _exact("Result", payload, end + n_body)  # raises
                return cls(ok == 1, payload[end:], payload[start:end].decode())
            end = start + n_type + n_error_type + n_message + n_trace
            _exact("Result", payload, end + n_body)
            content_type, error_type, message, trace = _decode_texts(
                payload, start, end, (n_type, n_error_type, n_message, n_trace))
            return cls(_bool("Result", ok), payload[end:], content_type, ErrorInfo(error_type, message, trace))
        except (struct.error, ValueError, IndexError) as exc:
            raise _protocol_error("Result", exc) from None


class HttpRequest(_Message):
    """Frame HTTP_REQUEST: an HTTP-trigger request as the client sent it, with
    the first chunk of its body (``more_body``: the rest follows as
    REQUEST_BODY frames, ended by REQUEST_END). ``raw_path`` is the path as
    sent (percent-encoded), without the query."""

    __slots__ = ("request_id", "method", "raw_path", "query", "headers", "timeout_ms", "body", "more_body",
                 "http_version", "scheme", "client_host", "client_port")

    def __init__(self, request_id: str = "", method: str = "", raw_path: bytes = b"", query: bytes = b"",
                 headers: Headers = (), timeout_ms: int = 0, body: bytes = b"", more_body: bool = False,
                 http_version: str = "", scheme: str = "", client_host: str = "", client_port: int = 0) -> None:
        self.request_id = request_id
        self.method = method
        self.raw_path = raw_path
        self.query = query
        self.headers = headers
        self.timeout_ms = timeout_ms
        self.body = body
        self.more_body = more_body
        self.http_version = http_version
        self.scheme = scheme
        self.client_host = client_host
        self.client_port = client_port

    def encode(self) -> bytes:
        headers = self.headers
        lengths, text = _encode_texts(_flatten(
            (self.request_id, self.method, self.http_version, self.scheme, self.client_host), headers))
        raw_path, query, body = self.raw_path, self.query, self.body
        try:
            fixed = _REQUEST.pack(self.timeout_ms, self.client_port, self.more_body, len(raw_path), len(query),
                                  len(body), len(headers))
        except struct.error as exc:
            raise _value_error("HttpRequest", exc) from None
        return b"".join((fixed, _lengths(len(lengths)).pack(*lengths), text, raw_path, query, body))

    @classmethod
    def decode(cls, payload: bytes) -> HttpRequest:
        try:
            timeout_ms, port, more, n_path, n_query, n_body, count = _REQUEST.unpack_from(payload)
            start = _REQUEST.size + 20 + 8 * count
            lengths = _header_lengths(payload, _REQUEST.size, 5 + 2 * count)
            end = start + sum(lengths)
            _exact("HttpRequest", payload, end + n_path + n_query + n_body)
            strings, headers = _decode_fields(payload, start, end, lengths, 5)
            query_at = end + n_path
            body_at = query_at + n_query
            return cls(strings[0], strings[1], payload[end:query_at], payload[query_at:body_at],
                       headers, timeout_ms, payload[body_at:],
                       _bool("HttpRequest", more), strings[2], strings[3], strings[4], port)
        except (struct.error, ValueError, IndexError) as exc:
            raise _protocol_error("HttpRequest", exc) from None


class HttpResponseStart(_Message):
    """Frame RESPONSE_START: the head of an HTTP-trigger response; its body
    follows as RESPONSE_BODY frames, and RESULT ends the exchange."""

    __slots__ = ("status", "headers")

    def __init__(self, status: int = 0, headers: Headers = ()) -> None:
        self.status = status
        self.headers = headers

    def encode(self) -> bytes:
        headers = self.headers
        lengths, text = _encode_texts(_flatten((), headers))
        try:
            fixed = _START.pack(self.status, len(headers))
        except struct.error as exc:
            raise _value_error("HttpResponseStart", exc) from None
        return b"".join((fixed, _lengths(len(lengths)).pack(*lengths), text))

    @classmethod
    def decode(cls, payload: bytes) -> HttpResponseStart:
        try:
            status, count = _START.unpack_from(payload)
            start = _START.size + 8 * count
            lengths = _header_lengths(payload, _START.size, 2 * count)
            end = start + sum(lengths)
            _exact("HttpResponseStart", payload, end)
            return cls(status, _decode_fields(payload, start, end, lengths, 0)[1])
        except (struct.error, ValueError, IndexError) as exc:
            raise _protocol_error("HttpResponseStart", exc) from None
