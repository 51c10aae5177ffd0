"""A damaged or foreign spool file at start: recover what SQLite can, keep the damaged file, or
exit non-zero with a clear message; never delete silently, never run while forwarding nothing."""

from __future__ import annotations

import os
import sqlite3

import pytest

from tests.tools.client import send_lines, wait_until


def _fill(make_daemon, fake_aws, n_batches: int = 40):
    fake_aws.faults.down = True
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "50ms", "retry_cap": "100ms"},
                         extra='[daemon]\nshutdown_grace = "100ms"\n').start()
    sent = []
    for b in range(n_batches):
        lines = [f"b{b:03d}-{i:04d}-{'q' * 200}".encode() for i in range(200)]
        assert send_lines(daemon.sockets()[0], b"\n".join(lines))["accepted"] == 200
        sent.extend(lines)
    assert daemon.stop() == 0
    return daemon, sent


def _checkpoint(path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated mid-page"])
def test_damaged_spool_is_recovered_and_kept(make_daemon, fake_aws, damage):
    daemon, sent = _fill(make_daemon, fake_aws)
    db = daemon.tmp / "spool.db"
    _checkpoint(db)
    size = db.stat().st_size
    with open(db, "r+b") as f:
        if damage == "flipped bytes":
            f.seek(size // 2)
            f.write(os.urandom(4096 * 3))
        else:
            f.truncate(size * 2 // 3 + 1000)
    fake_aws.faults.down = False
    # The rebuilt file takes the configured page size (the damaged one was made with 16384).
    text = daemon.config.read_text()
    assert text.startswith("[spool]\n")
    daemon.config.write_text(text.replace("[spool]\n", "[spool]\npage_size = 4096\n", 1))
    daemon.start()
    events = wait_until(lambda: [e for e in daemon.log_events() if e.get("event") == "spool_recovered"],
                        what="spool_recovered in the log")
    recovered, lost = events[0]["rows_recovered"], events[0]["rows_lost"]
    assert recovered > 0
    damaged = list(daemon.tmp.glob("spool.db.damaged-*"))
    assert damaged, "the damaged file is kept"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # the daemon is the only writer
    try:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    finally:
        conn.close()
    # What was readable is delivered, and nothing arrives that was not sent.
    wait_until(lambda: daemon.spool_rows() == 0, what="the recovered rows to be sent")
    arrived = {r.data for r in fake_aws.all_records()}
    assert arrived <= set(sent)
    assert len(arrived) >= len(sent) // 3
    print(f"{damage}: rows recovered {recovered}, rows lost {lost}, lines delivered {len(arrived)}/{len(sent)}")
    assert daemon.stop() == 0


def test_foreign_file_exits_nonzero_and_is_left_alone(make_daemon, fake_aws):
    daemon = make_daemon({"endpoint_url": fake_aws.url})
    db = daemon.tmp / "spool.db"
    db.write_bytes(b"this is somebody's notes, not a database\n" * 200)
    before = db.read_bytes()
    daemon.start(wait=False)
    assert daemon.proc.wait(timeout=60) == 1
    assert "not an SQLite database" in daemon.log()
    assert "Traceback" not in daemon.log()
    assert db.read_bytes() == before

    other = daemon.tmp / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    conn.commit()
    conn.close()
    db.unlink()
    other.rename(db)
    daemon.start(wait=False)
    assert daemon.proc.wait(timeout=60) == 1
    assert "not a spoold spool" in daemon.log()


def test_stale_wal_from_another_file_is_ignored(make_daemon, fake_aws):
    daemon, sent = _fill(make_daemon, fake_aws, n_batches=3)
    db = daemon.tmp / "spool.db"
    _checkpoint(db)
    (daemon.tmp / "spool.db-wal").write_bytes(os.urandom(64 * 1024))
    fake_aws.faults.down = False
    daemon.start()
    wait_until(lambda: len({r.data for r in fake_aws.all_records()}) == len(sent), what="every line")
    assert daemon.stop() == 0
