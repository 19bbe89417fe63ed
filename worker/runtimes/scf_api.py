"""Tencent SCF's Custom Runtime API, as a raw ASGI app.

Served on the worker's private loopback port to the ``bootstrap`` the
function's ``command`` starts (``SCF_RUNTIME_API`` = 127.0.0.1 and
``SCF_RUNTIME_API_PORT``); events come from ``pull.EventQueue``.

What SCF documents, and where:

- Tencent Cloud SCF docs, "Custom Runtime > Overview"
  (intl.cloud.tencent.com/document/product/583/38129; Chinese edition
  cloud.tencent.com/document/product/583/47274, "Custom Runtime 运行时 API"):
  four paths on ``SCF_RUNTIME_API:SCF_RUNTIME_API_PORT`` -- ``POST
  /runtime/init/ready`` (initialization is done; "if the notifications are
  repeated, the first access time will be used as the readiness time";
  without it SCF waits until the initialization timeout and fails the
  instance), ``GET /runtime/invocation/next`` (the event as the body, the
  headers ``request_id``, ``memory_limit_in_mb`` and ``time_limit_in_ms``;
  "if this API is repeatedly accessed during an invocation, the same event
  data will be returned"; clients must not time the long poll out), ``POST
  /runtime/invocation/response`` and ``POST /runtime/invocation/error`` (the
  first result pushed is final: "the result cannot be changed after push").
  An initialization that fails is reported by exiting (or timing out), with
  the output as the explanation: there is no init-error path.
- "Creating Sample Bash Function" (intl.cloud.tencent.com/document/product/
  583/38130): the reference ``bootstrap`` in bash and curl, which POSTs ready
  with ``curl -d " "``, long-polls ``next`` with ``curl -sS -LD headers``,
  and pushes ``-d "$RESPONSE"`` (so a result arrives form-encoded by curl's
  default) or an error as plain text (``-d "parse event error"``).
- "Environment Variables" (intl.cloud.tencent.com/document/product/583/32748):
  the built-in variables (``SCF_RUNTIME``, ``SCF_FUNCTIONNAME``,
  ``SCF_FUNCTIONVERSION``, ``TENCENTCLOUD_REGION``, ``TENCENTCLOUD_RUNENV``,
  ``USER_CODE_ROOT``...); ``_HANDLER`` is the configured handler, as the
  bash sample reads it. ``pull.PullHost`` sets those it can know.
- SCF documents no status codes. The SCF runtime for Swift
  (github.com/stevapple/swift-tencent-scf-runtime, ``SCFRuntimeClient.swift``
  and its local mock server) treats 200 as success for ready, response and
  error, and reads the event headers in lower case as above.

As implemented:

======  ================================  ===================================================
method  path                              answers
======  ================================  ===================================================
POST    ``/runtime/init/ready``           200 (again 200 on a repeat: the first one counts)
GET     ``/runtime/invocation/next``      200 + the event (long poll)
POST    ``/runtime/invocation/response``  200; 400 when no invocation is in flight (none, or
                                          it has its result already); 413 over max_body
POST    ``/runtime/invocation/error``     200; 400 and 413 as above
======  ================================  ===================================================

Anything else is 404, a known path with another method 405; failures carry
``{"errorType", "errorMessage"}``. Beyond SCF's documentation:

- SCF's response and error paths name no event: they answer *the* event in
  flight. When ``concurrency`` > 1 several can be, so an answer may carry the
  event's ``request_id`` header to say which; without it, it answers the only
  event in flight, and is refused (400) when there are several.
- The repeat rule of ``next`` (the same event again while it is unanswered)
  holds when the function's concurrency is 1; with more, every poll takes a
  new event, as several pollers are the point of concurrency.
- A result's content type is the one the bootstrap declares; curl's default
  ``application/x-www-form-urlencoded`` says nothing about the result and is
  dropped (SCF itself returns results as plain strings).
- An error's type is the body's ``errorType`` when the body is AWS-style JSON,
  else ``FunctionError``; the message is the body's ``errorMessage`` or the
  body's text.
- A body over ``max_body`` is refused with 413 while reading and ends the
  invocation with ``ResultTooLargeError``.
"""

from __future__ import annotations

import asyncio

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
    read_body,
    respond,
    respond_closing,
    respond_json,
    too_large,
)

READY = "/runtime/init/ready"
NEXT = "/runtime/invocation/next"
RESPONSE = "/runtime/invocation/response"
ERROR = "/runtime/invocation/error"
METHODS = {READY: "POST", NEXT: "GET", RESPONSE: "POST", ERROR: "POST"}
FALLBACK_ERROR_TYPE = "FunctionError"
FORM_TYPE = "application/x-www-form-urlencoded"
READY_BODY_LIMIT = 64 * 1024  # the sample posts " "; anything is accepted, within reason


class ScfApi:
    """The custom-runtime API for one worker's bootstrap (see the module docstring)."""

    ready_hint = f"it never sent POST {READY} (a bootstrap must, once initialized)"

    def __init__(self, queue: EventQueue, *, max_body: int, memory_mb: int, redeliver: bool) -> None:
        self.queue = queue
        self.max_body = max_body
        self.memory_mb = str(memory_mb).encode()
        self.redeliver = redeliver
        self.startup: asyncio.Future[ErrorInfo | None] = asyncio.get_running_loop().create_future()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        allowed = METHODS.get(path)
        try:
            if allowed is None:
                await respond_json(send, 404, {"errorType": "NotFound",
                                               "errorMessage": f"no such runtime API path: {path}"})
            elif scope["method"] != allowed:
                await respond(send, 405, b"", [(b"allow", allowed.encode())])
            elif path == NEXT:
                await self._next(receive, send)
            elif path == READY:
                await self._ready(scope, receive, send)
            else:
                await self._answer(scope, receive, send, path == RESPONSE)
        except QueueClosed:
            await respond_closing(send)
        except ClientGone:
            return  # the bootstrap hung up mid-request: nothing was applied

    async def _ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await read_body(scope, receive, READY_BODY_LIMIT) is None:
            await respond_json(send, 413, {"errorType": "RequestEntityTooLarge",
                                           "errorMessage": f"a ready notice has no use for {READY_BODY_LIMIT}+ bytes"})
            return
        if not self.startup.done():
            self.startup.set_result(None)
        await respond(send, 200)

    async def _next(self, receive: Receive, send: Send) -> None:
        event: Event | None = None
        if self.redeliver and self.queue.in_flight:
            # SCF: polling again during an invocation returns the same event.
            event = next(iter(self.queue.in_flight.values()))
            await receive()  # the empty request body
        else:
            event = await await_event(self.queue, receive)
        if event is None:
            return
        await respond(send, 200, event.body, [
            (b"request_id", event.request_id.encode("latin-1")),
            (b"memory_limit_in_mb", self.memory_mb),
            (b"time_limit_in_ms", str(int(event.timeout_s * 1000)).encode()),
        ])

    async def _answer(self, scope: Scope, receive: Receive, send: Send, success: bool) -> None:
        request_id = self._which(header(scope, b"request_id"))
        if isinstance(request_id, ErrorInfo):
            await respond_json(send, 400, {"errorType": request_id.error_type,
                                           "errorMessage": request_id.error_message})
            return
        body = await read_body(scope, receive, self.max_body)
        if body is None:
            what = "response" if success else "error report"
            if self.queue.answer(request_id, too_large(request_id, what, self.max_body)):
                await respond_json(send, 413, {
                    "errorType": "RequestEntityTooLarge",
                    "errorMessage": f"the {what} exceeds max_body ({self.max_body} bytes)"})
            else:
                await self._already_answered(send, request_id)
            return
        if success:
            content_type = header(scope, b"content-type") or ""
            if content_type.split(";", 1)[0].strip().lower() == FORM_TYPE:
                content_type = ""
            result = Result(ok=True, body=body, content_type=content_type)
        else:
            result = Result(ok=False, error=error_info_from_body(body, None, FALLBACK_ERROR_TYPE))
        # The first result is final: it may have arrived while this body was read.
        if self.queue.answer(request_id, result):
            await respond(send, 200)
        else:
            await self._already_answered(send, request_id)

    def _which(self, named: str | None) -> str | ErrorInfo:
        """The request id an answer is for, or why none can be chosen."""
        in_flight = self.queue.in_flight
        if named:
            if named in in_flight:
                return named
            return ErrorInfo(error_type="InvalidRequestID",
                             error_message=f"request {named} is not in flight (unknown, or it has its result)")
        if len(in_flight) == 1:
            return next(iter(in_flight))
        if not in_flight:
            return ErrorInfo(error_type="NoInvocationInFlight",
                             error_message="no invocation is waiting for a result (the first result is final)")
        return ErrorInfo(error_type="AmbiguousInvocation",
                         error_message=f"{len(in_flight)} invocations are in flight; send the request_id "
                                           "header of the event this result is for")

    @staticmethod
    async def _already_answered(send: Send, request_id: str) -> None:
        await respond_json(send, 400, {"errorType": "InvalidRequestID",
                                       "errorMessage": f"request {request_id} already has its result"})
