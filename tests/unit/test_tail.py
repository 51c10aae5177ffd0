"""Following log files: the config keys, and the pure part of spoold/tail.py (line cutting,
identity, rotation decisions) as tables; the spool's files table through a real spool file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spoold import config
from spoold.errors import ConfigError
from spoold.spool import Spool
from spoold.tail import (
    END_LOOKBACK,
    FINISH_GRACE,
    cut_lines,
    end_of_last_line,
    fingerprint,
    fitting,
    is_finished,
    same_file,
    start_offset,
)

REPO = Path(__file__).resolve().parents[2]
BASE = {"name": "app", "kind": "kinesis", "stream": "s", "region": "us-east-1"}


def parse(**keys: Any) -> config.Destination:
    doc = {"spool": {"path": "/tmp/x/spool.db"}, "destination": [{**BASE, **keys}]}
    return config.parse(doc, Path("spoold.toml")).destinations[0]


# ---------------------------------------------------------------- config


def test_files_without_a_socket() -> None:
    d = parse(files=["/var/log/app/*.log", "/var/log/x.log"])
    assert d.socket is None
    assert d.files == config.FilesConfig(("/var/log/app/*.log", "/var/log/x.log"), "end")


def test_files_and_a_socket_and_start_at() -> None:
    d = parse(files=["/var/log/a.log"], socket="/run/a.sock", start_at="beginning")
    assert d.socket is not None and d.socket.path == Path("/run/a.sock") and d.files.start_at == "beginning"


def test_a_socket_alone_has_no_files() -> None:
    d = parse(socket="/run/a.sock")
    assert d.files == config.FilesConfig((), "end")


@pytest.mark.parametrize(("keys", "wanted"), [
    ({}, "socket: required (or files"),
    ({"files": []}, "files: must be a non-empty list"),
    ({"files": "/var/log/a.log"}, "files: must be a non-empty list"),
    ({"files": [1]}, "files: must be a non-empty list"),
    ({"files": ["var/log/a.log"]}, "files: 'var/log/a.log' is not an absolute path"),
    ({"files": ["/var/log/"]}, "files: '/var/log/' names a folder"),
    ({"files": ["/a.log"], "start_at": "middle"}, "start_at: must be one of 'end', 'beginning'"),
    ({"socket": "/run/a.sock", "start_at": "end"}, "start_at: only valid with files"),
])
def test_bad_files_keys_are_named(keys: dict[str, Any], wanted: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(**keys)
    assert 'destination "app": ' + wanted in str(info.value)


def test_check_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[spool]\npath = "/tmp/s.db"\n[[destination]]\nname = "a"\nkind = "kinesis"\n'
                    'stream = "s"\nregion = "us-east-1"\nfiles = ["relative/*.log"]\n')
    env = {"PYTHONPATH": str(REPO), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-m", "spoold", "check-config", "--config", str(path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert 'destination "a": files:' in done.stderr


# ---------------------------------------------------------------- cutting lines


@pytest.mark.parametrize(("data", "skipping", "final", "want"), [
    # data, starts inside a long line, file finished -> lines, boundary, used, too_long, skipping
    (b"a\nb\n", False, False, ([b"a", b"b"], 4, 4, 0, False)),
    (b"a\nbc", False, False, ([b"a"], 2, 2, 0, False)),  # "bc" waits for its \n
    (b"a\nbc", False, True, ([b"a", b"bc"], 4, 4, 0, False)),  # finished: it counts
    (b"bc", False, False, ([], -1, 0, 0, False)),
    (b"", False, False, ([], -1, 0, 0, False)),
    (b"a\n\nb\n", False, False, ([b"a", b"b"], 5, 5, 0, False)),  # empty lines are dropped
    (b"a\nTOOLONG\nb\n", False, False, ([b"a", b"b"], 12, 12, 1, False)),
    (b"a\nTOOLONGTAIL", False, False, ([b"a"], 2, 13, 0, True)),  # skipping from 2; offset stays 2
    (b"STILL", True, False, ([], -1, 5, 0, True)),
    (b"END\nx\n", True, False, ([b"x"], 6, 6, 1, False)),
    (b"END", True, True, ([], 3, 3, 1, False)),
    (b"a\nTOOLONGTAIL", False, True, ([b"a"], 13, 13, 1, False)),
])
def test_cut_lines(data: bytes, skipping: bool, final: bool, want: tuple[Any, ...]) -> None:
    cut = cut_lines(data, 5, skipping, final)
    assert (cut.lines, cut.boundary, cut.used, cut.too_long, cut.skipping) == want


def test_a_line_of_exactly_max_line_bytes_is_kept() -> None:
    assert cut_lines(b"12345\n123456\n", 5, False, False).lines == [b"12345"]


def test_cutting_a_file_in_reads_of_any_size_gives_the_same_lines() -> None:
    """The reader's loop, run on bytes: re-reading from the boundary (or past it while
    skipping) must give every line once and skip exactly the long ones."""
    lines = [b"x" * (i % 13) + str(i).encode() for i in range(300)]
    data = b"\n".join(lines) + b"\nlast"
    limit = 12
    want = [ln for ln in lines + [b"last"] if 0 < len(ln) <= limit]
    for size in (1, 3, 7, 16, 64, 10_000):
        got: list[bytes] = []
        offset = scan = 0
        skipping = False
        too_long = 0
        while True:
            chunk = data[scan:scan + max(size, limit + 1)]
            final = scan + len(chunk) >= len(data)
            cut = cut_lines(chunk, limit, skipping, final)
            got += cut.lines
            too_long += cut.too_long
            if cut.boundary >= 0:
                offset = scan + cut.boundary
            if cut.skipping or cut.boundary >= 0:
                scan += cut.used
            skipping = cut.skipping
            if final and not skipping and offset == len(data):
                break
        assert got == want, size
        assert too_long == sum(1 for ln in lines if len(ln) > limit)


@pytest.mark.parametrize(("data", "limit", "want"), [
    (b"aa\nbb\ncc\n", 6, 6),  # two lines fit exactly
    (b"aa\nbb\ncc\n", 5, 3),
    (b"aaaaaa\nb\n", 3, 7),  # a first line longer than the limit still goes, alone
    (b"aa\nbb", 100, 3),  # the unfinished line waits
    (b"aaaa", 2, 0),
])
def test_fitting(data: bytes, limit: int, want: int) -> None:
    assert fitting(data, limit) == want


# ---------------------------------------------------------------- identity and rotation


def test_fingerprint_identity() -> None:
    head = b"2026-01-01 first line\n" * 100
    fp = fingerprint(head[:1024])
    assert same_file(fp, 1024, head)
    assert same_file(fingerprint(head[:10]), 10, head)  # a file that grew since
    assert not same_file(fp, 1024, head[:500])  # shorter than what was fingerprinted
    assert not same_file(fp, 1024, b"another file" + head)


REC = (fingerprint(b"hello\n"), 6, 100)


@pytest.mark.parametrize(("record", "head", "size", "first", "start_at", "want"), [
    (REC, b"hello\nworld\n", 200, False, "end", (100, "resumed")),
    (REC, b"hello\nworld\n", 200, True, "end", (100, "resumed")),  # a record beats start_at
    (REC, b"hello\n", 50, False, "end", (0, "truncated")),
    (REC, b"other\n", 200, False, "end", (0, "inode_reused")),
    (REC, b"", 0, False, "end", (0, "inode_reused")),  # a new empty file on the old inode
    (None, b"x\n", 200, False, "end", (0, "new")),
    (None, b"x\n", 200, True, "end", (190, "start_at_end")),
    (None, b"x\n", 200, True, "beginning", (0, "start_at_beginning")),
    (REC, b"other\n", 200, True, "beginning", (0, "start_at_beginning")),
])
def test_start_offset(record: Any, head: bytes, size: int, first: bool, start_at: str,
                      want: tuple[int, str]) -> None:
    assert start_offset(record, head, size, first, start_at, 190) == want


@pytest.mark.parametrize(("matched", "renamed", "deleted", "at_end", "quiet", "want"), [
    (True, False, False, True, 60.0, False),  # the live file: never finished
    (False, False, False, True, FINISH_GRACE, True),  # rotated out of the globs
    (True, True, False, True, FINISH_GRACE, True),  # app.log -> app.log.1
    (True, False, True, True, FINISH_GRACE, True),  # deleted
    (True, False, True, False, FINISH_GRACE, False),  # deleted, not read to its end yet
    (False, False, False, True, FINISH_GRACE / 2, False),  # still being written to, maybe
])
def test_is_finished(matched: bool, renamed: bool, deleted: bool, at_end: bool, quiet: float, want: bool) -> None:
    assert is_finished(matched=matched, renamed=renamed, deleted=deleted, at_end=at_end, quiet_for=quiet) is want


@pytest.mark.parametrize(("data", "want"), [
    (b"a\nb\n", 4), (b"a\nbc", 2), (b"abc", 0), (b"", 0),
    # An unfinished last line longer than one look back still starts at its beginning.
    (b"a\n" + b"x" * (2 * END_LOOKBACK + 5), 2),
    (b"x" * (3 * END_LOOKBACK), 0),
    # One longer than max_line_bytes: started max_line + 1 bytes before the end, inside it.
    (b"a\n" + b"x" * (4 * END_LOOKBACK), 2 + 4 * END_LOOKBACK - (3 * END_LOOKBACK + 1)),
], ids=["ended", "partial", "no_newline", "empty", "partial_past_lookback", "one_long_line", "too_long"])
def test_end_of_last_line(data: bytes, want: int) -> None:
    reads: list[int] = []

    def read(n: int, at: int) -> bytes:
        reads.append(n)
        return data[at:at + n]

    assert end_of_last_line(read, len(data), 3 * END_LOOKBACK) == want
    assert max(reads, default=0) <= END_LOOKBACK


def test_start_at_end_never_starts_inside_a_line_it_then_reads() -> None:
    """Whatever the last line's length: the lines read from where start_at = "end" starts, once
    the file goes on, are whole lines written after that point; a too long one is skipped."""
    max_line = 100
    for tail in (b"", b"p" * 10, b"p" * 99, b"p" * 100, b"p" * 101, b"p" * 5000):
        data = b"old\n" * 3 + tail
        start = end_of_last_line(lambda n, at, data=data: data[at:at + n], len(data), max_line)
        cut = cut_lines((data + b"-done\nnext\n")[start:], max_line, False, False)
        whole = tail + b"-done"
        assert cut.lines == ([whole] if len(whole) <= max_line else []) + [b"next"], len(tail)
        assert cut.too_long == (len(whole) > max_line)


# ---------------------------------------------------------------- the spool's files table


def test_positions_are_committed_with_the_lines_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    s = Spool(path)
    s.open_writer()
    assert s.tail_state("app") == (set(), [])
    s.tail_begin("app", ["/l/*.log"], [("app", 1, 2, b"fp", 2, "/l/a.log", 10)], 1.0)
    pos = ("app", 1, 2, b"fp2", 4, "/l/a.log", 30)
    s.commit([("app", [b"x", b"y"], 4)], [], 2.0, None, [pos, pos[:-1] + (40,)])
    s.commit([], [], 3.0, None, [("app", 1, 3, b"q", 1, "/l/b.log", 5)])
    s.close()
    again = Spool(path)
    stats = again.open_writer()
    assert stats["app"].lines == 2
    seen, rows = again.tail_state("app")
    assert seen == {"/l/*.log"}
    assert sorted(rows) == [("app", 1, 2, b"fp2", 4, "/l/a.log", 40), ("app", 1, 3, b"q", 1, "/l/b.log", 5)]
    assert again.tail_state("other") == (set(), [])
    again.tail_forget("app", [(1, 3)])
    assert [r[2] for r in again.tail_state("app")[1]] == [2]
    again.close()


def test_a_failed_commit_writes_no_position(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool.db")
    s.open_writer()
    lines: list[bytes] = [b"ok", None]  # type: ignore[list-item]
    with pytest.raises(TypeError):
        # A line that is not bytes fails the insert after the position was written: both roll back.
        s.commit([("app", lines, 3)], [], 1.0, None, [("app", 1, 2, b"f", 1, "/a", 9)])
    assert s.tail_state("app") == (set(), [])
    s.close()


# ---------------------------------------------------------------- status and metrics


def test_followed_files_in_the_table_and_prometheus() -> None:
    from spoold.status import render_prometheus, render_table

    snap = {"running": True, "spool": {"path": "/s.db", "bytes": 0}, "destinations": {"app": {
        "kind": "kinesis", "files": [{"path": '/var/log/a"b.log', "offset": 10, "size": 25, "lag_bytes": 15,
                                      "last_read": None, "inode": 7}]}}}
    text = render_prometheus(snap)
    assert 'spoold_file_lag_bytes{destination="app",path="/var/log/a\\"b.log"} 15' in text
    assert 'spoold_file_offset_bytes{destination="app",path="/var/log/a\\"b.log"} 10' in text
    assert "# TYPE spoold_file_size_bytes gauge" in text
    assert '/var/log/a"b.log at 10 of 25 (15B behind, read never)' in render_table(snap)
    snap["destinations"]["app"]["files"][0]["state"] = "parked"
    assert '/var/log/a"b.log at 10 of 25 (15B behind, read never, parked)' in render_table(snap)


def test_files_must_not_match_the_spool() -> None:
    with pytest.raises(ConfigError, match=r'destination "app": files: /tmp/x/\* matches /tmp/x/spool.db'):
        parse(files=["/tmp/x/*"])
    with pytest.raises(ConfigError, match="spool.db-wal"):
        parse(files=["/tmp/x/*-wal"])
