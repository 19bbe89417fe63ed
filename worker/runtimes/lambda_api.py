"""The AWS Lambda Runtime API (version 2018-06-01), as a raw ASGI app.

Served on the worker's private loopback port (``AWS_LAMBDA_RUNTIME_API``)
to the runtime the function's ``command`` starts; events come from
``pull.EventQueue``. It follows AWS's OpenAPI description of the API
(``runtime-api.zip`` in the Lambda developer guide) and the status codes and
bodies of AWS's runtime interface emulator (``lambda/rapi`` in
aws/aws-lambda-runtime-interface-emulator):

======  ===========================================  ============================================
method  path (under ``/2018-06-01/runtime``)          answers
======  ===========================================  ============================================
GET     ``/invocation/next``                          200 + the event (long poll); 403 after an
                                                      init error was reported
POST    ``/invocation/{id}/response``                 202; 400 ``InvalidRequestID`` for an id that
                                                      is not in flight (unknown, or answered);
                                                      413 ``RequestEntityTooLarge`` over max_body
POST    ``/invocation/{id}/error``                    202; 400 and 413 as above
POST    ``/init/error``                               202 during init; 403 ``InvalidStateTransition``
                                                      once init is over (ready, or an error was
                                                      already reported)
======  ===========================================  ============================================

Anything else is 404, a known path with another method 405. Successes carry
``{"status": "OK"}``, failures ``{"errorMessage", "errorType"}``.

Rules:
- The first ``GET .../next`` means the runtime is initialized (``startup``
  resolves with None); an accepted init error resolves it with the error.
- The event answers with ``Lambda-Runtime-Aws-Request-Id`` (the FC request
  id), ``Lambda-Runtime-Deadline-Ms`` (epoch ms), ``Lambda-Runtime-Invoked-
  Function-Arn`` (``arn:aws:lambda:<region>:<account>:function:<name>``),
  ``Lambda-Runtime-Trace-Id`` (the caller's ``X-Amzn-Trace-Id``, else one
  derived from the request id) and, when the caller gave them, ``Lambda-
  Runtime-Client-Context`` (from ``X-Amz-Client-Context``, base64 JSON as
  Lambda's Invoke API takes it, or ``Lambda-Runtime-Client-Context``) and
  ``Lambda-Runtime-Cognito-Identity``; both are re-encoded compact JSON, so a
  header can never carry a line break. The event is declared
  ``application/json``: Lambda events are JSON documents.
- A response or error body over ``max_body`` (AWS's 6 MB payload limit) is
  refused with 413 while reading and ends its invocation with
  ``ResultTooLargeError``, as AWS ends it with ``Function.ResponseSizeTooLarge``.
- An error's type is the body's ``errorType`` (the exception's class, for
  awslambdaric), else the ``Lambda-Runtime-Function-Error-Type`` header, else
  ``Runtime.Unknown``; its stack trace is the body's ``stackTrace`` joined.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import time
from collections.abc import Mapping

from calink.messages import ErrorInfo, Result
from worker.runtimes.events import (
    ClientGone,
    Event,
    EventQueue,
    QueueClosed,
    Receive,
    Scope,
    Send,
    await_event,
    error_info_from_body,
    header,
    json_dumps,
    json_loads,
    read_body,
    respond,
    respond_closing,
    respond_json,
    too_large,
)

PREFIX = "/2018-06-01/runtime"
NEXT = PREFIX + "/invocation/next"
INIT_ERROR = PREFIX + "/init/error"
INVOCATION = PREFIX + "/invocation/"
ERROR_TYPE_HEADER = b"lambda-runtime-function-error-type"
ACCEPTED = {"status": "OK"}
UNKNOWN_ERROR_TYPE = "Runtime.Unknown"
# Init error reports are a type, a message and a stack trace: 1 MiB is plenty.
INIT_ERROR_LIMIT = 1024 * 1024
DEFAULT_ACCOUNT = "000000000000"
PRINTABLE = re.compile(r"[\x20-\x7e]{1,1024}")  # what may be copied into a header as it is


def _compact_json(text: str) -> str | None:
    """``text`` re-encoded as compact ASCII JSON (safe in a header), or None if it is not JSON."""
    try:
        return json_dumps(json_loads(text), ascii_only=True).decode("ascii")
    except ValueError:
        return None


def _client_context(headers: Mapping[str, str]) -> str | None:
    given = headers.get("lambda-runtime-client-context")
    if given:
        return _compact_json(given)
    encoded = headers.get("x-amz-client-context")
    if encoded:
        try:
            return _compact_json(base64.b64decode(encoded, validate=True).decode("utf-8"))
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def trace_id(event: Event) -> str:
    """The caller's X-Ray trace header, else a well-formed one derived from the request id."""
    given = event.headers.get("x-amzn-trace-id")
    if given and PRINTABLE.fullmatch(given):
        return given
    root = hashlib.blake2b(event.request_id.encode(), digest_size=12).hexdigest()
    return f"Root=1-{int(time.time()):08x}-{root};Sampled=0"


class LambdaApi:
    """The runtime API for one worker's runtime (see the module docstring)."""

    ready_hint = f"it never polled GET {NEXT}"

    def __init__(self, queue: EventQueue, *, function: str, max_body: int, region: str, account: str = "") -> None:
        self.queue = queue
        self.max_body = max_body
        self.arn = f"arn:aws:lambda:{region}:{account or DEFAULT_ACCOUNT}:function:{function}"
        self.startup: asyncio.Future[ErrorInfo | None] = asyncio.get_running_loop().create_future()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if path == NEXT:
                if method == "GET":
                    await self._next(receive, send)
                else:
                    await self._not_allowed(send, "GET")
            elif path == INIT_ERROR:
                if method == "POST":
                    await self._init_error(scope, receive, send)
                else:
                    await self._not_allowed(send, "POST")
            elif path.startswith(INVOCATION):
                request_id, _, verb = path[len(INVOCATION):].partition("/")
                if not request_id or verb not in ("response", "error"):
                    await self._not_found(send, path)
                elif method != "POST":
                    await self._not_allowed(send, "POST")
                else:
                    await self._answer(scope, receive, send, request_id, verb)
            else:
                await self._not_found(send, path)
        except QueueClosed:
            await respond_closing(send)
        except ClientGone:
            return  # the runtime hung up mid-request: nothing to answer, nothing was applied

    # ---- routes ----------------------------------------------------------------------------

    async def _next(self, receive: Receive, send: Send) -> None:
        if self.startup.done() and self.startup.result() is not None:
            await respond_json(send, 403, {
                "errorType": "InvalidStateTransition",
                "errorMessage": "the runtime reported an init error; it must exit, not poll for events"})
            return
        if not self.startup.done():
            self.startup.set_result(None)  # the first poll: the runtime is initialized
        event = await await_event(self.queue, receive)
        if event is None:
            return
        headers = [
            (b"content-type", b"application/json"),
            (b"lambda-runtime-aws-request-id", event.request_id.encode("latin-1")),
            (b"lambda-runtime-deadline-ms", str(event.deadline_ms).encode()),
            (b"lambda-runtime-invoked-function-arn", self.arn.encode("latin-1")),
            (b"lambda-runtime-trace-id", trace_id(event).encode("latin-1")),
        ]
        context = _client_context(event.headers)
        if context is not None:
            headers.append((b"lambda-runtime-client-context", context.encode("ascii")))
        given_identity = event.headers.get("lambda-runtime-cognito-identity")
        identity = _compact_json(given_identity) if given_identity else None
        if identity is not None:
            headers.append((b"lambda-runtime-cognito-identity", identity.encode("ascii")))
        await respond(send, 200, event.body, headers)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, request_id: str, verb: str) -> None:
        if request_id not in self.queue.in_flight:
            await self._invalid_request_id(send)
            return
        body = await read_body(scope, receive, self.max_body)
        if body is None:
            what = "response" if verb == "response" else "error report"
            if self.queue.answer(request_id, too_large(request_id, what, self.max_body)):
                await respond_json(send, 413, {
                    "errorType": "RequestEntityTooLarge",
                    "errorMessage": f"Exceeded maximum allowed payload size ({self.max_body} bytes)."})
            else:
                await self._invalid_request_id(send)
            return
        if verb == "response":
            content_type = header(scope, b"content-type") or "application/json"
            result = Result(ok=True, body=body, content_type=content_type)
        else:
            result = Result(ok=False, error=error_info_from_body(
                body, header(scope, ERROR_TYPE_HEADER), UNKNOWN_ERROR_TYPE))
        # The id may have been answered while this body was being read.
        if self.queue.answer(request_id, result):
            await respond_json(send, 202, ACCEPTED)
        else:
            await self._invalid_request_id(send)

    async def _init_error(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.startup.done():
            await self._init_over(send)
            return
        body = await read_body(scope, receive, INIT_ERROR_LIMIT)
        if body is None:
            await respond_json(send, 413, {
                "errorType": "RequestEntityTooLarge",
                "errorMessage": f"Exceeded maximum allowed payload size ({INIT_ERROR_LIMIT} bytes)."})
        elif self.startup.done():  # it polled, or another process reported, while this body was read
            await self._init_over(send)
        else:
            self.startup.set_result(error_info_from_body(body, header(scope, ERROR_TYPE_HEADER),
                                                         UNKNOWN_ERROR_TYPE))
            await respond_json(send, 202, ACCEPTED)

    # ---- failures --------------------------------------------------------------------------

    async def _init_over(self, send: Send) -> None:
        state = "initialized" if self.startup.result() is None else "already reported an init error"
        await respond_json(send, 403, {
            "errorType": "InvalidStateTransition",
            "errorMessage": f"init errors are taken during init only; the runtime has {state}"})

    @staticmethod
    async def _invalid_request_id(send: Send) -> None:
        await respond_json(send, 400, {"errorType": "InvalidRequestID", "errorMessage": "Invalid request ID"})

    @staticmethod
    async def _not_found(send: Send, path: str) -> None:
        await respond_json(send, 404, {"errorType": "NotFound", "errorMessage": f"no such runtime API path: {path}"})

    @staticmethod
    async def _not_allowed(send: Send, allowed: str) -> None:
        await respond(send, 405, json_dumps({"errorType": "MethodNotAllowed",
                                             "errorMessage": f"this path takes {allowed} only"}),
                      [(b"content-type", b"application/json"), (b"allow", allowed.encode())])
