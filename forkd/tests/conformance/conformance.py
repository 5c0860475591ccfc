"""Stock grpcio against a real forkd: every RPC, streaming included, and
each documented error status, with gRPC's default channel options.

    PYTHONPATH=python python3 conformance.py --addr unix:PATH [--token T] --python PY

Prints one line per check (`ok NAME` or `FAIL NAME: why`) and exits
non-zero if any failed. Run by forkd/tests/clients.rs.
"""

import argparse
import json
import subprocess
import sys
import threading
import time

import grpc

from remotefork._pb import forkd_pb2 as pb
from remotefork._pb import forkd_pb2_grpc as pb_grpc

SERVER = r"""
import json, os, sys, time
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "sleep":
        time.sleep(120)
    print(json.dumps({"got": line.strip(), "pid": os.getpid()}), flush=True)
"""

C = grpc.StatusCode
results = []


def check(name):
    def wrap(f):
        try:
            f()
            results.append((name, None))
            print(f"ok {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            results.append((name, e))
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        return f
    return wrap


def expect_status(code, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        assert e.code() == code, f"wanted {code}, got {e.code()}: {e.details()}"
        assert e.details(), "the status has a message"
        return e.details()
    raise AssertionError(f"wanted {code}, the call succeeded")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--token", default="")
    ap.add_argument("--python", default=sys.executable)
    a = ap.parse_args()
    tcp = not a.addr.startswith("unix:")
    md = (("authorization", f"Bearer {a.token}"),) if a.token else ()
    # Default options: nothing but the target.
    channel = grpc.insecure_channel(a.addr)
    stub = pb_grpc.ForkdStub(channel)
    T = 120  # unary deadline, s: generous on a loaded machine
    state = {}

    @check("NodeInfo")
    def _():
        n = stub.NodeInfo(pb.NodeInfoRequest(), metadata=md, timeout=T)
        assert n.version and n.cpus >= 1 and n.kernel, n

    @check("CreateSeed(command)")
    def _():
        s = stub.CreateSeed(pb.CreateSeedRequest(
            command=pb.StartCommand(argv=[a.python, "-c", SERVER], ready_line="ready", env={"CONFORMANCE": "1"}),
            name="conformance"), metadata=md, timeout=T)
        assert len(s.id) == 16 and len(s.key) == 32 and s.name == "conformance", s
        state["seed"] = pb.SeedRef(id=s.id, key=s.key)

    @check("CreateSeed(pid)")
    def _():
        p = subprocess.Popen([a.python, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert p.stdout.readline().strip() == b"ready"
            s = stub.CreateSeed(pb.CreateSeedRequest(pid=p.pid, name="by-pid"), metadata=md, timeout=T)
            assert s.source_pid == p.pid and s.image_bytes > 0, s
            state["pid_seed"] = pb.SeedRef(id=s.id, key=s.key)
        finally:
            p.kill()
            p.wait()

    @check("GetSeed")
    def _():
        s = stub.GetSeed(state["seed"], metadata=md, timeout=T)
        assert s.id == state["seed"].id, s

    @check("ListSeeds")
    def _():
        ids = {s.id for s in stub.ListSeeds(pb.ListSeedsRequest(), metadata=md, timeout=T).seeds}
        assert {state["seed"].id, state["pid_seed"].id} <= ids, ids

    @check("Spawn(stream)")
    def _():
        kinds = {}
        done = 0
        for ev in stub.Spawn(pb.SpawnRequest(seed=state["seed"], count=3, stdin=b"hello\n"), metadata=md):
            kind = ev.WhichOneof("kind")
            kinds.setdefault(ev.index, []).append(kind)
            if kind == "exited":
                assert ev.exited.exit_code == 0 and ev.exited.signal == 0, ev
                out = json.loads(ev.exited.stdout)
                assert out == {"got": "hello", "pid": ev.pid}, out
                done += 1
                if done == 3:
                    break
        assert sorted(kinds) == [0, 1, 2], kinds
        for ks in kinds.values():
            assert ks[0] == "started" and ks[1] == "running" and ks[-1] == "exited", ks
            assert "output" in ks, ks

    @check("Watch(stream)")
    def _():
        seen = []
        watch = stub.Watch(pb.WatchRequest(), metadata=md)
        opened = threading.Event()

        def follow():
            try:
                for ev in watch:
                    seen.append(ev.WhichOneof("kind"))
                    if seen[-1] == "exited":
                        return
            except grpc.RpcError as e:
                if e.code() != C.CANCELLED:
                    seen.append(f"error {e.code()}")
        t = threading.Thread(target=follow)
        t.start()
        # The watch sees events from when forkd has it: spawn until one arrives.
        for _ in range(100):
            list(stub.Spawn(pb.SpawnRequest(seed=state["seed"], count=1, stdin=b"w\n"), metadata=md))
            if "exited" in seen:
                break
            time.sleep(0.1)
        watch.cancel()
        t.join(T)
        assert "exited" in seen, seen

    @check("ListInstances")
    def _():
        inst = stub.ListInstances(pb.ListInstancesRequest(seed_id=state["seed"].id), metadata=md, timeout=T).instances
        assert len(inst) >= 3 and all(i.seed_id == state["seed"].id for i in inst), inst
        assert any(i.state == "exited 0" for i in inst), inst
        state["ended"] = next(i.id for i in inst if i.state != "running")

    @check("GetInstance")
    def _():
        i = stub.GetInstance(pb.GetInstanceRequest(instance_id=state["ended"]), metadata=md, timeout=T)
        assert i.ended and i.id == state["ended"] and i.stdout, i

    @check("PutInput(client stream)")
    def _():
        # An input larger than one gRPC message, staged in chunks, then spawned from.
        data = b"x" * (5 << 20) + b"\n"
        ref = stub.PutInput(iter([pb.InputChunk(data=data[i:i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]),
                            metadata=md, timeout=T)
        assert ref.bytes == len(data), ref
        evs = list(stub.Spawn(pb.SpawnRequest(seed=state["seed"], count=1, stdin_ref=ref.id), metadata=md))
        assert evs[-1].WhichOneof("kind") == "exited" and evs[-1].exited.exit_code == 0, evs[-1]
        expect_status(C.NOT_FOUND, lambda: list(stub.Spawn(pb.SpawnRequest(seed=state["seed"], stdin_ref="nope"),
                                                           metadata=md)))

    @check("KillInstance")
    def _():
        stream = stub.Spawn(pb.SpawnRequest(seed=state["seed"], count=1, stdin=b"sleep\n"), metadata=md)
        for ev in stream:
            kind = ev.WhichOneof("kind")
            if kind == "running":
                stub.KillInstance(pb.KillInstanceRequest(instance_id=ev.instance_id), metadata=md, timeout=T)
            if kind == "exited":
                assert ev.exited.signal == 9, ev
                break
        else:
            raise AssertionError("no exited event")

    @check("FetchDescriptor")
    def _():
        b = stub.FetchDescriptor(state["seed"], metadata=md, timeout=T)
        assert b.descriptor and b.page_server and b.image_bytes > 0, b.page_server

    @check("OpenPageChannel")
    def _():
        r = stub.OpenPageChannel(pb.OpenPageChannelRequest(seed=state["seed"], transport="tcp"), metadata=md, timeout=T)
        assert r.transport == "tcp" and r.page_server, r

    @check("DropSeed")
    def _():
        stub.DropSeed(state["pid_seed"], metadata=md, timeout=T)

    @check("NOT_FOUND")
    def _():
        expect_status(C.NOT_FOUND, stub.GetSeed, state["pid_seed"], metadata=md, timeout=T)
        expect_status(C.NOT_FOUND, stub.KillInstance, pb.KillInstanceRequest(instance_id="nope"), metadata=md, timeout=T)

    @check("INVALID_ARGUMENT")
    def _():
        bad = pb.SpawnRequest(seed=state["seed"], prefetch="sideways")
        expect_status(C.INVALID_ARGUMENT, lambda: list(stub.Spawn(bad, metadata=md)))
        expect_status(C.INVALID_ARGUMENT, stub.CreateSeed, pb.CreateSeedRequest(), metadata=md, timeout=T)

    @check("FAILED_PRECONDITION")
    def _():
        cmd = pb.StartCommand(argv=[a.python, "-c", "import sys; sys.stderr.write('no ' + 'luck\\n'); sys.exit(3)"],
                              ready_line="ready")
        msg = expect_status(C.FAILED_PRECONDITION, stub.CreateSeed, pb.CreateSeedRequest(command=cmd),
                            metadata=md, timeout=T)
        # The command's stderr (not its argv) is in the message.
        assert "no luck" in msg, msg
        expect_status(C.FAILED_PRECONDITION, stub.KillInstance,
                      pb.KillInstanceRequest(instance_id=state["ended"]), metadata=md, timeout=T)

    @check("DEADLINE_EXCEEDED")
    def _():
        cmd = pb.StartCommand(argv=["sleep", "30"], ready_line="ready", ready_timeout_ms=300)
        expect_status(C.DEADLINE_EXCEEDED, stub.CreateSeed, pb.CreateSeedRequest(command=cmd), metadata=md, timeout=T)

    @check("PERMISSION_DENIED")
    def _():
        wrong = pb.SeedRef(id=state["seed"].id, key="0" * 32)
        expect_status(C.PERMISSION_DENIED, stub.FetchDescriptor, wrong, metadata=md, timeout=T)
        if tcp:
            expect_status(C.PERMISSION_DENIED, stub.GetSeed, wrong, metadata=md, timeout=T)

    if tcp:
        @check("UNAUTHENTICATED")
        def _():
            expect_status(C.UNAUTHENTICATED, stub.NodeInfo, pb.NodeInfoRequest(), timeout=T)
            expect_status(C.UNAUTHENTICATED, stub.NodeInfo, pb.NodeInfoRequest(),
                          metadata=(("authorization", "Bearer wrong"),), timeout=T)

    stub.DropSeed(state["seed"], metadata=md, timeout=T)
    channel.close()
    failed = [n for n, e in results if e is not None]
    print(f"grpcio {grpc.__version__} {'tcp' if tcp else 'unix'}: {len(results) - len(failed)} checks ok, {len(failed)} failing {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
