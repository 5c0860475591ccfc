"""remotefork: the cooperative checkpoint API for Python, in pure Python.

``checkpoint()`` returns twice, like ``os.fork()``: in the caller, once forkd
has made a seed of it, and in every child later started from that seed::

    import remotefork
    cp = remotefork.checkpoint("my-function")
    if cp.is_child:
        print("I am child", cp.index, "with", cp.args)
    else:
        print("seed", cp.seed_id)

The caller forks (so ``os.register_at_fork`` handlers run and the copy has
one thread); the copy waits reading its stdin while forkd captures it over
forkd's cooperative Unix socket (one JSON line each way); then the copy is
removed. A child resumes in that read, and forkd's first stdin line names it.
The socket is ``FORKD_COOP_SOCKET`` or ``/run/forkd/forkd.sock.coop``.

Every child is a new fork of the seed: before ``checkpoint()`` returns in a
child, the interpreter's after-fork-in-child handlers run in it, as after
``os.fork()`` (``random`` is reseeded, ``threading`` and ``logging`` reset
their locks, handlers given to ``os.register_at_fork(after_in_child=...)``
run), then the functions given to ``on_restore()``, in order. A seed
captured from outside (``forkctl seed create --ready-line``) runs no code
of ours when a child starts: call ``after_restore()`` yourself where the
child first runs (``remotefork.runtime`` does, when its pid has changed).
"""

import ctypes
import json
import os
import random
import socket
import threading
import time
import warnings

__all__ = ["checkpoint", "Checkpoint", "CheckpointError", "DEFAULT_SOCKET", "on_restore", "after_restore"]

_restore_hooks = []


def on_restore(fn):
    """Run ``fn()`` in every child started from a seed of this process, after
    the interpreter's own after-fork handlers (for per-child state: tokens,
    connection pools, ids). Returns ``fn``, so it can be used as a decorator."""
    if not callable(fn):
        raise TypeError("on_restore() needs a callable")
    _restore_hooks.append(fn)
    return fn


def after_restore():
    """What a child of a seed runs first: CPython's after-fork-in-child
    handlers (``PyOS_AfterFork_Child``: ``random`` reseeded, thread state and
    locks reset, ``os.register_at_fork(after_in_child=...)`` handlers), then
    the ``on_restore()`` hooks. ``checkpoint()`` calls it in every child."""
    ctypes.pythonapi.PyOS_AfterFork_Child()
    for fn in list(_restore_hooks):
        fn()

DEFAULT_SOCKET = "/run/forkd/forkd.sock.coop"


class CheckpointError(RuntimeError):
    """forkd could not make a seed of the caller."""


class Checkpoint:
    """What checkpoint() returns: a parent (seed_id, key) or a child
    (instance_id, index, args)."""

    def __init__(self, is_child, seed_id=None, key=None, instance_id=None, index=None, args=None):
        self.is_child = is_child
        self.seed_id = seed_id
        self.key = key
        self.instance_id = instance_id
        self.index = index
        self.args = args

    def __repr__(self):
        if self.is_child:
            return f"Checkpoint(child instance={self.instance_id!r} index={self.index} args={self.args!r})"
        return f"Checkpoint(parent seed={self.seed_id!r})"


def _read_line_fd0(limit=65536):
    # One byte at a time: nothing after the newline is taken from stdin.
    line = bytearray()
    while len(line) < limit:
        b = os.read(0, 1)
        if not b:
            return bytes(line) if line else None
        if b == b"\n":
            return bytes(line)
        line += b
    return bytes(line)


def _read_line(fd, limit=65536):
    # One byte at a time: nothing after the newline is consumed.
    line = bytearray()
    while len(line) < limit:
        b = os.read(fd, 1)
        if not b:
            return bytes(line) if line else None
        if b == b"\n":
            return bytes(line)
        line += b
    return bytes(line)


def _checkpoint_all_threads(name, path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        fd = s.fileno()
        s.sendall((json.dumps({"op": "create_seed", "pid": os.getpid(), "name": name,
                               "all_threads": True, "reply_fd": fd}) + "\n").encode())
        # Captured in this read (os.read: a socket here, the child's stdin
        # in a child). The caller gets forkd's answer, a child its first line.
        line = _read_line(fd)
    finally:
        s.close()
    info = json.loads(line or b"{}")
    if "instance_id" in info:
        random.seed()
        for fn in list(_restore_hooks):
            fn()
        return Checkpoint(True, instance_id=info["instance_id"], index=info["index"], args=info.get("args", ""))
    if not info.get("ok"):
        raise CheckpointError(info.get("error", f"forkd answered {line!r}"))
    return Checkpoint(False, seed_id=info["id"], key=info.get("key"))


def _wait_reading(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/syscall") as f:
                fields = f.read().split()
            if fields[:2] == ["0", "0x0"]:
                return
        except OSError:
            pass
        time.sleep(0.0002)
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/syscall") as f:
            where = f.read().strip()
    except OSError as e:
        state, where = "gone", str(e)
    if state == "Z":
        _, status = os.waitpid(pid, 0)
        how = f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        raise CheckpointError(f"the forked copy (pid {pid}) died before it could be captured ({how})")
    raise CheckpointError(f"the forked copy (pid {pid}) did not start waiting within {timeout} s (state {state}, syscall {where})")


def checkpoint(name="", socket_path=None, all_threads=False):
    """Make the calling process a seed; return a Checkpoint in the caller
    and in every child started from the seed.

    By default only the calling thread is in the seed, as only the calling
    thread is in an ``os.fork()`` child (a RuntimeWarning says how many
    threads are left out). With ``all_threads=True`` every thread is kept:
    forkd captures this process itself while the calling thread waits for
    its answer, and in each child every other thread runs on where it was.
    Nothing is forked then, so the interpreter's after-fork handlers do not
    run in the children (their threads are alive); ``random`` is reseeded
    and the ``on_restore()`` hooks run."""
    path = socket_path or os.environ.get("FORKD_COOP_SOCKET", DEFAULT_SOCKET)
    if all_threads:
        return _checkpoint_all_threads(name, path)
    others = threading.active_count() - 1
    if others > 0:
        warnings.warn(
            f"checkpoint() keeps only the calling thread, as os.fork() does: {others} other "
            "thread(s) are not in the seed (checkpoint(all_threads=True) keeps them)",
            RuntimeWarning,
            stacklevel=2,
        )
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(r, 0)
            os.close(r)
            os.close(w)
            # Captured here; in children this read returns their first line.
            line = _read_line_fd0()
            info = json.loads(line)
            after_restore()
            return Checkpoint(True, instance_id=info["instance_id"], index=info["index"], args=info.get("args", ""))
        except BaseException:
            os._exit(113)
    os.close(r)
    try:
        _wait_reading(pid)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall((json.dumps({"op": "create_seed", "pid": pid, "name": name}) + "\n").encode())
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
        reply = json.loads(answer or b"{}")
        if not reply.get("ok"):
            raise CheckpointError(reply.get("error", f"forkd answered {answer!r}"))
        return Checkpoint(False, seed_id=reply["id"], key=reply.get("key"))
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(w)
