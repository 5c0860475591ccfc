"""An example function for the gateway: boto3 imported and an S3 client built
once, before the checkpoint; every instance answers from that warm state.

Register it with:
    curl -X POST localhost:8080/functions -d '{"name": "s3", "command":
      ["python3", "-m", "remotefork.runtime", "python/examples/s3_handler.py"],
      "env": {"PYTHONPATH": "python"}}'
and call it with:
    curl -X POST localhost:8080/invoke/s3 -d '{"n": 3}'

The event may also ask for misbehaviour, for testing the gateway:
{"raise": "msg"} raises, {"crash": true} kills the process, {"hang": true}
never answers, {"sleep_ms": N} answers after N ms.
"""

import os
import time

import boto3

client = boto3.client("s3", region_name="us-east-1")
squares = {i: i * i for i in range(10000)}  # warm state built once


def handler(event):
    event = event or {}
    if "raise" in event:
        raise ValueError(event["raise"])
    if event.get("crash"):
        os.kill(os.getpid(), 9)
    if event.get("hang"):
        while True:
            time.sleep(3600)
    if "sleep_ms" in event:
        time.sleep(event["sleep_ms"] / 1000)
    n = int(event.get("n", 0))
    return {
        "n": n,
        "square": squares.get(n, n * n),
        "region": client.meta.region_name,
        "service": client.meta.service_model.service_name,
        "pid": os.getpid(),
    }
