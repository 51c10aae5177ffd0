"""A spool file made with 4096-byte pages (the default before 16384) under today's default: the
daemon keeps the file's own page size, delivers what it held and stores new lines in it."""

from __future__ import annotations

import sqlite3

from tests.tools.client import send_lines, wait_until
from tests.tools.daemon import spool_query


def test_spool_made_with_4096_pages_keeps_them_and_works_under_the_new_default(make_daemon, fake_aws):
    fake_aws.faults.down = True
    daemon = make_daemon({"name": "app", "endpoint_url": fake_aws.url, "retry_base": "20ms", "retry_cap": "100ms"},
                         spool={"page_size": 4096}, extra='[daemon]\nshutdown_grace = "100ms"\n').start()
    old = [f"old-{i:04d}-{'p' * 150}".encode() for i in range(600)]
    assert send_lines(daemon.sockets()[0], b"\n".join(old))["accepted"] == len(old)
    assert daemon.stop() == 0
    db = daemon.tmp / "spool.db"
    assert spool_query(db, "PRAGMA page_size")[0][0] == 4096
    assert spool_query(db, "SELECT sum(lines) FROM chunks")[0][0] == len(old)

    text = daemon.config.read_text()
    assert "page_size = 4096\n" in text
    daemon.config.write_text(text.replace("page_size = 4096\n", ""))  # the default from now on
    fake_aws.faults.down = False
    daemon.start()
    kept = wait_until(lambda: [e for e in daemon.log_events() if e.get("event") == "spool_page_size_kept"],
                      what="spool_page_size_kept in the log")
    assert kept[0]["page_size"] == 4096 and kept[0]["configured"] == 16384
    new = [f"new-{i:04d}-{'n' * 150}".encode() for i in range(600)]
    assert send_lines(daemon.sockets()[0], b"\n".join(new))["accepted"] == len(new)
    wait_until(lambda: {r.data for r in fake_aws.all_records()} >= set(old + new), what="old and new lines sent")
    wait_until(lambda: daemon.spool_rows() == 0, what="every row deleted once sent")
    assert daemon.stop() == 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
