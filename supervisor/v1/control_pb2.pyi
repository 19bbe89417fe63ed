from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataPlaneEvent(_message.Message):
    __slots__ = ("hello", "session", "ready", "init_failed", "disconnected", "kill", "demand", "due", "reported")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    INIT_FAILED_FIELD_NUMBER: _ClassVar[int]
    DISCONNECTED_FIELD_NUMBER: _ClassVar[int]
    KILL_FIELD_NUMBER: _ClassVar[int]
    DEMAND_FIELD_NUMBER: _ClassVar[int]
    DUE_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    hello: DataPlaneHello
    session: WorkerSession
    ready: WorkerReady
    init_failed: WorkerInitFailed
    disconnected: WorkerDisconnected
    kill: KillWorker
    demand: Demand
    due: WorkerDue
    reported: CountsReported
    def __init__(self, hello: _Optional[_Union[DataPlaneHello, _Mapping]] = ..., session: _Optional[_Union[WorkerSession, _Mapping]] = ..., ready: _Optional[_Union[WorkerReady, _Mapping]] = ..., init_failed: _Optional[_Union[WorkerInitFailed, _Mapping]] = ..., disconnected: _Optional[_Union[WorkerDisconnected, _Mapping]] = ..., kill: _Optional[_Union[KillWorker, _Mapping]] = ..., demand: _Optional[_Union[Demand, _Mapping]] = ..., due: _Optional[_Union[WorkerDue, _Mapping]] = ..., reported: _Optional[_Union[CountsReported, _Mapping]] = ...) -> None: ...

class DataPlaneHello(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class WorkerSession(_message.Message):
    __slots__ = ("worker_id", "next_token_digest")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_DIGEST_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    next_token_digest: bytes
    def __init__(self, worker_id: _Optional[str] = ..., next_token_digest: _Optional[bytes] = ...) -> None: ...

class WorkerReady(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class WorkerInitFailed(_message.Message):
    __slots__ = ("worker_id", "error_type", "error_message", "stack_trace")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STACK_TRACE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    error_type: str
    error_message: str
    stack_trace: str
    def __init__(self, worker_id: _Optional[str] = ..., error_type: _Optional[str] = ..., error_message: _Optional[str] = ..., stack_trace: _Optional[str] = ...) -> None: ...

class WorkerDisconnected(_message.Message):
    __slots__ = ("worker_id", "completed", "inflight")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    completed: int
    inflight: int
    def __init__(self, worker_id: _Optional[str] = ..., completed: _Optional[int] = ..., inflight: _Optional[int] = ...) -> None: ...

class KillWorker(_message.Message):
    __slots__ = ("worker_id", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("worker_id", "inflight", "served", "completed")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    inflight: int
    served: int
    completed: int
    def __init__(self, worker_id: _Optional[str] = ..., inflight: _Optional[int] = ..., served: _Optional[int] = ..., completed: _Optional[int] = ...) -> None: ...

class Demand(_message.Message):
    __slots__ = ("function", "queue_depth", "inflight", "workers", "draining", "busy_seconds")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    function: str
    queue_depth: int
    inflight: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerLoad]
    draining: bool
    busy_seconds: float
    def __init__(self, function: _Optional[str] = ..., queue_depth: _Optional[int] = ..., inflight: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerLoad, _Mapping]]] = ..., draining: _Optional[bool] = ..., busy_seconds: _Optional[float] = ...) -> None: ...

class CountsReported(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class WorkerDue(_message.Message):
    __slots__ = ("worker_id", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ControlEvent(_message.Message):
    __slots__ = ("snapshot", "added", "removed", "drain", "health", "config", "report")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    snapshot: Snapshot
    added: WorkerAdded
    removed: WorkerRemoved
    drain: DrainWorker
    health: PoolHealth
    config: ConfigUpdate
    report: ReportCounts
    def __init__(self, snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., added: _Optional[_Union[WorkerAdded, _Mapping]] = ..., removed: _Optional[_Union[WorkerRemoved, _Mapping]] = ..., drain: _Optional[_Union[DrainWorker, _Mapping]] = ..., health: _Optional[_Union[PoolHealth, _Mapping]] = ..., config: _Optional[_Union[ConfigUpdate, _Mapping]] = ..., report: _Optional[_Union[ReportCounts, _Mapping]] = ...) -> None: ...

class ReportCounts(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class ConfigUpdate(_message.Message):
    __slots__ = ("toml", "base_dir", "path", "generation")
    TOML_FIELD_NUMBER: _ClassVar[int]
    BASE_DIR_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    toml: str
    base_dir: str
    path: str
    generation: int
    def __init__(self, toml: _Optional[str] = ..., base_dir: _Optional[str] = ..., path: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class WorkerAdded(_message.Message):
    __slots__ = ("worker_id", "function", "pid", "token_digest", "max_requests", "disposable", "uid")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DISPOSABLE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    function: str
    pid: int
    token_digest: bytes
    max_requests: int
    disposable: bool
    uid: int
    def __init__(self, worker_id: _Optional[str] = ..., function: _Optional[str] = ..., pid: _Optional[int] = ..., token_digest: _Optional[bytes] = ..., max_requests: _Optional[int] = ..., disposable: _Optional[bool] = ..., uid: _Optional[int] = ...) -> None: ...

class WorkerRemoved(_message.Message):
    __slots__ = ("worker_id", "reason", "crashed", "oom")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CRASHED_FIELD_NUMBER: _ClassVar[int]
    OOM_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reason: str
    crashed: bool
    oom: bool
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ..., crashed: _Optional[bool] = ..., oom: _Optional[bool] = ...) -> None: ...

class DrainWorker(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class PoolHealth(_message.Message):
    __slots__ = ("function", "init_failed", "error_type", "error_message", "warm", "min_warm")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    INIT_FAILED_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WARM_FIELD_NUMBER: _ClassVar[int]
    MIN_WARM_FIELD_NUMBER: _ClassVar[int]
    function: str
    init_failed: bool
    error_type: str
    error_message: str
    warm: bool
    min_warm: int
    def __init__(self, function: _Optional[str] = ..., init_failed: _Optional[bool] = ..., error_type: _Optional[str] = ..., error_message: _Optional[str] = ..., warm: _Optional[bool] = ..., min_warm: _Optional[int] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("workers", "health", "config")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerAdded]
    health: _containers.RepeatedCompositeFieldContainer[PoolHealth]
    config: ConfigUpdate
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerAdded, _Mapping]]] = ..., health: _Optional[_Iterable[_Union[PoolHealth, _Mapping]]] = ..., config: _Optional[_Union[ConfigUpdate, _Mapping]] = ...) -> None: ...

class WaitReadyRequest(_message.Message):
    __slots__ = ("timeout_s",)
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    timeout_s: float
    def __init__(self, timeout_s: _Optional[float] = ...) -> None: ...

class WaitReadyReply(_message.Message):
    __slots__ = ("ok", "function", "error_type", "error_message")
    OK_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    function: str
    error_type: str
    error_message: str
    def __init__(self, ok: _Optional[bool] = ..., function: _Optional[str] = ..., error_type: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class StopWorkersRequest(_message.Message):
    __slots__ = ("grace_s", "reason")
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    grace_s: float
    reason: str
    def __init__(self, grace_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class StopWorkersReply(_message.Message):
    __slots__ = ("stopped",)
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    stopped: int
    def __init__(self, stopped: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("id", "pid", "state", "inflight", "served", "age_s", "rss_bytes", "mode")
    ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    pid: int
    state: str
    inflight: int
    served: int
    age_s: float
    rss_bytes: int
    mode: str
    def __init__(self, id: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., inflight: _Optional[int] = ..., served: _Optional[int] = ..., age_s: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., mode: _Optional[str] = ...) -> None: ...

class FunctionStatus(_message.Message):
    __slots__ = ("name", "runtime", "min_warm", "max_workers", "concurrency", "queue_depth", "inflight", "workers", "init_error", "isolation")
    class IsolationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    MIN_WARM_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    INIT_ERROR_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    runtime: str
    min_warm: int
    max_workers: int
    concurrency: int
    queue_depth: int
    inflight: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    init_error: str
    isolation: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., runtime: _Optional[str] = ..., min_warm: _Optional[int] = ..., max_workers: _Optional[int] = ..., concurrency: _Optional[int] = ..., queue_depth: _Optional[int] = ..., inflight: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., init_error: _Optional[str] = ..., isolation: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("ready", "functions", "data_plane_attached", "draining", "components")
    READY_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_ATTACHED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    functions: _containers.RepeatedCompositeFieldContainer[FunctionStatus]
    data_plane_attached: bool
    draining: bool
    components: _containers.RepeatedCompositeFieldContainer[ComponentStatus]
    def __init__(self, ready: _Optional[bool] = ..., functions: _Optional[_Iterable[_Union[FunctionStatus, _Mapping]]] = ..., data_plane_attached: _Optional[bool] = ..., draining: _Optional[bool] = ..., components: _Optional[_Iterable[_Union[ComponentStatus, _Mapping]]] = ...) -> None: ...

class ComponentStatus(_message.Message):
    __slots__ = ("name", "pid", "state", "restarts", "uptime_s", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    pid: int
    state: str
    restarts: int
    uptime_s: float
    detail: str
    def __init__(self, name: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., restarts: _Optional[int] = ..., uptime_s: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("wait_s",)
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    def __init__(self, wait_s: _Optional[float] = ...) -> None: ...

class ConfigProblem(_message.Message):
    __slots__ = ("path", "message")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    path: str
    message: str
    def __init__(self, path: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ReloadReply(_message.Message):
    __slots__ = ("ok", "problems", "added", "removed", "changed", "unchanged", "generation", "waited", "serving", "not_serving")
    OK_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WAITED_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    NOT_SERVING_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    problems: _containers.RepeatedCompositeFieldContainer[ConfigProblem]
    added: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    changed: _containers.RepeatedScalarFieldContainer[str]
    unchanged: _containers.RepeatedScalarFieldContainer[str]
    generation: int
    waited: bool
    serving: bool
    not_serving: str
    def __init__(self, ok: _Optional[bool] = ..., problems: _Optional[_Iterable[_Union[ConfigProblem, _Mapping]]] = ..., added: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ..., changed: _Optional[_Iterable[str]] = ..., unchanged: _Optional[_Iterable[str]] = ..., generation: _Optional[int] = ..., waited: _Optional[bool] = ..., serving: _Optional[bool] = ..., not_serving: _Optional[str] = ...) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("function", "min_warm", "max_workers")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    MIN_WARM_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    function: str
    min_warm: int
    max_workers: int
    def __init__(self, function: _Optional[str] = ..., min_warm: _Optional[int] = ..., max_workers: _Optional[int] = ...) -> None: ...

class ScaleReply(_message.Message):
    __slots__ = ("ok", "error", "min_warm", "max_workers")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MIN_WARM_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    min_warm: int
    max_workers: int
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[str] = ..., min_warm: _Optional[int] = ..., max_workers: _Optional[int] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ("openmetrics",)
    OPENMETRICS_FIELD_NUMBER: _ClassVar[int]
    openmetrics: bool
    def __init__(self, openmetrics: _Optional[bool] = ...) -> None: ...

class MetricsReply(_message.Message):
    __slots__ = ("exposition",)
    EXPOSITION_FIELD_NUMBER: _ClassVar[int]
    exposition: bytes
    def __init__(self, exposition: _Optional[bytes] = ...) -> None: ...
