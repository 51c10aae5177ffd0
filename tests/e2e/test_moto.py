"""The real daemon against moto's real Kinesis emulator: what goes in comes back, byte for byte."""

from __future__ import annotations

import os
import random
import subprocess
import sys

from spoold.testing import read_stream
from tests.tools.client import DEADLINE, send_lines, wait_until


def test_round_trip_binary_and_near_limit_lines(make_daemon, moto_server):
    kinesis = moto_server.client()
    kinesis.create_stream(StreamName="rt", ShardCount=3)
    max_line = 1024 * 1024 - 256
    rng = random.Random(5)
    lines = [f"line {i} {'x' * rng.randrange(200)}".encode() for i in range(2000)]
    # every byte value but "\n", including invalid UTF-8 and NULs
    lines.append(bytes(b for b in range(256) if b != 10) * 3)
    lines.append(b"\xff\xfe\x00 \r tab\t" + os.urandom(64).replace(b"\n", b"!"))
    lines.append(b"n" * max_line)  # exactly the default limit
    daemon = make_daemon({"stream": "rt", "endpoint_url": moto_server.url, "max_in_flight": 1}).start()
    sock = daemon.sockets()[0]
    half = len(lines) // 2
    a = send_lines(sock, b"\n".join(lines[:half]) + b"\n")
    b = send_lines(sock, b"\n".join(lines[half:]))  # the last line is unterminated: it counts
    assert a == {"accepted": half, "rejected": 0}
    assert b == {"accepted": len(lines) - half, "rejected": 0}

    got = wait_until(lambda: (r := read_stream(kinesis, "rt")) and len(r) >= len(lines) and r,
                     what="every record in moto")
    assert sorted(data for _, data in got) == sorted(lines)
    keys = {key for key, _ in got}
    assert len(keys) > len(lines) // 2, "partition keys should be random per record"
    assert all(1 <= len(k) <= 256 for k in keys)
    assert daemon.stop() == 0
    assert daemon.spool_rows() == 0, "every accepted row leaves the spool"


def test_partition_key_from_json_field(make_daemon, moto_server):
    kinesis = moto_server.client()
    kinesis.create_stream(StreamName="keyed", ShardCount=1)
    daemon = make_daemon({"stream": "keyed", "endpoint_url": moto_server.url,
                          "partition_key_field": "user", "max_in_flight": 1}).start()
    payload = b'{"user": "alice", "n": 1}\n{"user": 42}\nnot json\n{"other": 1}\n'
    assert send_lines(daemon.sockets()[0], payload)["accepted"] == 4
    got = wait_until(lambda: (r := read_stream(kinesis, "keyed")) and len(r) >= 4 and r, what="4 records")
    by_data = {data: key for key, data in got}
    assert by_data[b'{"user": "alice", "n": 1}'] == "alice"
    assert by_data[b'{"user": 42}'] == "42"
    assert len(by_data[b"not json"]) == 16  # random fallback
    assert len(by_data[b'{"other": 1}']) == 16
    daemon.stop()


def test_demo_delivers_every_line_exactly_once(tmp_path):
    # The README's first command: moto, the daemon and `spoold send`, each for real.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-aws-files")
    done = subprocess.run([sys.executable, "-m", "spoold", "demo"], env=env, capture_output=True,
                          timeout=DEADLINE * 2)
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "read back 1001 records" in out
    assert "every line arrived exactly once, byte for byte: yes" in out
