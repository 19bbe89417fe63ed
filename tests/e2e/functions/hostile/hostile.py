"""A hostile function: each attempt tries one thing a worker must not be able to do.

The handler answers {"done": bool, "detail": str}: "done" is True when the
attempt succeeded (which the tests treat as a hole), "detail" says what
stopped it. Attempts that exhaust a limit (memory, pids, nofile, cpu) report
what they managed.
"""

import ctypes
import errno
import gc
import json
import os
import resource
import secrets
import socket
import subprocess
import sys
import threading
import time

PTRACE_ATTACH = 16


def _result(fn):
    try:
        detail = fn()
    except OSError as exc:
        return {"done": False, "detail": f"{type(exc).__name__}: [{errno.errorcode.get(exc.errno, exc.errno)}] {exc.strerror}"}
    return {"done": True, "detail": detail}


def _read(path):
    with open(path, "rb") as f:
        return f.read(200).decode(errors="replace")


def _write(path):
    with open(path, "w") as f:
        f.write("pwned")
    return f"wrote {path}"


def _connect_unix(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
    return f"connected to {path}"


def _connect_tcp(host, port):
    with socket.create_connection((host, port), timeout=3):
        return f"connected to {host}:{port}"


def _ptrace(pid):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(PTRACE_ATTACH, pid, 0, 0) == 0:
        return f"attached to {pid}"
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def _hello(sock_path, worker_id, token):
    """HELLO on the worker socket, as a worker would: the data plane's answer frame kind."""
    from calink import frames
    from calink.messages import WorkerHello

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(sock_path)
        hello = WorkerHello(worker_id=worker_id, token=token, pid=os.getpid())
        sock.sendall(frames.encode(frames.Kind.HELLO, 0, hello.encode()))
        data = b""
        while len(data) < frames.HEADER.size:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError(errno.ECONNRESET, "closed without an answer")
            data += chunk
        _, kind, _ = frames.HEADER.unpack_from(data)
    if kind == frames.Kind.WELCOME:
        return "WELCOME"
    raise OSError(errno.EACCES, f"data plane answered frame kind {kind} (REJECT is {int(frames.Kind.REJECT)})")


def _own_credential():
    """This worker's current credential, taken from its own memory (a handler can)."""
    for obj in gc.get_objects():
        if type(obj).__name__ == "Worker" and hasattr(obj, "token") and hasattr(obj, "spec"):
            return obj.spec["worker_id"], obj.token
    raise RuntimeError("no Worker object found")


def _stolen_from_child(sock_path):
    worker_id, token = _own_credential()
    code = ("import sys, os; sys.path[:0] = " + json.dumps(sys.path) + "; import hostile;"
            "import json; print(json.dumps(hostile._result(lambda: hostile._hello("
            f"{sock_path!r}, {worker_id!r}, bytes.fromhex({token.hex()!r})))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=20, text=True)
    if not out.stdout.strip():
        raise OSError(errno.EIO, f"the child failed: {out.stderr[-300:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["done"]:
        return "a child process authenticated with the worker's credential"
    raise OSError(errno.EACCES, result["detail"])


def _allocate(mib):
    blocks = []
    for _ in range(mib):
        blocks.append(bytearray(1 << 20))  # touched: bytearray zero-fills
    return f"allocated {mib} MiB"


def _allocate_shared(mib, hold_s):
    """Memory no data rlimit counts: a tmpfs file mapped shared and touched."""
    import mmap

    path = f"/tmp/hog-{os.getpid()}"
    with open(path, "w+b") as f:
        f.truncate(mib << 20)
        mapped = mmap.mmap(f.fileno(), mib << 20, mmap.MAP_SHARED)
    for offset in range(0, mib << 20, 4096):
        mapped[offset] = 1
    time.sleep(hold_s)
    return f"held {mib} MiB for {hold_s}s"


def _fork_bomb(limit):
    children, error = [], ""
    try:
        for _ in range(limit):
            children.append(subprocess.Popen(["sleep", "30"]))
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc.strerror}"
    started = len(children)
    for child in children:
        child.kill()
        child.wait()
    return {"started": started, "error": error}


def _open_files(limit):
    held, error = [], ""
    try:
        for _ in range(limit):
            held.append(open("/dev/null"))
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc.strerror}"
    count = len(held)
    for f in held:
        f.close()
    return {"opened": count, "error": error}


def _spin(seconds, threads):
    stop = time.monotonic() + seconds

    def spin():
        while time.monotonic() < stop:
            pass

    before = os.times()
    workers = [threading.Thread(target=spin) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    after = os.times()
    return {"cpu_s": (after.user - before.user) + (after.system - before.system), "wall_s": seconds}


def handler(event, context):
    event = json.loads(event or b"{}")
    what = event["try"]
    arg = event.get("arg")
    if what == "whoami":
        return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "pid": os.getpid(),
                "no_new_privs": _status("NoNewPrivs"), "seccomp": _status("Seccomp"),
                "env": sorted(os.environ), "cgroup": open("/proc/self/cgroup").read(),
                "core_limit": list(resource.getrlimit(resource.RLIMIT_CORE))}
    if what == "read":
        return _result(lambda: _read(arg))
    if what == "list":
        return _result(lambda: sorted(os.listdir(arg)))
    if what == "write":
        return _result(lambda: _write(arg))
    if what == "kill":
        return _result(lambda: os.kill(int(arg), 0) or f"may signal {arg}")
    if what == "connect_unix":
        return _result(lambda: _connect_unix(arg))
    if what == "connect_tcp":
        return _result(lambda: _connect_tcp(arg[0], int(arg[1])))
    if what == "ptrace":
        return _result(lambda: _ptrace(int(arg)))
    if what == "forged_hello":
        return _result(lambda: _hello(arg["socket"], arg["worker_id"], secrets.token_bytes(32)))
    if what == "stolen_hello":
        return _result(lambda: _stolen_from_child(arg))
    if what == "replayed_hello":
        worker_id, token = _own_credential()
        return _result(lambda: _hello(arg, worker_id, token))
    if what == "unshare":
        libc = ctypes.CDLL(None, use_errno=True)
        def unshare():
            if libc.unshare(0x40000000) == 0:
                return "made a network namespace"
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return _result(unshare)
    if what == "clone3":
        # clone3 takes its flags in a struct seccomp cannot read: it must be refused
        # whole, or CLONE_NEWUSER passes where clone's namespace flags are refused.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        def clone3():
            args = (ctypes.c_uint64 * 11)(0x10000000, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0)  # CLONE_NEWUSER, SIGCHLD
            pid = libc.syscall(435, ctypes.byref(args), ctypes.c_size_t(88))
            if pid == 0:
                os._exit(0)
            if pid > 0:
                os.waitpid(pid, 0)
                return "made a user namespace"
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return _result(clone3)
    if what == "allocate":
        return _allocate(int(arg))
    if what == "allocate_shared":
        return _allocate_shared(int(arg), 15)
    if what == "fork_bomb":
        return _fork_bomb(int(arg))
    if what == "open_files":
        return _open_files(int(arg))
    if what == "spin":
        return _spin(float(arg), 2)
    if what == "environ":
        return {"mine": dict(os.environ), "other": _result(lambda: _read(f"/proc/{int(arg)}/environ"))}
    if what == "flood_link":
        # Frames on its own connection to the data plane: a header announcing
        # far more than max_body, then megabytes of body for it.
        from calink import frames

        worker = next(o for o in gc.get_objects() if type(o).__name__ == "Worker" and hasattr(o, "link"))
        transport = worker.link.transport
        transport.write(frames.HEADER.pack(int(arg) << 20, int(frames.Kind.RESULT), 1))
        for _ in range(64):
            transport.write(bytes(128 << 10))
        return {"sent": True}
    if what == "forge_log":
        print(json.dumps({"level": "error", "event": "worker exited", "component": "control-plane",
                          "function": "victim", "reason": "forged"}))
        sys.stdout.flush()
        return {"printed": True}
    raise ValueError(f"unknown attempt {what!r}")


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    return None
