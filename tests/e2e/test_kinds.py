"""The real daemon, end to end, for each kind of destination: Firehose against moto's
Firehose -> S3 and against the fault-injecting endpoint, Yandex Data Streams' stream name and
signing scope, Kinesis' stream_arn / explicit_hash_key / ordered mode, several destinations in one
daemon, and config errors on the command line.

Each test compares what arrived with what was sent, byte for byte, so that a missing or doubled
delimiter, a wrong stream name or scope, a whole-batch resend or a reordering fails it.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.tools.client import send_lines, wait_until
from tests.tools.daemon import TEST_KEYS, spool_query
from tests.tools.fakeaws import FakeAWS

# A destination key with this value is removed from the config make_daemon writes (it sets
# stream and region for every destination; yds and stream_arn destinations must not have them).
DROP = "<drop this key>"
# How long a healthy destination may take while another one is failing: far less than DEADLINE.
PROMPTLY = 5.0
REPO = Path(__file__).resolve().parents[2]
YDS_STREAM = "/ru-central1/b1gfolder/etn0db/mystream"
ARN = "arn:aws:kinesis:us-east-1:123456789012:stream/arnstream"
# 2**127 + 5 falls in the third of four even shards: shardId-000000000002.
EXPLICIT_HASH_KEY = str(2**127 + 5)
FAST_RETRY = {"retry_base": "5ms", "retry_cap": "100ms", "retry_cap_throttle": "50ms"}


def _daemon(make_daemon: Any, *dests: dict[str, Any], **kwargs: Any) -> Any:
    daemon = make_daemon(*dests, **kwargs)
    drop = " = " + json.dumps(DROP)
    kept = [line for line in daemon.config.read_text().splitlines(keepends=True) if not line.rstrip().endswith(drop)]
    daemon.config.write_text("".join(kept))
    return daemon


def _lines(n: int, tag: str = "l") -> list[bytes]:
    """Distinct lines of varied length, some of them not UTF-8, none containing a newline."""
    odd = [b"\xff\xfe caf\xe9", b"nul \x00 byte", b"tab\there", b"cr \r inside", b"ends with cr\r"]
    return [f"{tag}-{i:05d} {'x' * (i * 37 % 300)}".encode() + odd[i % len(odd)] for i in range(n)]


def _payload(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def _split_record(data: bytes, delimiter: bytes) -> list[bytes]:
    """The lines of one Firehose record (or S3 object): whole lines, each followed by the delimiter."""
    assert data.endswith(delimiter), f"record does not end with the delimiter: {data[-40:]!r}"
    return data[: len(data) - len(delimiter)].split(delimiter)


def _wait_acknowledged(daemon: Any) -> None:
    """Until every spooled row is gone: the service acknowledged all its lines. Waiting on this
    rather than on what arrived keeps a wrong delimiter from turning into a mere timeout."""
    wait_until(lambda: daemon.spool_rows() == 0, what="the service to acknowledge every line")


def _spooled(daemon: Any, dest: str, column: str = "lines") -> int:
    """Lines (or bytes) of ``dest`` still in the spool file."""
    assert column in ("lines", "bytes")
    query = f"SELECT coalesce(sum({column}), 0) FROM chunks WHERE dest = ?"
    return int(spool_query(daemon.tmp / "spool.db", query, dest)[0][0])


def _status(daemon: Any) -> dict[str, Any]:
    doc = daemon.status()
    assert doc["running"], "status should come from the running daemon"
    return doc



class _FieldsSeen(FakeAWS):
    """FakeAWS that also remembers which stream fields each Kinesis request named."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream_fields: list[tuple[str | None, str | None]] = []  # (StreamName, StreamARN)

    def _kinesis_stream(self, payload: dict[str, Any], ctx: Any) -> str:
        self.stream_fields.append((payload.get("StreamName"), payload.get("StreamARN")))
        return super()._kinesis_stream(payload, ctx)


@pytest.fixture
def fields_aws() -> Iterator[_FieldsSeen]:
    srv = _FieldsSeen(access_key=TEST_KEYS["AWS_ACCESS_KEY_ID"], secret_key=TEST_KEYS["AWS_SECRET_ACCESS_KEY"],
                      verify=True, store=True, seed=9, shards=4)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------- firehose


def _bucket_objects(s3: Any, bucket: str) -> list[bytes]:
    return [s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for item in page.get("Contents", [])]


@pytest.mark.parametrize(("keys", "delimiter"), [
    pytest.param({}, b"\n", id="default-newline"),
    pytest.param({"delimiter": "\r\n", "pack_lines": True}, b"\r\n", id="crlf-packed"),
])
def test_firehose_to_moto_s3_gets_exactly_the_lines(make_daemon, moto_server, keys, delimiter):
    httpx.post(moto_server.url + "/moto-api/reset", timeout=30).raise_for_status()  # moto's state is per process
    s3, firehose = moto_server.client("s3"), moto_server.client("firehose")
    s3.create_bucket(Bucket="spoold-firehose")
    firehose.create_delivery_stream(
        DeliveryStreamName="fh", DeliveryStreamType="DirectPut",
        ExtendedS3DestinationConfiguration={"RoleARN": "arn:aws:iam::123456789012:role/firehose",
                                            "BucketARN": "arn:aws:s3:::spoold-firehose"})
    lines = _lines(1500)
    daemon = make_daemon({"kind": "firehose", "stream": "fh", "endpoint_url": moto_server.url, **keys}).start()
    sock = daemon.sockets()[0]
    for part in (lines[:700], lines[700:1400], lines[1400:]):  # several chunks, several requests
        assert send_lines(sock, _payload(part)) == {"accepted": len(part), "rejected": 0}

    _wait_acknowledged(daemon)  # moto writes the S3 object before it answers
    objects = _bucket_objects(s3, "spoold-firehose")
    if not keys.get("pack_lines"):
        assert len(objects) >= 3, "1,500 one-line records take at least three PutRecordBatch calls"
    # moto writes one object per PutRecordBatch: each must be whole lines, each with one delimiter.
    arrived = [line for body in objects for line in _split_record(body, delimiter)]
    assert collections.Counter(arrived) == collections.Counter(lines)
    assert sum(map(len, objects)) == sum(len(line) + len(delimiter) for line in lines)
    assert daemon.stop() == 0
    assert daemon.spool_rows() == 0


# (id, destination keys, delimiter, lines packed into records)
FIREHOSE_SHAPES = [
    ("newline", {}, b"\n", False),
    ("empty-delimiter", {"delimiter": ""}, b"", False),
    ("crlf-packed-1KiB-records", {"delimiter": "\r\n", "pack_lines": True, "max_record_bytes": 1024}, b"\r\n", True),
]


@pytest.mark.parametrize(("keys", "delimiter", "packed"), [c[1:] for c in FIREHOSE_SHAPES],
                         ids=[c[0] for c in FIREHOSE_SHAPES])
def test_firehose_records_carry_whole_lines_and_one_delimiter(make_daemon, fake_aws, keys, delimiter, packed):
    lines = _lines(600)
    if packed:
        lines.append(b"F" * (1024 - len(delimiter)))  # the longest line allowed fills a record alone
    daemon = make_daemon({"kind": "firehose", "stream": "fh", "endpoint_url": fake_aws.url, **keys}).start()
    assert send_lines(daemon.sockets()[0], _payload(lines))["accepted"] == len(lines)
    _wait_acknowledged(daemon)
    records = fake_aws.records("fh")
    assert all(r.api == "firehose" for r in records)
    if packed:
        arrived = [line for r in records for line in _split_record(r.data, delimiter)]
        assert len(records) < len(lines) / 4, "pack_lines should put many lines in one record"
        assert max(len(r.data) for r in records) <= 1024
        assert b"F" * (1024 - len(delimiter)) + delimiter in [r.data for r in records]
    elif delimiter:
        assert all(len(_split_record(r.data, delimiter)) == 1 for r in records), "one line per record"
        arrived = [r.data[: -len(delimiter)] for r in records]
    else:
        arrived = [r.data for r in records]
    assert collections.Counter(arrived) == collections.Counter(lines)
    puts = [r for r in fake_aws.requests if r.target == "Firehose_20150804.PutRecordBatch"]
    assert puts and {(r.service, r.signature_ok) for r in puts} == {("firehose", True)}
    daemon.stop()


@pytest.mark.parametrize("delimiter", ["\n", "\r\n", ""], ids=["newline", "crlf", "empty"])
def test_firehose_longest_line_fills_one_record_and_one_more_byte_is_rejected(make_daemon, fake_aws, delimiter):
    record_limit = 1000 * 1024  # Firehose's 1,000 KiB, the default max_record_bytes; fakeaws enforces it
    longest = b"L" * (record_limit - len(delimiter))
    daemon = make_daemon({"kind": "firehose", "stream": "fh", "endpoint_url": fake_aws.url,
                          "delimiter": delimiter}).start()
    answer = send_lines(daemon.sockets()[0], b"short\n" + longest + b"\n" + longest + b"M\n")
    assert answer == {"accepted": 2, "rejected": 1, "reasons": {"line too long": 1}}
    _wait_acknowledged(daemon)
    data = sorted(r.data for r in fake_aws.records("fh"))
    assert data == sorted([b"short" + delimiter.encode(), longest + delimiter.encode()])
    assert fake_aws.bad_signatures == 0 and {r.status for r in fake_aws.requests} == {200}
    daemon.stop()


# (id, destination keys, share of records failed, share of whole calls answered ServiceUnavailableException)
FIREHOSE_FAILURES = [
    ("one-line-per-record", {}, 0.3, 0.0),
    ("packed", {"pack_lines": True, "max_record_bytes": 2048}, 0.3, 0.0),
    ("whole-calls-unavailable-too", {}, 0.3, 0.3),
]


@pytest.mark.parametrize(("keys", "fail_rate", "throttle_rate"), [c[1:] for c in FIREHOSE_FAILURES],
                         ids=[c[0] for c in FIREHOSE_FAILURES])
def test_firehose_partial_failures_resend_only_failed_records(make_daemon, fake_aws, keys, fail_rate,
                                                              throttle_rate):
    fake_aws.faults.record_fail_rate = fail_rate
    fake_aws.faults.throttle_rate = throttle_rate
    lines = _lines(3000)
    daemon = make_daemon({"kind": "firehose", "stream": "fh", "endpoint_url": fake_aws.url,
                          **FAST_RETRY, **keys}).start()
    assert send_lines(daemon.sockets()[0], _payload(lines))["accepted"] == len(lines)
    _wait_acknowledged(daemon)
    records = fake_aws.records("fh")
    arrived = collections.Counter(line for r in records for line in _split_record(r.data, b"\n"))
    assert set(arrived) == set(lines)
    # A whole batch resent after a partial failure, or failures matched to the wrong positions in
    # RequestResponses, would deliver some line twice.
    assert max(arrived.values()) == 1, "no line twice: only the failed records are resent"
    puts = [r for r in fake_aws.requests if r.target == "Firehose_20150804.PutRecordBatch"]
    failed = sum(r.n_failed for r in puts)
    answered = sum(r.n_records for r in puts if r.status == 200)  # calls refused whole fail no record
    assert failed > 0.15 * answered, "the endpoint should fail about 30% of the records it answers"
    refused_whole = sum(r.n_records for r in puts if r.status != 200)
    assert bool(refused_whole) == bool(throttle_rate)
    # Every record offered was accepted once, failed alone, or went with a whole refused call.
    distinct_records = len(lines) if not keys.get("pack_lines") else len(records)
    assert sum(r.n_records for r in puts) == distinct_records + failed + refused_whole
    assert daemon.stop() == 0
    assert daemon.spool_rows() == 0


# ---------------------------------------------------------------- yds


YDS_ENV = {"AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "us-west-2"}  # must not apply to yds


@pytest.mark.parametrize("keys", [
    pytest.param({"folder": "b1gfolder", "database": "etn0db", "stream": "mystream"}, id="composed"),
    pytest.param({"stream": YDS_STREAM}, id="full-path"),
])
def test_yds_stream_name_and_signing_scope(make_daemon, fake_aws, keys):
    fake_aws.expect_scope = ("ru-central1", "kinesis")
    fake_aws.known_streams = {YDS_STREAM}
    lines = _lines(400)
    daemon = _daemon(make_daemon, {"kind": "yds", "region": DROP, "endpoint_url": fake_aws.url, **keys},
                     env=YDS_ENV).start()
    assert send_lines(daemon.sockets()[0], _payload(lines))["accepted"] == len(lines)
    wait_until(lambda: len(fake_aws.records(YDS_STREAM)) >= len(lines) or any(r.error for r in fake_aws.requests),
               what="every line on the yds stream (or a refusal)")
    assert {(r.error, r.stream, r.region, r.service) for r in fake_aws.requests if r.error} == set()
    assert collections.Counter(r.data for r in fake_aws.records(YDS_STREAM)) == collections.Counter(lines)
    puts = [r for r in fake_aws.requests if r.target == "Kinesis_20131202.PutRecords"]
    assert puts and all(r.status == 200 and r.signature_ok for r in puts)
    assert {(r.region, r.service, r.stream) for r in fake_aws.requests} == {("ru-central1", "kinesis", YDS_STREAM)}
    assert fake_aws.bad_signatures == 0
    daemon.stop()


# (id, destination keys, the error the endpoint answers)
YDS_WRONG = [
    ("other-folder", {"folder": "b1gother", "database": "etn0db", "stream": "mystream"}, "ResourceNotFoundException"),
    ("other-database", {"folder": "b1gfolder", "database": "etn1db", "stream": "mystream"},
     "ResourceNotFoundException"),
    ("scoped-to-us-west-2", {"stream": YDS_STREAM, "region": "us-west-2"}, "InvalidSignatureException"),
]


@pytest.mark.parametrize(("keys", "error"), [c[1:] for c in YDS_WRONG], ids=[c[0] for c in YDS_WRONG])
def test_yds_wrong_stream_or_scope_delivers_nothing(make_daemon, fake_aws, keys, error):
    """The negative control of the test above: the same endpoint refuses a name or scope off by one part."""
    fake_aws.expect_scope = ("ru-central1", "kinesis")
    fake_aws.known_streams = {YDS_STREAM}
    daemon = _daemon(make_daemon, {"kind": "yds", "region": DROP, "endpoint_url": fake_aws.url, **FAST_RETRY,
                                   **keys}, env=YDS_ENV, extra='[daemon]\nshutdown_grace = "500ms"\n').start()
    assert send_lines(daemon.sockets()[0], _payload(_lines(50)))["accepted"] == 50
    wait_until(lambda: sum(r.error is not None for r in fake_aws.requests) >= 3 or fake_aws.all_records(),
               what="refused requests")
    assert fake_aws.all_records() == []
    assert {(r.status, r.error) for r in fake_aws.requests} == {(400, error)}
    wait_until(lambda: [e for e in daemon.log_events() if e.get("event") == "send_failed"
                        and e.get("dest") == "d0" and e.get("code") == error], what="send_failed in the log")
    assert daemon.stop() == 0
    assert _spooled(daemon, "d0") == 50, "refused lines stay spooled"


# ---------------------------------------------------------------- kinesis extras


def test_kinesis_stream_arn_and_explicit_hash_key(make_daemon, fields_aws):
    lines = _lines(300)
    # No region: it comes from the ARN, not from AWS_REGION.
    daemon = _daemon(make_daemon, {"stream": DROP, "region": DROP, "stream_arn": ARN, "endpoint_url": fields_aws.url,
                                   "explicit_hash_key": EXPLICIT_HASH_KEY}, env={"AWS_REGION": "eu-west-1"}).start()
    assert send_lines(daemon.sockets()[0], _payload(lines))["accepted"] == len(lines)
    wait_until(lambda: len(fields_aws.records("arnstream")) >= len(lines), what="every line on arnstream")
    records = fields_aws.records("arnstream")
    assert collections.Counter(r.data for r in records) == collections.Counter(lines)
    assert fields_aws.stream_fields and set(fields_aws.stream_fields) == {(None, ARN)}, "StreamARN, not StreamName"
    assert {r.explicit_hash_key for r in records} == {EXPLICIT_HASH_KEY}
    assert {r.shard_id for r in records} == {"shardId-000000000002"}, "routed by the explicit hash key"
    puts = [r for r in fields_aws.requests if r.target == "Kinesis_20131202.PutRecords"]
    assert puts and {(r.region, r.service, r.signature_ok) for r in puts} == {("us-east-1", "kinesis", True)}
    daemon.stop()


@pytest.mark.parametrize("throttle_rate", [pytest.param(0.0, id="clean"), pytest.param(0.3, id="throttled")])
def test_kinesis_ordered_keeps_order_per_key_with_sequence_numbers(make_daemon, fake_aws, throttle_rate):
    fake_aws.faults.throttle_rate = throttle_rate
    keys, per_key = ["a", "b", "c"], 40
    lines = [json.dumps({"k": k, "n": n}, separators=(",", ":")).encode()
             for n in range(1, per_key + 1) for k in keys]
    daemon = make_daemon({"endpoint_url": fake_aws.url, "ordered": True, "partition_key_field": "k",
                          **FAST_RETRY}).start()
    sock = daemon.sockets()[0]
    for i in range(0, len(lines), 30):  # several chunks
        assert send_lines(sock, _payload(lines[i:i + 30]))["accepted"] == 30
    wait_until(lambda: len(fake_aws.records("test-stream")) >= len(lines), what="every ordered record")
    records = fake_aws.records("test-stream")  # in acceptance order
    assert len(records) == len(lines), "no record twice"
    for key in keys:
        mine = [r for r in records if r.partition_key == key]
        assert [json.loads(r.data)["n"] for r in mine] == list(range(1, per_key + 1)), f"order of key {key!r}"
        assert mine[0].ordering is None
        for before, after in zip(mine, mine[1:]):
            assert after.ordering == before.sequence_number, f"SequenceNumberForOrdering of key {key!r}"
    targets = {r.target for r in fake_aws.requests}
    assert targets == {"Kinesis_20131202.PutRecord"}, "ordered mode sends PutRecord, one record at a time"
    if throttle_rate:
        assert any(r.error == "ProvisionedThroughputExceededException" for r in fake_aws.requests)
    assert daemon.stop() == 0
    assert daemon.spool_rows() == 0


# ---------------------------------------------------------------- several destinations


@pytest.mark.parametrize("failure", [
    pytest.param("down", id="down-503"),
    # Requests that hang for the whole request_timeout: a lock, pool or backoff shared between
    # destinations would hold the healthy ones up for that long.
    pytest.param("hang", id="hanging"),
])
def test_failing_destination_does_not_hold_up_the_others(make_daemon, fake_aws, second_aws, failure):
    sick, healthy = fake_aws, second_aws
    setattr(sick.faults, failure, True)
    daemon = make_daemon(
        {"name": "sick", "stream": "sick-stream", "endpoint_url": sick.url, "request_timeout": "30s", **FAST_RETRY},
        {"name": "fine", "stream": "fine-stream", "endpoint_url": healthy.url},
        {"name": "hose", "kind": "firehose", "stream": "hose", "endpoint_url": healthy.url},
        extra='[daemon]\nshutdown_grace = "1s"\n',
    ).start()
    socks = dict(zip(("sick", "fine", "hose"), daemon.sockets()))
    lines = {name: _lines(500, tag=name) for name in socks}
    assert send_lines(socks["sick"], _payload(lines["sick"]))["accepted"] == 500
    wait_until(lambda: sick.count_requests >= 1, what="the failing destination to be trying")
    for name in ("fine", "hose"):
        assert send_lines(socks[name], _payload(lines[name]))["accepted"] == 500

    wait_until(lambda: len(healthy.records("fine-stream")) >= 500 and len(healthy.records("hose")) >= 500,
               timeout=PROMPTLY, what="the healthy destinations while another one fails")
    assert collections.Counter(r.data for r in healthy.records("fine-stream")) == collections.Counter(lines["fine"])
    assert collections.Counter(r.data[:-1] for r in healthy.records("hose")) == collections.Counter(lines["hose"])
    wait_until(lambda: _spooled(daemon, "fine") == 0 and _spooled(daemon, "hose") == 0, what="healthy rows deleted")
    assert sick.all_records() == [] and _spooled(daemon, "sick") == 500
    status = _status(daemon)["destinations"]
    assert status["sick"]["spooled_lines"] == 500 and status["sick"]["lines_sent"] == 0
    assert status["fine"]["spooled_lines"] == 0 and status["hose"]["spooled_lines"] == 0
    assert status["fine"]["lines_sent"] == 500 and status["hose"]["lines_sent"] == 500
    if failure == "down":
        # The failing destination says so, by name, in the log and in status.
        wait_until(lambda: [e for e in daemon.log_events() if e.get("event") == "send_failed"],
                   what="send_failed in the log")
        assert "ServiceUnavailable" in _status(daemon)["destinations"]["sick"]["last_error"]
    failures = [e for e in daemon.log_events() if e.get("event") == "send_failed"]
    assert {(e.get("dest"), e.get("code")) for e in failures} <= {("sick", "ServiceUnavailable")}

    setattr(sick.faults, failure, False)
    wait_until(lambda: len(sick.records("sick-stream")) >= 500, what="the spooled lines once it is back")
    assert collections.Counter(r.data for r in sick.records("sick-stream")) == collections.Counter(lines["sick"])
    assert healthy.bad_signatures == 0 and sick.bad_signatures == 0
    assert daemon.stop() == 0
    assert daemon.spool_rows() == 0


def test_down_destination_filling_the_spool_does_not_block_the_others(make_daemon, fake_aws, second_aws):
    sick, healthy = fake_aws, second_aws
    sick.faults.down = True
    max_bytes = 1024 * 1024
    daemon = make_daemon(
        {"name": "sick", "stream": "sick-stream", "endpoint_url": sick.url, **FAST_RETRY},
        {"name": "fine", "stream": "fine-stream", "endpoint_url": healthy.url},
        spool={"max_bytes": max_bytes}, extra='[daemon]\nshutdown_grace = "1s"\n',
    ).start()
    sick_sock, fine_sock = daemon.sockets()
    backlog = [b"s%05d " % i + b"x" * 1200 for i in range(1500)]  # 1.8 MB: more than the spool holds
    answers: dict[str, Any] = {}
    writer = threading.Thread(target=lambda: answers.update(sick=send_lines(sick_sock, _payload(backlog))))
    writer.start()
    try:
        # The down destination fills what the healthy one's reserved share leaves: half the spool.
        wait_until(lambda: _spooled(daemon, "sick", "bytes") > max_bytes // 2 - 128 * 1024,
                   what="the down destination's share of the spool full")
        fine = [b"f%05d " % i + b"y" * 300 for i in range(1000)]
        try:
            answer = send_lines(fine_sock, _payload(fine), timeout=PROMPTLY)
        except TimeoutError:
            raise AssertionError(f"a healthy destination's writer waited over {PROMPTLY}s for space") from None
        assert answer == {"accepted": 1000, "rejected": 0}
        wait_until(lambda: len(healthy.records("fine-stream")) >= 1000, timeout=PROMPTLY,
                   what="the healthy destination's lines")
    finally:
        sick.faults.down = False
        writer.join(timeout=60)
    assert answers["sick"] == {"accepted": 1500, "rejected": 0}
    daemon.stop()


# ---------------------------------------------------------------- config errors on the command line

SPOOL = '[spool]\npath = "{tmp}/spool.db"\n'


def _dest(name: str, kind: str, socket: str, extra: str = "") -> str:
    return f'[[destination]]\nname = "{name}"\nkind = "{kind}"\nsocket = "{{tmp}}/{socket}"\n{extra}'


FH = 'stream = "fh"\nregion = "us-east-1"\n'
KIN = 'stream = "s"\nregion = "us-east-1"\n'
# (id, config text, what stderr must name)
BAD_CONFIGS = [
    ("firehose-with-folder", _dest("f", "firehose", "f.sock", FH + 'folder = "b1g"\n'), 'destination "f": folder'),
    ("yds-without-folder-or-database", _dest("y", "yds", "y.sock", 'stream = "events"\n'),
     'destination "y": folder: required'),
    ("duplicate-names", _dest("a", "kinesis", "a.sock", KIN) + _dest("a", "firehose", "b.sock", FH),
     'destination[1].name: "a" is used by another destination'),
    ("duplicate-sockets", _dest("a", "kinesis", "a.sock", KIN) + _dest("b", "firehose", "a.sock", FH),
     'destination "b": socket'),
    ("unknown-kind", _dest("k", "kafka", "k.sock", KIN), 'destination "k": kind: must be one of'),
]


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize(("text", "named"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_config_errors_exit_2_naming_the_key(tmp_path: Path, command: str, text: str, named: str) -> None:
    path = tmp_path / "spoold.toml"
    path.write_text((SPOOL + text).replace("{tmp}", str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-aws-files")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # this checkout
    proc = subprocess.run([sys.executable, "-m", "spoold", command, "--config", str(path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert named in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "OK" not in proc.stdout
    assert not list(tmp_path.glob("*.sock")) and not (tmp_path / "spool.db").exists(), "nothing was started"
