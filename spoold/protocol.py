"""Pure wire protocol: request bodies for PutRecords / PutRecordBatch / PutRecord, and replies
parsed into per-entry outcomes. No I/O.

A reply marks an entry as sent only when it says so unambiguously (a SequenceNumber for Kinesis,
a RecordId for Firehose, at the entry's position). Anything else about a 200 reply that does not
add up (not JSON, missing fields, a wrong number of results, a failure count that disagrees) makes
the whole reply malformed: every entry is retried, none is counted as sent.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from binascii import b2a_base64 as b2a
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from typing import Any

from spoold.batching import Entry, Run
from spoold.errors import FatalSendError, RetryableSendError, SendError
from spoold.machine import FATAL_CODES, RetryPolicy

JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
KINESIS_PREFIX = "Kinesis_20131202."
FIREHOSE_PREFIX = "Firehose_20150804."
# Under this many records a body is joined from its pieces at once (see Api._few_body); from it,
# one bytes object per record is faster (many records: small ones, 5 MiB at most per request).
FEW_RECORDS = 64

_b64 = partial(b2a, newline=False)

try:  # SIMD base64: a 1 MB aggregate in ~0.07 ms instead of ~4.6 ms (binascii), same bytes
    from pybase64 import b64encode as _b64_large
except ImportError:  # pragma: no cover - pybase64 is a dependency, but binascii is as correct
    _b64_large = _b64
_OPEN, _KEY, _HASH, _CLOSE = b'{"Data":"', b'","PartitionKey":"', b'","ExplicitHashKey":"', b'"},'


class Outcomes(list):  # type: ignore[type-arg]
    """Per-record outcomes (None: accepted, else the error code), plus ``shard``: the position
    and ShardId of the first accepted record when the reply names it (Kinesis), else None. One
    item is looked at, not all: enough to see that the shard map went stale (resharding)."""

    __slots__ = ("shard",)

    def __init__(self, outcomes: Any = (), shard: tuple[int, str] | None = None) -> None:
        super().__init__(outcomes)
        self.shard = shard


def _shard_hint(items: list[Any], index: int) -> tuple[int, str] | None:
    item = items[index] if index < len(items) else None
    shard = item.get("ShardId") if isinstance(item, dict) else None
    return (index, shard) if isinstance(shard, str) and shard else None


@dataclass(frozen=True)
class Api:
    """How one destination talks to its service."""

    target: str  # X-Amz-Target
    stream_field: str  # StreamName / StreamARN / DeliveryStreamName
    stream: str
    firehose: bool

    @classmethod
    def for_destination(cls, kind: str, stream: str, stream_arn: str | None) -> Api:
        if kind == "firehose":
            return cls(FIREHOSE_PREFIX + "PutRecordBatch", "DeliveryStreamName", stream, True)
        if stream_arn:
            return cls(KINESIS_PREFIX + "PutRecords", "StreamARN", stream_arn, False)
        return cls(KINESIS_PREFIX + "PutRecords", "StreamName", stream, False)

    def headers(self) -> dict[str, str]:
        return {"Content-Type": JSON_CONTENT_TYPE, "X-Amz-Target": self.target}

    def body(self, batch: list[Entry | Run], hex_keys: bool = False) -> bytes:
        """The request body for ``batch``, built once so the signed bytes are the sent bytes.

        Joined by hand rather than serialized from dicts (about 3x faster): Data is base64 and
        ExplicitHashKey decimal digits, which JSON never escapes. ``hex_keys`` says every
        partition key is a random hex key (no partition_key_field), so keys need no escaping
        either; otherwise each key goes through the JSON encoder. Runs (whose keys are always
        random hex keys) are laid out as their entries would be, byte for byte.
        """
        head = b'{"' + self.stream_field.encode() + b'":' + _dumps(self.stream) + b',"Records":['
        if not batch:
            return head + b"]}"
        if Run in set(map(type, batch)):
            return _columnar_body(head, batch)
        if len(batch) < FEW_RECORDS:
            return self._few_body(head, batch, hex_keys)
        if self.firehose:
            parts = [b2a(e.data, newline=False) for e in batch]
            return head + b'{"Data":"' + b'"},{"Data":"'.join(parts) + b'"}]}'
        if hex_keys:
            parts = [
                b2a(e.data, newline=False) + b'","PartitionKey":"' + e.key.encode()
                + (b'","ExplicitHashKey":"' + e.hash_key.encode() if e.hash_key else b"")
                for e in batch
            ]
            return head + b'{"Data":"' + b'"},{"Data":"'.join(parts) + b'"}]}'
        parts = [
            b2a(e.data, newline=False) + b'","PartitionKey":' + _dumps(e.key)
            + (b',"ExplicitHashKey":"' + e.hash_key.encode() + b'"' if e.hash_key else b"")
            for e in batch
        ]
        return head + b'{"Data":"' + b'},{"Data":"'.join(parts) + b"}]}"

    def _few_body(self, head: bytes, batch: list[Entry | Run], hex_keys: bool) -> bytes:
        # Few records, so possibly large ones (KPL aggregates, packed Firehose lines): pieces
        # joined once, so that each record is copied once rather than at every "+", and each
        # encoded by pybase64 (SIMD; for 100-byte records its call costs more than binascii's).
        out = [head]
        if self.firehose:
            for e in batch:
                out += (b'{"Data":"', _b64_large(e.data), b'"},')
        else:
            for e in batch:
                if hex_keys:
                    out += (b'{"Data":"', _b64_large(e.data), b'","PartitionKey":"', e.key.encode(), b'"')
                else:
                    out += (b'{"Data":"', _b64_large(e.data), b'","PartitionKey":', _dumps(e.key))
                if e.hash_key:
                    out += (b',"ExplicitHashKey":"', e.hash_key.encode(), b'"},')
                else:
                    out.append(b"},")
        out[-1] = out[-1][:-1] + b"]}"
        return b"".join(out)

    def single_body(self, entry: Entry, sequence_for_ordering: str | None) -> bytes:
        """A Kinesis PutRecord body (ordered mode)."""
        doc: dict[str, Any] = {
            self.stream_field: self.stream,
            "Data": base64.b64encode(entry.data).decode(),
            "PartitionKey": entry.key,
        }
        if entry.hash_key:
            doc["ExplicitHashKey"] = entry.hash_key
        if sequence_for_ordering:
            doc["SequenceNumberForOrdering"] = sequence_for_ordering
        return _dumps(doc)

    def parse(self, status: int, body: bytes, count: int) -> Outcomes:
        """Per-entry outcome of a PutRecords/PutRecordBatch reply: None when accepted, else the
        error code (and, for Kinesis, the first accepted record's ShardId: Outcomes.shard).
        Raises SendError subclasses when the request failed as a whole."""
        if status == 200:
            accepted = (FIREHOSE_REPLY if self.firehose else KINESIS_REPLY).all_accepted(body, count)
            if accepted is not None:
                return accepted
        return self.parse_document(status, body, count)

    def parse_document(self, status: int, body: bytes, count: int) -> Outcomes:
        """parse() by a full JSON parse: every reply, whatever its shape."""
        doc = _reply(status, body)
        if self.firehose:
            items, failed_key, ok_key = doc.get("RequestResponses"), "FailedPutCount", "RecordId"
        else:
            items, failed_key, ok_key = doc.get("Records"), "FailedRecordCount", "SequenceNumber"
        if not isinstance(items, list) or len(items) != count:
            got = len(items) if isinstance(items, list) else "no"
            raise RetryableSendError(f"malformed reply: {got} results for {count} records", code="MalformedReply")
        failed = doc.get(failed_key)
        if failed == 0 and type(failed) is int and _all_accepted(items, ok_key):
            return Outcomes([None] * count, None if self.firehose else _shard_hint(items, 0))
        out = Outcomes()
        for item in items:
            if not isinstance(item, dict):
                raise RetryableSendError("malformed reply: a result is not an object", code="MalformedReply")
            code = item.get("ErrorCode")
            if code:
                out.append(str(code))
            elif isinstance(item.get(ok_key), str) and item[ok_key]:
                out.append(None)
            else:
                raise RetryableSendError(f"malformed reply: a result has neither {ok_key} nor ErrorCode",
                                         code="MalformedReply")
        errors = sum(1 for o in out if o is not None)
        if failed is not None and (not isinstance(failed, int) or failed != errors):
            raise RetryableSendError(f"malformed reply: {failed_key}={failed!r} but {errors} results failed",
                                     code="MalformedReply")
        if not self.firehose and errors < count:
            out.shard = _shard_hint(items, out.index(None))
        return out

    def parse_single(self, status: int, body: bytes) -> str:
        """The SequenceNumber of a PutRecord reply."""
        doc = _reply(status, body)
        seq = doc.get("SequenceNumber")
        if not isinstance(seq, str) or not seq:
            raise RetryableSendError("malformed reply: no SequenceNumber", code="MalformedReply")
        return seq


def _columnar_body(head: bytes, batch: list[Entry | Run]) -> bytes:
    # A run's records are laid out in C loops: a list of its pieces made by repetition, the
    # base64 data and the keys dropped into every fourth slot, one join for the whole body.
    out = [head]
    for item in batch:
        tail = _HASH + item.hash_key.encode() if item.hash_key else b""
        if type(item) is Run:
            glue = tail + _CLOSE + _OPEN
            pieces = [_KEY, _KEY, glue, glue] * item.records
            pieces[0::4] = map(_b64, item.lines())
            pieces[2::4] = item.key_list()
            pieces[-1] = tail + _CLOSE
            out.append(_OPEN)
            out += pieces
        else:  # an entry of an exploded run: a random hex key too
            out += (_OPEN, _b64(item.data), _KEY, item.key.encode(), tail, _CLOSE)  # type: ignore[union-attr]
    out[-1] = out[-1][:-1] + b"]}"
    return b"".join(out)


try:  # 500-record bodies and replies are several times faster with orjson
    import orjson

    def _loads(body: bytes) -> Any:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValueError(str(exc)) from None

    def _dumps(doc: Any) -> bytes:
        return orjson.dumps(doc)

except ImportError:  # pragma: no cover - orjson is a dependency, but the stdlib is as correct
    def _loads(body: bytes) -> Any:
        return json.loads(body)

    def _dumps(doc: Any) -> bytes:
        return json.dumps(doc, separators=(",", ":")).encode()


def _all_accepted(items: list[Any], ok_key: str) -> bool:
    """Every item an object with a non-empty string ``ok_key`` and no ErrorCode: the common
    all-accepted reply, checked in C loops (map) rather than one Python step per item."""
    try:
        ids = list(map(dict.get, items, repeat(ok_key)))
        if any(map(dict.get, items, repeat("ErrorCode"))):
            return False
    except TypeError:  # an item that is not an object: the careful path says which
        return False
    return set(map(type, ids)) == {str} and "" not in ids


class ReplyShape:
    """The common reply, every record accepted, recognized in its compact form without a JSON
    parse: C-level passes (a regex on the head and on the tail, bytes.translate, two or three
    counts, one search) instead of a dict and two strings per record. Services answer in this
    form byte for byte; anything else (whitespace, escapes, another key order, an ErrorCode,
    a failure count other than 0, a stray byte) is left to the full parse, which then decides.

    Why nothing else passes: let M be the bytes between the items' ``[`` and ``]``, and S be M
    with every VALUE_CHARS byte deleted. S must be the item skeleton (``{"":"","":""}``: the
    quotes of each key and value) ``count`` times, comma-separated, so M is that skeleton with
    runs of VALUE_CHARS inserted between its bytes. M must then start with ``{"Key1":"``, end
    with ``"}``, and hold ``"},{"Key1":"`` count-1 times and ``","Key2":"`` count times. In S
    the skeleton of each of those occurs once per item boundary (once per item), so each
    boundary and each item holds that text exactly, with nothing inserted. The only runs left
    are the values: strings of VALUE_CHARS, which JSON takes as they are. A last search
    rejects an empty first value (what the full parse would refuse).
    """

    __slots__ = ("head", "tail", "first", "boundary", "inner", "empty", "skeleton", "shard")

    def __init__(self, count_key: bytes, items_key: bytes, keys: tuple[bytes, ...], shard: bool) -> None:
        extra = rb'"(?:Encrypted|EncryptionType)":(?:true|false|"[A-Z_]+")'  # members parse() ignores
        self.head = re.compile(rb'\{(?:%s,){0,2}"%s":0,(?:%s,){0,2}"%s":\[' % (extra, count_key, extra, items_key))
        self.tail = re.compile(rb"\](?:,%s){0,2}\}" % extra)
        self.first = b'{"' + keys[0] + b'":"'
        self.boundary = b'"},' + self.first
        self.inner = [b'","' + key + b'":"' for key in keys[1:]]
        self.empty = b'"' + keys[0] + b'":""'
        self.skeleton = b"{" + b",".join([b'"":""'] * len(keys)) + b"}"
        self.shard = shard  # the second key is the ShardId (Outcomes.shard)

    def all_accepted(self, body: bytes, count: int) -> Outcomes | None:
        """Outcomes of a reply accepting all ``count`` records, or None: not sure, parse it."""
        head, end = self.head.match(body), body.rfind(b"]")
        if head is None or count < 1 or end < head.end() or not self.tail.fullmatch(body, end):
            return None
        items = body[head.end():end]
        if (not items.startswith(self.first) or not items.endswith(b'"}')
                or items.translate(None, VALUE_CHARS) != _skeletons(self.skeleton, count)
                or items.count(self.boundary) != count - 1
                or any(items.count(inner) != count for inner in self.inner)
                or self.empty in items):
            return None
        shard = None
        if self.shard:
            start = items.find(self.inner[0]) + len(self.inner[0])
            name = items[start:items.find(b'"', start)].decode("ascii")
            shard = (0, name) if name else None
        return Outcomes([None] * count, shard)


@functools.lru_cache(maxsize=8)
def _skeletons(skeleton: bytes, count: int) -> bytes:
    return b",".join([skeleton] * count)


# What a value may hold for ReplyShape: printable ASCII but JSON's quote and backslash (and no
# syntax byte: each must stay in the skeleton).
VALUE_CHARS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+-./=_"
KINESIS_REPLY = ReplyShape(b"FailedRecordCount", b"Records", (b"SequenceNumber", b"ShardId"), shard=True)
FIREHOSE_REPLY = ReplyShape(b"FailedPutCount", b"RequestResponses", (b"RecordId",), shard=False)


def reply_document(status: int, body: bytes) -> dict[str, Any]:
    """The JSON object of a 200 reply; SendError for an error reply or a malformed one."""
    return _reply(status, body)


def _reply(status: int, body: bytes) -> dict[str, Any]:
    if status != 200:
        raise error_from_reply(status, body)
    try:
        doc = _loads(body)
    except ValueError:
        raise RetryableSendError("malformed reply: not JSON", code="MalformedReply", status=status) from None
    if not isinstance(doc, dict):
        raise RetryableSendError("malformed reply: not a JSON object", code="MalformedReply", status=status)
    return doc


def error_from_reply(status: int, body: bytes) -> SendError:
    """Classify a non-200 reply by its AWS error type."""
    code, message = "", ""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            code = str(doc.get("__type") or doc.get("code") or "")
            message = str(doc.get("message") or doc.get("Message") or "")
    except ValueError:
        pass
    code = code.rsplit("#", 1)[-1] or f"HTTP{status}"
    text = f"HTTP {status} {code}" + (f": {message[:300]}" if message else "")
    if status < 500 and code in FATAL_CODES:
        return FatalSendError(text, code=code, status=status)
    return RetryableSendError(text, code=code, status=status)


def is_throttle(code: str) -> bool:
    return RetryPolicy.is_throttle(code)
