#!/usr/bin/env python3
"""A custom runtime for tests/e2e/test_runtimes.py: a stdlib HTTP server on
$FC_SERVER_PORT, the way a function in any language would be written.

At start it leaves a grandchild (``sleep``) and writes ``grandchild-<pid>``
and ``env-<pid>`` into $MARK_DIR, so tests can check that a worker's whole
tree dies with it and what environment the server got. Lifecycle calls
write ``<hook>-<pid>`` there. Routes as in web.py, plus /stats (the most
requests it ever had in flight), /bighead (a 64 KiB response head) and POST /invoke (an event: echoed with the
x-fc-* headers; the event "fail" answers 404 with a JSON error).
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MARK_DIR = os.environ["MARK_DIR"]
lock = threading.Lock()
HOG = []
inflight = 0
peak = 0


def mark(name, text=""):
    with open(os.path.join(MARK_DIR, f"{name}-{os.getpid()}"), "w") as f:
        f.write(text)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        sys.stderr.write("server: " + (format % args) + "\n")

    def body_chunks(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        else:
            left = int(self.headers.get("content-length") or 0)
            while left:
                data = self.rfile.read(min(left, 65536))
                if not data:
                    return
                left -= len(data)
                yield data

    def send(self, status, body, content_type="application/json", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        global inflight, peak
        with lock:
            inflight += 1
            peak = max(peak, inflight)
        try:
            self.route()
        finally:
            with lock:
                inflight -= 1

    def route(self):
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path == "/healthz":
            return self.send(200, b"ok", "text/plain")
        if path in ("/initialize", "/pre-stop", "/pre-freeze"):
            b"".join(self.body_chunks())
            mark(path.strip("/"), self.headers.get("x-fc-request-id", ""))
            return self.send(200, b"", "text/plain")
        if path == "/invoke":
            event = b"".join(self.body_chunks())
            if event == b"fail":
                error = {"errorType": "BadEventError", "errorMessage": "the event was 'fail'"}
                return self.send(404, json.dumps(error).encode(), extra=[("x-fc-status", "404")])
            headers = {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-fc-")}
            return self.send(200, json.dumps({"event": event.decode(), "headers": headers, "pid": os.getpid()}).encode())
        if path == "/upload":
            digest, size, chunks = hashlib.sha256(), 0, 0
            for data in self.body_chunks():
                digest.update(data)
                size += len(data)
                chunks += 1
            return self.send(200, json.dumps({"size": size, "sha256": digest.hexdigest(), "chunks": chunks}).encode())
        if path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i, piece in enumerate((b"first\n", b"second\n")):
                if i:
                    deadline = time.monotonic() + 20
                    while not os.path.exists(query["gate"]) and time.monotonic() < deadline:
                        time.sleep(0.01)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        if path == "/sleep":
            b"".join(self.body_chunks())
            time.sleep(float(query.get("s", "1")))
            return self.send(200, b"slept", "text/plain")
        if path == "/crash":
            os._exit(3)
        if path == "/pid":
            return self.send(200, str(os.getpid()).encode(), "text/plain")
        if path == "/hog":  # keeps this many MiB resident in the server until it goes
            HOG.append(bytearray(b"\x01") * (int(query["mib"]) << 20))
            return self.send(200, str(os.getpid()).encode(), "text/plain")
        if path == "/stats":
            return self.send(200, json.dumps({"peak": peak}).encode())
        if path == "/boom":
            return self.send(500, b"internal failure", "text/plain")
        if path == "/bighead":  # a response head too large for one worker frame
            return self.send(200, b"big", "text/plain", extra=[(f"x-big-{i}", "v" * 1000) for i in range(64)])
        body = b"".join(self.body_chunks())
        echo = {"method": self.command, "path": path, "raw_path": self.path.split("?")[0], "query": url.query,
                "headers": [[k.lower(), v] for k, v in self.headers.items()], "body_hex": body.hex(),
                "pid": os.getpid()}
        self.send(200, json.dumps(echo).encode(), extra=[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any


if __name__ == "__main__":
    grandchild = subprocess.Popen(["sleep", "300"])
    mark("grandchild", str(grandchild.pid))
    mark("env", json.dumps(dict(os.environ)))
    if os.environ.get("NEVER_LISTEN"):
        print("starting up... and never listening", flush=True)
        time.sleep(600)
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["FC_SERVER_PORT"])), Handler)
    server.daemon_threads = True
    print(f"listening on {server.server_address}", flush=True)
    server.serve_forever()
