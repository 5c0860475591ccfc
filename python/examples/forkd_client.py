"""forkd from Python: make a seed of a warm function, start children from
it, talk to them, list and kill instances, read the node.

    python3 -m remotefork.generate            # once: the gRPC stubs
    PYTHONPATH=python python3 python/examples/forkd_client.py [ADDR]

ADDR is ``unix:PATH`` or ``HOST:PORT`` (then ``FORKD_TOKEN_FILE`` names the
token file); default ``FORKD_ADDR`` or ``unix:/run/forkd/forkd.sock``.
"""

import json
import sys

from remotefork.client import Client, NotFound

# The function: its warm state (a table built once) is what children share.
FUNCTION = r"""
import json, os, sys, time
table = [i * i for i in range(100000)]
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req.get("sleep"):
        time.sleep(req["sleep"])
    print(json.dumps({"pid": os.getpid(), "n": req["n"], "square": table[req["n"]]}), flush=True)
"""


def main(addr=None):
    with Client(addr) as forkd:
        node = forkd.node_info()
        print(f"node {node.hostname}: forkd {node.version}, {node.seeds} seeds, {node.instances_running} running")

        seed = forkd.create_seed(command=[sys.executable, "-c", FUNCTION], ready_line="ready",
                                 name="example", env={"EXAMPLE": "1"})
        print(f"seed {seed.id}: {seed.image_bytes / 2**20:.1f} MiB, parent paused {seed.pause_us} us")

        # Ready before the first child: the node's template is built now.
        ready = forkd.prepare(seed.ref)
        assert ready["seed"] == seed.id and ready["template_built"], ready
        print(f"prepared in {ready['ms']:.1f} ms")

        # Three children, one request each (the seed's key comes along in
        # seed.ref: over TCP, spawning needs it); every one answers from the warm table.
        for child in forkd.run(seed.ref, count=3, stdin=b'{"n": 12}\n'):
            answer = json.loads(child.stdout)
            assert child.ok and answer["pid"] == child.pid and answer["square"] == 144, child
            print(f"child {child.index} pid {child.pid}: {answer} "
                  f"(running after {child.time_to_running_ms:.1f} ms, {child.faults} faults)")

        # Events as they happen; a long request is killed once it runs.
        for ev in forkd.spawn(seed.ref, stdin=b'{"n": 3, "sleep": 60}\n', labels={"job": "long"}):
            if ev.kind == "running":
                running = [i for i in forkd.list_instances(seed.id) if i.state == "running"]
                print(f"running: {[i.id for i in running]}")
                forkd.kill(ev.instance_id)
            elif ev.kind == "exited":
                print(f"instance {ev.instance_id} ended by signal {ev.signal}")
                assert ev.signal == 9

        forkd.drop_seed(seed.id, seed.key)
        try:
            forkd.get_seed(seed.id, seed.key)
        except NotFound as e:
            print(f"dropped: {e.message}")
    print("example ok")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
