# checkpoint(all_threads=True): a warm worker thread serving a queue is in
# the seed; each child hands it a job and gets the answer from it.
import json, os, queue, random, sys, threading
import remotefork

table = {i: i * i for i in range(50000)}
jobs, results = queue.Queue(), queue.Queue()

def worker():
    while True:
        n = jobs.get()
        results.put((threading.current_thread().name, sum(v for k, v in table.items() if k < n)))

threading.Thread(target=worker, name="rf-worker", daemon=True).start()
jobs.put(10); results.get()                 # warm: the worker has run
random.seed(42)                             # every child would draw the same without a reseed
hook = {}
remotefork.on_restore(lambda: hook.update(pid=os.getpid()))
cp = remotefork.checkpoint("coop-python-threads", all_threads=True)
if cp.is_child:
    jobs.put(50000)
    name, total = results.get(timeout=30)
    print(json.dumps({"child": cp.index, "instance": cp.instance_id, "args": cp.args,
                      "sum": total, "worker": name, "threads": threading.active_count(),
                      "line": sys.stdin.readline().strip(),
                      "hook_pid": hook.get("pid"), "random": random.random()}), flush=True)
    sys.exit(0)
jobs.put(50000)
print("parent seed=" + cp.seed_id, flush=True)
print("parent continues", results.get(timeout=30)[1], threading.active_count(), flush=True)
