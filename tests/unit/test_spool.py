"""The spool file on its own: drops that spare what a read returned, deletes by id lists,
page sizes. Real SQLite files in tmp_path, no threads."""

from __future__ import annotations

import time
from pathlib import Path

from spoold import spool as spool_module
from spoold.spool import Spool
from tests.tools.daemon import spool_query, spooled_ids


def test_drop_spares_the_rows_a_read_returned(tmp_path):
    """The flusher's read and a drop on the other thread: rows the read returned are being
    leased (the flusher's cursor does not show it yet), so a drop above the old cursor must
    spare them."""
    spool = Spool(tmp_path / "spool.db")
    spool.open_writer()
    spool.open_reader()
    try:
        ids = [spool.commit([("d", [b"row%d" % i], 5)], [], time.time())[0][0] for i in range(3)]
        rows = spool.read("d", 0, 1)  # about 1 byte: the first row only
        assert [r.id for r in rows] == ids[:1]
        assert [r[0] for r in spool.drop("d", 0, None, 10)] == ids[1:], "the row read is spared"
        assert [r.id for r in spool.read("d", 0, 1 << 20)] == ids[:1]
        assert spool.drop("d", 0, None, 10) == []
        # A read from a lower cursor (a new flusher after a reload) sets what is protected anew.
        more = [spool.commit([("d", [b"more%d" % i], 6)], [], time.time())[0][0] for i in range(2)]
        assert [r.id for r in spool.read("d", ids[0], 1 << 20)] == more
        assert spool.drop("d", 0, None, 10) == []
        assert [r.id for r in spool.read("d", 0, 1)] == ids[:1]
        assert [r[0] for r in spool.drop("d", 0, None, 10)] == more
    finally:
        spool.close()


def test_commit_deletes_many_ids_and_reports_only_those_still_there(tmp_path, monkeypatch):
    """Deletes go by id lists, several statements' worth here; ids already gone (dropped or
    expired meanwhile) are not reported deleted, so they are not subtracted twice."""
    monkeypatch.setattr(spool_module, "DELETE_IDS_MAX", 7)
    spool = Spool(tmp_path / "spool.db")
    spool.open_writer()
    try:
        ids = [spool.commit([("d", [b"row%d" % i], 5)], [], time.time())[0][0] for i in range(30)]
        assert spool.drop("d", 0, None, 3) == [(i, 1, 5) for i in ids[:3]]  # gone already
        kept = ids[25:]
        made = spool.commit([("d", [b"new"], 4)], ids[:25] + [10_000], time.time())
        assert spool.last_deleted == set(ids[3:25])
        assert sorted(spooled_ids(spool.path)) == sorted(kept + [made[0][0]])
    finally:
        spool.close()


def test_new_spools_get_16384_byte_pages(tmp_path):
    spool = Spool(tmp_path / "spool.db")
    spool.open_writer()
    spool.close()
    assert spool_query(tmp_path / "spool.db", "PRAGMA page_size")[0][0] == 16384


def test_deleting_a_sent_row_does_not_write_its_freed_pages(tmp_path):
    """The row's pages go to the free list as they are (secure_delete FAST): with builds that
    zero freed pages, each one would be written to the WAL a second time, as zeros."""
    path = tmp_path / "spool.db"
    for page_size in (4096, 16384):
        spool = Spool(path, page_size=page_size)
        spool.open_writer()
        try:
            lines = [b"%06d" % i + b"z" * 93 for i in range(9000)]  # one row of 900 KB
            (row_id, *_), = spool.commit([("d", lines, 900_000)], [], time.time())
            spool._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]
            wal = path.with_name("spool.db-wal")
            before = wal.stat().st_size
            spool.commit([], [row_id], time.time())
            assert spool.last_deleted == {row_id}
            assert wal.stat().st_size - before < 10 * page_size, page_size
        finally:
            spool.close()
        for p in tmp_path.iterdir():
            p.unlink()


def test_page_size_applies_to_new_spools_and_an_existing_one_keeps_its_own(tmp_path):
    """page_size is set when the file is created (SQLite cannot change it in WAL mode): a new
    spool gets it, and an existing one keeps the size it has, reports it, and reads as before."""
    def file_page_size(path: Path) -> int:
        return int(spool_query(path, "PRAGMA page_size")[0][0])

    path = tmp_path / "spool.db"
    spool = Spool(path, page_size=16384)
    spool.open_writer()
    checkpoint_pages = spool._w.execute("PRAGMA wal_autocheckpoint").fetchone()[0]  # type: ignore[union-attr]
    assert checkpoint_pages == 1000
    big = Spool(tmp_path / "big.db", page_size=65536)
    big.open_writer()
    try:  # the WAL is checkpointed at 16 MB however big the pages
        assert big._w.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 256  # type: ignore[union-attr]
        assert file_page_size(tmp_path / "big.db") == 65536
    finally:
        big.close()
    spool.commit([("d", [b"x" * 100] * 500, 50500)], [], time.time())
    spool.close()
    assert file_page_size(path) == 16384

    again = Spool(path, page_size=4096)
    again.open_writer()
    try:
        assert again.page_size == 16384, "the file's own page size is reported"
        again.open_reader()
        assert [(r.nbytes, len(r.lines)) for r in again.read("d", 0, 1 << 20)] == [(50500, 500)]
    finally:
        again.close()
    assert file_page_size(path) == 16384
