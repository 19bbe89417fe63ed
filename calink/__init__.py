"""calink: the worker link, the one format the data plane and its workers share.

``calink.frames`` frames a byte stream (a 9-byte header per frame, kinds,
an incremental decoder, a coalescing writer, the limits of the link);
``calink.messages`` encodes and decodes the payloads of the frames that
carry a message. The full protocol, byte by byte: ``docs/worker-protocol.md``.

Rules:
- The standard library only, so a worker can import it before (and without)
  anything of the supervisor's or of the function's: a function may ship its
  own versions of any third-party package.
- Importing ``calink`` does nothing else: no submodule is imported here, no
  state is set, nothing is read from the environment.
"""
