# A function runtime that warms up, checkpoints, and serves: the parent
# prints its seed id and carries on; each child computes with the warm state.
# Each child is a new fork: random is reseeded, and an on_restore hook runs.
import json, os, random, sys
import remotefork

table = {i: i * i for i in range(50000)}   # the "warm" state
random.seed(42)                             # every child would draw the same without a reseed
hook = {}
remotefork.on_restore(lambda: hook.update(pid=os.getpid()))
cp = remotefork.checkpoint("coop-python")
if cp.is_child:
    print(json.dumps({"child": cp.index, "instance": cp.instance_id, "args": cp.args,
                      "sum": sum(table.values()), "line": sys.stdin.readline().strip(),
                      "hook_pid": hook.get("pid"), "random": random.random()}), flush=True)
    sys.exit(0)
print("parent seed=" + cp.seed_id, flush=True)
print("parent continues", len(table), flush=True)
