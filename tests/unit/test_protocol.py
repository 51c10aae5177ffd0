"""protocol.Api: request bodies, reply parsing (every malformed shape retried whole), and the
classification of error replies."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoold.batching import Entry
from spoold.errors import FatalSendError, RetryableSendError, SendError
from spoold.protocol import Api, Outcomes, error_from_reply, is_throttle

ARN = "arn:aws:kinesis:eu-west-1:123456789012:stream/s1"
KINESIS = Api.for_destination("kinesis", "s1", None)
FIREHOSE = Api.for_destination("firehose", "fh", None)


def e(data: bytes, key: str = "", hash_key: str | None = None) -> Entry:
    return Entry(data, key, [], 1, 0.0, hash_key)


BATCH = [
    e(b"hello", "k1"),
    e(b"\x00\xff\n\x80 binary", 'we"ird\\ключ', hash_key="340282366920938463463374607431768211455"),
    e(b"", "0123456789abcdef"),
]


# ---------------------------------------------------------------- bodies

# (kind, stream, stream_arn, field, value, X-Amz-Target)
API_CASES = [
    ("kinesis", "s1", None, "StreamName", "s1", "Kinesis_20131202.PutRecords"),
    ("kinesis", "s1", ARN, "StreamARN", ARN, "Kinesis_20131202.PutRecords"),
    ("yds", "/ru-central1/f/d/s", None, "StreamName", "/ru-central1/f/d/s", "Kinesis_20131202.PutRecords"),
    ("firehose", "fh", None, "DeliveryStreamName", "fh", "Firehose_20150804.PutRecordBatch"),
]


@pytest.mark.parametrize(("kind", "stream", "arn", "field", "value", "target"), API_CASES)
def test_body(kind: str, stream: str, arn: str | None, field: str, value: str, target: str) -> None:
    api = Api.for_destination(kind, stream, arn)
    assert api.headers() == {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target}
    body = api.body(BATCH)
    assert isinstance(body, bytes)
    doc = json.loads(body)
    assert set(doc) == {field, "Records"}
    assert doc[field] == value
    records = doc["Records"]
    assert [base64.b64decode(r["Data"], validate=True) for r in records] == [x.data for x in BATCH]
    if kind == "firehose":
        assert all(set(r) == {"Data"} for r in records)
    else:
        assert [r["PartitionKey"] for r in records] == [x.key for x in BATCH]
        assert [r.get("ExplicitHashKey") for r in records] == [x.hash_key for x in BATCH]


def _reference_body(api: Api, batch: list[Entry]) -> dict[str, Any]:
    records: list[dict[str, str]] = []
    for x in batch:
        record = {"Data": base64.b64encode(x.data).decode()}
        if not api.firehose:
            record["PartitionKey"] = x.key
            if x.hash_key:
                record["ExplicitHashKey"] = x.hash_key
        records.append(record)
    return {api.stream_field: api.stream, "Records": records}


_hex_key = st.binary(min_size=1, max_size=16).map(bytes.hex)
_any_key = st.text(min_size=1, max_size=40)  # hypothesis leaves out lone surrogates
_hash_key = st.none() | st.integers(0, 2**128 - 1).map(str)


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["kinesis", "firehose"]),
    hex_keys=st.booleans(),
    stream=st.text(min_size=1, max_size=20),
    rows=st.lists(st.tuples(st.binary(max_size=64), st.data()), max_size=40),
)
def test_hand_joined_body_is_the_dict_body(kind: str, hex_keys: bool, stream: str,
                                           rows: list[tuple[bytes, Any]]) -> None:
    """Every batch, small or large, hex keys or any keys (quotes, backslashes, control and
    non-ASCII characters), serializes to exactly the JSON a dict-based encoder would make."""
    api = Api.for_destination(kind, stream, None)
    batch = [e(data, draw.draw(_hex_key if hex_keys else _any_key), draw.draw(_hash_key)) for data, draw in rows]
    assert json.loads(api.body(batch, hex_keys)) == _reference_body(api, batch)


def test_body_of_500_records_with_escaped_keys() -> None:
    batch = [e(bytes([i % 256]) * (i % 7), f'k"{i}\\\n\u00e9', None if i % 3 else str(i)) for i in range(500)]
    assert json.loads(KINESIS.body(batch)) == _reference_body(KINESIS, batch)
    hexed = [e(x.data, f"{i:032x}", x.hash_key) for i, x in enumerate(batch)]
    assert json.loads(KINESIS.body(hexed, hex_keys=True)) == _reference_body(KINESIS, hexed)
    assert json.loads(FIREHOSE.body(batch)) == _reference_body(FIREHOSE, batch)


def test_big_records_are_encoded_by_pybase64_to_the_same_bytes_as_binascii() -> None:
    """Aggregates are base64'd by pybase64 (SIMD): the same text as the standard library's, for
    every length's remainder mod 3 and for a record of the service's 1 MiB limit."""
    import os

    import pybase64

    from spoold import protocol

    assert protocol._b64_large is pybase64.b64encode  # the declared dependency is the one used
    for data in [b"", *(os.urandom(n) for n in (1, 2, 3, 4, 5, 63, 64, 65, 1000)), os.urandom(1 << 20)]:
        assert protocol._b64_large(data) == base64.b64encode(data)
    aggregate = os.urandom((1 << 20) - 7)
    for api in (KINESIS, FIREHOSE):
        batch = [e(aggregate, "k", None), e(b"x", "k2", "12")]
        assert json.loads(api.body(batch)) == _reference_body(api, batch)


def test_single_body() -> None:
    entry = e(b"line", "key")
    doc = json.loads(KINESIS.single_body(entry, None))
    assert doc == {"StreamName": "s1", "Data": base64.b64encode(b"line").decode(), "PartitionKey": "key"}
    doc = json.loads(KINESIS.single_body(entry, "4959"))
    assert doc["SequenceNumberForOrdering"] == "4959"
    doc = json.loads(Api.for_destination("kinesis", "s1", ARN).single_body(e(b"x", "k", "12"), "1"))
    assert doc["StreamARN"] == ARN and doc["ExplicitHashKey"] == "12" and "StreamName" not in doc


# ---------------------------------------------------------------- parse


def reply(doc: Any) -> bytes:
    return json.dumps(doc).encode()


OK_K = {"SequenceNumber": "49590", "ShardId": "shardId-000000000000"}
OK_F = {"RecordId": "rid-1"}


def fail_k(code: str) -> dict[str, str]:
    return {"ErrorCode": code, "ErrorMessage": "no"}


# (id, api, body, count, outcomes)
PARSE_CASES = [
    ("kinesis all ok", KINESIS, {"FailedRecordCount": 0, "Records": [OK_K, OK_K]}, 2, [None, None]),
    ("kinesis mixed", KINESIS,
     {"FailedRecordCount": 2, "Records": [OK_K, fail_k("ProvisionedThroughputExceededException"), OK_K,
                                          fail_k("InternalFailure")]},
     4, [None, "ProvisionedThroughputExceededException", None, "InternalFailure"]),
    ("kinesis all failed", KINESIS, {"FailedRecordCount": 1, "Records": [fail_k("KMSThrottlingException")]},
     1, ["KMSThrottlingException"]),
    ("kinesis empty ErrorCode with a sequence number", KINESIS,
     {"FailedRecordCount": 0, "Records": [{"SequenceNumber": "1", "ErrorCode": ""}]}, 1, [None]),
    ("firehose all ok", FIREHOSE, {"FailedPutCount": 0, "RequestResponses": [OK_F, OK_F, OK_F]}, 3, [None] * 3),
    ("firehose mixed", FIREHOSE,
     {"FailedPutCount": 1, "Encrypted": False,
      "RequestResponses": [OK_F, {"ErrorCode": "ServiceUnavailableException", "ErrorMessage": "slow down"}]},
     2, [None, "ServiceUnavailableException"]),
]


@pytest.mark.parametrize(("api", "body", "count", "outcomes"), [c[1:] for c in PARSE_CASES],
                         ids=[c[0] for c in PARSE_CASES])
def test_parse(api: Api, body: Any, count: int, outcomes: list[str | None]) -> None:
    assert api.parse(200, reply(body), count) == outcomes


# (id, api, raw body, count)
MALFORMED = [
    ("not JSON", KINESIS, b"<html>ok</html>", 1),
    ("empty body", KINESIS, b"", 1),
    ("JSON array", KINESIS, b"[]", 0),
    ("JSON string", KINESIS, b'"ok"', 1),
    ("missing Records", KINESIS, reply({"FailedRecordCount": 0}), 1),
    ("Records not a list", KINESIS, reply({"FailedRecordCount": 0, "Records": {"0": OK_K}}), 1),
    ("too few results", KINESIS, reply({"FailedRecordCount": 0, "Records": [OK_K]}), 2),
    ("too many results", KINESIS, reply({"FailedRecordCount": 0, "Records": [OK_K, OK_K]}), 1),
    ("result not an object", KINESIS, reply({"FailedRecordCount": 0, "Records": ["49590"]}), 1),
    ("neither SequenceNumber nor ErrorCode", KINESIS,
     reply({"FailedRecordCount": 0, "Records": [OK_K, {"ShardId": "shardId-0"}]}), 2),
    ("empty SequenceNumber", KINESIS, reply({"FailedRecordCount": 0, "Records": [{"SequenceNumber": ""}]}), 1),
    ("numeric SequenceNumber", KINESIS, reply({"FailedRecordCount": 0, "Records": [{"SequenceNumber": 7}]}), 1),
    ("null SequenceNumber", KINESIS, reply({"FailedRecordCount": 0, "Records": [OK_K, {"SequenceNumber": None}]}), 2),
    ("one bad result among 500", KINESIS,
     reply({"FailedRecordCount": 0, "Records": [OK_K] * 250 + [{"ShardId": "shardId-0"}] + [OK_K] * 249}), 500),
    ("one non-object among 500", FIREHOSE,
     reply({"FailedPutCount": 0, "RequestResponses": [OK_F] * 499 + [["rid"]]}), 500),
    ("count says 0, one failed", KINESIS,
     reply({"FailedRecordCount": 0, "Records": [OK_K, fail_k("InternalFailure")]}), 2),
    ("count says 1, none failed", KINESIS, reply({"FailedRecordCount": 1, "Records": [OK_K, OK_K]}), 2),
    ("count not an integer", KINESIS, reply({"FailedRecordCount": "0", "Records": [OK_K]}), 1),
    ("firehose shape to kinesis", KINESIS, reply({"FailedPutCount": 0, "RequestResponses": [OK_F]}), 1),
    ("kinesis shape to firehose", FIREHOSE, reply({"FailedRecordCount": 0, "Records": [OK_K]}), 1),
    ("firehose missing RecordId", FIREHOSE, reply({"FailedPutCount": 0, "RequestResponses": [{}]}), 1),
    ("firehose wrong count", FIREHOSE, reply({"FailedPutCount": 0, "RequestResponses": [OK_F]}), 2),
    ("firehose FailedPutCount disagrees", FIREHOSE,
     reply({"FailedPutCount": 2, "RequestResponses": [OK_F, {"ErrorCode": "InternalFailure"}]}), 2),
]


@pytest.mark.parametrize(("api", "body", "count"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_parse_malformed_is_retried_whole(api: Api, body: bytes, count: int) -> None:
    with pytest.raises(RetryableSendError) as info:
        api.parse(200, body, count)
    assert info.value.code == "MalformedReply"
    assert type(info.value) is RetryableSendError


def test_parse_single() -> None:
    assert KINESIS.parse_single(200, reply({"SequenceNumber": "42", "ShardId": "s"})) == "42"
    for body in (reply({"ShardId": "s"}), reply({"SequenceNumber": ""}), b"nope", b"[]"):
        with pytest.raises(RetryableSendError) as info:
            KINESIS.parse_single(200, body)
        assert info.value.code == "MalformedReply"


def test_parse_error_status_raises_the_classified_error() -> None:
    with pytest.raises(FatalSendError) as fatal:
        KINESIS.parse(400, reply({"__type": "ResourceNotFoundException", "message": "Stream s1 not found"}), 1)
    assert fatal.value.code == "ResourceNotFoundException" and fatal.value.status == 400
    with pytest.raises(RetryableSendError) as retry:
        FIREHOSE.parse(503, b"", 1)
    assert retry.value.code == "HTTP503" and retry.value.status == 503


# ---------------------------------------------------------------- error_from_reply

# (id, status, body, class, code, text that the message includes)
ERROR_CASES = [
    ("not found is fatal", 400, reply({"__type": "ResourceNotFoundException", "message": "Stream s1 not found"}),
     FatalSendError, "ResourceNotFoundException", "Stream s1 not found"),
    ("coral prefix stripped", 400,
     reply({"__type": "com.amazon.coral.service#AccessDeniedException", "Message": "User is not authorized"}),
     FatalSendError, "AccessDeniedException", "User is not authorized"),
    ("bad token is fatal", 403, reply({"__type": "UnrecognizedClientException", "message": "bad token"}),
     FatalSendError, "UnrecognizedClientException", "HTTP 403"),
    ("KMS is fatal", 400, reply({"__type": "KMSDisabledException"}), FatalSendError, "KMSDisabledException",
     "KMSDisabledException"),
    ("lower-case code field", 400, reply({"code": "ValidationException", "message": "too big"}),
     FatalSendError, "ValidationException", "too big"),
    ("throttled is retryable", 400, reply({"__type": "ProvisionedThroughputExceededException"}),
     RetryableSendError, "ProvisionedThroughputExceededException", "HTTP 400"),
    ("limit exceeded is retryable", 400, reply({"__type": "LimitExceededException"}),
     RetryableSendError, "LimitExceededException", "LimitExceededException"),
    ("500", 500, reply({"__type": "InternalFailure"}), RetryableSendError, "InternalFailure", "HTTP 500"),
    ("503", 503, reply({"__type": "ServiceUnavailableException"}), RetryableSendError,
     "ServiceUnavailableException", "HTTP 503"),
    ("5xx is never fatal", 500, reply({"__type": "ResourceNotFoundException"}), RetryableSendError,
     "ResourceNotFoundException", "HTTP 500"),
    ("non-JSON 502", 502, b"<html><body>Bad Gateway</body></html>", RetryableSendError, "HTTP502", "HTTP 502"),
    ("JSON array 500", 500, b"[1]", RetryableSendError, "HTTP500", "HTTP 500"),
    ("empty 403", 403, b"", RetryableSendError, "HTTP403", "HTTP 403"),
]


@pytest.mark.parametrize(("status", "body", "cls", "code", "text"), [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_error_from_reply(status: int, body: bytes, cls: type[SendError], code: str, text: str) -> None:
    err = error_from_reply(status, body)
    assert type(err) is cls
    assert err.code == code and err.status == status
    assert text in str(err)


def test_error_message_is_bounded() -> None:
    err = error_from_reply(400, reply({"__type": "ValidationException", "message": "m" * 10_000}))
    assert len(str(err)) < 400


@pytest.mark.parametrize(("code", "throttle"), [
    ("ProvisionedThroughputExceededException", True), ("ThrottlingException", True),
    ("InternalFailure", True), ("KMSThrottlingException", True),
    ("ResourceNotFoundException", False), ("KMSDisabledException", False), ("", False),
])
def test_is_throttle(code: str, throttle: bool) -> None:
    assert is_throttle(code) is throttle


# ---------------------------------------------------------------- shard hint

def _kinesis_reply(*items: dict[str, Any]) -> bytes:
    failed = sum(1 for i in items if "ErrorCode" in i)
    return json.dumps({"FailedRecordCount": failed, "Records": list(items)}).encode()


OK0 = {"SequenceNumber": "1", "ShardId": "shardId-000000000000"}
OK3 = {"SequenceNumber": "2", "ShardId": "shardId-000000000003"}
THROTTLED = {"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "Rate exceeded"}


@pytest.mark.parametrize(("items", "shard"), [
    ((OK0, OK3), (0, "shardId-000000000000")),  # all accepted: the first record's shard
    ((THROTTLED, OK3, OK0), (1, "shardId-000000000003")),  # the first accepted one
    ((THROTTLED, THROTTLED), None),  # none accepted: nothing to say
    (({"SequenceNumber": "1"}, OK3), None),  # no ShardId on the one looked at: no hint
    (({"SequenceNumber": "1", "ShardId": 7}, OK3), None),
])
def test_parse_gives_the_first_accepted_records_shard(items: tuple[dict[str, Any], ...],
                                                       shard: tuple[int, str] | None) -> None:
    out = KINESIS.parse(200, _kinesis_reply(*items), len(items))
    assert isinstance(out, Outcomes) and out.shard == shard
    assert out == [None if "SequenceNumber" in i else i["ErrorCode"] for i in items]


def test_firehose_replies_carry_no_shard_hint() -> None:
    body = json.dumps({"FailedPutCount": 0, "RequestResponses": [{"RecordId": "r1", "ShardId": "x"}]}).encode()
    assert FIREHOSE.parse(200, body, 1).shard is None
