"""cahttp: the hardened HTTP/1.1 server of the CA port, for any process to use.

``cahttp.server`` serves an ASGI callable with uvicorn's httptools protocol
on the caller's own event loop, with what a port facing clients that may be
slow, silent, broken or hostile needs (bounded request heads, client
timeouts, a connection limit that sheds the idlest, the contract's JSON for
every answer it gives on its own). ``cahttp.request_ids`` says which request
ids are safe to echo and makes new ones.

Rules:
- Importable without the ``supervisor`` package: the data plane serves the
  CA and metrics ports with it, and a worker its runtime's private API
  (``worker/runtimes/gate.py``). Dependencies: the standard library,
  uvicorn and httptools; no orjson, no structlog: what the server reports
  goes to a callable its owner passes (the data plane's structlog records),
  by default to standard ``logging``.
- Importing ``cahttp`` imports nothing else.
"""
