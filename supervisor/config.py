"""Configuration: read `supervisor.toml`, validate it, and hand out frozen objects.

The contract is docs/configuration.md. The rules:

* Every problem is collected and reported at once (`ConfigError.problems`),
  each with the dotted key path it is about ("functions.hello.timeout") and a
  message written for the person editing the file: what is wrong and what
  is expected. A user fixing a config should need one round trip, not ten.
* Unknown keys are errors: a typo (`timout`) must not be silently ignored.
* Types are strict: TOML has real integers, booleans and strings, so `"4"`
  where an integer belongs is a mistake, not something to coerce.
* Durations are strings with a unit (`"250ms"`, `"10s"`, `"1.5m"`, `"2h"`);
  a bare number is rejected because nobody can tell whether 10 means
  seconds or milliseconds. Sizes are bytes (a TOML integer or `"1024"`) or
  strings with a binary unit (`B`, `KiB`, `MiB`, `GiB`, `TiB`); decimal units
  (`KB`, `MB`) are refused rather than guessed.
* Relative paths (`code_dir`, `run_dir`) are relative to the config file's
  directory, so a config means the same thing whatever the current directory.
* The environment overrides the file: `ca_port` from `FC_SERVER_PORT`, else
  `FC_CUSTOM_LISTEN_PORT`, else `CA_PORT` (the platform decides the port);
  `metrics_port` from `SUPERVISOR_METRICS_PORT` (0..65535, 0 disables, as
  the key); `run_dir` from `SUPERVISOR_RUN_DIR`. An empty variable counts as
  unset; a bad value is a problem named after the variable (`env.NAME`).
* Importing handlers runs user code, so it is not part of validation:
  `check_handlers` does it in throwaway subprocesses, on request.
* A config that validates can run: every number is bounded (the bound is
  in the message) so that each downstream use is safe (protobuf uint32
  fields, cgroup files, rlimits, deadline arithmetic), and every string
  that reaches an environment, an exec, a socket path or a host name holds
  only what can get there (no NUL, sizes the kernel takes). The bounds are
  the constants below and README.md's "Configuration bounds"; what depends
  on the container (a user that exists, an rlimit it lets a worker raise)
  is `supervisor.control.sandbox.check_config`'s.
* Nothing the file holds makes validation raise anything but ConfigError:
  nesting, huge integers and odd strings are problems with key paths too.
  Key paths are written as TOML would (`functions.f.env."A B"`).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import tomllib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)


class Problem(NamedTuple):
    path: str  # dotted key path, e.g. "functions.hello.timeout"
    message: str


class ConfigError(Exception):
    """A config that cannot be used; `problems` lists every reason.

    ``functions`` holds the functions whose own tables validated, and
    ``settings`` the ``[supervisor]`` table when it did (``validate`` imports
    those functions' handlers too, so that one pass reports everything).
    """

    def __init__(self, problems: list[Problem], *, settings: SupervisorSettings | None = None,
                 functions: Mapping[str, FunctionConfig] | None = None) -> None:
        self.problems = list(problems)
        self.settings = settings
        self.functions = dict(functions or {})
        super().__init__(
            "\n".join(f"{p.path}: {p.message}" if p.path else p.message for p in self.problems)
        )


# --- bounds -----------------------------------------------------------------------
# Each is what the value's downstream use can take, with room to spare; the
# README ("Configuration bounds") says why each is what it is.

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
MAX_DURATION_S = 86400  # 24h: FC's longest function timeout (async/task invocations)
MIN_TIMEOUT_S = Fraction(1, 1000)  # 1ms: timeout_ms, an integer, must not round down to 0
MAX_CONCURRENCY = 1000  # a slot can be a handler thread in the worker; FC allows 200 per instance
MAX_WORKERS = 1000
MAX_QUEUE = 100_000
MAX_REQUESTS = 1_000_000_000  # plus up to 10 % jitter, still inside WorkerAdded's uint32
MAX_BODY = 1 * GiB  # the data plane holds a body whole; a frame's length is a uint32 (FC itself: 32 MB)
MIN_MEMORY, MAX_MEMORY = 16 * MiB, 1 * TiB  # a worker is a Python process (~10 MiB); cgroups take far more
MIN_CPU, MAX_CPU = 0.01, 1024.0  # a CFS quota of 1ms per 100ms period, and 1024 cores
MIN_PIDS, MAX_PIDS = 4, 4_194_304  # a worker's own threads; PID_MAX_LIMIT, the most pids.max takes
MIN_NOFILE, MAX_NOFILE = 64, 1 << 20  # a worker's own descriptors; fs.nr_open's default
MAX_UID = (1 << 32) - 2  # (uid_t)-1 means "no change" to setuid
MAX_ENV_ENTRY = 128 * KiB  # MAX_ARG_STRLEN: one "NAME=value" (with its NUL) in an exec
MAX_EXEC_BYTES = 1 * MiB  # env + command of one function: half the usual ARG_MAX (2 MiB)
MAX_COMMAND = 16 * KiB  # with the handler and paths, a worker's start spec must fit a pipe's 64 KiB buffer
MAX_ENTRY = 1024  # a handler or hook name (characters)
MAX_NAME = 64  # a function's name (FC's limit); it names cgroup directories too
MAX_NESTING = 32  # tables and arrays in one file (the contract needs 4)
MAX_FILE = 2 * MiB  # the planes pass the text of a reloaded file in one gRPC message (4 MiB at most)
MAX_NUMBER_TEXT = 1000  # characters of a duration or size written as a string
SUN_PATH_MAX = 107  # bytes of a unix socket path (sockaddr_un.sun_path, less its NUL)


def show_size(n: int | float) -> str:
    """Bytes in the largest binary unit that divides them: 1073741824 -> '1GiB'."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{int(n // size)}{unit}"
    return f"{n}B" if isinstance(n, int) else f"{n:g}B"


def show_duration(seconds: float | Fraction) -> str:
    """Seconds in the unit they read best in: 86400 -> '24h', 0.001 -> '1ms'."""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds >= 1:
        return f"{float(seconds):g}s"
    return f"{float(seconds * 1000):g}ms"


# --- durations and sizes --------------------------------------------------------

_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)\s*", re.ASCII)
_DURATION_UNITS = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600)}
_DURATION_HELP = "expected a duration such as '10s', '250ms', '1.5m' or '2h' (a number and a unit: ms, s, m, h)"

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*", re.ASCII)
_SIZE_UNITS = {None: 1, "B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB}
_SIZE_HELP = "expected a size such as '6MiB', '512KiB', '1GiB', '100B' or a number of bytes"


def _number_text(text: str, what: str) -> None:
    if len(text) > MAX_NUMBER_TEXT:
        raise ValueError(f"{_show(text)} is not a {what}: more than {MAX_NUMBER_TEXT} characters")


def duration_seconds(text: str) -> Fraction:
    """'10s', '250ms', '1.5m', '2h' -> exact seconds. Raises ValueError with a user-facing message."""
    _number_text(text, "duration")
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        if re.fullmatch(r"\s*[0-9]+(?:\.[0-9]+)?\s*", text):
            raise ValueError(f"{text!r} has no unit; write e.g. '{text.strip()}s' or '{text.strip()}ms' (units: ms, s, m, h)")
        raise ValueError(f"{_DURATION_HELP}, got {_show(text)}")
    # Fraction keeps the arithmetic exact, so "3ms" is exactly 3/1000 rounded once.
    return Fraction(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_duration(text: str) -> float:
    """'10s', '250ms', '1.5m', '2h' -> seconds. Raises ValueError with a user-facing message."""
    try:
        return float(duration_seconds(text))
    except OverflowError:
        raise ValueError(f"{_show(text)} is too long a duration") from None


def parse_size(text: str) -> int:
    """'6MiB', '512KiB', '1GiB', '100B', '1024' -> bytes. Raises ValueError with a user-facing message."""
    _number_text(text, "size")
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        if re.fullmatch(r"\s*[\d.]+\s*[kKmMgGtT]i?[bB]?\s*", text):
            raise ValueError(f"{text!r}: use binary units B, KiB, MiB, GiB or TiB (e.g. '256MiB'); decimal units like MB are not accepted")
        raise ValueError(f"{_SIZE_HELP}, got {_show(text)}")
    value = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML, short enough for one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and value.bit_length() > 200:
        return f"an integer of {len(str(abs(value)))} digits" if value.bit_length() < 14000 else "a huge integer"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _duration_in(low: Fraction | int, high: Fraction | int) -> Callable[[Any, ValidationInfo], Any]:
    """A duration's validator: from ``low`` to ``high`` seconds (both included)."""
    def check(value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            seconds = duration_seconds(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if (info.context or {}).get("from_file"):
                # The one mistake worth a precise hint: a TOML number without a unit.
                example = f"{value}" if isinstance(value, int) or value.is_integer() else "10"
                raise ValueError(f'a duration needs a unit: write it as a string, e.g. "{example}s" or "{example}ms"')
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"expected a finite duration, got {_show(value)}")
            seconds = Fraction(value)  # built in Python (tests, other modules): numbers are seconds
        else:
            raise ValueError(f"{_DURATION_HELP}, got {_show(value)}")
        if seconds > high:
            raise ValueError(f"must be at most {show_duration(high)}, got {_show(value)}")
        if seconds < low:
            raise ValueError(f"must be at least {show_duration(low)}, got {_show(value)}")
        return float(seconds)
    return check


def _size_in(low: int, high: int) -> Callable[[Any], Any]:
    """A size's validator: from ``low`` to ``high`` bytes (both included)."""
    def check(value: Any) -> Any:
        if isinstance(value, str):
            size = parse_size(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            size = value  # a TOML integer is a number of bytes
        else:
            raise ValueError(f"{_SIZE_HELP}, got {_show(value)}")
        if size > high:
            raise ValueError(f"must be at most {show_size(high)}, got {_show(value)}")
        if size < low:
            raise ValueError(f"must be at least {show_size(low)}, got {_show(value)}"
                             if low > 1 else f"must be greater than 0, got {_show(value)}")
        return size
    return check


def _unreachable(text: str, what: str) -> str | None:
    """Why ``text`` cannot reach ``what`` (an environment, an exec, a path), or None."""
    if "\0" in text:
        return f"contains a NUL character, which cannot be in {what}"
    try:
        os.fsencode(text)
    except UnicodeEncodeError as exc:
        return f"{exc.object[exc.start:exc.end]!r} cannot be encoded in this system's file name encoding ({exc.encoding})"
    return None


def _path_text(value: Any, info: ValidationInfo) -> Path:
    """A directory path as written: a non-empty string that can be a path; relative to the config file."""
    if not isinstance(value, (str, Path)) or str(value) == "":
        raise ValueError(f"expected a directory path as a string, got {_show(value)}")
    why = _unreachable(str(value), "a path")
    if why is not None:
        raise ValueError(why)
    base: Path = (info.context or {}).get("base_dir", Path.cwd())
    try:
        return base / Path(value).expanduser()
    except RuntimeError as exc:  # "~nosuchuser/..."
        raise ValueError(f"cannot expand {str(value)!r}: {exc}") from None


def _directory(value: Any, info: ValidationInfo) -> Path:
    path = _path_text(value, info)
    base: Path = (info.context or {}).get("base_dir", Path.cwd())
    try:
        path = path.resolve()
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a directory we may not look into
        raise ValueError(f"cannot look at {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if not exists:
        raise ValueError(f"directory {str(path)!r} does not exist (relative paths start at the config file's directory, {str(base)!r})")
    if not is_dir:
        raise ValueError(f"{str(path)!r} is not a directory")
    return path


MAX_PACKAGES_PATH = 1024  # bytes of python_packages: it travels in a worker's start spec with the other paths


def _packages_path(value: str) -> str:
    """python_packages: a relative path to a directory inside code_dir, normalized
    (``supervisor deps`` replaces that directory whole; workers see code_dir read-only)."""
    why = _unreachable(value, "a path")
    if why is not None:
        raise ValueError(why)
    if len(os.fsencode(value)) > MAX_PACKAGES_PATH:
        raise ValueError(f"must be at most {MAX_PACKAGES_PATH} bytes, got {len(os.fsencode(value))}")
    if value.startswith(("/", "~")):
        raise ValueError(f"must be a path relative to code_dir (the directory is part of the function's code), "
                         f"got {_show(value)}")
    normal = os.path.normpath(value)
    if normal in (".", "..") or normal.startswith("../"):
        raise ValueError(f"must name a directory inside code_dir, not code_dir itself or a place outside it "
                         f"(`supervisor deps` replaces that directory whole), got {_show(value)}")
    return normal


def _run_dir(value: Any, info: ValidationInfo) -> Path:
    return _path_text(value, info)  # it need not exist yet: the supervisor creates it


def _exec_string(value: str, what: str = "an environment variable or a command line") -> str:
    why = _unreachable(value, what)
    if why is not None:
        raise ValueError(why)
    if len(os.fsencode(value)) >= MAX_ENV_ENTRY:
        raise ValueError(f"must be less than {show_size(MAX_ENV_ENTRY)} (the kernel's limit for one "
                         f"argument or variable), got {len(os.fsencode(value))} bytes")
    return value


def _env_value(value: str) -> str:
    """No NUL, encodable; its size is judged with its name (``_function_checks``)."""
    why = _unreachable(value, "an environment variable")
    if why is not None:
        raise ValueError(why)
    return value


_HOST_NAME_RE = re.compile(r"(?=.{1,253}\.?\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                           r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?", re.ASCII)


def _host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if _HOST_NAME_RE.fullmatch(value):
        return value
    raise ValueError(f"expected an IP address or host name to listen on (e.g. '0.0.0.0', '127.0.0.1', '::' "
                     f"or 'localhost'), got {_show(value)}")


_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?", re.ASCII)


def _user(value: str | None) -> str | None:
    if value is None or value in ("auto", "root"):
        return value
    if value == "":
        raise ValueError("must not be an empty string (leave it out for the default, 'nobody')")
    if re.fullmatch(r"[0-9]+", value, re.ASCII):
        if len(value) > 10 or int(value) > MAX_UID:
            raise ValueError(f"a numeric uid must be at most {MAX_UID}, got {_show(value)}")
        return value
    if not _USER_RE.fullmatch(value):
        raise ValueError(f"expected a user name (a letter or '_', then letters, digits, '_', '.' or '-'; at most "
                         f"32), a numeric uid, 'auto' or 'root', got {_show(value)}")
    return value


Duration = Annotated[float, BeforeValidator(_duration_in(0, MAX_DURATION_S))]
PositiveDuration = Annotated[float, BeforeValidator(_duration_in(MIN_TIMEOUT_S, MAX_DURATION_S))]
Port = Annotated[int, Field(ge=1, le=65535)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
EnvValue = Annotated[str, AfterValidator(_env_value)]

_ENTRY_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_PORT_ENV = ("FC_SERVER_PORT", "FC_CUSTOM_LISTEN_PORT", "CA_PORT")  # highest precedence first
METRICS_PORT_ENV = "SUPERVISOR_METRICS_PORT"
# Runtimes whose command pulls events from a runtime API (no HTTP server of their own).
PULL_RUNTIMES = frozenset({"lambda", "scf"})

# --- the models -------------------------------------------------------------------

# strict: TOML is typed, so coercing "4" to 4 would only hide a mistake.
_MODEL_CONFIG = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class Limits(BaseModel):
    model_config = _MODEL_CONFIG

    memory: Annotated[int, BeforeValidator(_size_in(MIN_MEMORY, MAX_MEMORY))] | None = None  # bytes
    cpu: Annotated[float, Field(ge=MIN_CPU, le=MAX_CPU)] | None = None  # cores
    pids: Annotated[int, Field(ge=MIN_PIDS, le=MAX_PIDS)] | None = None
    nofile: Annotated[int, Field(ge=MIN_NOFILE, le=MAX_NOFILE)] | None = None
    user: Annotated[str | None, AfterValidator(_user)] = None
    network: Literal["inherit", "none"] = "inherit"
    seccomp: bool = True
    require_isolation: bool = False


class FunctionConfig(BaseModel):
    model_config = _MODEL_CONFIG

    name: str
    runtime: Literal["python", "custom", "lambda", "scf"] = "python"
    handler: str | None = None
    interface: Literal["event", "asgi", "wsgi"] = "event"
    code_dir: Annotated[Path, BeforeValidator(_directory)]
    initializer: str | None = None
    pre_freeze: str | None = None
    pre_stop: str | None = None
    timeout: PositiveDuration = 60.0
    concurrency: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] = 1
    min_warm: Annotated[int, Field(ge=0, le=MAX_WORKERS)] = 1
    max_workers: Annotated[int, Field(ge=1, le=MAX_WORKERS)] = 4
    max_queue: Annotated[int, Field(ge=0, le=MAX_QUEUE)] = 64
    idle_ttl: Duration = 60.0
    shrink_strategy: Literal["lcc", "fifo", "filo"] = "lcc"
    max_requests: Annotated[int, Field(ge=0, le=MAX_REQUESTS)] = 0
    recycle_memory_share: Annotated[float, Field(ge=0, le=1)] = 0.9
    disposable: bool = False
    seed: bool = True  # python: fork workers from a preloaded seed; false: a fresh interpreter each
    # python: asyncio's own loop, or the uvloop the function ships (in its own directories; worker/python/paths.py)
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    # python: where `supervisor deps` installs requirements.txt (supervisor/deps.py), inside code_dir
    python_packages: Annotated[str, AfterValidator(_packages_path)] = ".python_packages"
    max_body: Annotated[int, BeforeValidator(_size_in(1, MAX_BODY))] = 6 << 20
    env: dict[EnvName, EnvValue] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    # TOML gives lists; strict mode would insist on tuples, so these two are lax.
    command: tuple[Annotated[str, AfterValidator(_exec_string)], ...] | None = Field(None, strict=False, min_length=1)
    ready: str = "http:/"
    startup_timeout: PositiveDuration = 15.0
    hooks: tuple[Literal["initialize", "pre-freeze", "pre-stop"], ...] = Field((), strict=False)

    @property
    def serves_http(self) -> bool:
        """Whether HTTP-trigger requests reach this function (an HTTP app or server)."""
        return self.runtime == "custom" or (self.runtime == "python" and self.interface != "event")

    def has_hook(self, kind: str) -> bool:
        """Whether lifecycle ``kind`` ("initialize", "pre_freeze", "pre_stop") runs in its workers."""
        if self.runtime == "python":
            return bool(getattr(self, "initializer" if kind == "initialize" else kind, None))
        return kind.replace("_", "-") in self.hooks

    @field_validator("handler", "initializer", "pre_freeze", "pre_stop")
    @classmethod
    def _entry_point(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and len(value) > MAX_ENTRY:
            raise ValueError(f"must be at most {MAX_ENTRY} characters, got {len(value)}")
        if info.field_name == "handler" and info.data.get("runtime") in PULL_RUNTIMES:
            # The runtime's own handler name (Lambda's _HANDLER, e.g. "app.handler"), passed as it is.
            if value is not None and not value.strip():
                raise ValueError("must not be an empty string")
            return None if value is None else _exec_string(value, "an environment variable")  # it is _HANDLER
        if value is not None and not _ENTRY_RE.fullmatch(value):
            raise ValueError(f"expected \"module:callable\" (e.g. \"hello:handler\" or \"pkg.app:main\"), got {value!r}")
        return value

    @field_validator("ready")
    @classmethod
    def _ready(cls, value: str) -> str:
        # PATH goes into the request line of the readiness probe: printable ASCII, no spaces.
        if value != "tcp" and not re.fullmatch(r"http:/[!-~]{0,1000}", value, re.ASCII):
            raise ValueError(f"expected \"tcp\" or \"http:/PATH\" (e.g. \"http:/\" or \"http:/healthz\"; PATH in "
                             f"printable ASCII without spaces), got {_show(value)}")
        return value

    @field_validator("command")
    @classmethod
    def _program(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and value[0] == "":
            raise ValueError("the program (the command's first item) must not be an empty string")
        size = sum(len(os.fsencode(item)) + 1 for item in value or ())
        if size > MAX_COMMAND:
            raise ValueError(f"must be at most {show_size(MAX_COMMAND)} all together, got {size} bytes")
        return value


class SupervisorSettings(BaseModel):
    model_config = _MODEL_CONFIG

    ca_port: Port = 9000
    host: Annotated[str, Field(min_length=1), AfterValidator(_host)] = "0.0.0.0"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9464  # 0 disables
    run_dir: Annotated[Path, BeforeValidator(_run_dir)] = Path("/tmp/ca-supervisor")
    log_format: Literal["json", "console"] = "json"
    access_log: bool = True  # the data plane's record of every invocation (supervisor/data/access.py)
    default_function: str | None = None
    grace_period: Duration = 30.0
    # Clients of the CA and metrics ports (cahttp/server.py): a request head must arrive
    # whole within client_header_timeout of its first byte (or of the connection, for its
    # first request); a request body may stall at most client_body_timeout (then 408); an
    # idle keep-alive connection is closed after keep_alive_timeout.
    client_header_timeout: PositiveDuration = 10.0
    client_body_timeout: PositiveDuration = 10.0
    keep_alive_timeout: PositiveDuration = 75.0


class Config(BaseModel):
    model_config = ConfigDict(frozen=True)

    supervisor: SupervisorSettings
    functions: dict[str, FunctionConfig]  # in the file's order
    path: Path | None = None
    text: str | None = None  # the file's text, as read (what a reload passes between the planes)
    generation: int = 0  # 0 as started; each accepted reload adds one

    def function_for(self, name: str | None) -> FunctionConfig | None:
        """The function a request naming `name` (or nothing) is for, as the HTTP contract says."""
        if name is not None and name in self.functions:
            return self.functions[name]
        default = self.supervisor.default_function
        if default is not None:
            return self.functions.get(default)
        if len(self.functions) == 1:
            return next(iter(self.functions.values()))
        return None


# --- turning pydantic's errors into ours ------------------------------------------

_M = TypeVar("_M", bound=BaseModel)


_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)


def toml_key(part: str) -> str:
    """One key of a dotted path as TOML writes it: bare when it can be, else quoted (one line, ASCII)."""
    return part if _BARE_KEY_RE.fullmatch(part) else json.dumps(part)


def _path(prefix: str, loc: tuple[int | str, ...]) -> str:
    path = prefix
    for part in loc:
        if part == "[key]":
            continue  # a dict key's own error; the key is already the previous part
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{toml_key(part)}" if path else toml_key(part)
    return path


def _known_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed next to the last part of `loc` (for "did you mean")."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return [key for key in model.model_fields if key != "name"]


def _message(error: Mapping[str, Any], model: type[BaseModel]) -> str:
    kind, ctx, got = error["type"], error.get("ctx") or {}, _show(error.get("input"))
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), _known_keys(model, error["loc"]), n=1)
        return f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"
    if kind == "missing":
        return "missing (this key is required)"
    if kind == "string_pattern_mismatch":
        return f"{got} is not a valid environment variable name (letters, digits and _, not starting with a digit)"
    simple = {
        "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
        "string_type": "a string", "dict_type": "a table", "model_type": "a table",
        "model_attributes_type": "a table", "tuple_type": "a list", "list_type": "a list",
    }
    if kind in simple:
        return f"expected {simple[kind]}, got {got}"
    if kind == "literal_error":
        return f"expected {ctx['expected']}, got {got}"
    bounds = {"greater_than": "greater than {gt}", "greater_than_equal": "at least {ge}",
              "less_than": "less than {lt}", "less_than_equal": "at most {le}"}
    if kind in bounds:
        shown = {name: int(bound) if isinstance(bound, float) and bound.is_integer() else bound
                 for name, bound in ctx.items()}
        return f"must be {bounds[kind].format(**shown)}, got {got}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "string_too_short":
        return "must not be an empty string"
    if kind == "finite_number":
        return f"expected a finite number, got {got}"
    return str(error["msg"])  # not expected to happen; pydantic's words beat losing the problem


def _validate(model: type[_M], data: Any, prefix: str, base_dir: Path) -> tuple[_M | None, list[Problem], set[str]]:
    """Validate one table; the set names the top-level keys that failed."""
    try:
        return model.model_validate(data, context={"base_dir": base_dir, "from_file": True}), [], set()
    except ValidationError as exc:
        errors = exc.errors()
        problems = [Problem(_path(prefix, e["loc"]), _message(e, model)) for e in errors]
        return None, problems, {str(e["loc"][0]) for e in errors if e["loc"]}


# --- the whole file -----------------------------------------------------------------

_HOOK_FIELDS = ("initializer", "pre_freeze", "pre_stop")


def _function_checks(prefix: str, raw: Mapping[str, Any], failed: set[str]) -> list[Problem]:
    """Checks spanning several keys, run on every key that validated on its own.

    They run even when other keys of the function are wrong, so a user sees
    "min_warm > max_workers" together with the typo next to it.
    """
    values: dict[str, Any] = {
        key: field.get_default(call_default_factory=True)
        for key, field in FunctionConfig.model_fields.items()
        if not field.is_required()
    }
    values.update({key: value for key, value in raw.items() if key not in failed})

    def ok(*keys: str) -> bool:  # only judge keys that parsed on their own
        return not failed.intersection(keys)

    runtime, problems = values["runtime"], []
    if ok("runtime") and runtime == "python":
        # startup_timeout applies to every runtime: the worker's start deadline.
        if ok("hooks") and raw.get("hooks"):
            problems.append(Problem(f"{prefix}.hooks", "only custom functions take hooks; a python function uses initializer, pre_freeze and pre_stop"))
        if ok("ready") and "ready" in raw:
            problems.append(Problem(f"{prefix}.ready", "only custom functions take ready; a python function is ready when its initializer has run"))
        if ok("handler") and values["handler"] is None:
            problems.append(Problem(f"{prefix}.handler", 'missing: a python function needs handler = "module:callable", e.g. "hello:handler"'))
        if ok("command") and "command" in raw:
            problems.append(Problem(f"{prefix}.command", "only custom, lambda and scf functions take a command; a python function runs its handler"))
    elif ok("runtime"):
        if ok("command") and values["command"] is None:
            problems.append(Problem(f"{prefix}.command", f'missing: a {runtime} function needs the command that starts it, e.g. command = ["./bootstrap"]'))
        if ok("handler") and raw.get("handler") is not None and runtime not in PULL_RUNTIMES:
            problems.append(Problem(f"{prefix}.handler", f"only python, lambda and scf functions take a handler; a {runtime} function runs its command"))
        if ok("ready") and "ready" in raw and runtime != "custom":
            problems.append(Problem(f"{prefix}.ready", f"only custom functions take ready (a {runtime} function is ready when it asks for its first event)"))
        if ok("hooks") and raw.get("hooks") and runtime != "custom":
            problems.append(Problem(f"{prefix}.hooks", f"only custom functions take hooks (their server answers the lifecycle calls); a {runtime} function has none"))
        for key in _HOOK_FIELDS:
            if ok(key) and key in raw:
                problems.append(Problem(f"{prefix}.{key}", f'only python functions take {key}; a {runtime} function gets lifecycle calls through hooks = ["initialize", ...]'))
        if ok("interface") and values["interface"] != "event":
            problems.append(Problem(f"{prefix}.interface", f"only python functions take interface; a {runtime} function serves HTTP from its command"))
        if ok("event_loop") and "event_loop" in raw:
            problems.append(Problem(f"{prefix}.event_loop", f"only python functions take event_loop; a {runtime} function's own process runs its loop"))
        if ok("python_packages") and "python_packages" in raw:
            problems.append(Problem(f"{prefix}.python_packages", f"only python functions take python_packages; a {runtime} function's command finds its own dependencies"))
    if ok("disposable", "concurrency") and values["disposable"] and values["concurrency"] > 1:
        problems.append(Problem(f"{prefix}.concurrency", f"a disposable worker serves exactly one invocation; concurrency must be 1, got {values['concurrency']}"))
    if ok("seed", "runtime") and "seed" in raw and runtime != "python":
        problems.append(Problem(f"{prefix}.seed", f"only python functions have a seed; a {runtime} function starts its command"))
    if ok("min_warm", "max_workers") and values["min_warm"] > values["max_workers"]:
        problems.append(Problem(f"{prefix}.min_warm", f"min_warm ({values['min_warm']}) cannot exceed max_workers ({values['max_workers']})"))
    if ok("env"):
        for name, value in values["env"].items():
            size = len(os.fsencode(f"{name}={value}")) + 1
            if size > MAX_ENV_ENTRY:
                problems.append(Problem(f"{prefix}.env.{toml_key(name)}", f"NAME=value and its NUL must be at most "
                                        f"{show_size(MAX_ENV_ENTRY)} (the kernel's limit for one variable), got "
                                        f"{size} bytes"))
    if ok("env", "command", "handler"):
        # What one exec of the function carries besides the supervisor's few variables.
        strings = [f"{name}={value}" for name, value in values["env"].items()] + list(values["command"] or ())
        if isinstance(values["handler"], str):
            strings.append(f"_HANDLER={values['handler']}")
        size = sum(len(os.fsencode(text)) + 1 for text in strings)
        if size > MAX_EXEC_BYTES:
            problems.append(Problem(f"{prefix}.env", f"the environment and command of one worker must be at most "
                                                     f"{show_size(MAX_EXEC_BYTES)} together, got {size} bytes"))
    return problems


def _env_port(var: str, text: str, low: int) -> tuple[int | None, list[Problem]]:
    """A port number low..65535 from variable ``var``, else a problem naming it."""
    digits = text.strip()
    if re.fullmatch(r"[0-9]{1,5}", digits) and low <= int(digits) <= 65535:
        return int(digits), []
    what = "a port number 1..65535" if low else "a port number 0..65535 (0 disables metrics)"
    return None, [Problem(f"env.{var}", f"expected {what}, got {_show(text)}")]


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], list[Problem]]:
    update: dict[str, Any] = {}
    problems: list[Problem] = []
    # The first variable that is set decides, even when it is bad: falling
    # through to a lower one would listen where the platform does not expect.
    var = next((var for var in _PORT_ENV if env.get(var, "") != ""), None)
    if var is not None:
        port, found = _env_port(var, env[var], 1)
        problems += found
        if port is not None:
            update["ca_port"] = port
    if env.get(METRICS_PORT_ENV, "") != "":
        port, found = _env_port(METRICS_PORT_ENV, env[METRICS_PORT_ENV], 0)
        problems += found
        if port is not None:
            update["metrics_port"] = port
    if env.get("SUPERVISOR_RUN_DIR"):
        update["run_dir"] = Path(env["SUPERVISOR_RUN_DIR"])
    return update, problems


def _socket_room(run_dir: Path) -> str | None:
    """Why the sockets in ``run_dir`` cannot be bound, or None."""
    from supervisor.runstate import CONTROL_SOCK_NAME, WORKER_SOCK_NAME

    try:
        longest = max((run_dir.absolute() / name for name in (CONTROL_SOCK_NAME, WORKER_SOCK_NAME)),
                      key=lambda path: len(os.fsencode(path)))
    except (ValueError, UnicodeEncodeError) as exc:
        return f"cannot be a path: {exc}"
    size = len(os.fsencode(longest))
    if size > SUN_PATH_MAX:
        return (f"too long for the unix sockets it holds: {str(longest)!r} is {size} bytes, at most "
                f"{SUN_PATH_MAX} bytes fit in a socket address (use a shorter directory)")
    return None


def parse_config(data: Mapping[str, Any], base_dir: Path, env: Mapping[str, str], path: Path | None = None) -> Config:
    """Validate parsed TOML; relative paths start at `base_dir`. Raises ConfigError with every problem."""
    base_dir = base_dir.resolve()
    problems = [Problem(toml_key(str(name)), "unknown key (expected [supervisor] and [functions.NAME] tables)")
                for name in data if name not in ("supervisor", "functions")]

    settings, found, _ = _validate(SupervisorSettings, data.get("supervisor", {}), "supervisor", base_dir)
    problems += found
    update, found = _env_overrides(env)
    problems += found
    if settings is not None:
        settings = settings.model_copy(update=update)
        room = _socket_room(settings.run_dir)
        if room is not None:
            problems.append(Problem("env.SUPERVISOR_RUN_DIR" if "run_dir" in update else "supervisor.run_dir", room))
        if settings.metrics_port == settings.ca_port:
            key = f"env.{METRICS_PORT_ENV}" if "metrics_port" in update else "supervisor.metrics_port"
            problems.append(Problem(key, f"must differ from ca_port ({settings.ca_port}); use another port or 0 to disable metrics"))

    functions: dict[str, FunctionConfig] = {}
    tables = data.get("functions", {})
    if not isinstance(tables, dict):
        problems.append(Problem("functions", f"expected tables of functions such as [functions.hello], got {_show(tables)}"))
        tables = {}
    elif not tables:
        problems.append(Problem("functions", "no function is configured; add one, e.g. [functions.hello] with a handler and code_dir"))
    for name, raw in tables.items():
        prefix = f"functions.{toml_key(name)}"
        if not _NAME_RE.fullmatch(name):
            problems.append(Problem(prefix, f"function name {_show(name)} may only contain letters, digits, '_' and '-' (it is used in metric labels and headers)"))
        elif len(name) > MAX_NAME:
            problems.append(Problem(prefix, f"a function name must be at most {MAX_NAME} characters, got {len(name)}"))
        if isinstance(raw, dict) and "name" in raw:
            problems.append(Problem(f"{prefix}.name", "unknown key (a function's name is its table name)"))
            raw = {key: value for key, value in raw.items() if key != "name"}
        function, found, failed = _validate(FunctionConfig, {**raw, "name": name} if isinstance(raw, dict) else raw, prefix, base_dir)
        problems += found
        if isinstance(raw, dict):
            problems += _function_checks(prefix, raw, failed)
        if function is not None:
            functions[name] = function

    # Read from the raw table so this is reported even when another [supervisor] key is bad.
    raw_settings = data.get("supervisor", {})
    default = raw_settings.get("default_function") if isinstance(raw_settings, dict) else None
    if isinstance(default, str) and default not in tables:
        known = ", ".join(map(_show, tables)) or "none"
        problems.append(Problem("supervisor.default_function", f"{_show(default)} is not a configured function (configured: {known})"))

    if problems or settings is None:
        raise ConfigError(problems, settings=settings, functions=functions)
    return Config(supervisor=settings, functions=functions, path=path)


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML config file; env (default os.environ) overrides it."""
    path = Path(path).absolute()
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE + 1)  # no more: what is past the bound is refused anyway
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read the config file: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        if len(raw) > MAX_FILE:  # cut in the middle of a character
            raise ConfigError([_too_big(str(path))]) from None
        raise ConfigError([Problem(str(path), f"not valid TOML: the file is not UTF-8 ({exc})")]) from exc
    return parse_config_text(text, path.parent, path, env)


def _too_big(where: str) -> Problem:
    return Problem(where, f"a config file must be at most {show_size(MAX_FILE)}, got more")


def parse_config_text(text: str, base_dir: Path, path: Path | None = None, env: Mapping[str, str] | None = None,
                      generation: int = 0) -> Config:
    """Validate a config file's text; relative paths start at ``base_dir``."""
    where = str(path or "config")
    deep = f"not usable: tables and arrays are nested more than {MAX_NESTING} deep"
    if len(text) > MAX_FILE or len(text.encode()) > MAX_FILE:
        raise ConfigError([_too_big(where)])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(where, f"not valid TOML: {exc}")]) from None
    except RecursionError:  # tomllib recurses into arrays and inline tables
        raise ConfigError([Problem(where, deep)]) from None
    except ValueError as exc:  # tomllib lets int()'s own errors through
        reason = ("an integer has more digits than can be read (4300)" if "integer string conversion" in str(exc)
                  else str(exc))
        raise ConfigError([Problem(where, f"not valid TOML: {reason}")]) from None
    if _depth(data) > MAX_NESTING:  # the same answer whatever the caller's stack (validate, reload)
        raise ConfigError([Problem(where, deep)])
    config = parse_config(data, base_dir, os.environ if env is None else env, path)
    return config.model_copy(update={"text": text, "generation": generation})


def _depth(data: Any) -> int:
    """How deeply tables and arrays nest in ``data`` (without recursing)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            items: Any = value.values()
        elif isinstance(value, list):
            items = value
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((item, depth + 1) for item in items)
    return deepest


def bundled_config_path() -> Path:
    """The example config shipped with the package (a wheel) or in the source tree."""
    package_dir = Path(__file__).resolve().parent
    bundled = package_dir / "_bundled" / "hello" / "supervisor.toml"
    return bundled if bundled.exists() else package_dir.parent / "examples" / "hello" / "supervisor.toml"


def resolve_config_path(cli_path: str | None, env: Mapping[str, str], cwd: Path) -> Path:
    """--config, else $SUPERVISOR_CONFIG, else ./supervisor.toml if present, else the bundled example."""
    for given in (cli_path, env.get("SUPERVISOR_CONFIG")):
        if given:
            return cwd / Path(given).expanduser()
    local = cwd / "supervisor.toml"
    return local if local.is_file() else bundled_config_path()


# --- importing handlers, out of process ---------------------------------------------

# worker/check.py imports the handlers in a fresh interpreter started like a worker
# (worker/boot.py: the function's sys.path, never the supervisor's packages).
# Results go to the real stdout behind a marker: user modules may print at import.
_MARKER = "@@ca-supervisor-check@@"


def _check_function(function: FunctionConfig, timeout_s: float, plan: dict[str, Any] | None) -> list[Problem]:
    from supervisor.control.launcher import python_argv, worker_env

    prefix = f"functions.{function.name}"
    specs = [(key, getattr(function, key)) for key in ("handler", *_HOOK_FIELDS) if getattr(function, key)]
    # The environment a worker gets, not the supervisor's (which may hold secrets).
    env = {**worker_env(function, "check", os.environ), "PYTHONDONTWRITEBYTECODE": "1"}
    job = {"specs": specs, "code_dir": str(function.code_dir), "event_loop": function.event_loop,
           "python_packages": function.python_packages, "plan": plan or {}}
    argv = [*python_argv("worker.check"), _MARKER, json.dumps(job)]
    # Its own session, so a timeout kills anything the module started too.
    process = subprocess.Popen(argv, cwd=function.code_dir, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        try:
            process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # a grandchild escaped the group and holds the pipes; the verdict stands
        names = ", ".join(repr(spec) for _, spec in specs)
        return [Problem(prefix, f"importing {names} did not finish within {timeout_s:g}s; does a module block at import?")]
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        if line.startswith(_MARKER):
            found: dict[str, str] = json.loads(line[len(_MARKER):])
            return [Problem(f"{prefix}.{key}", found[key]) for key in ("event_loop", *(k for k, _ in specs))
                    if key in found]
    tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
    return [Problem(prefix, f"checking the handlers crashed Python (exit code {process.returncode})" + (f": {' | '.join(tail)}" if tail else ""))]


def _check_command(function: FunctionConfig) -> list[Problem]:
    """The command's program exists and can be executed (as the worker will run it)."""
    program = (function.command or ("",))[0]
    path = os.environ.get("PATH", os.defpath)
    if "/" in program:
        found = (function.code_dir / program).resolve()
        if not found.is_file():
            return [Problem(f"functions.{function.name}.command", f"{program!r} does not exist (relative to code_dir {str(function.code_dir)!r})")]
        if not os.access(found, os.X_OK):
            return [Problem(f"functions.{function.name}.command", f"{program!r} is not executable (chmod +x it)")]
        return []
    if shutil.which(program, path=function.env.get("PATH", path)) is None:
        return [Problem(f"functions.{function.name}.command", f"{program!r} is not found on PATH")]
    return []


def check_handlers(config: Config, timeout_s: float = 20.0,
                   plans: Mapping[str, dict[str, Any]] | None = None) -> list[Problem]:
    """Import every python function's handler and hooks in a subprocess (isolated
    by ``plans[name]``, see ``supervisor/control/sandbox.py``), and find every
    other function's command; [] when all resolve."""
    problems = [problem for f in config.functions.values() if f.runtime != "python" for problem in _check_command(f)]
    functions = [f for f in config.functions.values() if f.runtime == "python"]
    if not functions:
        return problems
    # Threads, not asyncio: callers may already be inside an event loop.
    with ThreadPoolExecutor(max_workers=len(functions)) as pool:
        results = list(pool.map(lambda f: _check_function(f, timeout_s, (plans or {}).get(f.name)), functions))
    return problems + [problem for found in results for problem in found]
