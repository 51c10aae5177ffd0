"""Pure KPL aggregated-record encoder, and the hash key -> shard map to group lines by.

An aggregated record is MAGIC + protobuf AggregatedRecord + MD5(protobuf), per
awslabs/amazon-kinesis-producer aggregation-format.md (proto2):

    message AggregatedRecord {
      repeated string partition_key_table     = 1;
      repeated string explicit_hash_key_table = 2;
      repeated Record records                 = 3;
    }
    message Record {
      required uint64 partition_key_index     = 1;
      optional uint64 explicit_hash_key_index = 2;
      required bytes  data                    = 3;
      repeated Tag    tags                    = 4;  // never written, as in the KPL
    }

The protobuf is written by hand so spoold needs no protobuf at run time, and the builder
keeps running sizes so adding a line never re-encodes the aggregate. Fields go out in
field-number order, as protobuf's own serializer writes them, so the bytes equal
AggregatedRecord.SerializeToString() for the same content (the tests check this).

KCL 2.x drops sub-records whose hash key is outside the shard that got the aggregate, so
all sub-records of one aggregate must map to one shard: group lines with ShardMap and
hash_key() before filling a builder.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain
from typing import Any

__all__ = [
    "MAGIC",
    "MAX_HASH_KEY",
    "AggregateBuilder",
    "Shard",
    "ShardMap",
    "hash_key",
    "next_shard_page",
    "shard_map_request",
]

# KPL magic number that opens every aggregated record.
MAGIC = b"\xf3\x89\x9a\xc2"
# Bytes of the MD5 digest that closes every aggregated record.
DIGEST_SIZE = 16
# Largest hash key: Kinesis hash keys are 128-bit unsigned integers.
MAX_HASH_KEY = 2**128 - 1

# Protobuf tags (field_number << 3 | wire_type); 0 = varint, 2 = length-delimited.
_TAG_PK_TABLE = b"\x0a"  # AggregatedRecord.partition_key_table = 1
_TAG_EHK_TABLE = b"\x12"  # AggregatedRecord.explicit_hash_key_table = 2
_TAG_RECORD = b"\x1a"  # AggregatedRecord.records = 3
_TAG_PK_INDEX = b"\x08"  # Record.partition_key_index = 1
_TAG_EHK_INDEX = b"\x10"  # Record.explicit_hash_key_index = 2
_TAG_DATA = b"\x1a"  # Record.data = 3

# The Kinesis API's pattern for ExplicitHashKey; the range is checked separately.
_EHK_PATTERN = re.compile(r"0|[1-9][0-9]{0,38}")


def _varint_size(value: int) -> int:
    return (value.bit_length() + 6) // 7 or 1


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)



class _Framing:
    """Per line length: the bytes framing a sub-record of data under one key index field
    (Record tag, its length, key index, Data tag, data length), and the whole record's cost."""

    __slots__ = ("cost", "prefix")

    def __init__(self, index_field: bytes) -> None:
        head_base = index_field + _TAG_DATA

        def prefix(n: int) -> bytes:
            head = head_base + _varint(n)
            return _TAG_RECORD + _varint(len(head) + n) + head

        self.prefix = _Table(prefix)
        self.cost = _Table(lambda n: len(self.prefix[n]) + n)


class _Table(dict[int, Any]):
    """A dict that computes missing values (map(table.__getitem__, ...) stays in C), and
    forgets everything past a few thousand sizes so that odd sizes cannot grow it forever."""

    def __init__(self, make: Callable[[int], Any]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, n: int) -> Any:
        if len(self) >= _FRAMING_SIZES_MAX:
            self.clear()
        value = self[n] = self._make(n)
        return value


_FRAMING_SIZES_MAX = 4096
_FRAMINGS: dict[bytes, _Framing] = {}


def _frames(index_field: bytes) -> _Framing:
    framing = _FRAMINGS.get(index_field)
    if framing is None:
        if len(_FRAMINGS) >= 64:
            _FRAMINGS.clear()
        framing = _FRAMINGS[index_field] = _Framing(index_field)
    return framing


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _check_explicit_hash_key(explicit_hash_key: str) -> None:
    if (
        not _EHK_PATTERN.fullmatch(explicit_hash_key)
        or int(explicit_hash_key) > MAX_HASH_KEY
    ):
        raise ValueError(f"explicit hash key not in 0..2**128-1: {explicit_hash_key!r}")


def hash_key(partition_key: str, explicit_hash_key: str | None = None) -> int:
    """The 128-bit key Kinesis routes a record by.

    That is the explicit hash key if given, else the MD5 of the UTF-8 partition key.
    """
    if explicit_hash_key is not None:
        _check_explicit_hash_key(explicit_hash_key)
        return int(explicit_hash_key)
    return int.from_bytes(hashlib.md5(partition_key.encode()).digest(), "big")


class AggregateBuilder:
    """Packs lines into one KPL aggregated record no larger than max_bytes.

    max_bytes is what the service counts: the record's Data plus its partition key in
    UTF-8. Fill with try_add(); when it returns False, send build() and start a new
    builder. A line that an empty builder refuses can never be aggregated: the caller
    rejects it (or, if data + key fit the record limit, as the last ~30 bytes of framing
    may allow, sends it as a plain record).

    An aggregate of one sub-record is still valid KPL; the caller may send that line
    as a plain record instead, which saves the framing and suits consumers that do
    not de-aggregate.

    partition_key and explicit_hash_key are the outer record's, the ones PutRecords
    routes by; sub-records may carry their own keys, which must map to the same shard.
    The outer explicit hash key is not stored in the aggregate nor counted in its size.
    Keys are not length-checked here (the service wants 1-256 characters for the outer
    one). ValueError if max_bytes cannot hold even an empty line under the outer key.
    """

    __slots__ = (
        "_count",
        "_ehk_fields",
        "_ehk_table",
        "_explicit_hash_key",
        "_max_bytes",
        "_partition_key",
        "_pk_fields",
        "_pk_table",
        "_records",
        "_size",
    )

    def __init__(
        self, max_bytes: int, partition_key: str, explicit_hash_key: str | None = None
    ) -> None:
        if explicit_hash_key is not None:
            _check_explicit_hash_key(explicit_hash_key)
        encoded_key = partition_key.encode()
        framing = len(MAGIC) + DIGEST_SIZE + len(encoded_key)
        # An empty line under the outer key: its table entry plus a 6-byte Record field.
        smallest = framing + 1 + _varint_size(len(encoded_key)) + len(encoded_key) + 6
        if max_bytes < smallest:
            raise ValueError(
                f"max_bytes={max_bytes} cannot hold a line (needs {smallest})"
            )
        self._max_bytes = max_bytes
        self._partition_key = partition_key
        self._explicit_hash_key = explicit_hash_key
        # key -> its encoded index field in Record: a repeated key costs a dict lookup.
        self._pk_fields: dict[str, bytes] = {}
        self._ehk_fields: dict[str, bytes] = {}
        # Encoded table entries and records, in order; build() only joins them.
        self._pk_table: list[bytes] = []
        self._ehk_table: list[bytes] = []
        self._records: list[bytes] = []
        self._count = 0
        self._size = framing

    @property
    def max_bytes(self) -> int:
        """The limit this builder was made with."""
        return self._max_bytes

    @property
    def partition_key(self) -> str:
        """The outer record's partition key."""
        return self._partition_key

    @property
    def explicit_hash_key(self) -> str | None:
        """The outer record's explicit hash key, if any."""
        return self._explicit_hash_key

    @property
    def size(self) -> int:
        """Exact size the service would count: len(build()) + outer key in UTF-8."""
        return self._size

    def __len__(self) -> int:
        return self._count

    def try_add(
        self,
        data: bytes,
        partition_key: str | None = None,
        explicit_hash_key: str | None = None,
    ) -> bool:
        """Add one sub-record (partition_key None = the aggregate's own key).

        Returns False, with nothing changed, if it would not fit. Raises ValueError
        for a malformed explicit hash key, UnicodeEncodeError for a lone surrogate.
        """
        room = self._max_bytes - self._size
        if len(data) > room:
            return False
        key = self._partition_key if partition_key is None else partition_key
        added = 0

        pk_field = self._pk_fields.get(key)
        pk_entry = None
        if pk_field is None:
            pk_entry = _length_delimited(_TAG_PK_TABLE, key.encode())
            pk_field = _TAG_PK_INDEX + _varint(len(self._pk_table))
            added += len(pk_entry)

        ehk_field = b""
        new_ehk: tuple[str, bytes] | None = None
        if explicit_hash_key is not None:
            found = self._ehk_fields.get(explicit_hash_key)
            if found is None:
                _check_explicit_hash_key(explicit_hash_key)
                ehk_entry = _length_delimited(
                    _TAG_EHK_TABLE, explicit_hash_key.encode()
                )
                found = _TAG_EHK_INDEX + _varint(len(self._ehk_table))
                new_ehk = (explicit_hash_key, ehk_entry)
                added += len(ehk_entry)
            ehk_field = found

        head = pk_field + ehk_field + _TAG_DATA + _varint(len(data))
        inner = len(head) + len(data)
        added += 1 + _varint_size(inner) + inner
        if added > room:
            return False

        if pk_entry is not None:
            self._pk_fields[key] = pk_field
            self._pk_table.append(pk_entry)
        if new_ehk is not None:
            self._ehk_fields[new_ehk[0]] = ehk_field
            self._ehk_table.append(new_ehk[1])
        # data is kept by reference (bytes are immutable) and copied once, by build().
        self._records.append(_TAG_RECORD + _varint(inner) + head)
        self._records.append(data)
        self._count += 1
        self._size += added
        return True

    def extend(self, lines: Sequence[bytes], start: int = 0) -> int:
        """Add ``lines[start:]`` in order under the aggregate's own key until one does not fit;
        returns how many were added. The same bytes as try_add() line by line, much faster."""
        end = len(lines)
        if start >= end:
            return 0
        key = self._partition_key
        first = 0  # the key's first line goes through try_add, which adds its table entry
        if key not in self._pk_fields:
            if not self.try_add(lines[start]):
                return 0
            first = 1
        frames = _frames(self._pk_fields[key])
        prefix_of, cost_of = frames.prefix, frames.cost
        room = self._max_bytes - self._size
        records = self._records
        i = start + first
        used = 0
        # Windows of about as many lines as the room holds, each framed in C loops (map,
        # accumulate, bisect): no Python step per line, and little work past the last line
        # that fits.
        while i < end:
            window = lines[i:i + max(16, (room - used) // (len(lines[i]) + 6) + 16)]
            lens = list(map(len, window))
            totals = list(accumulate(map(cost_of.__getitem__, lens), initial=used))
            fit = bisect.bisect_right(totals, room) - 1  # totals[0] = used <= room
            records += chain.from_iterable(zip(map(prefix_of.__getitem__, lens[:fit]), window[:fit]))
            used = totals[fit]
            i += fit
            if fit < len(window):
                break
        added = i - (start + first)
        self._size += used
        self._count += added
        return first + added

    def build(self) -> bytes:
        """The aggregated record's Data: MAGIC + protobuf + MD5(protobuf).

        ValueError if empty: de-aggregators would take that for a plain record.
        """
        if not self._count:
            raise ValueError("cannot build an empty aggregate")
        body = b"".join((*self._pk_table, *self._ehk_table, *self._records))
        return b"".join((MAGIC, body, hashlib.md5(body).digest()))


@dataclass(frozen=True, slots=True)
class Shard:
    """One open shard and its inclusive hash key range."""

    shard_id: str
    start: int
    end: int


class ShardMap:
    """Maps hash keys to the stream's open shards.

    Closed shards (an EndingSequenceNumber in their SequenceNumberRange) are ignored.
    The open shards must tile 0..2**128-1 with no gap or overlap, else ValueError: a
    map caught mid-reshard should be fetched again rather than half trusted.
    """

    __slots__ = ("_shards", "_starts")

    def __init__(self, shards: Iterable[Shard]) -> None:
        ordered = tuple(sorted(shards, key=lambda s: s.start))
        if not ordered:
            raise ValueError("no open shards")
        expected = 0
        for shard in ordered:
            if shard.start != expected or shard.end < shard.start:
                raise ValueError(
                    f"open shards do not tile the hash key space: {shard.shard_id} "
                    f"covers {shard.start}..{shard.end}, expected a start of {expected}"
                )
            expected = shard.end + 1
        if expected != MAX_HASH_KEY + 1:
            raise ValueError(f"open shards end at {expected - 1}, not at 2**128-1")
        self._shards = ordered
        self._starts = [s.start for s in ordered]

    @classmethod
    def from_list_shards(cls, replies: Sequence[Mapping[str, Any]]) -> ShardMap:
        """From every page of ListShards replies ({"Shards": [...], "NextToken"})."""
        return cls(
            _open_shards(
                shard for reply in replies for shard in reply.get("Shards", ())
            )
        )

    @classmethod
    def from_describe_stream(cls, replies: Sequence[Mapping[str, Any]]) -> ShardMap:
        """From every page of DescribeStream replies.

        Each is {"StreamDescription": {"Shards": [...], "HasMoreShards": ...}}. Yandex
        Data Streams has no ListShards, so this is the portable source.
        """
        return cls(
            _open_shards(
                shard
                for reply in replies
                for shard in reply["StreamDescription"].get("Shards", ())
            )
        )

    @classmethod
    def from_pages(cls, operation: str, replies: Sequence[Mapping[str, Any]]) -> ShardMap:
        """From the pages of ``operation`` (see shard_map_request)."""
        if operation == "DescribeStream":
            return cls.from_describe_stream(replies)
        return cls.from_list_shards(replies)

    @property
    def shards(self) -> tuple[Shard, ...]:
        """Open shards, ordered by start."""
        return self._shards

    def __len__(self) -> int:
        return len(self._shards)

    def shard_for(self, hash_key: int) -> Shard:
        """The open shard whose range holds hash_key (see hash_key())."""
        if not 0 <= hash_key <= MAX_HASH_KEY:
            raise ValueError(f"hash key out of range: {hash_key}")
        return self._shards[bisect.bisect_right(self._starts, hash_key) - 1]


def shard_map_request(kind: str, stream_field: str, stream: str) -> tuple[str, dict[str, Any]]:
    """The operation that lists a stream's shards, and its first request body. Yandex Data
    Streams has no ListShards: DescribeStream pages there."""
    return ("DescribeStream" if kind == "yds" else "ListShards"), {stream_field: stream}


def next_shard_page(operation: str, stream_field: str, stream: str,
                    page: Mapping[str, Any]) -> dict[str, Any] | None:
    """The request body for the page after ``page``, or None when it was the last."""
    if operation == "ListShards":
        token = page.get("NextToken")
        return {"NextToken": token} if token else None
    desc = page.get("StreamDescription") or {}
    shards = desc.get("Shards") or []
    if not desc.get("HasMoreShards") or not shards:
        return None
    return {stream_field: stream, "ExclusiveStartShardId": shards[-1]["ShardId"]}


def _open_shards(shards: Iterable[Mapping[str, Any]]) -> list[Shard]:
    # A shard can appear on two pages if the stream changed between calls; keep one.
    found: dict[str, Shard] = {}
    for shard in shards:
        sequence_range = shard.get("SequenceNumberRange", {})
        if sequence_range.get("EndingSequenceNumber") is not None:
            continue
        key_range = shard["HashKeyRange"]
        found[shard["ShardId"]] = Shard(
            shard_id=shard["ShardId"],
            start=int(key_range["StartingHashKey"]),
            end=int(key_range["EndingHashKey"]),
        )
    return list(found.values())
