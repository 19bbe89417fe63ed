#!/usr/bin/env python3
"""A custom runtime in tests/e2e/test_hostile.py: a stdlib HTTP server on
$FC_SERVER_PORT that answers POST /invoke with what the process can see
and do (its uid, seccomp mode, whether it reaches the outside)."""

import json
import os
import socket
from http.server import BaseHTTPRequestHandler, HTTPServer


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    return None


def reach(host, port):
    try:
        with socket.create_connection((host, port), timeout=3):
            return "connected"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror}"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self._send({"ok": True})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        self._send({"uid": os.getuid(), "seccomp": status("Seccomp"), "no_new_privs": status("NoNewPrivs"),
                    "outside": reach("192.0.2.1", 80), "ca_port": reach("127.0.0.1", int(body.get("ca_port", 9)))})

    def _send(self, payload):
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(os.environ["FC_SERVER_PORT"])), Handler).serve_forever()
