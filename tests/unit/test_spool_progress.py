"""Progress of partly sent rows: which lines the service accepted is recorded with the commit
that deletes finished rows, so that a restart (or a re-read after a release) sends only the rest.

Real spool files and the real writer thread; entries come from the real Encoder.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from spoold.batching import Chunk, Encoder, Entry
from spoold.committer import Committer
from spoold.config import SpoolConfig
from spoold.spool import SCHEMA_VERSION, Spool, Worker, merge_spans, unsent_positions

MiB = 1024 * 1024


def lines_of(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i:05d}".encode() for i in range(n)]


def size(lines: list[bytes]) -> int:
    return sum(len(x) + 1 for x in lines)


class Setup:
    """A Committer on a real spool with its writer and reader threads; rows are offered to no
    flusher (the tests lease them by hand)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spool = Spool(path)
        self.writer = Worker("test-writer")
        self.reader = Worker("test-reader")
        self.committer: Committer
        self.made: list[tuple[int, str, list[bytes], int]] = []

    async def open(self, when_full: str = "block", max_bytes: int = 64 * MiB) -> Setup:
        stats = await self.writer.run(self.spool.open_writer)
        await self.reader.run(self.spool.open_reader)
        cfg = SpoolConfig(path=self.path, max_bytes=max_bytes, when_full=when_full)
        self.committer = Committer(self.spool, self.writer, cfg, stats,
                                   lambda rows, _now: self.made.extend(rows), lambda dest: 0)
        return self

    async def close(self) -> None:
        await self.reader.run(lambda: None)
        await self.writer.run(self.spool.close)
        self.reader.stop()
        self.writer.stop()

    async def write(self, dest: str, lines: list[bytes]) -> int:
        ticket = await self.committer.submit(dest, lines, size(lines))
        await self.committer.commit_once()
        assert ticket.accepted == len(lines)
        return self.made[-1][0]

    async def read(self, dest: str = "d") -> list[Any]:
        return await self.reader.run(self.spool.read, dest, 0, 64 * MiB)

    def stats(self, dest: str = "d") -> tuple[int, int, int]:
        s = self.committer.stats[dest]
        return s.rows, s.lines, s.bytes


@contextlib.asynccontextmanager
async def opened(path: Path, **options: Any) -> AsyncIterator[Setup]:
    """A Setup opened with ``options`` (those of Setup.open), closed at the end of the block."""
    setup = await Setup(path).open(**options)
    try:
        yield setup
    finally:
        await setup.close()


def ack(committer: Committer, entries: list[Entry], one_by_one: bool = False) -> list[Chunk]:
    """What the flusher does for accepted entries: lower each chunk's count, delete the
    finished ones, record the rest's progress (for the whole batch, or entry by entry as when
    some of a batch failed)."""
    done = []
    for e in entries:
        for chunk, n in e.refs:
            chunk.remaining -= n
            if chunk.remaining == 0:
                done.append(chunk)
        if one_by_one:
            committer.accepted_one(e)
    if not one_by_one:
        committer.accepted(entries)
    for chunk in done:
        committer.delete(chunk.id, "d", len(chunk.lines), chunk.nbytes)
    return done


def chunk_of(row: Any) -> Chunk:
    return Chunk(row.id, row.created, row.lines, row.nbytes)


def on_disk(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        return {"chunks": conn.execute("SELECT count(*) FROM chunks").fetchone()[0],
                "progress": dict(conn.execute("SELECT id, done FROM progress")),
                "schema": conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]}
    finally:
        conn.close()


# -- the bitmap ---------------------------------------------------------------------------
@pytest.mark.parametrize("lines", [1, 7, 8, 9, 100, 1000])
def test_bitmap_round_trip(lines):
    rng = random.Random(lines)
    for _ in range(20):
        chosen = sorted(rng.sample(range(lines), rng.randrange(0, lines + 1)))
        spans: list[int] = []
        for p in chosen:  # single positions, merged as the committer does
            if spans and spans[-1] == p:
                spans[-1] = p + 1
            else:
                spans += (p, p + 1)
        bits = merge_spans(b"", spans, lines)
        sent = bits.to_bytes((lines + 7) // 8, "little")
        assert unsent_positions(sent, len(chosen), lines) == [i for i in range(lines) if i not in set(chosen)]


def test_many_short_ranges_and_long_ones_merge_alike():
    lines = 5000
    spans = [p for i in range(0, lines, 3) for p in (i, i + 1)]  # 1,667 ranges of one line
    spans += [4000, 4990]
    bits = merge_spans(b"\x01", spans, lines)
    want = {i for i in range(0, lines, 3)} | set(range(4000, 4990)) | {0}
    assert [i for i in range(lines) if bits >> i & 1] == sorted(want)


def test_a_bitmap_that_does_not_fit_its_row_is_ignored():
    sent = (0b1011).to_bytes(1, "little")
    assert unsent_positions(sent, 3, 4) == [2]
    assert unsent_positions(sent, 2, 4) is None, "a count that disagrees with the bits"
    assert unsent_positions(sent, 3, 3) is None, "a bit past the row's last line"


# -- commit, read, restart -------------------------------------------------------------------
async def test_progress_is_skipped_by_a_restart_and_counted_right(tmp_path):
    lines = lines_of("a", 1000)
    async with opened(tmp_path / "spool.db") as s:
        row_id = await s.write("d", lines)
        assert s.stats() == (1, 1000, size(lines))
        s.committer.progress(row_id, range(0, 600))
        s.committer.progress(row_id, [700, 702, 999])
        await s.committer.commit_once()
        assert s.stats() == (1, 397, size(lines)), "unsent lines; the row's bytes stay until it goes"
        assert on_disk(s.path)["progress"] == {row_id: 603}
        # Before any restart, a re-read (after a release, say) skips what was recorded too.
        [row] = await s.read()
        assert row.lines == [x for i, x in enumerate(lines) if i >= 600 and i not in (700, 702, 999)]

    async with opened(tmp_path / "spool.db") as again:
        assert again.stats() == (1, 397, size(lines))
        [row] = await again.read()
        want = [i for i in range(1000) if i >= 600 and i not in (700, 702, 999)]
        assert row.lines == [lines[i] for i in want]
        assert row.nbytes == size(row.lines)
        assert again.spool.line_positions(row_id) == want
        # Positions the committer is given are those of the row as read: mapped back to the row's.
        again.committer.progress(row_id, [0, 1, 2])  # lines 600, 601, 602
        await again.committer.commit_once()
        assert again.stats() == (1, 394, size(lines))
        [row] = await again.read()
        assert row.lines == [lines[i] for i in want[3:]]
        # The rest accepted: the row is deleted by the flusher's delete(), counted to zero.
        again.committer.delete(row_id, "d", len(row.lines), row.nbytes)
        await again.committer.commit_once()
        assert again.stats() == (0, 0, 0)
        assert on_disk(again.path) | {"schema": None} == {"chunks": 0, "progress": {}, "schema": None}


async def test_a_row_whose_lines_are_all_recorded_is_deleted(tmp_path):
    async with opened(tmp_path / "spool.db") as s:
        keep = await s.write("d", lines_of("k", 10))
        row_id = await s.write("d", lines_of("a", 50))
        s.committer.progress(row_id, range(0, 20))
        await s.committer.commit_once()
        s.committer.progress(row_id, range(10, 50))  # overlaps what is recorded
        await s.committer.commit_once()
        assert [r.id for r in await s.read()] == [keep]
        assert s.stats() == (1, 10, size(lines_of("k", 10)))
        assert on_disk(s.path)["progress"] == {}


async def test_progress_and_delete_in_one_commit_and_a_gone_row(tmp_path):
    """Progress for a row deleted in the same commit, or gone already, records nothing."""
    async with opened(tmp_path / "spool.db") as s:
        a = await s.write("d", lines_of("a", 10))
        b = await s.write("d", lines_of("b", 10))
        s.committer.progress(a, range(3))
        s.committer.delete(a, "d", 10, size(lines_of("a", 10)))
        s.committer.progress(10_000, range(3))
        await s.committer.commit_once()
        assert s.stats() == (1, 10, size(lines_of("b", 10)))
        assert on_disk(s.path)["progress"] == {}
        assert [r.id for r in await s.read()] == [b]


async def test_a_failed_commit_keeps_progress_for_the_next(tmp_path):
    async with opened(tmp_path / "spool.db") as s:
        row_id = await s.write("d", lines_of("a", 10))
        s.committer.progress(row_id, range(4))
        real = s.spool._transaction

        def failing(doing: str, work: Any) -> Any:
            from spoold.errors import SpoolError
            raise SpoolError("disk gone")

        s.spool._transaction = failing  # type: ignore[method-assign]
        await s.committer.commit_once()
        assert s.committer.write_errors == 1 and s.stats()[1] == 10
        s.spool._transaction = real  # type: ignore[method-assign]
        s.committer.progress(row_id, range(4, 6))
        await s.committer.commit_once()
        assert s.stats()[1] == 4
        assert [len(r.lines) for r in await s.read()] == [4]


# -- entries as the encoder makes them --------------------------------------------------------
def encode(kind: str, chunk: Chunk, **opts: Any) -> list[Entry]:
    enc = Encoder(kind, max_record_bytes=opts.pop("max_record_bytes", 1024 * 1024), rng=random.Random(1), **opts)
    out = list(enc.entries(chunk))
    return out + enc.flush()


@pytest.mark.parametrize("kind, opts", [
    ("kinesis", {}),
    ("kinesis", {"partition_key_field": "k"}),
    ("firehose", {"delimiter": b"\n"}),
    ("firehose", {"pack_lines": True, "delimiter": b"\n", "max_record_bytes": 300}),
    ("kinesis", {"aggregation": "kpl", "max_record_bytes": 400}),
    ("kinesis", {"aggregation": "kpl", "partition_key_field": "k", "max_record_bytes": 400}),
])
@pytest.mark.parametrize("one_by_one", [False, True])
async def test_entries_accepted_out_of_order_twice_over_a_restart(tmp_path, kind, opts, one_by_one):
    """Every kind of entry: some accepted, a restart, more accepted from what the read gave,
    another restart: what is read at the end is exactly the lines never accepted."""
    lines = [b'{"k": "key%d", "i": %d}' % (i % 7, i) for i in range(300)]
    rng = random.Random(5)
    accepted: set[bytes] = set()
    async with opened(tmp_path / "spool.db") as s:
        row_id = await s.write("d", lines)
        [row] = await s.read()
        entries = encode(kind, chunk_of(row), **opts)
        assert len({id(e) for e in entries}) == len(entries)
        taken = [e for e in entries if rng.random() < 0.5]
        ack(s.committer, taken, one_by_one)
        accepted.update(x for e in taken for x in e.lines)
        await s.committer.commit_once()
    for round_ in range(2):
        async with opened(tmp_path / "spool.db") as s:
            assert s.stats()[1] == len(lines) - len(accepted)
            [row] = await s.read()
            assert row.id == row_id
            assert row.lines == [x for x in lines if x not in accepted]
            entries = encode(kind, chunk_of(row), **opts)
            taken = [e for e in entries if rng.random() < 0.5]
            ack(s.committer, taken, one_by_one=(round_ == 0) != one_by_one)
            accepted.update(x for e in taken for x in e.lines)
            await s.committer.commit_once()
    async with opened(tmp_path / "spool.db") as s:
        rows = await s.read()
        assert [x for r in rows for x in r.lines] == [x for x in lines if x not in accepted]


async def test_an_aggregate_over_two_rows_records_both(tmp_path):
    """An unkeyed KPL aggregate that goes on into the next row: its lines in the first row start
    mid-row, those in the second at 0."""
    async with opened(tmp_path / "spool.db") as s:
        a_lines, b_lines = lines_of("a", 40), lines_of("b", 40)
        await s.write("d", a_lines)
        await s.write("d", b_lines)
        a, b = (chunk_of(r) for r in await s.read())
        enc = Encoder("kinesis", max_record_bytes=600, aggregation="kpl", rng=random.Random(1))
        entries = list(enc.entries(a)) + list(enc.entries(b)) + enc.flush()
        spanning = [e for e in entries if len(e.refs) == 2]
        assert spanning, "the test needs an aggregate over both rows"
        ack(s.committer, spanning)
        await s.committer.commit_once()
        got = await s.read()
        assert [x for r in got for x in r.lines] == [x for x in a_lines + b_lines if x not in spanning[0].lines]


# -- drops, expiry, dead letters --------------------------------------------------------------
async def test_drop_counts_only_unsent_lines_and_takes_pending_progress_first(tmp_path):
    async with opened(tmp_path / "spool.db", when_full="drop_oldest") as s:
        row_id = await s.write("d", lines_of("a", 100))
        s.committer.progress(row_id, range(30))
        await s.committer.commit_once()
        s.committer.progress(row_id, range(30, 50))  # accepted, not committed yet
        lost = await s.committer.expire("d", time.time() + 10)
        assert lost == 50, "the 50 lines accepted are not expired"
        assert s.committer.expired == {"d": 50}
        assert s.stats() == (0, 0, 0)
        assert on_disk(s.path) | {"schema": None} == {"chunks": 0, "progress": {}, "schema": None}


async def test_dead_lettered_and_expired_entries_count_as_done(tmp_path):
    """The flusher acks dead-lettered and expired entries too (sent=False): a restart must not
    send them again either."""
    async with opened(tmp_path / "spool.db") as s:
        await s.write("d", lines_of("a", 20))
        [row] = await s.read()
        entries = encode("kinesis", chunk_of(row))
        ack(s.committer, entries[:5])
        await s.committer.commit_once()
        [row] = await s.read()
        assert row.lines == lines_of("a", 20)[5:]


# -- the file: migration and recovery ---------------------------------------------------------
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, dest TEXT NOT NULL, created REAL NOT NULL,
    lines INTEGER NOT NULL, bytes INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX chunks_by_dest ON chunks (dest, id, lines, bytes, created);
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, dest TEXT NOT NULL, created REAL NOT NULL,
    failed REAL NOT NULL, error TEXT NOT NULL, data BLOB NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
"""


async def test_a_version_1_spool_is_migrated_and_keeps_its_rows(tmp_path):
    path = tmp_path / "spool.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(V1_SCHEMA)
    lines = lines_of("old", 30)
    conn.execute("INSERT INTO chunks (dest, created, lines, bytes, data) VALUES ('d', ?, 30, ?, ?)",
                 (time.time(), size(lines), b"\n".join(lines)))
    conn.commit()
    conn.close()
    from spoold.spool import offline_status
    assert offline_status(path)["destinations"]["d"]["spooled_lines"] == 30, "read-only, before migrating"

    async with opened(path) as s:
        assert s.stats() == (1, 30, size(lines))
        [row] = await s.read()
        assert row.lines == lines
        s.committer.progress(row.id, range(10))
        await s.committer.commit_once()
    assert on_disk(path)["schema"] == str(SCHEMA_VERSION) == "3"
    assert offline_status(path)["destinations"]["d"]["spooled_lines"] == 20


async def test_a_newer_schema_is_refused(tmp_path):
    from spoold.errors import SpoolCorrupt

    path = tmp_path / "spool.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA.replace("'schema', '1'", "'schema', '9'"))
    conn.close()
    with pytest.raises(SpoolCorrupt, match="schema 9"):
        Spool(path).open_writer()


async def test_recovery_keeps_progress_and_opening_drops_what_does_not_fit(tmp_path):
    path = tmp_path / "spool.db"
    async with opened(path) as s:
        a = await s.write("d", lines_of("a", 40))
        b = await s.write("d", lines_of("b", 40))
        s.committer.progress(a, range(10))
        s.committer.progress(b, range(20))
        await s.committer.commit_once()
    # A bitmap whose count disagrees: those lines are sent again rather than trusted.
    conn = sqlite3.connect(path)
    conn.execute("UPDATE progress SET done = 5 WHERE id = ?", (b,))
    conn.commit()
    conn.close()
    spool = Spool(path)
    spool._recover("a test: copy every row")
    async with opened(path) as again:
        assert again.stats() == (2, 30 + 40, size(lines_of("a", 40)) * 2)
        rows = await again.read()
        assert [len(r.lines) for r in rows] == [30, 40]
        assert on_disk(path)["progress"] == {a: 10}
    assert list(tmp_path.glob("spool.db.damaged-*")), "the original is kept beside it"
