"""batching: take_batch limits and order, backoff bounds, partition keys from JSON, and the Encoder
for each kind (Kinesis random keys, Firehose delimiters and packing)."""

from __future__ import annotations

import json
import random
import re
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoold.batching import MAX_PARTITION_KEY, Chunk, Encoder, Entry, partition_key_from_json, take_batch
from spoold.machine import backoff

MiB = 1024 * 1024


def entry(size: int, key: str = "") -> Entry:
    """An entry whose counted size is ``size`` (data plus key); entries compare by identity."""
    return Entry(b"x" * (size - len(key)), key, [], 1, 0.0)


# ---------------------------------------------------------------- take_batch

# (id, entry sizes, max_records, max_bytes, how many are taken)
BATCH_CASES = [
    ("empty source", [], 500, 100, 0),
    ("all fit", [10, 10, 10], 500, 100, 3),
    ("bytes exactly at the limit", [40, 30, 30], 500, 100, 3),
    ("one byte over stops", [40, 30, 31], 500, 100, 2),
    ("record limit", [1] * 10, 3, 100, 3),
    ("records and bytes both bind", [50, 50, 1], 2, 100, 2),
    ("first entry alone larger than the limit", [150, 1], 500, 100, 1),
    ("small entries do not jump a big one", [60, 60, 1, 1], 500, 100, 1),
    ("max_records one", [1, 1], 1, 100, 1),
]


@pytest.mark.parametrize(("sizes", "max_records", "max_bytes", "taken"),
                         [c[1:] for c in BATCH_CASES], ids=[c[0] for c in BATCH_CASES])
def test_take_batch_cases(sizes: list[int], max_records: int, max_bytes: int, taken: int) -> None:
    entries = [entry(n) for n in sizes]
    source = deque(entries)
    batch, size = take_batch([source], max_records, max_bytes)
    assert batch == entries[:taken]
    assert size == sum(sizes[:taken])
    assert list(source) == entries[taken:]


def _take_batch_one_by_one(sources: list[deque[Entry]], max_records: int, max_bytes: int) -> tuple[list[Entry], int]:
    batch: list[Entry] = []
    size = 0
    for source in sources:
        while source and len(batch) < max_records:
            if batch and size + source[0].size > max_bytes:
                return batch, size
            size += source[0].size
            batch.append(source.popleft())
    return batch, size


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(1, 60), max_size=12), min_size=1, max_size=3), st.integers(1, 15),
       st.integers(1, 300))
def test_take_batch_equals_taking_one_entry_at_a_time(sources: list[list[int]], max_records: int,
                                                       max_bytes: int) -> None:
    ours = [deque(entry(n) for n in sizes) for sizes in sources]
    reference = [deque(q) for q in ours]
    assert take_batch(ours, max_records, max_bytes) == _take_batch_one_by_one(reference, max_records, max_bytes)
    assert [list(q) for q in ours] == [list(q) for q in reference]


def test_take_batch_counts_partition_keys() -> None:
    # 90 bytes of data each plus a 16-character key: two would be 212 > 200.
    a, b = entry(106, key="k" * 16), entry(106, key="k" * 16)
    assert a.size == 106
    source = deque([a, b])
    batch, size = take_batch([source], 500, 200)
    assert (batch, size, list(source)) == ([a], 106, [b])


def test_take_batch_drains_sources_in_order() -> None:
    due = deque([entry(10), entry(10)])
    fresh = deque([entry(10), entry(10)])
    want = list(due) + list(fresh)[:1]
    batch, size = take_batch([due, fresh], 3, 1000)
    assert batch == want and size == 30
    assert not due and len(fresh) == 1


def test_take_batch_stops_at_an_entry_that_does_not_fit_in_an_earlier_source() -> None:
    big = entry(90)
    due = deque([entry(20), big])
    fresh = deque([entry(1)])
    batch, _ = take_batch([due, fresh], 500, 100)
    assert len(batch) == 1
    assert due[0] is big  # left at the head of its source
    assert len(fresh) == 1  # and nothing from a later source jumps ahead of it


@settings(max_examples=300, deadline=None)
@given(
    sources=st.lists(st.lists(st.integers(min_value=1, max_value=300), max_size=20), min_size=1, max_size=3),
    max_records=st.integers(min_value=1, max_value=25),
    max_bytes=st.integers(min_value=1, max_value=1000),
)
def test_take_batch_property(sources: list[list[int]], max_records: int, max_bytes: int) -> None:
    queues = [deque(entry(n) for n in sizes) for sizes in sources]
    before = [e for q in queues for e in q]
    batch, size = take_batch(queues, max_records, max_bytes)
    after = [e for q in queues for e in q]
    assert batch + after == before  # a prefix taken, in order, nothing lost or reordered
    assert size == sum(e.size for e in batch)
    if before:
        assert batch, "at least one entry is always taken"
    assert len(batch) <= max_records
    if len(batch) > 1:
        assert size <= max_bytes
    if after and len(batch) < max_records:
        assert size + after[0].size > max_bytes  # it stopped only because the next did not fit


# ---------------------------------------------------------------- backoff


class EdgeRandom(random.Random):
    """uniform() returns one end of its range, to see the exact bounds."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


# (attempt, base, cap, the upper bound)
BACKOFF_CASES = [
    (0, 0.1, 60.0, 0.1),
    (1, 0.1, 60.0, 0.2),
    (5, 0.1, 60.0, 3.2),
    (10, 0.1, 60.0, 60.0),
    (-3, 0.1, 60.0, 0.1),
    (3, 1.0, 5.0, 5.0),
    (10**6, 0.1, 60.0, 60.0),
    (10**6, 0.001, 3600.0, 3600.0),
]


@pytest.mark.parametrize(("attempt", "base", "cap", "bound"), BACKOFF_CASES)
def test_backoff_bounds(attempt: int, base: float, cap: float, bound: float) -> None:
    assert backoff(attempt, base, cap, EdgeRandom(high=True)) == pytest.approx(bound)
    assert backoff(attempt, base, cap, EdgeRandom(high=False)) == 0.0
    rng = random.Random(attempt)
    samples = [backoff(attempt, base, cap, rng) for _ in range(200)]
    assert all(0.0 <= s <= bound for s in samples)
    assert len(set(samples)) > 100  # jittered, not a constant


# ---------------------------------------------------------------- partition_key_from_json

# (id, line, field, key or None for "fall back to a random key")
KEY_CASES = [
    ("string", b'{"user":"alice","n":1}', "user", "alice"),
    ("integer", b'{"user":42}', "user", "42"),
    ("float", b'{"user":1.5}', "user", "1.5"),
    ("boolean", b'{"user":true}', "user", "true"),
    ("unicode", '{"user":"ключ"}'.encode(), "user", "ключ"),
    ("escaped", b'{"user":"a\\u00e9\\"b"}', "user", 'a\u00e9"b'),
    ("missing", b'{"other":"x"}', "user", None),
    ("null", b'{"user":null}', "user", None),
    ("empty string", b'{"user":""}', "user", None),
    ("nested object value", b'{"user":{"id":1}}', "user", None),
    ("array value", b'{"user":[1,2]}', "user", None),
    ("dotted field is not a path", b'{"a":{"b":"x"}}', "a.b", None),
    ("only top level", b'{"a":{"user":"x"}}', "user", None),
    ("not JSON", b"user=alice", "user", None),
    ("truncated JSON", b'{"user":"alice"', "user", None),
    ("JSON array", b'["user"]', "user", None),
    ("JSON string", b'"user"', "user", None),
    ("invalid UTF-8", b'{"user":"\xff\xfe"}', "user", None),
    ("long key truncated", b'{"user":"' + b"k" * 300 + b'"}', "user", "k" * MAX_PARTITION_KEY),
    ("key of exactly 256", b'{"user":"' + b"k" * 256 + b'"}', "user", "k" * 256),
]


@pytest.mark.parametrize(("line", "field", "key"), [c[1:] for c in KEY_CASES], ids=[c[0] for c in KEY_CASES])
def test_partition_key_from_json(line: bytes, field: str, key: str | None) -> None:
    assert partition_key_from_json(line, field) == key


def test_max_partition_key_is_the_kinesis_limit() -> None:
    assert MAX_PARTITION_KEY == 256


# ---------------------------------------------------------------- Encoder: kinesis


def chunk(lines: list[bytes], id: int = 1) -> Chunk:
    return Chunk(id, 1234.5, lines, sum(map(len, lines)))


class FixedBits(random.Random):
    def __init__(self, value: int) -> None:
        super().__init__(0)
        self.value = value

    def getrandbits(self, k: int) -> int:
        assert k == 64
        return self.value


@pytest.mark.parametrize(("bits", "key"), [(0, "0" * 16), (1, "0" * 15 + "1"), (2**64 - 1, "f" * 16),
                                           (0xABC, "0000000000000abc")])
def test_random_key_is_16_hex_digits_zero_padded(bits: int, key: str) -> None:
    assert Encoder("kinesis", max_record_bytes=MiB, rng=FixedBits(bits)).random_key() == key


def test_kinesis_entries_random_keys() -> None:
    lines = [b"a", b"bb", b'{"user":"x"}', b"dddd"]
    c = chunk(lines)
    out = list(Encoder("kinesis", max_record_bytes=MiB, rng=random.Random(7)).entries(c))
    assert [e.data for e in out] == lines
    assert all(re.fullmatch(r"[0-9a-f]{16}", e.key) for e in out)
    assert len({e.key for e in out}) == len(out)
    for e, line in zip(out, lines):
        assert e.hash_key is None
        assert e.refs == [(c, 1)] and e.nlines == 1 and e.lines == [line]
        assert e.created == 1234.5 and e.attempts == 0
        assert e.size == len(line) + 16


def test_kinesis_entries_keys_from_json_field_else_random() -> None:
    lines = [b'{"user":"alice"}', b"plain", b'{"user":7}']
    out = list(Encoder("kinesis", max_record_bytes=MiB, partition_key_field="user",
                       rng=random.Random(1)).entries(chunk(lines)))
    assert out[0].key == "alice" and out[2].key == "7"
    assert re.fullmatch(r"[0-9a-f]{16}", out[1].key)


def test_kinesis_explicit_hash_key_carried() -> None:
    ehk = str(2**127)
    out = list(Encoder("kinesis", max_record_bytes=MiB, explicit_hash_key=ehk).entries(chunk([b"a", b"b"])))
    assert [e.hash_key for e in out] == [ehk, ehk]


# ---------------------------------------------------------------- Encoder: firehose

# (delimiter, line, data)
DELIM_CASES = [
    (b"\n", b"abc", b"abc\n"),
    (b"\r\n", b"abc", b"abc\r\n"),
    (b"|", b"a|b", b"a|b|"),
    (b"\n", b"abc\r", b"abc\r\n"),
    (b"", b"abc", b"abc"),
]


@pytest.mark.parametrize(("delimiter", "line", "data"), DELIM_CASES)
def test_firehose_delimiter_appended_once(delimiter: bytes, line: bytes, data: bytes) -> None:
    c = chunk([line, line])
    out = list(Encoder("firehose", delimiter=delimiter, max_record_bytes=1024000).entries(c))
    assert [e.data for e in out] == [data, data]
    for e in out:
        assert e.key == "" and e.hash_key is None
        assert e.lines == [line] and e.nlines == 1 and e.refs == [(c, 1)]
        assert e.size == len(data)


@settings(max_examples=300, deadline=None)
@given(
    delimiter=st.sampled_from([b"\n", b"\r\n", b"", b"|||"]),
    max_record=st.integers(min_value=4, max_value=64),
    data=st.data(),
)
def test_firehose_pack_lines(delimiter: bytes, max_record: int, data: st.DataObject) -> None:
    # The config guarantees max_line_bytes + len(delimiter) <= max_record_bytes.
    max_line = max_record - len(delimiter)
    lines = data.draw(st.lists(st.binary(min_size=1, max_size=max_line), max_size=30))
    c = chunk(lines)
    out = list(Encoder("firehose", delimiter=delimiter, pack_lines=True, max_record_bytes=max_record).entries(c))
    assert all(len(e.data) <= max_record for e in out)
    assert b"".join(e.data for e in out) == b"".join(line + delimiter for line in lines)
    assert [line for e in out for line in e.lines] == lines  # no line split, none lost, in order
    for e in out:
        assert e.lines and e.data == b"".join(line + delimiter for line in e.lines)
        assert e.nlines == len(e.lines)
        assert e.refs == [(c, e.nlines)]
        assert e.key == ""
    assert sum(e.nlines for e in out) == len(lines) == c.remaining
    for a, b in zip(out, out[1:]):  # greedy: the next line did not fit
        assert len(a.data) + len(b.lines[0]) + len(delimiter) > max_record


def test_firehose_pack_lines_table() -> None:
    c = chunk([b"aaa", b"bbb", b"cc", b"d", b"eeeeeee"])
    out = list(Encoder("firehose", delimiter=b"\n", pack_lines=True, max_record_bytes=8).entries(c))
    assert [e.data for e in out] == [b"aaa\nbbb\n", b"cc\nd\n", b"eeeeeee\n"]
    assert [e.refs for e in out] == [[(c, 2)], [(c, 2)], [(c, 1)]]


def test_non_ascii_partition_key_counts_bytes_and_fits_the_room() -> None:
    from spoold.batching import Chunk, Encoder

    key = "ключ" * 100  # 400 characters, 800 UTF-8 bytes
    line = json.dumps({"k": key}).encode()
    enc = Encoder("kinesis", max_record_bytes=1024 * 1024, partition_key_field="k")
    (entry,) = list(enc.entries(Chunk(1, 0.0, [line], len(line) + 1)))
    assert len(entry.key.encode()) <= 256 and entry.key == key[:128]
    assert entry.size == len(line) + len(entry.key.encode())


def test_kpl_aggregate_spans_rows_until_full_or_flushed() -> None:
    from spoold.batching import Chunk, Encoder

    enc = Encoder("kinesis", max_record_bytes=1200, aggregation="kpl")
    a = Chunk(1, 10.0, [b"a%02d" % i + b"x" * 80 for i in range(10)], 0)
    b = Chunk(2, 11.0, [b"b%02d" % i + b"x" * 80 for i in range(10)], 0)
    assert list(enc.entries(a)) == [] and enc.open_since is not None  # still filling
    closed = list(enc.entries(b))  # 20 lines of ~90 bytes do not fit 1200 bytes: one closes
    assert len(closed) == 1
    first = closed[0]
    assert [c.id for c, _ in first.refs] == [1, 2], "the aggregate holds lines of both rows"
    assert first.created == 10.0 and first.nlines == sum(n for _, n in first.refs)
    assert first.size <= 1200
    rest = enc.flush()
    assert len(rest) == 1 and enc.open_since is None and enc.flush() == []
    assert first.lines + rest[0].lines == a.lines + b.lines
    assert sum(n for e in (first, rest[0]) for _, n in e.refs) == 20


def test_lone_surrogate_key_falls_back_to_random() -> None:
    from spoold.batching import partition_key_from_json

    assert partition_key_from_json(b'{"k": "\\ud800"}', "k") is None
    assert partition_key_from_json(b'{"k": "ok\\ud800x"}', "k") is None
