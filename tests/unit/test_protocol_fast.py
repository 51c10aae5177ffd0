"""protocol.ReplyShape: the all-accepted reply recognized without a JSON parse. Whatever the
body, it either declines (None) or gives exactly what the full parse gives, outcome for outcome
and the shard hint too; it never accepts a body the full parse refuses."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from spoold.errors import SendError
from spoold.protocol import FIREHOSE_REPLY, KINESIS_REPLY, VALUE_CHARS, Api, Outcomes, ReplyShape

KINESIS = Api.for_destination("kinesis", "s1", None)
FIREHOSE = Api.for_destination("firehose", "fh", None)
SHAPES: dict[bool, ReplyShape] = {False: KINESIS_REPLY, True: FIREHOSE_REPLY}
SEQUENCE = "49590000000000000000000000000000000000000000000000000017"


def full(api: Api, body: bytes, count: int) -> Outcomes | None:
    """The full parse's answer, None when it refuses the reply."""
    try:
        return api.parse_document(200, body, count)
    except SendError:
        return None


def check(api: Api, body: bytes, count: int) -> bool:
    """The fast path declines or agrees with the full parse; True when it accepted."""
    fast = SHAPES[api.firehose].all_accepted(body, count)
    if fast is None:
        return False
    reference = full(api, body, count)
    assert reference is not None, body
    assert fast == reference and fast.shard == reference.shard, body
    assert api.parse(200, body, count) == fast
    return True


def kinesis_reply(n: int, shard: str = "shardId-000000000001", *, first: str = "", last: str = "") -> bytes:
    items = [{"SequenceNumber": str(int(SEQUENCE) + i), "ShardId": shard} for i in range(n)]
    return (b'{' + first.encode() + b'"FailedRecordCount":0,"Records":' + orjson.dumps(items)
            + last.encode() + b'}')


def firehose_reply(n: int) -> bytes:
    items = [{"RecordId": f"{i:048x}"} for i in range(n)]
    return orjson.dumps({"FailedPutCount": 0, "Encrypted": False, "RequestResponses": items})


# ---------------------------------------------------------------- what it accepts

@pytest.mark.parametrize(("api", "body", "count", "shard"), [
    (KINESIS, kinesis_reply(500), 500, (0, "shardId-000000000001")),
    (KINESIS, kinesis_reply(1, "shard-000000"), 1, (0, "shard-000000")),  # Yandex's shard names
    (KINESIS, kinesis_reply(3, ""), 3, None),  # an empty ShardId: accepted, no hint
    (KINESIS, kinesis_reply(2, first='"EncryptionType":"KMS",'), 2, (0, "shardId-000000000001")),
    (KINESIS, kinesis_reply(2, last=',"EncryptionType":"NONE"'), 2, (0, "shardId-000000000001")),
    (FIREHOSE, firehose_reply(500), 500, None),
    (FIREHOSE, b'{"Encrypted":true,"FailedPutCount":0,"RequestResponses":[{"RecordId":"kS4V+1P/9e="}]}', 1, None),
], ids=["kinesis 500", "yds", "empty ShardId", "EncryptionType first", "EncryptionType last", "firehose 500",
        "firehose Encrypted first"])
def test_the_common_replies_take_the_fast_path(api: Api, body: bytes, count: int,
                                                shard: tuple[int, str] | None) -> None:
    assert check(api, body, count)
    out = SHAPES[api.firehose].all_accepted(body, count)
    assert out == [None] * count and out is not None and out.shard == shard


# (id, api, body, count): each declined, whatever the full parse makes of it
DECLINED = [
    ("one record fewer", KINESIS, kinesis_reply(3), 4),
    ("one record more", KINESIS, kinesis_reply(3), 2),
    ("no records", KINESIS, kinesis_reply(0), 0),
    ("an ErrorCode", KINESIS, kinesis_reply(2).replace(b'"ShardId"', b'"ErrorCode":"X","ShardId"', 1), 2),
    ("a failure count of 1", KINESIS, kinesis_reply(2).replace(b":0,", b":1,", 1), 2),
    ("a failure count of 00", KINESIS, kinesis_reply(2).replace(b":0,", b":00,", 1), 2),
    ("a failure count of 0.0", KINESIS, kinesis_reply(2).replace(b":0,", b":0.0,", 1), 2),
    ("an empty SequenceNumber", KINESIS, kinesis_reply(2).replace(SEQUENCE.encode(), b"", 1), 2),
    ("a duplicated key", KINESIS, kinesis_reply(1).replace(b'"ShardId"', b'"SequenceNumber":"","ShardId"'), 1),
    ("keys swapped", KINESIS,
     b'{"FailedRecordCount":0,"Records":[{"ShardId":"shardId-0","SequenceNumber":"1"}]}', 1),
    ("a key with a digit", KINESIS, kinesis_reply(2).replace(b'"ShardId"', b'"Shard1Id"', 1), 2),
    ("an escape", KINESIS, kinesis_reply(1).replace(b"shardId", b"shard\\u0049d"), 1),
    ("a space", KINESIS, kinesis_reply(1).replace(b'":0,', b'": 0,'), 1),
    ("a newline after it", KINESIS, kinesis_reply(1) + b"\n", 1),
    ("cut short", KINESIS, kinesis_reply(2)[:-1], 2),
    ("a brace in a value", KINESIS, kinesis_reply(1, "shard}{"), 1),
    ("a number as a value", KINESIS, b'{"FailedRecordCount":0,"Records":[{"SequenceNumber":1,"ShardId":"s"}]}', 1),
    ("non-ASCII in a value", KINESIS, kinesis_reply(1, "shard-\u00e9"), 1),
    ("a control byte in a value", KINESIS, kinesis_reply(1).replace(b"shardId", b"shard\x01d"), 1),
    ("a digit after a value", KINESIS, kinesis_reply(1).replace(b'"}', b'"7}'), 1),
    ("a letter between items", KINESIS, kinesis_reply(2).replace(b"},{", b"}x,{"), 2),
    ("Kinesis items to Firehose", FIREHOSE, kinesis_reply(1), 1),
    ("Firehose items to Kinesis", KINESIS, firehose_reply(1), 1),
    ("an unknown member", FIREHOSE, firehose_reply(1).replace(b'"Encrypted"', b'"Other"'), 1),
    ("an extra key in an item", FIREHOSE, firehose_reply(1).replace(b'"}', b'","ShardId":"s"}'), 1),
]


@pytest.mark.parametrize(("api", "body", "count"), [c[1:] for c in DECLINED], ids=[c[0] for c in DECLINED])
def test_anything_else_is_left_to_the_full_parse(api: Api, body: bytes, count: int) -> None:
    assert SHAPES[api.firehose].all_accepted(body, count) is None
    check(api, body, count)


# ---------------------------------------------------------------- every single-byte edit

EDIT_BYTES = b'0aSzI-_+/=." \\{}[],:\x00\x01\n\x7f\xc3\xa9\xff'


@pytest.mark.parametrize(("api", "body", "count"), [
    (KINESIS, kinesis_reply(2, "shardId-7", first='"EncryptionType":"KMS",'), 2),
    (FIREHOSE, firehose_reply(2), 2),
], ids=["kinesis", "firehose"])
def test_every_single_byte_insertion_deletion_and_change(api: Api, body: bytes, count: int) -> None:
    """Inserting, deleting or changing any one byte anywhere: declined, or the same outcomes
    (a digit more in a sequence number, say). Both happen, so the check is not vacuous."""
    accepted = declined = 0
    for i in range(len(body) + 1):
        edits = [body[:i] + bytes([b]) + body[i:] for b in EDIT_BYTES]
        if i < len(body):
            edits.append(body[:i] + body[i + 1:])
            edits += [body[:i] + bytes([b]) + body[i + 1:] for b in EDIT_BYTES if b != body[i]]
        for edited in edits:
            for n in (count - 1, count, count + 1):
                if check(api, edited, n):
                    accepted += 1
                else:
                    declined += 1
    assert accepted > 100 and declined > 1000


# ---------------------------------------------------------------- generated replies and their mutations

_value = st.text(alphabet=VALUE_CHARS.decode(), min_size=1, max_size=12)
_odd_text = st.text(max_size=8)  # empty, quotes, backslashes, control and non-ASCII characters
_kinesis_failed = st.fixed_dictionaries({"ErrorCode": st.sampled_from(["InternalFailure", ""]),
                                         "ErrorMessage": _odd_text})
_odd_item = (st.dictionaries(st.sampled_from(["SequenceNumber", "ShardId", "RecordId", "ErrorCode", "X"]),
                             _value | _odd_text | st.integers(-1, 2) | st.none(), max_size=3)
             | _kinesis_failed | _value | st.integers(0, 9))
_odd_count = st.sampled_from([1, -1, "0", 0.0, None, False])
_extra = st.dictionaries(st.sampled_from(["EncryptionType", "Encrypted", "Records", "FailedRecordCount",
                                          "RequestResponses", "FailedPutCount"]),
                         st.sampled_from(["KMS", "NONE", True, False, 0, []]), max_size=2)
_inserts = st.sampled_from([bytes([b]) for b in EDIT_BYTES] + [
    b'"ErrorCode":"X",', b'\\u0041', b'\\"', b'{"SequenceNumber":"1","ShardId":"s"},', b'{"RecordId":"r"},',
    b'"SequenceNumber":"1",', b'"ShardId":"s",', b',"X":1', b"\r\n", b'""', b"12", b"ab"])
_dumps = [
    orjson.dumps,
    lambda doc: json.dumps(doc).encode(),  # spaces
    lambda doc: json.dumps(doc, separators=(",", ":")).encode(),  # \\u escapes of non-ASCII
]


def _rarely(draw: st.DrawFn) -> bool:
    return draw(st.sampled_from([False, False, False, True]))


@st.composite
def replies(draw: st.DrawFn) -> tuple[Api, bytes, int]:
    """A reply and a record count: mostly the compact all-accepted reply (which the fast path
    takes), sometimes another shape, then 0-3 mutations of its bytes."""
    firehose = draw(st.booleans())
    keys = ("RecordId",) if firehose else ("SequenceNumber", "ShardId")
    count_key, items_key = ("FailedPutCount", "RequestResponses") if firehose else ("FailedRecordCount", "Records")
    ok = st.fixed_dictionaries({key: _value | _odd_text if _rarely(draw) else _value for key in keys})
    items = draw(st.lists(ok | _odd_item if _rarely(draw) else ok, min_size=1, max_size=6))
    members: list[tuple[str, Any]] = [(count_key, draw(_odd_count) if _rarely(draw) else 0), (items_key, items)]
    if _rarely(draw):
        members = draw(st.permutations(members + list(draw(_extra).items())))
    body = draw(st.sampled_from(_dumps))(dict(members)) if _rarely(draw) else orjson.dumps(dict(members))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(body)))
        j = draw(st.integers(i, min(len(body), i + 40)))
        op = draw(st.sampled_from(["cut", "insert", "delete", "double", "swap", "replace"]))
        if op == "cut":
            body = body[:i]
        elif op == "insert":
            body = body[:i] + draw(_inserts) + body[i:]
        elif op == "delete":
            body = body[:i] + body[j:]
        elif op == "double":
            body = body[:j] + body[i:j] + body[j:]
        elif op == "swap":
            k = draw(st.integers(j, min(len(body), j + 40)))
            body = body[:i] + body[j:k] + body[i:j] + body[k:]
        else:
            body = body[:i] + draw(_inserts) + body[j:]
    count = len(items) + (draw(st.sampled_from([-1, 1, 2])) if _rarely(draw) else 0)
    return FIREHOSE if firehose else KINESIS, body, count


@settings(max_examples=1000, deadline=None)
@given(replies())
@example((KINESIS, kinesis_reply(3), 3))
@example((FIREHOSE, firehose_reply(3), 3))
def test_generated_replies_and_mutations_declined_or_agreed(reply: tuple[Api, bytes, int]) -> None:
    check(*reply)


@settings(max_examples=300, deadline=None)
@given(firehose=st.booleans(),
       values=st.lists(st.tuples(st.text(alphabet=VALUE_CHARS.decode(), min_size=1, max_size=60),
                                 st.text(alphabet=VALUE_CHARS.decode(), max_size=30)), min_size=1, max_size=50))
def test_every_compact_all_accepted_reply_takes_the_fast_path(firehose: bool, values: list[tuple[str, str]]) -> None:
    if firehose:
        body = orjson.dumps({"FailedPutCount": 0, "RequestResponses": [{"RecordId": r} for r, _ in values]})
    else:
        body = orjson.dumps({"FailedRecordCount": 0,
                             "Records": [{"SequenceNumber": s, "ShardId": h} for s, h in values]})
    assert check(FIREHOSE if firehose else KINESIS, body, len(values))
