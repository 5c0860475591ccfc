"""A Python process with a worker thread, for the multi-threaded restore
tests (forkd/tests/threads.rs).

A `threading.Thread` named "rf-worker" takes requests from one
`queue.Queue` and puts its answers on another. Once it runs (it answered a
first, internal request), the main thread prints "ready"; then for each
stdin line it puts the line in, gets the worker's answer and prints it as
one JSON line:

    {"got": LINE, "sha256": hex sha256 of LINE (UTF-8, without newline),
     "seq": how many requests the worker has answered (1 for the first line),
     "worker": its thread name, "tls": its threading.local value,
     "threads": threading.active_count(), "tasks": tasks in /proc/self/task}

and exits at end of input (the worker is told to stop first).
"""

import hashlib
import json
import os
import queue
import sys
import threading

requests = queue.Queue()
answers = queue.Queue()
local = threading.local()
WARM = object()  # the warm-up request


def worker():
    local.value = "worker-local"
    seq = 0
    while True:
        item = requests.get()
        if item is None:
            return
        if item is WARM:
            answers.put(None)
            continue
        seq += 1
        answers.put({
            "got": item,
            "sha256": hashlib.sha256(item.encode()).hexdigest(),
            "seq": seq,
            "worker": threading.current_thread().name,
            "tls": local.value,
            "threads": threading.active_count(),
            "tasks": len(os.listdir("/proc/self/task")),
        })


def main():
    local.value = "main-local"
    t = threading.Thread(target=worker, name="rf-worker", daemon=True)
    t.start()
    requests.put(WARM)
    answers.get()
    print("ready", flush=True)
    for line in sys.stdin:
        requests.put(line.rstrip("\n"))
        a = answers.get(timeout=60)
        assert local.value == "main-local"
        print(json.dumps(a), flush=True)
    requests.put(None)
    t.join(timeout=10)


if __name__ == "__main__":
    main()
