"""A warm numpy process with OpenBLAS's threads running, for the
multi-threaded restore tests (forkd/tests/threads.rs).

As a program: builds two 200x200 float64 matrices of small integers (so
every product is exact), multiplies them once (OpenBLAS's worker threads
run), checks /proc/self/task has more than one thread where the machine
has more than one CPU (the count goes to stderr), prints "ready", then
answers each stdin line "N" with one JSON line

    {"n": N, "trace": trace((N*A) @ B), "sum": sum((N*A) @ B), "threads": T}

(T: the tasks in /proc/self/task) and exits at end of input. The matrices
are A[i][k] = (7i + 3k) % 10 and B[k][j] = (5k + 11j) % 9, so a test can
compute the answers itself.

As a function for the gateway (`python3 -m remotefork.runtime
numpy_server.py`): `warmup()` does the first product, `handler({"n": N})`
returns the same object with the instance's "pid" added.
"""

import json
import os
import sys

import numpy as np

SIZE = 200
_i = np.arange(SIZE).reshape(SIZE, 1)
_j = np.arange(SIZE).reshape(1, SIZE)
A = ((7 * _i + 3 * _j) % 10).astype(np.float64)
B = ((5 * _i + 11 * _j) % 9).astype(np.float64)


def threads():
    return len(os.listdir("/proc/self/task"))


def answer(n):
    c = (A * n) @ B
    return {"n": n, "trace": int(round(float(np.trace(c)))), "sum": int(round(float(c.sum()))), "threads": threads()}


def warmup():
    """One product: OpenBLAS's threads are started and have worked."""
    c = A @ B
    assert float(c.sum()) == float(A.sum(axis=0) @ B.sum(axis=1))
    t = threads()
    print(f"numpy_server: {t} threads in /proc/self/task", file=sys.stderr, flush=True)
    if (os.cpu_count() or 1) > 1 and t <= 1:
        raise SystemExit(f"numpy_server: OpenBLAS started no threads ({t} task) on {os.cpu_count()} CPUs")
    return t


def handler(event):
    return dict(answer(int(event["n"])), pid=os.getpid())


def main():
    warmup()
    print("ready", flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        print(json.dumps(answer(int(line))), flush=True)


if __name__ == "__main__":
    main()
