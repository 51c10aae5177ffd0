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
import threading
import time
from pathlib import Path
from typing import Any

DEMO_STREAM = "spoold-demo"
DEMO_REGION = "us-east-1"
DEMO_KEYS = {"AWS_ACCESS_KEY_ID": "AKIDSPOOLDDEMO", "AWS_SECRET_ACCESS_KEY": "spoold-demo-secret"}
# Seconds the demo waits for the daemon to start and for the records to arrive.
DEMO_DEADLINE = 30.0


class LockedApp:
    """moto's Kinesis store is not thread-safe (concurrent PutRecords can lose records after a
    200 answer), so requests are served one at a time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self.lock:
            return list(self.app(environ, start_response))


class MotoServer:
    """moto's server on 127.0.0.1 and a free port, in a thread of this process."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app  # type: ignore[attr-defined]
        from werkzeug.serving import WSGIRequestHandler, make_server

        class QuietHandler(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        app = LockedApp(DomainDispatcherApplication(create_backend_app))
        self.server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> MotoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)

    def client(self, service: str = "kinesis", region: str = DEMO_REGION) -> Any:
        import boto3

        return boto3.client(
            service, endpoint_url=self.url, region_name=region,
            aws_access_key_id=DEMO_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DEMO_KEYS["AWS_SECRET_ACCESS_KEY"],
        )


def read_stream(kinesis: Any, stream: str) -> list[tuple[str, bytes]]:
    """Every record in every shard, from the start: (partition key, data)."""
    out: list[tuple[str, bytes]] = []
    shards = kinesis.describe_stream(StreamName=stream)["StreamDescription"]["Shards"]
    for shard in shards:
        it = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            reply = kinesis.get_records(ShardIterator=it, Limit=10000)
            out.extend((r["PartitionKey"], r["Data"]) for r in reply["Records"])
            if not reply["Records"]:
                break
            it = reply.get("NextShardIterator")
    return out


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
        kinesis = moto_srv.client()
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
