from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerHello(_message.Message):
    __slots__ = ("worker_id", "token", "pid")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    token: bytes
    pid: int
    def __init__(self, worker_id: _Optional[str] = ..., token: _Optional[bytes] = ..., pid: _Optional[int] = ...) -> None: ...

class WorkerWelcome(_message.Message):
    __slots__ = ("next_token", "resumed")
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    next_token: bytes
    resumed: bool
    def __init__(self, next_token: _Optional[bytes] = ..., resumed: _Optional[bool] = ...) -> None: ...

class WorkerReject(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ErrorInfo(_message.Message):
    __slots__ = ("error_type", "error_message", "stack_trace")
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STACK_TRACE_FIELD_NUMBER: _ClassVar[int]
    error_type: str
    error_message: str
    stack_trace: str
    def __init__(self, error_type: _Optional[str] = ..., error_message: _Optional[str] = ..., stack_trace: _Optional[str] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class Invoke(_message.Message):
    __slots__ = ("request_id", "kind", "headers", "timeout_ms", "body")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kind: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    timeout_ms: int
    body: bytes
    def __init__(self, request_id: _Optional[str] = ..., kind: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., timeout_ms: _Optional[int] = ..., body: _Optional[bytes] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("ok", "body", "content_type", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    body: bytes
    content_type: str
    error: ErrorInfo
    def __init__(self, ok: _Optional[bool] = ..., body: _Optional[bytes] = ..., content_type: _Optional[str] = ..., error: _Optional[_Union[ErrorInfo, _Mapping]] = ...) -> None: ...

class HttpRequest(_message.Message):
    __slots__ = ("request_id", "method", "raw_path", "query", "headers", "timeout_ms", "body", "more_body", "http_version", "scheme", "client_host", "client_port")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RAW_PATH_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    MORE_BODY_FIELD_NUMBER: _ClassVar[int]
    HTTP_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PORT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    method: str
    raw_path: bytes
    query: bytes
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    timeout_ms: int
    body: bytes
    more_body: bool
    http_version: str
    scheme: str
    client_host: str
    client_port: int
    def __init__(self, request_id: _Optional[str] = ..., method: _Optional[str] = ..., raw_path: _Optional[bytes] = ..., query: _Optional[bytes] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., timeout_ms: _Optional[int] = ..., body: _Optional[bytes] = ..., more_body: _Optional[bool] = ..., http_version: _Optional[str] = ..., scheme: _Optional[str] = ..., client_host: _Optional[str] = ..., client_port: _Optional[int] = ...) -> None: ...

class HttpResponseStart(_message.Message):
    __slots__ = ("status", "headers")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    status: int
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    def __init__(self, status: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ...) -> None: ...
