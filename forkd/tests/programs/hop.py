# Multi-hop: a seed on node A (cooperative checkpoint); a child on node B
# checkpoints itself again (its args name B's cooperative socket); children
# of that second seed on node C compute with state from both hops.
import json, os, sys, traceback
import remotefork

hop0 = {i: i * 3 for i in range(20000)}
cp = remotefork.checkpoint("hop0")
if not cp.is_child:
    print("hop0 seed=" + cp.seed_id, flush=True)
    sys.exit(0)
os.environ["FORKD_COOP_SOCKET"] = cp.args
hop1 = [sum(hop0.values()) + k for k in range(1000)]
try:
    cp2 = remotefork.checkpoint("hop1")
except Exception:
    print("hop1 failed: " + traceback.format_exc().replace("\n", " | "), flush=True)
    sys.exit(1)
if not cp2.is_child:
    print("hop1 seed=" + cp2.seed_id, flush=True)
    sys.exit(0)
print(json.dumps({"index": cp2.index, "hop0": sum(hop0.values()), "hop1": hop1[999], "pid": os.getpid()}), flush=True)
