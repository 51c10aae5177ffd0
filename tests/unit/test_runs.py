"""Runs, the columnar batch of the hot case (Kinesis, random keys): each is exactly the entries it
stands for. Its body is theirs byte for byte, take_batch cuts it where it would stop among them,
the committer records the same lines, and the machine accounts every line exactly once whatever
the replies."""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoold.aggregation import Shard, ShardMap
from spoold.errors import FatalSendError, RetryableSendError
from spoold.batching import Chunk, Encoder, Entry, Run, explode, take_batch
from spoold.machine import Limits, Outbox, Read, RetryPolicy, Send, Wait
from spoold.pacing import MAX_RATE
from spoold.protocol import Api
from tests.unit.test_spool_progress import chunk_of, opened

MiB = 1024 * 1024
WALL = 1_000_000.0
PTEE = "ProvisionedThroughputExceededException"

line_lists = st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=30)


def run_of(lines: list[bytes], seed: int = 1, ehk: str | None = None, row: int = 1) -> Run:
    [run] = Encoder("kinesis", max_record_bytes=MiB, explicit_hash_key=ehk,
                    rng=random.Random(seed)).items(Chunk(row, WALL, lines, sum(map(len, lines))))
    assert isinstance(run, Run)
    return run


def cut(run: Run, points: list[int]) -> list[Run]:
    """``run`` split at ``points`` (record counts from its start)."""
    out = []
    done = 0
    for p in sorted({p for p in points if 0 < p < run.records}):
        head, run = run.split(p - done)
        done = p
        out.append(head)
    return out + [run]


def same(entries: list[Entry]) -> list[tuple[Any, ...]]:
    return [(e.data, e.key, e.hash_key, e.at, [(c.id, n) for c, n in e.refs], e.nlines, e.size) for e in entries]


# -- one run: its entries, its body -------------------------------------------------------------
@pytest.mark.parametrize("ehk", [None, "12345678901234567890"])
def test_a_runs_entries_are_the_encoders_entries(ehk: str | None) -> None:
    lines = [b"a", b"bb", b"", b"dddd" * 50]
    chunk = Chunk(3, WALL, lines, 100)
    [run] = Encoder("kinesis", max_record_bytes=MiB, explicit_hash_key=ehk, rng=random.Random(9)).items(chunk)
    entries = list(Encoder("kinesis", max_record_bytes=MiB, explicit_hash_key=ehk,
                           rng=random.Random(9)).entries(chunk))
    assert isinstance(run, Run) and (run.records, run.size) == (4, sum(e.size for e in entries))
    assert same(explode([run])) == same(entries)


@pytest.mark.parametrize("opts", [{"partition_key_field": "k"}, {"aggregation": "kpl"}, {}])
def test_only_random_keyed_kinesis_lines_become_runs(opts: dict[str, Any]) -> None:
    kind = "firehose" if not opts else "kinesis"
    encoder = Encoder(kind, max_record_bytes=MiB, **opts)
    items = [*encoder.items(Chunk(1, WALL, [b'{"k":1}'], 8)), *encoder.flush()]  # a KPL aggregate stays open
    assert items and not any(isinstance(i, Run) for i in items)


@settings(max_examples=200, deadline=None)
@given(lines=line_lists, points=st.lists(st.integers(0, 30), max_size=4), ehk=st.sampled_from([None, "7", "1" * 38]),
       before=st.integers(0, 3), routed=st.booleans())
def test_a_run_body_is_its_entries_body_byte_for_byte(lines: list[bytes], points: list[int], ehk: str | None,
                                                      before: int, routed: bool) -> None:
    runs = cut(run_of(lines, ehk=ehk), points)
    if routed:  # the machine gives a routed run its shard's hash key
        runs[0].hash_key = "42"
    items: list[Entry | Run] = [*explode([run_of([b"x%d" % i for i in range(before)] or [b"y"], seed=2)])[:before],
                                *runs]
    api = Api.for_destination("kinesis", "s", None)
    assert api.body(items, hex_keys=True) == api.body(explode(items), hex_keys=True)
    assert api.body(explode(items), hex_keys=True) == api.body(explode(items), hex_keys=False)


# -- take_batch ---------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 60), min_size=1, max_size=12), min_size=1, max_size=4),
       due=st.lists(st.integers(0, 60), max_size=4),
       max_records=st.integers(1, 20), max_bytes=st.integers(1, 300))
def test_take_batch_cuts_runs_where_it_would_stop_among_their_entries(
        rows: list[list[int]], due: list[int], max_records: int, max_bytes: int) -> None:
    runs = [run_of([b"x" * n for n in sizes], seed=i, row=i) for i, sizes in enumerate(rows)]
    due_entries = explode([run_of([b"d" * n for n in due] or [b""], seed=99, row=99)])[:len(due)]
    columnar = (deque(due_entries), deque(runs))
    plain = (deque(due_entries), deque(explode(runs)))
    got, size = take_batch(columnar, max_records, max_bytes)
    want, want_size = take_batch(plain, max_records, max_bytes)
    assert same(explode(got)) == same(want) and size == want_size
    assert [same(explode(q)) for q in columnar] == [same(list(q)) for q in plain]


# -- the committer ------------------------------------------------------------------------------
async def test_runs_accepted_out_of_order_over_a_restart_leave_exactly_the_rest(tmp_path: Any) -> None:
    lines = [b"line-%04d" % i for i in range(400)]
    rng = random.Random(3)
    accepted: set[bytes] = set()
    for _ in range(3):
        async with opened(tmp_path / "spool.db") as s:
            if not accepted:
                await s.write("d", lines)
            [row] = await s.read()
            assert row.lines == [x for x in lines if x not in accepted]
            chunk = chunk_of(row)
            runs = cut(run_of(row.lines), sorted(rng.sample(range(1, len(row.lines)), 6)))
            taken = [r for r in runs if rng.random() < 0.5][::-1]  # out of order
            for r in taken:
                r.chunk = chunk
                chunk.remaining -= r.records
                accepted.update(r.lines())
            s.committer.accepted(taken)
            await s.committer.commit_once()
    async with opened(tmp_path / "spool.db") as s:
        rows = await s.read()
        assert [x for r in rows for x in r.lines] == [x for x in lines if x not in accepted]


# -- the machine: every line accounted once, whatever the replies ------------------------------------
def drive(seed: int, sharded: bool, max_records: int, max_bytes: int, ehk: str | None = None) -> None:
    rng = random.Random(seed)
    encoder = Encoder("kinesis", max_record_bytes=MiB, explicit_hash_key=ehk, rng=random.Random(seed))
    m = Outbox(Limits(linger=0.0, max_records=max_records, max_bytes=max_bytes, max_in_flight=3), encoder,
               RetryPolicy(base=0.01, cap=0.1, cap_throttle=0.05), 0.0, random.Random(seed))
    m.caught_up = True
    if sharded:
        half = 2 ** 127
        m.set_shard_map(ShardMap([Shard("shardId-0", 0, half - 1), Shard("shardId-1", half, 2 ** 128 - 1)]), 0.0)
    for p in m._paces or [m.pace]:
        p.rate = p.tokens = MAX_RATE
        p.slow_start = False
    rows = {i: [b"r%d-%d-" % (i, j) + b"z" * rng.randrange(30) for j in range(rng.randrange(1, 60))]
            for i in range(1, 8)}
    for i, lines in rows.items():
        m.offer(i, lines, sum(map(len, lines)), WALL, 0.0, WALL)
    done: Counter[bytes] = Counter()
    deleted: list[int] = []
    flying: list[Send] = []
    now = 0.0

    def settle() -> None:
        effects = m.take_effects()
        deleted.extend(c.id for c in effects.deleted)
        for item in effects.accepted:
            done.update(item.lines() if isinstance(item, Run) else item.lines)
        if effects.dead:
            m.dead_lettered(effects.dead)
            settle()

    for _ in range(5000):
        d = m.next(now, WALL)
        settle()
        if isinstance(d, Send):
            if rng.random() < 0.3:  # read as entries (as the tests do): the replies then see those
                assert len(d.batch) == d.records
            assert sum(1 if isinstance(i, Entry) else i.records for i in d.items) == d.records <= max_records
            flying.append(d)
            continue
        if isinstance(d, Read):
            m.rows_read(d, [], now, WALL)
            continue
        if flying:
            s = flying.pop(rng.randrange(len(flying)))
            roll = rng.random()
            if roll < 0.1:
                m.on_error(s, RetryableSendError("503", code="InternalFailure"),
                           now, WALL)
            elif roll < 0.15 and s.records > 1:
                m.on_error(s, FatalSendError("400", code="ValidationException"),
                           now, WALL)
            else:
                codes = [None, None, None, PTEE, "InternalFailure", "InvalidArgumentException"]
                m.on_reply(s, [rng.choice(codes) for _ in range(s.records)], now, WALL)
            settle()
            continue
        assert isinstance(d, Wait)
        if d.until == math.inf:
            break
        now = max(now, d.until)
    want = Counter(x for lines in rows.values() for x in lines)
    assert done == want, "every line accepted or dead-lettered exactly once"
    assert sorted(deleted) == sorted(rows), "every row deleted once"
    assert m.lines_sent + m.dead_letters == sum(want.values())


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_every_line_is_accounted_once_whatever_the_replies(seed: int, sharded: bool) -> None:
    drive(seed, sharded, max_records=[7, 500, 13][seed % 3], max_bytes=[150, 5 * MiB, 400][seed % 3])


@pytest.mark.parametrize("seed", range(3))
def test_runs_with_an_explicit_hash_key_go_through_a_shard_queue_as_entries(seed: int) -> None:
    drive(seed, True, max_records=[7, 500, 13][seed], max_bytes=[150, 5 * MiB, 400][seed], ehk=str(2 ** 127 + 1))


def test_a_shard_map_that_comes_while_fresh_holds_a_whole_row_past_the_target() -> None:
    m = Outbox(Limits(linger=0.0), Encoder("kinesis", max_record_bytes=MiB, rng=random.Random(1)), RetryPolicy(),
               0.0, random.Random(2))
    m.caught_up = True
    m.pace.rate, m.pace.tokens = 1.0, -1000.0  # a pace that holds everything back
    lines = [b"%05d" % i for i in range(3000)]  # one row, more than ENCODE_AHEAD_BATCHES batches
    m.offer(1, lines, 6 * 3000, WALL, 0.0, WALL)
    m.offer(2, lines[:10], 60, WALL, 0.0, WALL)
    assert isinstance(m.next(0.0, WALL), Wait) and m._fresh_records == 3000
    half = 2 ** 127
    m.set_shard_map(ShardMap([Shard("shardId-0", 0, half - 1), Shard("shardId-1", half, 2 ** 128 - 1)]), 0.0)
    for p in m._paces:
        p.rate = p.tokens = MAX_RATE
        p.slow_start = False
    got: list[bytes] = []
    while isinstance(d := m.next(0.0, WALL), Send):
        got += [e.data for e in d.batch]
        m.on_reply(d, [None] * d.records, 0.0, WALL)
    assert sorted(got) == sorted(lines + lines[:10]) and m.lines_sent == 3010
