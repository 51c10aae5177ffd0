"""spoold.aggregation, checked by aws-kinesis-agg's de-aggregator and by protobuf."""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

import pytest

# messages_pb2 imports config_pb2 as a top-level module, which works only once
# deaggregator has put the package's directory on sys.path: take it from there.
from aws_kinesis_agg.deaggregator import deaggregate_records, messages_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from spoold.aggregation import (
    MAGIC,
    MAX_HASH_KEY,
    AggregateBuilder,
    Shard,
    ShardMap,
    hash_key,
)

MIB = 1024 * 1024

# (data, partition key or None for the aggregate's own, explicit hash key or None)
Line = tuple[bytes, str | None, str | None]


def lambda_record(data: bytes, partition_key: str) -> dict[str, Any]:
    """A record shaped like a Lambda Kinesis event, as deaggregate_records expects."""
    return {
        "eventSource": "aws:kinesis",
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": partition_key,
            "sequenceNumber": "1",
            "approximateArrivalTimestamp": 1700000000.0,
            "data": base64.b64encode(data).decode(),
        },
    }


def deaggregate(builder: AggregateBuilder) -> list[tuple[bytes, str, str | None]]:
    """(data, partition key, explicit hash key) per sub-record, by aws-kinesis-agg."""
    out = deaggregate_records([lambda_record(builder.build(), builder.partition_key)])
    assert all(r["kinesis"].get("aggregated") is True for r in out), (
        "not recognised as an aggregate"
    )
    return [
        (
            base64.b64decode(r["kinesis"]["data"]),
            r["kinesis"]["partitionKey"],
            r["kinesis"]["explicitHashKey"],
        )
        for r in out
    ]


def parse(builder: AggregateBuilder) -> messages_pb2.AggregatedRecord:
    """Parse with protobuf itself and check the framing and canonical encoding."""
    data = builder.build()
    assert data[:4] == MAGIC
    body, digest = data[4:-16], data[-16:]
    assert hashlib.md5(body).digest() == digest
    record = messages_pb2.AggregatedRecord()
    record.ParseFromString(body)
    assert record.IsInitialized()
    # protobuf writes fields in number order; so must a hand encoder, byte for byte.
    assert record.SerializeToString() == body
    return record


def sub_records(
    record: messages_pb2.AggregatedRecord,
) -> list[tuple[bytes, str, str | None]]:
    """Like deaggregate(), but honouring a missing explicit_hash_key_index.

    See test_mixed_explicit_hash_keys for why deaggregate() cannot be used for that.
    """
    return [
        (
            r.data,
            record.partition_key_table[r.partition_key_index],
            record.explicit_hash_key_table[r.explicit_hash_key_index]
            if r.HasField("explicit_hash_key_index")
            else None,
        )
        for r in record.records
    ]


def expected(
    builder: AggregateBuilder, lines: list[Line]
) -> list[tuple[bytes, str, str | None]]:
    return [
        (data, builder.partition_key if pk is None else pk, ehk)
        for data, pk, ehk in lines
    ]


def fill(builder: AggregateBuilder, lines: list[Line]) -> None:
    for data, pk, ehk in lines:
        assert builder.try_add(data, pk, ehk), (len(data), pk, ehk)


def check_size(builder: AggregateBuilder) -> None:
    assert builder.size == len(builder.build()) + len(builder.partition_key.encode())
    assert builder.size <= builder.max_bytes


# --- round trips ----------------------------------------------------------------------


def test_round_trip_mixed_lines() -> None:
    builder = AggregateBuilder(MIB, "outer-key")
    lines: list[Line] = [
        (b"hello world\n", None, None),
        (b"", None, None),
        (b"\x00", "other", None),
        (b"\xff\xfe\x80\xc3\x28 not utf-8", None, None),
        (bytes(range(256)) * 3, "other", None),
        (b"x" * 200, "\u043a\u043b\u044e\u0447-\U0001f511", None),
        (b"last", None, None),
    ]
    fill(builder, lines)
    assert len(builder) == len(lines)
    check_size(builder)
    assert deaggregate(builder) == expected(builder, lines)
    record = parse(builder)
    # Repeated keys reuse their table entry; first-seen order.
    assert list(record.partition_key_table) == [
        "outer-key",
        "other",
        "\u043a\u043b\u044e\u0447-\U0001f511",
    ]
    assert list(record.explicit_hash_key_table) == []


def test_round_trip_many_distinct_keys() -> None:
    # > 128 keys so table indices need two-byte varints.
    builder = AggregateBuilder(MIB, "k0")
    lines: list[Line] = [
        (f"line {i}".encode(), f"k{i % 300}", None) for i in range(1000)
    ]
    fill(builder, lines)
    check_size(builder)
    assert deaggregate(builder) == expected(builder, lines)
    assert list(parse(builder).partition_key_table) == [f"k{i}" for i in range(300)]


def test_round_trip_explicit_hash_keys() -> None:
    ehks = ["0", "1", str(2**127), str(MAX_HASH_KEY)]
    builder = AggregateBuilder(MIB, "outer", explicit_hash_key=str(2**127))
    lines: list[Line] = [
        (f"{i}".encode(), f"pk{i % 3}", ehks[i % len(ehks)]) for i in range(200)
    ]
    fill(builder, lines)
    check_size(builder)
    assert deaggregate(builder) == expected(builder, lines)
    record = parse(builder)
    assert list(record.explicit_hash_key_table) == ehks
    # The outer keys are not stored unless a sub-record uses them.
    assert "outer" not in record.partition_key_table


def test_mixed_explicit_hash_keys() -> None:
    # Valid KPL: only some sub-records have an explicit hash key. aws-kinesis-agg 1.2.3
    # (Python) reports explicit_hash_key_table[0] for the others (it never
    # asks HasField) while KCL honours the missing index, so check those with protobuf.
    builder = AggregateBuilder(MIB, "outer")
    lines: list[Line] = [
        (b"a", None, None),
        (b"b", None, "42"),
        (b"c", "x", None),
        (b"d", None, "7"),
    ]
    fill(builder, lines)
    check_size(builder)
    assert sub_records(parse(builder)) == expected(builder, lines)
    assert [(d, pk) for d, pk, _ in deaggregate(builder)] == [
        (d, pk) for d, pk, _ in expected(builder, lines)
    ]


@pytest.mark.parametrize(
    "length", [0, 1, 127, 128, 129, 16383, 16384, 16385, 2097151, 2097152]
)
def test_varint_boundaries(length: int) -> None:
    builder = AggregateBuilder(8 * MIB, "p")
    data = b"\xab" * length
    fill(builder, [(data, None, None), (data, "q", "5")])
    check_size(builder)
    assert sub_records(parse(builder)) == [(data, "p", None), (data, "q", "5")]
    assert [(d, pk) for d, pk, _ in deaggregate(builder)] == [(data, "p"), (data, "q")]


def largest_fitting(max_bytes: int, partition_key: str) -> int:
    low, high = 0, max_bytes  # fits(low) is True, fits(high) is False
    while high - low > 1:
        mid = (low + high) // 2
        if AggregateBuilder(max_bytes, partition_key).try_add(b"x" * mid):
            low = mid
        else:
            high = mid
    return low


@pytest.mark.parametrize(
    "partition_key",
    ["p", "k" * 256, "\U0001f511" * 64],
    ids=["short", "256-chars", "256-bytes-utf8"],
)
def test_line_at_the_limit(partition_key: str) -> None:
    n = largest_fitting(MIB, partition_key)
    builder = AggregateBuilder(MIB, partition_key)
    assert not builder.try_add(b"x" * (n + 1))
    assert len(builder) == 0
    data = bytes(i % 251 for i in range(n))
    assert builder.try_add(data)
    check_size(builder)
    # A byte more of data costs one or two bytes, so the largest line nearly fills it.
    assert MIB - builder.size <= 2
    assert not builder.try_add(b"")  # even an empty line needs six bytes
    assert deaggregate(builder) == [(data, partition_key, None)]


def test_fill_to_the_limit_with_small_lines() -> None:
    builder = AggregateBuilder(64 * 1024, "p")
    lines: list[Line] = []
    i = 0
    while True:
        line: Line = (
            f"{i:08d} ".encode() * (i % 7 + 1),
            None if i % 3 else f"k{i % 5}",
            None,
        )
        if not builder.try_add(*line):
            break
        lines.append(line)
        i += 1
    check_size(builder)
    assert builder.max_bytes - builder.size < 80
    assert deaggregate(builder) == expected(builder, lines)


def test_oversized_line_never_fits() -> None:
    builder = AggregateBuilder(1000, "p")
    assert not builder.try_add(b"x" * 1000)
    # framing 21 + key entry 3 + Record (tag 1, length 2, index 2, tag 1, length 2) = 32
    assert not builder.try_add(b"x" * 969)
    assert builder.try_add(b"x" * 968)
    check_size(builder)
    assert builder.size == 1000
    builder = AggregateBuilder(1000, "p")
    assert len(builder) == 0
    assert builder.size == 4 + 16 + 1
    with pytest.raises(ValueError, match="empty"):
        builder.build()


def test_refused_add_changes_nothing() -> None:
    builder = AggregateBuilder(200, "p")
    assert builder.try_add(b"a" * 100, "first", "1")
    before = (builder.size, len(builder), builder.build())
    assert not builder.try_add(b"b" * 60, "a-new-key-that-costs-more", "2")
    assert (builder.size, len(builder), builder.build()) == before
    # The refused keys did not enter the tables: the next record gets index 1, not 2.
    assert builder.try_add(b"c", "second", "3")
    record = parse(builder)
    assert list(record.partition_key_table) == ["first", "second"]
    assert list(record.explicit_hash_key_table) == ["1", "3"]


@pytest.mark.parametrize(
    "bad",
    ["", "-1", "01", "1.0", " 1", "abc", "\uff11", str(MAX_HASH_KEY + 1), "9" * 40],
)
def test_malformed_explicit_hash_key(bad: str) -> None:
    with pytest.raises(ValueError, match="explicit hash key"):
        AggregateBuilder(MIB, "p", explicit_hash_key=bad)
    builder = AggregateBuilder(MIB, "p")
    with pytest.raises(ValueError, match="explicit hash key"):
        builder.try_add(b"x", None, bad)
    assert len(builder) == 0
    assert builder.size == 4 + 16 + 1


def test_max_bytes_must_hold_an_empty_line() -> None:
    # magic 4 + md5 16 + key 1 + table entry 0a 01 70 + Record 1a 04 08 00 1a 00
    builder = AggregateBuilder(30, "p")
    assert builder.try_add(b"")
    check_size(builder)
    assert builder.size == 30
    for too_small in (29, 0, -1):
        with pytest.raises(ValueError, match="cannot hold"):
            AggregateBuilder(too_small, "p")


# --- the de-aggregator must notice a broken encoder -----------------------------------


def built() -> tuple[bytes, str]:
    builder = AggregateBuilder(MIB, "pk")
    fill(builder, [(b"one", None, None), (b"two", "other", None)])
    return builder.build(), builder.partition_key


def flipped(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def test_intact_aggregate_is_deaggregated() -> None:
    data, pk = built()
    assert len(deaggregate_records([lambda_record(data, pk)])) == 2


@pytest.mark.parametrize(
    "index",
    [0, 3, 4, -17, -16, -1],
    ids=["magic0", "magic3", "body0", "body-last", "md5-0", "md5-last"],
)
def test_corruption_is_not_deaggregated(index: int) -> None:
    data, pk = built()
    bad = flipped(data, index)
    out = deaggregate_records([lambda_record(bad, pk)])
    # Passed through unchanged as a plain record.
    assert len(out) == 1
    assert "aggregated" not in out[0]["kinesis"]
    assert base64.b64decode(out[0]["kinesis"]["data"]) == bad


# --- hypothesis: exact sizes, exact refusals, faithful round trips --------------------

KEY_POOL = ["a", "b", "\u00e9", "\U0001f511key", "k" * 40]
EHK_POOL = ["0", "1", "127", "128", str(2**64), str(MAX_HASH_KEY)]
keys = st.text(min_size=1, max_size=12)
lines_strategy = st.lists(
    st.tuples(
        st.binary(max_size=300),
        st.none() | st.sampled_from(KEY_POOL) | keys,
        st.none() | st.sampled_from(EHK_POOL) | st.integers(0, MAX_HASH_KEY).map(str),
    ),
    max_size=40,
)


@settings(deadline=None, max_examples=200)
@given(room=st.integers(0, 2500), outer=keys, lines=lines_strategy)
def test_builder_property(room: int, outer: str, lines: list[Line]) -> None:
    key_bytes = len(outer.encode())
    # framing + the smallest possible line + room
    max_bytes = 4 + 16 + key_bytes + (2 + key_bytes + 6) + room
    builder = AggregateBuilder(max_bytes, outer)
    accepted: list[Line] = []
    for line in lines:
        before = (builder.size, len(builder), builder.build() if len(builder) else b"")
        if builder.try_add(*line):
            accepted.append(line)
        else:
            after = (
                builder.size,
                len(builder),
                builder.build() if len(builder) else b"",
            )
            assert after == before
            # The refusal is exact: with this line the aggregate really is too big.
            unbounded = AggregateBuilder(10 * MIB, outer)
            fill(unbounded, [*accepted, line])
            assert len(unbounded.build()) + len(outer.encode()) > max_bytes
        assert builder.size <= max_bytes
        if len(builder):
            assert builder.size == len(builder.build()) + len(outer.encode())
    assert len(builder) == len(accepted)
    if accepted:
        assert sub_records(parse(builder)) == expected(builder, accepted)
        assert [(d, pk) for d, pk, _ in deaggregate(builder)] == [
            (d, pk) for d, pk, _ in expected(builder, accepted)
        ]
        if all(ehk is not None for _, _, ehk in accepted) or all(
            ehk is None for _, _, ehk in accepted
        ):
            assert deaggregate(builder) == expected(builder, accepted)


# --- hash keys and shard maps ---------------------------------------------------------

HALF = 2**127


def shard(shard_id: str, start: int, end: int, closed: bool = False) -> dict[str, Any]:
    sequence: dict[str, str] = {"StartingSequenceNumber": "100"}
    if closed:
        sequence["EndingSequenceNumber"] = "200"
    return {
        "ShardId": shard_id,
        "HashKeyRange": {"StartingHashKey": str(start), "EndingHashKey": str(end)},
        "SequenceNumberRange": sequence,
    }


# shard-0 was split at 2**127 into shard-1 and shard-2; shard-2 was then split again.
SHARDS = [
    shard("shardId-000000000000", 0, MAX_HASH_KEY, closed=True),
    shard("shardId-000000000001", 0, HALF - 1),
    shard("shardId-000000000002", HALF, MAX_HASH_KEY, closed=True),
    shard("shardId-000000000003", HALF, HALF + 2**126 - 1),
    shard("shardId-000000000004", HALF + 2**126, MAX_HASH_KEY),
]


def check_map(shard_map: ShardMap) -> None:
    assert [s.shard_id for s in shard_map.shards] == [
        "shardId-000000000001",
        "shardId-000000000003",
        "shardId-000000000004",
    ]
    for s in shard_map.shards:
        for key in (s.start, s.start + 1, (s.start + s.end) // 2, s.end - 1, s.end):
            assert shard_map.shard_for(key) == s
    assert shard_map.shard_for(HALF - 1).shard_id == "shardId-000000000001"
    assert shard_map.shard_for(HALF).shard_id == "shardId-000000000003"


def test_shard_map_from_list_shards() -> None:
    pages: list[dict[str, Any]] = [
        {"Shards": SHARDS[:2], "NextToken": "t"},
        {"Shards": SHARDS[2:]},
    ]
    shard_map = ShardMap.from_list_shards(pages)
    check_map(shard_map)
    assert shard_map.shard_for(0) == Shard("shardId-000000000001", 0, HALF - 1)


def test_shard_map_from_describe_stream() -> None:
    pages = [
        {
            "StreamDescription": {
                "StreamName": "s",
                "Shards": SHARDS[:3],
                "HasMoreShards": True,
            }
        },
        {
            "StreamDescription": {
                "StreamName": "s",
                "Shards": SHARDS[3:],
                "HasMoreShards": False,
            }
        },
    ]
    check_map(ShardMap.from_describe_stream(pages))


def test_shard_map_tolerates_a_shard_repeated_across_pages() -> None:
    check_map(
        ShardMap.from_list_shards([{"Shards": SHARDS[:4]}, {"Shards": SHARDS[3:]}])
    )


def test_single_shard_and_out_of_range_keys() -> None:
    shard_map = ShardMap.from_list_shards(
        [{"Shards": [shard("only", 0, MAX_HASH_KEY)]}]
    )
    assert (
        shard_map.shard_for(0).shard_id
        == shard_map.shard_for(MAX_HASH_KEY).shard_id
        == "only"
    )
    for key in (-1, MAX_HASH_KEY + 1):
        with pytest.raises(ValueError, match="out of range"):
            shard_map.shard_for(key)


@pytest.mark.parametrize(
    "shards",
    [
        [],
        [shard("closed", 0, MAX_HASH_KEY, closed=True)],
        [shard("a", 0, HALF - 1)],  # does not reach the top
        [shard("a", 1, MAX_HASH_KEY)],  # does not start at 0
        [shard("a", 0, HALF - 2), shard("b", HALF, MAX_HASH_KEY)],  # gap
        [shard("a", 0, HALF), shard("b", HALF, MAX_HASH_KEY)],  # overlap
    ],
    ids=["empty", "all-closed", "short", "late-start", "gap", "overlap"],
)
def test_shard_map_must_tile_the_key_space(shards: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match="open shards"):
        ShardMap.from_list_shards([{"Shards": shards}])


@pytest.mark.parametrize(
    "key", ["", "a", "shard-7", "\u043a\u043b\u044e\u0447", "\U0001f511" * 10]
)
def test_hash_key_is_md5_of_utf8(key: str) -> None:
    assert hash_key(key) == int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16)


def test_hash_key_known_values() -> None:
    assert hash_key("") == 0xD41D8CD98F00B204E9800998ECF8427E
    assert hash_key("anything", "12345") == 12345
    assert hash_key("anything", str(MAX_HASH_KEY)) == MAX_HASH_KEY
    with pytest.raises(ValueError, match="explicit hash key"):
        hash_key("anything", "012")


def test_hash_key_and_shard_map_agree_with_moto() -> None:
    # moto's replies have the real shapes, and it routes PutRecord by MD5 of the key.
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    with moto.mock_aws():
        client = boto3.client(
            "kinesis",
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        client.create_stream(StreamName="s", ShardCount=3)
        shard_map = ShardMap.from_describe_stream(
            [client.describe_stream(StreamName="s")]
        )
        assert len(shard_map) == 3
        for i in range(60):
            key = f"key-{i}"
            put = client.put_record(StreamName="s", Data=b"x", PartitionKey=key)
            assert put["ShardId"] == shard_map.shard_for(hash_key(key)).shard_id
        # Routing is not checked after a split: moto 5.2 routes to the closed parent.
        client.split_shard(
            StreamName="s",
            ShardToSplit="shardId-000000000001",
            NewStartingHashKey=str(HALF),
        )
        paginator = client.get_paginator("list_shards")
        pages = list(
            paginator.paginate(StreamName="s", PaginationConfig={"PageSize": 2})
        )
        assert len(pages) == 3
        from_list = ShardMap.from_list_shards(pages)
        assert (
            from_list.shards
            == ShardMap.from_describe_stream(
                [client.describe_stream(StreamName="s")]
            ).shards
        )
        assert [s.shard_id for s in from_list.shards] == [
            "shardId-000000000000",
            "shardId-000000000003",
            "shardId-000000000004",
            "shardId-000000000002",
        ]
        assert from_list.shard_for(HALF).shard_id == "shardId-000000000004"


# --- throughput (reported, not asserted) ----------------------------------------------


def test_encode_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    lines = [(f"{i:08d}".encode() * 13)[:99] + b"\n" for i in range(10_000)]
    started = time.perf_counter()
    aggregates: list[bytes] = []
    builder = AggregateBuilder(MIB, "p")
    for line in lines:
        if not builder.try_add(line):
            aggregates.append(builder.build())
            builder = AggregateBuilder(MIB, "p")
            assert builder.try_add(line)
    aggregates.append(builder.build())
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(
            f"\nencoded {len(lines)} x 100-byte lines into {len(aggregates)} aggregates"
            f" in {elapsed * 1000:.1f} ms: {len(lines) / elapsed:,.0f} lines/s"
        )
    out = deaggregate_records([lambda_record(data, "p") for data in aggregates])
    assert [base64.b64decode(r["kinesis"]["data"]) for r in out] == lines


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(200, 40_000),
    lines=st.lists(st.binary(max_size=20_000), min_size=1, max_size=40),
    start=st.integers(0, 5),
    prefill=st.booleans(),
)
def test_extend_equals_try_add_line_by_line(limit: int, lines: list[bytes], start: int, prefill: bool) -> None:
    """The bulk path builds exactly the aggregate the line-by-line path builds, stops at the
    same line, and keeps size exact."""
    a = _extend_matches_try_add(limit, lines, start, prefill)
    if len(a):
        assert a.size == len(a.build()) + len(b"outer")


def _extend_matches_try_add(limit: int, lines: list[bytes], start: int = 0,
                            prefill: bool = False) -> AggregateBuilder:
    """extend(lines, start) and try_add line by line build the same aggregate, stop at the same
    line and count the same exact size (never over limit); returns the extended builder."""
    a, b = AggregateBuilder(limit, "outer"), AggregateBuilder(limit, "outer")
    if prefill:  # the key's table entry already exists
        assert a.try_add(b"p") == b.try_add(b"p")
    n = a.extend(lines, start)
    m = 0
    for line in lines[start:]:
        if not b.try_add(line):
            break
        m += 1
    assert n == m
    assert len(a) == len(b) and a.size == b.size <= limit
    if len(a):
        assert a.build() == b.build()
    return a


@settings(max_examples=60, deadline=None)
@given(
    limit=st.integers(200, 200_000),
    sizes=st.lists(st.integers(0, 400), min_size=1, max_size=3000),
    first=st.integers(0, 2000),
)
def test_extend_over_many_windows_equals_try_add(limit: int, sizes: list[int], first: int) -> None:
    """Many small lines of mixed sizes, where the first line's size misjudges how many fit:
    the bulk path works through several windows and still matches line-by-line exactly."""
    _extend_matches_try_add(limit, [bytes([i % 251]) * n for i, n in enumerate([first, *sizes])])


def test_extend_stops_exactly_at_the_limit() -> None:
    """Every remainder of room before the line that does not fit: 0, 1, 2 ... bytes short."""
    lines = [bytes([i]) * (90 + i % 13) for i in range(200)]
    for limit in range(2_000, 2_300):
        assert len(_extend_matches_try_add(limit, lines)) < len(lines)  # stopped inside the list
