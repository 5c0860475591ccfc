"""A warm CPython asyncio process (its event loop's epoll, self-pipe
socketpair, a listening TCP socket), for the restore tests of runtimes
that hold kernel objects. Standard library only.

It starts a TCP server on 127.0.0.1 (port 0: the kernel picks;
SO_REUSEPORT set) that answers each line it receives with the line in
upper case, reads its stdin through loop.connect_read_pipe (a
StreamReader), warms up (a few requests of every kind), prints
"ready", then answers each stdin line:

    N    fib=<fib(N)> sleep=ok tcp=<HELLO: what its own server answered
         to 'hello' over a new loopback connection; ERROR:<exception> if
         none answered within 5 s>
    pid  pid=<os.getpid()>

one line per request, in order, and exits 0 at end of input. Its stdin
must be a pipe, a socket or a terminal (epoll must accept it): otherwise
it exits 1 at once.

Note for restores: with SO_REUSEPORT, a child that binds a new listener
on the same port joins the parent's group, and the kernel spreads new
connections over the group by their addresses: those that land on a
listener whose process does not accept (a stopped parent) wait there.
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
    """'HELLO' from a server listening on port, or what went wrong.

    Children of one seed on one node each listen on the port
    (SO_REUSEPORT), and the kernel spreads connections over all of them: a
    connection may be queued at a sibling that exits before accepting it,
    which resets it (unless net.ipv4.tcp_migrate_req is set), as for any
    pre-fork server with SO_REUSEPORT. A client retries; so does this."""
    last = "none"
    for _ in range(20):
        got = await tcp_hello_once(port)
        if not got.startswith("ERROR:Connection"):
            return got
        last = got
    return last


async def tcp_hello_once(port):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, asyncio.TimeoutError) as e:
        return f"ERROR:{type(e).__name__}"
    try:
        writer.write(b"hello\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.readline(), 5)
        return reply.decode().strip() or "ERROR:ConnectionClosed"
    except (OSError, asyncio.TimeoutError) as e:
        return f"ERROR:{type(e).__name__}"
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


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


async def serve(port):
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        raw = await reader.readline()
        if not raw:
            break
        line = raw.decode().strip()
        if line:
            sys.stdout.write(await answer(line, port) + "\n")
            sys.stdout.flush()


def main():
    check_stdin()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        asyncio.start_server(upper_echo, host="127.0.0.1", port=0, reuse_port=True)
    )
    port = server.sockets[0].getsockname()[1]
    for i in range(20):
        loop.run_until_complete(answer(str(i), port))
    print("ready", flush=True)
    # Warm, the loop stopped, its epoll set, self-pipe and server in place:
    # the process waits here for its first request. A process captured
    # inside a running loop cannot run that loop in a child: CPython keeps
    # the running loop with its pid, and in a child (another pid)
    # get_running_loop() fails, as after os.fork().
    select.select([0], [], [])
    loop.run_until_complete(serve(port))
    server.close()
    loop.run_until_complete(server.wait_closed())
    loop.close()


if __name__ == "__main__":
    main()
