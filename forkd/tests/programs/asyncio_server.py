"""A warm CPython asyncio process (its event loop's epoll, self-pipe
socketpair, a listening TCP socket), for the restore tests of runtimes
that hold kernel objects. Standard library only.

It starts a TCP server on 127.0.0.1 (port 0: the kernel picks;
SO_REUSEPORT set) that answers each line it receives with the line in
upper case, reads its stdin through loop.connect_read_pipe (a
StreamReader), warms up (a few requests of every kind), prints
"ready port=PORT", then answers each stdin line:

    N    fib=<fib(N)> sleep=ok tcp=<HELLO: what its own server answered
         to 'hello' over a new loopback connection>
    pid  pid=<os.getpid()>

one line per request, in order, and exits 0 at end of input.
"""

import asyncio
import os
import select
import sys


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


async def upper_echo(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write(line.upper())
            await writer.drain()
    finally:
        writer.close()


async def tcp_hello(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"hello\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.readline(), 10)
        return reply.decode().strip() or "EOF"
    finally:
        writer.close()
        await writer.wait_closed()


async def answer(line, port):
    if line == "pid":
        return f"pid={os.getpid()}"
    try:
        n = int(line)
    except ValueError:
        return f"error=bad request {line!r}"
    if n < 0:
        return f"error=bad request {line!r}"

    async def sleep_ok():
        await asyncio.sleep(0.005)
        return "ok"

    slept, tcp = await asyncio.gather(sleep_ok(), tcp_hello(port))
    return f"fib={fib(n)} sleep={slept} tcp={tcp}"


def check_stdin():
    """connect_read_pipe needs a stdin that epoll accepts (a pipe, a
    socket, a terminal): a regular file or /dev/null would otherwise fail
    inside a loop callback and leave the program waiting for ever."""
    ep = select.epoll()
    try:
        ep.register(sys.stdin.fileno(), select.EPOLLIN)
    except OSError as e:
        raise SystemExit(f"asyncio_server: stdin cannot be watched by epoll ({e}): give it a pipe")
    finally:
        ep.close()


async def main():
    check_stdin()
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(upper_echo, host="127.0.0.1", port=0, reuse_port=True)
    port = server.sockets[0].getsockname()[1]

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    for i in range(20):
        await answer(str(i), port)
    print(f"ready port={port}", flush=True)

    while True:
        raw = await reader.readline()
        if not raw:
            break
        line = raw.decode().strip()
        if not line:
            continue
        sys.stdout.write(await answer(line, port) + "\n")
        sys.stdout.flush()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
