"""An ``async def`` handler for the Python runtime (remotefork.runtime),
run on the loop the runtime made before its checkpoint: answers {"n": N}
with {"n", "fib", "slept" (after asyncio.sleep: the loop's epoll timeout),
"woken" (a value a new thread hands to the loop with call_soon_threadsafe,
which wakes it through its self-pipe socket pair), "pid"}."""

import asyncio
import os
import threading


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


async def warmup():
    for i in range(20):
        await handler({"n": i})


async def handler(event):
    n = int(event["n"])
    await asyncio.sleep(0.002)
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    threading.Thread(target=lambda: loop.call_soon_threadsafe(fut.set_result, n * 2)).start()
    woken = await asyncio.wait_for(fut, 10)
    return {"n": n, "fib": str(fib(n)), "slept": True, "woken": woken, "pid": os.getpid()}
