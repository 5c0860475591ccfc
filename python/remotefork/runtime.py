"""remotefork.runtime: the function runtime the gateway starts.

A user writes only a handler::

    # hello.py
    import boto3                      # imported once, before the checkpoint
    client = boto3.client("s3", region_name="us-east-1")

    def handler(event):
        return {"hello": event.get("name"), "region": client.meta.region_name}

and registers ``python3 -m remotefork.runtime hello.py`` with the gateway.
The runtime imports the handler's module (its imports and globals are the
warm state), calls ``warmup()`` if the module has one, and then
``remotefork.checkpoint()``: the caller prints one line
``remotefork-seed {"id": ..., "key": ...}`` for the gateway and exits; every
child started from the seed connects back to the gateway (the address comes
in the checkpoint's args) and serves invocations, one JSON line each way:

    gateway -> child   {"id": N, "event": {...}}      or {"exit": true}
    child -> gateway   {"id": N, "ok": true, "result": ...}
                       {"id": N, "ok": false, "error": "..."}

The first line a child sends is its hello: {"hello": INSTANCE_ID, "function": NAME}.
A handler that raises answers an error and the instance lives on; one that
crashes the process or hangs is the gateway's to deal with.

The handler (and ``warmup``) may be ``async def``: the runtime makes one
asyncio event loop before the checkpoint (its epoll set and self-pipe are
in the seed, recreated in every child) and runs each call on it with
``run_until_complete``. The loop never runs across the checkpoint: CPython
keeps a running loop with the pid it runs in, and a child (another pid)
could not go on with it, as after ``os.fork()``.

With ``--ready-line LINE`` the runtime instead prints LINE once warm (a seed
made by forkd's CreateSeed with a ready line), then reads one event line from
stdin, prints the result as one JSON line and exits: one invocation per child.
A child there knows it is one by its pid, which differs from the warm
process's, and runs ``remotefork.after_restore()`` first (fresh ``random``
state, the module's ``on_restore`` hooks) as the checkpoint path does.
"""

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import json
import os
import socket
import sys
import traceback

from . import after_restore, checkpoint

__all__ = ["load_handler", "serve", "main"]


def load_handler(spec):
    """`path/to/file.py[:func]` or `package.module[:func]` -> the function."""
    target, _, func = spec.partition(":")
    func = func or "handler"
    if target.endswith(".py"):
        path = os.path.abspath(target)
        sys.path.insert(0, os.path.dirname(path))
        name = os.path.splitext(os.path.basename(path))[0]
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise AttributeError(f"{target} has no callable {func!r}")
    return module, fn


_loop = None


def _run(value):
    """`value`, or what it resolves to if it is awaitable (on the runtime's
    event loop, made once)."""
    global _loop
    if not inspect.isawaitable(value):
        return value
    if _loop is None:
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop.run_until_complete(value)


def _call(handler, event):
    try:
        return {"ok": True, "result": _run(handler(event))}
    except Exception as e:  # the handler's own errors travel back to the caller
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=5)}


def serve(handler, gateway, instance_id, function):
    """Serve invocations from the gateway at HOST:PORT until told to exit."""
    host, _, port = gateway.rpartition(":")
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rwb", buffering=0)
        f.write((json.dumps({"hello": instance_id, "function": function}) + "\n").encode())
        for line in f:
            msg = json.loads(line)
            if msg.get("exit"):
                return
            answer = _call(handler, msg.get("event"))
            answer["id"] = msg.get("id")
            try:
                data = json.dumps(answer)
            except (TypeError, ValueError) as e:
                data = json.dumps({"id": msg.get("id"), "ok": False, "error": f"result is not JSON: {e}"})
            f.write((data + "\n").encode())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m remotefork.runtime", description=__doc__.split("\n\n")[0])
    p.add_argument("handler", help="path/to/file.py[:func] or module[:func] (default func: handler)")
    p.add_argument("--name", default="", help="the seed's name (default: the handler spec)")
    p.add_argument("--ready-line", help="print this once warm and serve one event from stdin (no checkpoint)")
    a = p.parse_args(argv)
    module, handler = load_handler(a.handler)
    warmup = getattr(module, "warmup", None)
    if callable(warmup):
        _run(warmup())
    if inspect.iscoroutinefunction(handler):
        _run(asyncio.sleep(0))  # the loop exists before the checkpoint
    if a.ready_line is not None:
        warm_pid = os.getpid()
        print(a.ready_line, flush=True)
        line = sys.stdin.readline()
        if os.getpid() != warm_pid:
            # A child of a seed captured here: a new fork of this process.
            after_restore()
        answer = _call(handler, json.loads(line) if line.strip() else None)
        print(json.dumps(answer), flush=True)
        # Skip interpreter teardown, as a checkpointed instance does: it
        # would touch (and, in a lazily paged child, fault in) every object
        # of the warm process for nothing; 200 ms of a 230 ms one-shot
        # invocation of the boto3 example.
        sys.stderr.flush()
        os._exit(0 if answer["ok"] else 1)
    cp = checkpoint(a.name or a.handler)
    if not cp.is_child:
        print("remotefork-seed " + json.dumps({"id": cp.seed_id, "key": cp.key}), flush=True)
        return
    args = json.loads(cp.args or "{}")
    serve(handler, args["gateway"], cp.instance_id, args.get("function", ""))
    # Skip interpreter teardown: nothing of the seed's needs flushing.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
