"""A function run in the container tests' OCI bundle (forkd/scripts/oci-bundle.sh).

Warm-up imports boto3 and makes an S3 client (no network is used), then
prints its ready line and answers one JSON line per command on stdin:

  info              what the process sees: os-release, a module only the
                    container has, pid, hostname, the pids in /proc, its
                    network interfaces, a fresh random number
  write PATH TEXT   write TEXT to PATH
  read PATH         PATH's text
  kill PID SIG      os.kill(PID, SIG)
  alloc MB          allocate and touch MB MiB
  forkbomb N        fork N children that sleep; how many were made
  tcp               listen on 127.0.0.1 and connect to it: is loopback up?
  sleep S           answer after S seconds
  {"n": N}          an invocation (the gateway's one-shot mode): N squared,
                    with the os-release and pids this instance sees
"""

import json
import os
import random
import signal
import socket
import sys
import time

import boto3
import rf_container_only

session = boto3.session.Session()
client = session.client(
    "s3",
    region_name="eu-west-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)
kept = []


def os_release():
    with open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return ""


def answer(cmd):
    if cmd.startswith("{"):
        n = json.loads(cmd).get("n", 0)
        return {
            "square": n * n,
            "os": os_release(),
            "pid": os.getpid(),
            "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
            "region": client.meta.region_name,
        }
    words = cmd.split(" ", 2)
    op = words[0]
    if op == "info":
        return {
            "os": os_release(),
            "marker": rf_container_only.VALUE,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
            "net": sorted(name for _, name in socket.if_nameindex()),
            "random": random.getrandbits(64),
            "boto3": boto3.__version__,
            "region": client.meta.region_name,
        }
    if op == "write":
        try:
            with open(words[1], "w") as f:
                f.write(words[2])
            return {"ok": True}
        except OSError as e:
            return {"ok": False, "error": e.strerror}
    if op == "read":
        try:
            with open(words[1]) as f:
                return {"ok": True, "text": f.read()}
        except OSError as e:
            return {"ok": False, "error": e.strerror}
    if op == "kill":
        try:
            os.kill(int(words[1]), int(words[2]))
            return {"ok": True}
        except OSError as e:
            return {"ok": False, "error": e.strerror}
    if op == "alloc":
        mb = int(words[1])
        b = bytearray(mb << 20)
        for i in range(0, len(b), 4096):
            b[i] = 1
        kept.append(b)
        return {"ok": True, "mb": mb}
    if op == "forkbomb":
        made, error = 0, None
        for _ in range(int(words[1])):
            try:
                pid = os.fork()
            except OSError as e:
                error = e.strerror
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            made += 1
        return {"made": made, "error": error}
    if op == "sleep":
        time.sleep(float(words[1]))
        return {"ok": True}
    if op == "tcp":
        try:
            with socket.socket() as srv, socket.socket() as cli:
                srv.bind(("127.0.0.1", 0))
                srv.listen(1)
                cli.settimeout(5)
                cli.connect(srv.getsockname())
            return {"ok": True}
        except OSError as e:
            return {"ok": False, "error": e.strerror}
    return {"error": "unknown command " + op}


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    print(json.dumps(answer(line)), flush=True)
# Input ended: leave without the interpreter's finalisation (tens of ms
# with boto3 loaded), as a serverless handler does.
os._exit(0)
