"""Other Python Kinesis producers, run against the benchmark's endpoint for comparison.

``bench.py --peers`` creates a virtual environment (PEERS_VENV, only when asked; never by the test
suite), installs PEERS into it from the package index, and runs this file with that
environment's Python once per producer:

    peers.py PRODUCER URL LINES SIZE SECONDS  ->  one JSON line on stdout

Each producer sends up to LINES lines of SIZE bytes (stamped as bench.py's clients stamp them,
so the endpoint counts them and samples latency) for at most SECONDS, waits for every record
to be resolved, and reports lines, seconds and its own CPU. None of them is durable before
it acknowledges: the lines live in the producer's memory only.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import random
import resource
import sys
import time
from typing import Any

# What --peers installs, pinned to the versions the comparison table was measured with.
PEERS = ("aiokpl==0.2.0", "async-kinesis[kpl]==3.0.1", "boto3")
PEERS_VENV = os.path.expanduser("~/.cache/spoold-bench/peers")
PRODUCERS = ("boto3", "async-kinesis", "async-kinesis-kpl", "aiokpl")
# Producers with a rate limiter of their own get the limits of a stream far bigger than the
# endpoint's single shard: what is measured is their CPU, not their pacing.
UNLIMITED_SHARD_RECORDS = 10_000_000
KEYS = {"aws_access_key_id": "AKIDSPOOLDBENCH", "aws_secret_access_key": "spoold-bench-secret"}
REGION = "us-east-1"
STAMP_HEX = 16


def line(size: int, tag: bytes) -> bytes:
    head = b"%016x" % time.monotonic_ns() + tag
    return head + b"x" * (size - len(head))


def _peer_module(name: str) -> Any:
    # By name: these packages live in the peers' virtual environment only, never in spoold's own
    # (whose imports tests/unit/test_packaging.py checks against pyproject.toml).
    return importlib.import_module(name)


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_boto3(url: str, lines: int, size: int, seconds: float) -> int:
    import boto3

    client = boto3.client("kinesis", endpoint_url=url, region_name=REGION, **KEYS)
    rng = random.Random(1)
    sent = 0
    end = time.monotonic() + seconds
    while sent < lines and time.monotonic() < end:
        k = min(500, lines - sent)
        records = [{"Data": line(size, b" peer "), "PartitionKey": f"{rng.getrandbits(64):016x}"} for _ in range(k)]
        while records:
            resp = client.put_records(StreamName="peer-boto3", Records=records)
            records = [r for r, res in zip(records, resp["Records"]) if "ErrorCode" in res]
        sent += k
    return sent


async def run_async_kinesis(url: str, lines: int, size: int, seconds: float, kpl: bool) -> int:
    processors = _peer_module("kinesis.processors")
    Producer = _peer_module("kinesis").Producer
    os.environ.setdefault("AWS_ACCESS_KEY_ID", KEYS["aws_access_key_id"])
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", KEYS["aws_secret_access_key"])
    stream = "peer-async-kinesis" + ("-kpl" if kpl else "")
    processor = processors.KPLStringProcessor() if kpl else processors.StringProcessor()
    sent = 0
    end = time.monotonic() + seconds
    async with Producer(stream, endpoint_url=url, region_name=REGION, processor=processor, buffer_time=0.2,
                        put_rate_limit_per_shard=UNLIMITED_SHARD_RECORDS, put_bandwidth_limit_per_shard=1024) as producer:
        rng = random.Random(1)
        while sent < lines and time.monotonic() < end:
            # Its KPL aggregator refuses partition keys of the caller's: it draws its own.
            key = None if kpl else f"{rng.getrandbits(64):016x}"
            await producer.put(line(size, b" peer ").decode(), partition_key=key)
            sent += 1
        await producer.flush()
    return sent


async def run_aiokpl(url: str, lines: int, size: int, seconds: float) -> int:
    aiokpl = _peer_module("aiokpl")
    Config, Producer = aiokpl.Config, aiokpl.Producer
    config = Config(region=REGION, endpoint_url=url, verify_ssl=False, **KEYS)
    rng = random.Random(1)
    sent = 0
    outcomes: list[Any] = []
    end = time.monotonic() + seconds
    async with Producer(config) as producer:
        while sent < lines and time.monotonic() < end:
            outcomes.append(await producer.put_record(stream="peer-aiokpl", partition_key=f"{rng.getrandbits(64):016x}",
                                                      data=line(size, b" peer ")))
            sent += 1
        await producer.flush()
    return sent


def main(argv: list[str]) -> int:
    producer, url, lines, size, seconds = argv[0], argv[1], int(argv[2]), int(argv[3]), float(argv[4])
    if producer not in PRODUCERS:
        raise SystemExit(f"unknown producer {producer!r}; one of {', '.join(PRODUCERS)}")
    cpu0 = cpu()
    t0 = time.monotonic()
    result: dict[str, Any] = {"producer": producer}
    try:
        if producer == "boto3":
            result["lines"] = run_boto3(url, lines, size, seconds)
        elif producer == "aiokpl":
            result["lines"] = asyncio.run(run_aiokpl(url, lines, size, seconds))
        else:
            result["lines"] = asyncio.run(run_async_kinesis(url, lines, size, seconds, kpl=producer.endswith("kpl")))
    except Exception as exc:  # the producer failed: reported, with what the endpoint got before
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        result["error"] = f"{type(exc).__name__}: {exc}"[:300]
    result.update(seconds=time.monotonic() - t0, cpu_s=cpu() - cpu0)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
