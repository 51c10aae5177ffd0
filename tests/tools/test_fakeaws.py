"""tests/tools/fakeaws.py checked against independent clients: boto3, botocore's signer, raw sockets."""

from __future__ import annotations

import base64
import datetime
import hashlib
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.auth
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.tools.fakeaws import HASH_SPACE, FakeAWS, Record, Role

ACCESS = "AKIDSPOOLDTEST"
SECRET = "spoold-test-secret"
DEADLINE = 10.0  # every wait below has one; generous for busy machines
NO_RETRY = Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=10)
PTEE = "ProvisionedThroughputExceededException"
PUT_RECORDS = "Kinesis_20131202.PutRecords"
PUT_RECORD_BATCH = "Firehose_20150804.PutRecordBatch"
FAKEAWS_SCRIPT = Path(__file__).with_name("fakeaws.py")


@pytest.fixture
def srv() -> Iterator[FakeAWS]:
    with FakeAWS(access_key=ACCESS, secret_key=SECRET, seed=1, shards=4) as server:
        yield server


@pytest.fixture
def client() -> Iterator[Callable[..., Any]]:
    """boto3 client factory; clients are closed at teardown so no socket outlives the test."""
    made: list[Any] = []

    def make(
        server: FakeAWS,
        service: str = "kinesis",
        *,
        region: str = "us-east-1",
        key: str = ACCESS,
        secret: str = SECRET,
    ) -> Any:
        c = boto3.client(
            service,
            endpoint_url=server.url,
            region_name=region,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=NO_RETRY,
        )
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def signed_post(
    server: FakeAWS,
    target: str,
    payload: Any,
    *,
    secret: str = SECRET,
    region: str = "us-east-1",
    service: str | None = None,
    send_body: bytes | None = None,
    timeout: float = DEADLINE,
) -> httpx.Response:
    """POST signed by botocore, as spoold does; send_body replaces the body after signing."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    if service is None:
        service = "firehose" if target.startswith("Firehose") else "kinesis"
    request = AWSRequest(
        method="POST",
        url=server.url + "/",
        data=body,
        headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target},
    )
    SigV4Auth(Credentials(ACCESS, secret), service, region).add_auth(request)
    with httpx.Client(timeout=timeout) as http:
        return http.post(
            server.url + "/",
            content=body if send_body is None else send_body,
            headers=dict(request.headers.items()),
        )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kinesis_body(stream: str, records: list[tuple[bytes, str]]) -> dict[str, Any]:
    return {
        "StreamName": stream,
        "Records": [{"Data": b64(data), "PartitionKey": key} for data, key in records],
    }


def error_of(exc_info: pytest.ExceptionInfo[ClientError]) -> tuple[int, str]:
    response = exc_info.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


def expected_shard(partition_key: str, shards: int) -> str:
    """Independent of fakeaws: MD5 of the key as a 128-bit integer, ranges split evenly."""
    hash_key = int(hashlib.md5(partition_key.encode()).hexdigest(), 16)
    for i in range(shards):
        if HASH_SPACE * i // shards <= hash_key < HASH_SPACE * (i + 1) // shards:
            return f"shardId-{i:012d}"
    raise AssertionError("hash key outside the hash space")


# ---- signing and storage ---------------------------------------------------------------------


def test_boto3_put_records_is_verified_and_stored_exactly(srv, client):
    records = [{"Data": f"line {i}".encode(), "PartitionKey": f"pk-{i}"} for i in range(30)]
    records.append({"Data": b"\x00\xff\n binary", "PartitionKey": "x", "ExplicitHashKey": "0"})
    records.append({"Data": b"", "PartitionKey": "y", "ExplicitHashKey": str(HASH_SPACE - 1)})

    answer = client(srv).put_records(StreamName="s1", Records=records)

    assert answer["FailedRecordCount"] == 0
    stored = srv.records("s1")
    assert [r.data for r in stored] == [r["Data"] for r in records]
    assert [r.partition_key for r in stored] == [r["PartitionKey"] for r in records]
    assert [r.explicit_hash_key for r in stored] == [None] * 30 + ["0", str(HASH_SPACE - 1)]
    numbers = [int(r["SequenceNumber"]) for r in answer["Records"]]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert [r.sequence_number for r in stored] == [r["SequenceNumber"] for r in answer["Records"]]
    shard_ids = [r["ShardId"] for r in answer["Records"]]
    assert [r.shard_id for r in stored] == shard_ids
    assert shard_ids[:30] == [expected_shard(f"pk-{i}", 4) for i in range(30)]
    assert len(set(shard_ids[:30])) == 4, "30 keys should land on every one of 4 shards"
    assert shard_ids[30:] == ["shardId-000000000000", "shardId-000000000003"]
    assert srv.all_records() == stored and srv.count_accepted == 32 and srv.bad_signatures == 0
    (log,) = srv.requests
    assert (log.target, log.stream, log.n_records, log.status) == (PUT_RECORDS, "s1", 32, 200)
    assert (log.signature_ok, log.region, log.service, log.access_key) == (
        True,
        "us-east-1",
        "kinesis",
        ACCESS,
    )


def test_put_record_ordering_and_stream_arn(srv, client):
    kinesis = client(srv)
    first = kinesis.put_record(StreamName="s2", Data=b"a", PartitionKey="p")
    arn = "arn:aws:kinesis:us-east-1:123456789012:stream/s2"
    second = kinesis.put_record(
        StreamARN=arn,
        Data=b"b",
        PartitionKey="p",
        SequenceNumberForOrdering=first["SequenceNumber"],
    )
    far = str(10**70)
    third = kinesis.put_record(
        StreamName="s2", Data=b"c", PartitionKey="q", SequenceNumberForOrdering=far
    )

    assert int(first["SequenceNumber"]) < int(second["SequenceNumber"]) < int(far)
    assert int(third["SequenceNumber"]) > int(far)
    stored = srv.records("s2")
    assert [(r.data, r.ordering) for r in stored] == [
        (b"a", None),
        (b"b", first["SequenceNumber"]),
        (b"c", far),
    ]
    assert [r.shard_id for r in stored] == [
        expected_shard("p", 4),
        expected_shard("p", 4),
        expected_shard("q", 4),
    ]
    assert [r.shard_id for r in stored] == [a["ShardId"] for a in (first, second, third)]


def test_signature_uses_the_request_date_and_covers_the_body(srv, monkeypatch):
    payload = kinesis_body("sig", [(b"real", "k")])
    old = datetime.datetime(2020, 2, 29, 23, 59, 58)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: old)

    tampered = json.dumps(kinesis_body("sig", [(b"evil", "k")])).encode()
    rejected = signed_post(srv, PUT_RECORDS, payload, send_body=tampered)
    accepted = signed_post(srv, PUT_RECORDS, payload)

    assert rejected.status_code == 400
    assert rejected.json()["__type"] == "InvalidSignatureException"
    assert accepted.status_code == 200, accepted.text
    assert [r.data for r in srv.records("sig")] == [b"real"]
    assert srv.bad_signatures == 1


@pytest.mark.parametrize(
    ("how", "code"),
    [
        ("wrong secret", "InvalidSignatureException"),
        ("unknown key", "UnrecognizedClientException"),
        ("firehose scope on a Kinesis call", "InvalidSignatureException"),
    ],
)
def test_bad_credentials_are_rejected_and_store_nothing(srv, client, how, code):
    if how == "wrong secret":
        kinesis = client(srv, secret="not-the-secret")
    elif how == "unknown key":
        kinesis = client(srv, key="AKIDSOMEONEELSE")
    else:
        kinesis = None
    records = [{"Data": b"x", "PartitionKey": "k"}]

    if kinesis is not None:
        with pytest.raises(ClientError) as caught:
            kinesis.put_records(StreamName="s", Records=records)
        assert error_of(caught) == (400, code)
    else:
        answer = signed_post(
            srv, PUT_RECORDS, kinesis_body("s", [(b"x", "k")]), service="firehose"
        )
        assert (answer.status_code, answer.json()["__type"]) == (400, code)

    assert srv.all_records() == [] and srv.count_accepted == 0
    assert srv.bad_signatures == 1
    assert [r.signature_ok for r in srv.requests] == [False]


def test_missing_authorization_is_rejected(srv):
    with httpx.Client(timeout=DEADLINE) as http:
        answer = http.post(
            srv.url + "/",
            content=json.dumps(kinesis_body("s", [(b"x", "k")])).encode(),
            headers={"X-Amz-Target": PUT_RECORDS, "Content-Type": "application/x-amz-json-1.1"},
        )
    assert (answer.status_code, answer.json()["__type"]) == (400, "InvalidSignatureException")
    assert srv.all_records() == [] and srv.bad_signatures == 1


def test_yandex_scope_and_slashed_stream_name(srv, client):
    srv.expect_scope = ("ru-central1", "kinesis")
    name = "/ru-central1/b1gfolder/etndatabase/events"
    records = [{"Data": b"ydb", "PartitionKey": "k"}]

    answer = client(srv, region="ru-central1").put_records(StreamName=name, Records=records)
    with pytest.raises(ClientError) as caught:
        client(srv, region="us-east-1").put_records(StreamName=name, Records=records)

    assert answer["FailedRecordCount"] == 0
    assert error_of(caught) == (400, "InvalidSignatureException")
    assert [(r.stream, r.data) for r in srv.all_records()] == [(name, b"ydb")]
    assert [(r.region, r.status) for r in srv.requests] == [
        ("ru-central1", 200),
        ("us-east-1", 400),
    ]
    assert srv.bad_signatures == 1


def test_firehose_put_record_batch_and_put_record(srv, client):
    firehose = client(srv, "firehose")
    batch = firehose.put_record_batch(
        DeliveryStreamName="fh", Records=[{"Data": b"one\n"}, {"Data": b"two\n"}, {"Data": b""}]
    )
    single = firehose.put_record(DeliveryStreamName="fh", Record={"Data": b"three\n"})

    assert batch["FailedPutCount"] == 0 and batch["Encrypted"] is False
    ids = [r["RecordId"] for r in batch["RequestResponses"]] + [single["RecordId"]]
    assert len(set(ids)) == 4
    stored = srv.records("fh")
    assert [r.data for r in stored] == [b"one\n", b"two\n", b"", b"three\n"]
    assert [r.sequence_number for r in stored] == ids
    assert {(r.api, r.partition_key, r.shard_id) for r in stored} == {("firehose", None, None)}
    assert [r.service for r in srv.requests] == ["firehose", "firehose"]


# ---- faults ----------------------------------------------------------------------------------


def test_kinesis_per_record_failures_have_the_real_shapes(srv, client):
    srv.faults.record_fail_rate = 0.3
    kinesis = client(srv)
    records = [{"Data": f"r{i}".encode(), "PartitionKey": f"k{i}"} for i in range(500)]

    answer = kinesis.put_records(StreamName="s", Records=records)

    results = answer["Records"]
    failed = [i for i, r in enumerate(results) if "ErrorCode" in r]
    assert answer["FailedRecordCount"] == len(failed)
    assert 100 < len(failed) < 200, "about 30% of 500"
    codes = [results[i]["ErrorCode"] for i in failed]
    assert codes == [PTEE, "InternalFailure"] * (len(failed) // 2) + [PTEE] * (len(failed) % 2)
    for i, r in enumerate(results):
        expected = {"ErrorCode", "ErrorMessage"} if i in failed else {"SequenceNumber", "ShardId"}
        assert set(r) == expected
        assert r.get("ErrorMessage", "x")
    ok = [i for i in range(500) if i not in failed]
    assert [r.data for r in srv.records("s")] == [records[i]["Data"] for i in ok]
    assert [r.sequence_number for r in srv.records("s")] == [
        results[i]["SequenceNumber"] for i in ok
    ]
    assert srv.count_accepted == len(ok) and srv.requests[-1].n_failed == len(failed)

    # Retrying exactly the failed records completes the set.
    srv.faults.record_fail_rate = 0.0
    retry = kinesis.put_records(StreamName="s", Records=[records[i] for i in failed])
    assert retry["FailedRecordCount"] == 0
    assert sorted(r.data for r in srv.records("s")) == sorted(r["Data"] for r in records)


def test_firehose_per_record_failures_keep_request_order(srv, client):
    srv.faults.record_fail_rate = 0.5
    records = [{"Data": f"f{i}".encode()} for i in range(200)]

    answer = client(srv, "firehose").put_record_batch(DeliveryStreamName="fh", Records=records)

    responses = answer["RequestResponses"]
    assert len(responses) == 200
    failed = [i for i, r in enumerate(responses) if "ErrorCode" in r]
    assert answer["FailedPutCount"] == len(failed) and 50 < len(failed) < 150
    assert {responses[i]["ErrorCode"] for i in failed} == {"ServiceUnavailableException"}
    assert all(set(responses[i]) == {"ErrorCode", "ErrorMessage"} for i in failed)
    ok = [i for i in range(200) if i not in failed]
    assert all(set(responses[i]) == {"RecordId"} for i in ok)
    assert [r.data for r in srv.records("fh")] == [records[i]["Data"] for i in ok]
    assert [r.sequence_number for r in srv.records("fh")] == [responses[i]["RecordId"] for i in ok]


WHOLE_REQUEST_FAULTS = [
    ("kinesis", "throttle_rate", 1.0, 400, PTEE),
    ("firehose", "throttle_rate", 1.0, 400, "ServiceUnavailableException"),
    ("kinesis", "http500_rate", 1.0, 500, "InternalFailure"),
    ("firehose", "http500_rate", 1.0, 500, "InternalFailure"),
    ("kinesis", "down", True, 503, None),
    ("firehose", "down", True, 503, None),
    ("kinesis", "fatal", "ResourceNotFoundException", 400, "ResourceNotFoundException"),
    ("firehose", "fatal", "AccessDeniedException", 400, "AccessDeniedException"),
]


@pytest.mark.parametrize(("service", "field", "value", "status", "code"), WHOLE_REQUEST_FAULTS)
def test_whole_request_faults(srv, client, service, field, value, status, code):
    c = client(srv, service)

    def put() -> Any:
        if service == "kinesis":
            return c.put_records(StreamName="s", Records=[{"Data": b"x", "PartitionKey": "k"}])
        return c.put_record_batch(DeliveryStreamName="s", Records=[{"Data": b"x"}])

    setattr(srv.faults, field, value)
    with pytest.raises(ClientError) as caught:
        put()
    got_status, got_code = error_of(caught)
    assert got_status == status
    if code is not None:
        assert got_code == code
    assert srv.all_records() == [] and srv.count_accepted == 0
    assert srv.requests[-1].status == status

    setattr(srv.faults, field, type(value)())  # cleared: the very next request goes through
    put()
    assert [r.data for r in srv.all_records()] == [b"x"]


def test_down_applies_to_every_call(srv, client):
    srv.faults.down = True
    with pytest.raises(ClientError) as caught:
        client(srv).list_shards(StreamName="s")
    assert error_of(caught)[0] == 503


def test_throttle_rate_is_a_fraction_of_requests(srv, client):
    srv.faults.throttle_rate = 0.5
    kinesis = client(srv)
    throttled = 0
    for i in range(40):
        try:
            kinesis.put_record(StreamName="s", Data=b"%d" % i, PartitionKey="k")
        except ClientError as exc:
            assert exc.response["Error"]["Code"] == PTEE
            throttled += 1
    assert 8 < throttled < 32
    assert len(srv.records("s")) == 40 - throttled


def test_scripted_answers_are_sent_verbatim_and_store_nothing(srv):
    srv.faults.scripted.extend([(200, b'{"FailedRecordCount": 0}'), (500, b"<html>oops</html>")])
    payload = kinesis_body("s", [(b"x", "k")])

    listing = signed_post(srv, "Kinesis_20131202.ListShards", {"StreamName": "s"})
    first = signed_post(srv, PUT_RECORDS, payload)
    second = signed_post(srv, PUT_RECORDS, payload)
    third = signed_post(srv, PUT_RECORDS, payload)

    assert listing.status_code == 200 and len(listing.json()["Shards"]) == 4
    assert (first.status_code, first.content) == (200, b'{"FailedRecordCount": 0}')
    assert (second.status_code, second.content) == (500, b"<html>oops</html>")
    assert third.status_code == 200 and third.json()["FailedRecordCount"] == 0
    assert [r.data for r in srv.all_records()] == [b"x"]
    assert [r.error for r in srv.requests] == [None, "scripted", "scripted", None]
    assert not srv.faults.scripted


def test_latency_is_added_without_blocking_other_requests(srv):
    # One second each: answered one after another, six would take at least 6 s; side by side
    # about 1 s. The bound in between is wide enough for a busy machine.
    srv.faults.latency = 1.0
    results: list[tuple[int | str, float]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        started = time.monotonic()
        try:
            status: int | str = signed_post(
                srv, PUT_RECORDS, kinesis_body("lat", [(b"%d" % i, "k")])
            ).status_code
        except Exception as exc:  # reported by the asserts below, not as a thread crash
            status = repr(exc)
        with lock:
            results.append((status, time.monotonic() - started))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    total = time.monotonic() - started

    assert [status for status, _ in results] == [200] * 6
    assert min(elapsed for _, elapsed in results) >= 1.0
    assert total < 4.0, f"6 x 1 s answered one after another ({total:.2f} s): latency blocks"
    assert len(srv.records("lat")) == 6


def test_hang_holds_requests_until_cleared(srv):
    srv.faults.hang = True
    payload = kinesis_body("h", [(b"first", "k")])
    with pytest.raises(httpx.ReadTimeout):
        signed_post(srv, PUT_RECORDS, payload, timeout=0.3)
    # The client gave up: that request is dropped unprocessed.
    srv.wait_for(lambda s: [r.status for r in s.requests] == [0], timeout=DEADLINE)

    answers: list[httpx.Response | Exception] = []

    def second() -> None:
        try:
            answers.append(signed_post(srv, PUT_RECORDS, kinesis_body("h", [(b"second", "k")])))
        except Exception as exc:  # reported by the asserts below, not as a thread crash
            answers.append(exc)

    worker = threading.Thread(target=second)
    worker.start()
    try:
        srv.wait_for(lambda s: s.count_requests == 2, timeout=DEADLINE)
        assert answers == [] and srv.all_records() == []
    finally:
        srv.faults.hang = False
        worker.join(DEADLINE)

    assert [getattr(a, "status_code", a) for a in answers] == [200]
    assert [r.data for r in srv.all_records()] == [b"second"]


def test_validation_like_the_service(srv):
    def put(stream: str, records: list[tuple[bytes, str]]) -> httpx.Response:
        return signed_post(srv, PUT_RECORDS, kinesis_body(stream, records))

    mib = 1024 * 1024
    cases: list[tuple[httpx.Response, int, str]] = [
        (put("v", [(b"x", "k")] * 501), 400, "ValidationException"),
        (put("v", []), 400, "ValidationException"),
        (put("v", [(b"x", "k" * 257)]), 400, "ValidationException"),
        (put("v", [(b"x", "")]), 400, "ValidationException"),
        (put("v", [(b"d" * mib, "k")]), 400, "ValidationException"),
        (put("", [(b"x", "k")]), 400, "ValidationException"),
        (signed_post(srv, PUT_RECORDS, b"{not json"), 400, "SerializationException"),
        (
            signed_post(
                srv,
                PUT_RECORDS,
                {"StreamName": "v", "Records": [{"Data": "%%", "PartitionKey": "k"}]},
            ),
            400,
            "SerializationException",
        ),
        (
            signed_post(
                srv,
                PUT_RECORD_BATCH,
                {"DeliveryStreamName": "v", "Records": [{"Data": b64(b"\0" * 1_024_001)}]},
            ),
            400,
            "ValidationException",
        ),
        (signed_post(srv, "Kinesis_20131202.Nope", {}), 400, "UnknownOperationException"),
    ]
    for i, (answer, status, code) in enumerate(cases):
        assert (i, answer.status_code, answer.json().get("__type")) == (i, status, code)
    assert srv.all_records() == [] and srv.count_accepted == 0

    # The limits themselves are accepted: 500 records, 256-char keys, exactly 1 MiB, 1,024,000 B.
    assert put("v", [(b"x", "k" * 256)] * 500).status_code == 200
    assert put("v", [(b"d" * (mib - 1), "k")]).status_code == 200
    firehose_max = {"DeliveryStreamName": "v", "Records": [{"Data": b64(b"\0" * 1_024_000)}]}
    assert signed_post(srv, PUT_RECORD_BATCH, firehose_max).status_code == 200
    assert srv.count_accepted == 502


def test_known_streams_limit_what_exists(srv, client):
    srv.known_streams = {"exists"}
    kinesis, firehose = client(srv), client(srv, "firehose")
    with pytest.raises(ClientError) as k_caught:
        kinesis.put_records(StreamName="missing", Records=[{"Data": b"x", "PartitionKey": "k"}])
    with pytest.raises(ClientError) as f_caught:
        firehose.put_record_batch(DeliveryStreamName="missing", Records=[{"Data": b"x"}])
    kinesis.put_records(StreamName="exists", Records=[{"Data": b"x", "PartitionKey": "k"}])

    assert error_of(k_caught) == error_of(f_caught) == (400, "ResourceNotFoundException")
    assert [r.stream for r in srv.all_records()] == ["exists"]


def _list_shards_by_twos(kinesis: Any) -> list[dict[str, Any]]:
    """Every page of ListShards, two shards a page (NextToken)."""
    page = kinesis.list_shards(StreamName="s", MaxResults=2)
    paged: list[dict[str, Any]] = page["Shards"]
    while "NextToken" in page:
        page = kinesis.list_shards(NextToken=page["NextToken"], MaxResults=2)
        paged += page["Shards"]
    return paged


@pytest.mark.parametrize("shards", [1, 3, 4])
def test_shard_maps_cover_the_whole_hash_space(client, shards):
    with FakeAWS(access_key=ACCESS, secret_key=SECRET, shards=shards) as server:
        kinesis = client(server)
        listed = kinesis.list_shards(StreamName="s")["Shards"]
        described = kinesis.describe_stream(StreamName="s")["StreamDescription"]
        paged = _list_shards_by_twos(kinesis)

    assert len(listed) == shards
    assert [s["ShardId"] for s in listed] == [f"shardId-{i:012d}" for i in range(shards)]
    ranges = [
        (int(s["HashKeyRange"]["StartingHashKey"]), int(s["HashKeyRange"]["EndingHashKey"]))
        for s in listed
    ]
    assert ranges[0][0] == 0 and ranges[-1][1] == HASH_SPACE - 1
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert start == end + 1
    widths = [end - start + 1 for start, end in ranges]
    assert max(widths) - min(widths) <= 1, "evenly split"
    assert described["Shards"] == listed and described["HasMoreShards"] is False
    assert described["StreamStatus"] == "ACTIVE" and described["StreamName"] == "s"
    assert paged == listed


# ---- HTTP and harness ------------------------------------------------------------------------


def _raw_request(server: FakeAWS, payload: dict[str, Any], close: bool = False) -> bytes:
    body = json.dumps(payload).encode()
    head = (
        f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Amz-Target: {PUT_RECORDS}\r\n"
        f"Content-Type: application/x-amz-json-1.1\r\nContent-Length: {len(body)}\r\n"
    )
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + body


def _read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, Any]]]:
    buffer = b""
    out: list[tuple[int, dict[str, Any]]] = []
    while len(out) < count:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buffer[:head_end].decode()
            length = int(head.lower().split("content-length: ")[1].split("\r\n")[0])
            if len(buffer) >= head_end + 4 + length:
                body = buffer[head_end + 4 : head_end + 4 + length]
                out.append((int(head.split(" ")[1]), json.loads(body)))
                buffer = buffer[head_end + 4 + length :]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(out)} of {count} responses"
        buffer += chunk
    return out


def test_keep_alive_pipelining_and_connection_close():
    with FakeAWS(access_key=ACCESS, secret_key=SECRET, verify=False) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as sock:
            two = _raw_request(server, kinesis_body("p", [(b"1", "k")])) + _raw_request(
                server, kinesis_body("p", [(b"2", "k"), (b"3", "k")])
            )
            sock.sendall(two[:100])  # a head split across reads
            sock.sendall(two[100:])
            answers = _read_responses(sock, 2)
            sock.sendall(_raw_request(server, kinesis_body("p", [(b"4", "k")]), close=True))
            answers += _read_responses(sock, 1)
            assert sock.recv(1) == b"", "Connection: close must close after the answer"
        assert [status for status, _ in answers] == [200, 200, 200]
        assert [len(body["Records"]) for _, body in answers] == [1, 2, 1]
        assert [r.data for r in server.records("p")] == [b"1", b"2", b"3", b"4"]
        assert [r.signature_ok for r in server.requests] == [None] * 3


def test_wait_for_times_out_with_a_useful_message(srv):
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"s\.count_accepted > 0.*'accepted': 0"):
        srv.wait_for(lambda s: s.count_accepted > 0, timeout=0.1)
    assert time.monotonic() - started < 2.0


def test_cli_writes_its_port_and_serves_stats(tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(FAKEAWS_SCRIPT),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--no-verify",
            "--no-store",
            "--shards",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while not port_file.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no port file before the deadline"
            time.sleep(0.02)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        yandex = "/ru-central1/folder/db/stream"
        with httpx.Client(base_url=url, timeout=DEADLINE) as http:
            headers = {"X-Amz-Target": PUT_RECORDS, "Content-Type": "application/x-amz-json-1.1"}
            a = http.post(
                "/",
                json=kinesis_body("a", [(b"1", "k"), (b"2", "k"), (b"3", "j")]),
                headers=headers,
            )
            b = http.post(
                "/", json=kinesis_body(yandex, [(b"4", "k"), (b"5", "k")]), headers=headers
            )
            stats = http.get("/_stats").json()
        assert (a.status_code, b.status_code) == (200, 200)
        assert stats == {
            "requests": 2,
            "accepted": 5,
            "bad_signatures": 0,
            "records_by_stream": {"a": 3, yandex: 2},
        }
        proc.terminate()
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_record_is_a_frozen_value():
    record = Record("s", "k", None, b"d", "1", "shardId-000000000000", None)
    with pytest.raises(AttributeError):
        record.data = b"changed"  # type: ignore[misc]
    assert record == Record("s", "k", None, b"d", "1", "shardId-000000000000", None)


# ---- several keys, session tokens, STS AssumeRole ---------------------------------------------

ROLE = "arn:aws:iam::123456789012:role/writer"


def sts_client(server: FakeAWS, key: str = ACCESS, secret: str = SECRET) -> Any:
    return boto3.client("sts", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret, config=NO_RETRY)


def test_several_static_keys_each_verified_with_its_own_secret(client: Callable[..., Any]) -> None:
    with FakeAWS(access_key=ACCESS, secret_key=SECRET, keys={"AKIDOTHER": "other-secret"}) as server:
        client(server).put_record(StreamName="s", Data=b"a", PartitionKey="k")
        client(server, key="AKIDOTHER", secret="other-secret").put_record(StreamName="s", Data=b"b", PartitionKey="k")
        with pytest.raises(ClientError) as exc:
            client(server, key="AKIDOTHER", secret=SECRET).put_record(StreamName="s", Data=b"c", PartitionKey="k")
        assert error_of(exc) == (400, "InvalidSignatureException")
        with pytest.raises(ClientError) as exc:
            client(server, key="AKIDNOBODY").put_record(StreamName="s", Data=b"c", PartitionKey="k")
        assert error_of(exc) == (400, "UnrecognizedClientException")
        assert [r.data for r in server.records("s")] == [b"a", b"b"]
        assert [r.access_key for r in server.requests] == [ACCESS, "AKIDOTHER", "AKIDOTHER", "AKIDNOBODY"]


def test_assume_role_issues_keys_that_sign_with_their_session_token(srv: FakeAWS) -> None:
    srv.roles[ROLE] = Role(external_id="ext-123")
    sts = sts_client(srv)
    answer = sts.assume_role(RoleArn=ROLE, RoleSessionName="spoold-host", ExternalId="ext-123",
                             DurationSeconds=900)
    creds = answer["Credentials"]
    assert creds["AccessKeyId"].startswith("ASIA")
    assert answer["AssumedRoleUser"]["Arn"] == "arn:aws:sts::123456789012:assumed-role/writer/spoold-host"
    left = (creds["Expiration"] - datetime.datetime.now(datetime.UTC)).total_seconds()
    assert 890 <= left <= 900
    (call,) = srv.assume_role_calls()
    assert (call.access_key, call.role_arn, call.external_id, call.role_session_name, call.duration_seconds,
            call.status, call.issued_key) == (ACCESS, ROLE, "ext-123", "spoold-host", 900, 200, creds["AccessKeyId"])
    kinesis = boto3.client("kinesis", endpoint_url=srv.url, region_name="us-east-1", config=NO_RETRY,
                           aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                           aws_session_token=creds["SessionToken"])
    kinesis.put_record(StreamName="s", Data=b"x", PartitionKey="k")
    assert srv.requests[-1].access_key == creds["AccessKeyId"] and srv.requests[-1].signature_ok
    # The same key without its token, or with another one, is not accepted.
    for token in (None, "fake-token-wrong"):
        bad = boto3.client("kinesis", endpoint_url=srv.url, region_name="us-east-1", config=NO_RETRY,
                           aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                           aws_session_token=token)
        with pytest.raises(ClientError) as exc:
            bad.put_record(StreamName="s", Data=b"y", PartitionKey="k")
        assert error_of(exc) == (400, "UnrecognizedClientException")
    # A static key may not carry a token.
    with pytest.raises(ClientError) as exc:
        boto3.client("kinesis", endpoint_url=srv.url, region_name="us-east-1", config=NO_RETRY,
                     aws_access_key_id=ACCESS, aws_secret_access_key=SECRET,
                     aws_session_token="t").put_record(StreamName="s", Data=b"y", PartitionKey="k")
    assert error_of(exc) == (400, "UnrecognizedClientException")
    assert [r.data for r in srv.records("s")] == [b"x"]


def test_assume_role_refusals_are_access_denied(srv: FakeAWS) -> None:
    srv.roles[ROLE] = Role(external_id="ext-123", trusted_keys=frozenset({ACCESS}))
    srv.keys["AKIDOTHER"] = "other-secret"
    cases = [
        (sts_client(srv), dict(RoleArn=ROLE, RoleSessionName="s1", ExternalId="wrong")),
        (sts_client(srv), dict(RoleArn=ROLE, RoleSessionName="s1")),
        (sts_client(srv), dict(RoleArn=ROLE + "x", RoleSessionName="s1", ExternalId="ext-123")),
        (sts_client(srv, "AKIDOTHER", "other-secret"), dict(RoleArn=ROLE, RoleSessionName="s1", ExternalId="ext-123")),
    ]
    for sts, kwargs in cases:
        with pytest.raises(ClientError) as exc:
            sts.assume_role(**kwargs)
        assert error_of(exc) == (403, "AccessDenied"), kwargs
    with pytest.raises(ClientError) as exc:
        sts_client(srv, secret="wrong").assume_role(RoleArn=ROLE, RoleSessionName="s1", ExternalId="ext-123")
    assert error_of(exc)[1] == "InvalidSignatureException"
    assert [c.status for c in srv.assume_role_calls()] == [403, 403, 403, 403, 400]
    assert not srv.issued_keys() and srv.bad_signatures == 1


def test_expired_session_token_is_refused(srv: FakeAWS) -> None:
    srv.roles[ROLE] = Role()
    srv.sts_lifetime = 2
    creds = sts_client(srv).assume_role(RoleArn=ROLE, RoleSessionName="short")["Credentials"]
    issued = srv.issued_keys()[creds["AccessKeyId"]]
    kinesis = boto3.client("kinesis", endpoint_url=srv.url, region_name="us-east-1", config=NO_RETRY,
                           aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                           aws_session_token=creds["SessionToken"])
    # Waiting for the key's end is the point of this test: poll the clock, not the server.
    while time.time() < issued.expiration:
        time.sleep(0.05)
    with pytest.raises(ClientError) as exc:
        kinesis.put_record(StreamName="s", Data=b"late", PartitionKey="k")
    assert error_of(exc) == (400, "ExpiredTokenException")
    assert srv.records("s") == []


def test_reshard_closes_the_old_shards_and_puts_by_the_new_map(client):
    with FakeAWS(access_key=ACCESS, secret_key=SECRET, shards=2) as server:
        kinesis = client(server)
        before = kinesis.put_records(StreamName="s", Records=[{"Data": b"a", "PartitionKey": "pk-1"}])
        assert server.reshard(3) == [f"shardId-{i:012d}" for i in (2, 3, 4)]
        listed = kinesis.list_shards(StreamName="s")["Shards"]
        paged = _list_shards_by_twos(kinesis)
        described = kinesis.describe_stream(StreamName="s")["StreamDescription"]["Shards"]
        after = kinesis.put_records(StreamName="s", Records=[{"Data": b"b", "PartitionKey": "pk-1"}])

    assert [s["ShardId"] for s in listed] == [f"shardId-{i:012d}" for i in range(5)]
    closed = [s["ShardId"] for s in listed if "EndingSequenceNumber" in s["SequenceNumberRange"]]
    assert closed == ["shardId-000000000000", "shardId-000000000001"]
    assert paged == listed == described
    assert before["Records"][0]["ShardId"] == expected_shard("pk-1", 2)
    assert after["Records"][0]["ShardId"] == f"shardId-{int(expected_shard('pk-1', 3)[-1]) + 2:012d}"
    assert [r.shard_id for r in server.all_records()] == [r["Records"][0]["ShardId"] for r in (before, after)]


def test_reshard_not_listed_routes_by_the_new_map_and_lists_the_old(client):
    with FakeAWS(access_key=ACCESS, secret_key=SECRET, shards=1) as server:
        kinesis = client(server)
        server.reshard(2, listed=False)
        listed = kinesis.list_shards(StreamName="s")["Shards"]
        put = kinesis.put_records(StreamName="s", Records=[{"Data": b"a", "PartitionKey": "pk-1"}])
    assert [s["ShardId"] for s in listed] == ["shardId-000000000000"]
    assert "EndingSequenceNumber" not in listed[0]["SequenceNumberRange"]
    assert put["Records"][0]["ShardId"] == f"shardId-{int(expected_shard('pk-1', 2)[-1]) + 1:012d}"
