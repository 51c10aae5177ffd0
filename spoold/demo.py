"""``spoold demo``: the whole path on one machine, nothing leaving it.

Starts moto (a third-party Kinesis emulator) in-process on 127.0.0.1, creates a stream, runs the
real daemon as a subprocess with a temporary spool, pushes sample lines through its socket with
``spoold send``, reads every record back with boto3 and prints what arrived.

moto and boto3 come with the dev extra: ``pip install -e '.[dev]'``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spoold.testing import MotoServer, read_stream

DEMO_STREAM = "spoold-demo"
DEMO_REGION = "us-east-1"
# moto does not check the signatures the daemon makes with these.
DEMO_KEYS = {"AWS_ACCESS_KEY_ID": "AKIDSPOOLDDEMO", "AWS_SECRET_ACCESS_KEY": "spoold-demo-secret"}
# Seconds the demo waits for the daemon to start and for the records to arrive.
DEMO_DEADLINE = 30.0


def main() -> int:
    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
    except ImportError:
        print("spoold demo needs the dev extra: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    lines = [f'{{"n": {i}, "msg": "hello from spoold", "host": "demo"}}'.encode() for i in range(1, 1001)]
    lines.append("non-UTF-8 bytes survive: \xff\xfe".encode("latin-1"))
    with tempfile.TemporaryDirectory(prefix="spoold-demo-") as tmp, MotoServer() as moto_srv:
        kinesis = moto_srv.client(region=DEMO_REGION)
        kinesis.create_stream(StreamName=DEMO_STREAM, ShardCount=2)
        print(f"moto Kinesis on {moto_srv.url}; stream {DEMO_STREAM!r} with 2 shards")
        sock = Path(tmp) / "demo.sock"
        config = Path(tmp) / "spoold.toml"
        config.write_text(
            f'[spool]\npath = "{tmp}/spool.db"\n\n'
            f'[log]\nformat = "console"\n\n'
            f'[[destination]]\nname = "demo"\nkind = "kinesis"\nsocket = "{sock}"\n'
            f'stream = "{DEMO_STREAM}"\nregion = "{DEMO_REGION}"\nendpoint_url = "{moto_srv.url}"\n'
            f'linger = "50ms"\n'
        )
        env = {**os.environ, **DEMO_KEYS}
        daemon = subprocess.Popen([sys.executable, "-m", "spoold", "run", "--config", str(config)],
                                  env=env, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + DEMO_DEADLINE
            while not sock.exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print("the daemon did not start:\n" + (daemon.stderr.read().decode() if daemon.stderr else ""))
                    return 1
                time.sleep(0.05)
            print(f"daemon up, socket {sock}; sending {len(lines)} lines with `spoold send`")
            sent = subprocess.run([sys.executable, "-m", "spoold", "send", "--socket", str(sock)],
                                  input=b"\n".join(lines) + b"\n", capture_output=True)
            print(f"acknowledgement (the lines are durable in the spool now): {sent.stdout.decode().strip()}")
            got: list[tuple[str, bytes]] = []
            while time.monotonic() < deadline:
                got = read_stream(kinesis, DEMO_STREAM)
                if len(got) >= len(lines):
                    break
                time.sleep(0.2)
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
        arrived = sorted(data for _, data in got)
        ok = arrived == sorted(lines)
        print(f"read back {len(got)} records from the stream with boto3 GetRecords:")
        for key, data in got[:3]:
            print(f"  key={key} data={data!r}")
        print(f"  ... every line arrived exactly once, byte for byte: {'yes' if ok else 'NO'}")
        return 0 if ok else 1
