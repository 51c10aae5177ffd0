"""The SQLite spool: one file, WAL mode, rows of many lines.

Each row of ``chunks`` holds the lines of one destination committed in one transaction, joined
by "\\n" (a line never contains one). Ids come from AUTOINCREMENT and are never reused, so "every
row above id N" is a stable cursor. Which rows are being sent lives in memory only: after a crash
every row is simply pending again (at-least-once), less the lines recorded in ``progress``: for a
row partly accepted by the service, a bitmap of its accepted lines, written by the same commits
that delete finished rows, so that a restart resends only what was in flight.

Concurrency: the SQLite on these machines (3.40) can corrupt a WAL database when two connections
write or checkpoint at once, so exactly one connection writes (insert, delete, checkpoint), and it
lives on one dedicated thread (``Worker``). A second, query-only connection on its own thread
reads rows for the flushers, which WAL allows at any time. No SQLite call runs on the trio thread.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import outcome
import sqlite_utils
import structlog
import trio

from spoold.errors import SpoolCorrupt, SpoolError, SpoolLocked

T = TypeVar("T")

SCHEMA_VERSION = 3  # 2: the progress table; 3: files and tailed (older files get them when opened)
# The biggest row the writer makes: big enough to amortise per-row costs, small enough that a
# partial send after a crash resends little and that memory per leased row stays modest.
CHUNK_MAX_BYTES = 1024 * 1024
# Rows the reader returns per call, whatever their size.
READ_MAX_ROWS = 64
# Ids probed one by one when a damaged table cannot be walked (the newest ones are kept).
RECOVERY_PROBE_MAX = 5_000_000
# Pages kept in the WAL before the writer checkpoints it (SQLite's default), and at most
# this many bytes of them (bigger pages, see [spool] page_size): the WAL's size on disk.
WAL_AUTOCHECKPOINT = 1000
WAL_MAX_BYTES = 16 * 1024 * 1024
# Modes of what the daemon creates for the spool, whatever the umask: the files hold record
# contents, and only the daemon's user may change or replace them.
FILE_MODE = 0o600
DIR_MODE = 0o750
# Buffer of the copies recovery makes.
COPY_BUFFER = 1024 * 1024
# Row ids deleted by one statement.
DELETE_IDS_MAX = 500
_DELETE_IDS = "DELETE FROM chunks WHERE id IN (SELECT value FROM json_each(?)) RETURNING id, lines, bytes"
_DELETE_PROGRESS = "DELETE FROM progress WHERE id IN (SELECT value FROM json_each(?)) RETURNING id, done"
# One id, the usual delete of a commit: without json_each, 30-45 us less per commit.
_DELETE_ONE = "DELETE FROM chunks WHERE id = ? RETURNING id, lines, bytes"
_DELETE_ONE_PROGRESS = "DELETE FROM progress WHERE id = ? RETURNING id, done"
_ROW_PROGRESS = ("SELECT c.dest, c.lines, c.bytes, p.done, p.sent FROM chunks c "
                 "LEFT JOIN progress p ON p.id = c.id WHERE c.id = ?")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dest TEXT NOT NULL,
    created REAL NOT NULL,
    lines INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_dest ON chunks (dest, id, lines, bytes, created);
CREATE TABLE IF NOT EXISTS progress (
    id INTEGER PRIMARY KEY,
    done INTEGER NOT NULL,
    sent BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    dest TEXT NOT NULL,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    fp BLOB NOT NULL,
    fp_len INTEGER NOT NULL,
    path TEXT NOT NULL,
    offset INTEGER NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (dest, dev, ino)
);
CREATE TABLE IF NOT EXISTS tailed (
    id INTEGER PRIMARY KEY,
    dest TEXT NOT NULL,
    pattern TEXT NOT NULL,
    since REAL NOT NULL,
    UNIQUE (dest, pattern)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dest TEXT NOT NULL,
    created REAL NOT NULL,
    failed REAL NOT NULL,
    error TEXT NOT NULL,
    data BLOB NOT NULL
);
"""


_TABLES = ("meta", "chunks", "progress", "files", "tailed", "dead_letters", "sqlite_sequence")
# Schema versions this one opens after a migration (_migrate).
_MIGRATES = frozenset({"1", "2"})
_FILE_UPSERT = ("INSERT INTO files (dest, dev, ino, fp, fp_len, path, offset, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (dest, dev, ino) DO UPDATE SET fp = excluded.fp, fp_len = excluded.fp_len, "
                "path = excluded.path, offset = excluded.offset, updated = excluded.updated")
# Positions of the clear bits of each byte value, low bit first: the unsent lines of a bitmap.
_CLEAR_BITS = [tuple(b for b in range(8) if not v >> b & 1) for v in range(256)]


# A followed file's position: (dest, dev, inode, fingerprint, fingerprint length, path, offset).
FilePosition = tuple[str, int, int, bytes, int, str, int]


@dataclass
class DestStats:
    """What the spool holds for one destination."""

    rows: int = 0
    lines: int = 0
    bytes: int = 0
    oldest: float | None = None


@dataclass(frozen=True)
class Row:
    id: int
    dest: str
    created: float
    lines: list[bytes]
    nbytes: int


class _Damaged(Exception):
    """quick_check or a read found damage that recovery may get around."""


def _files(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def make_private_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents with DIR_MODE, whatever the umask; return
    the folders made."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    for path in reversed(missing):
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(path, DIR_MODE)
        made.append(path)
    return made


def _private_copy(src: Path, dst: Path) -> None:
    # A copy of the spool holds every unsent line: FILE_MODE from its first byte, not the
    # umask's default as shutil.copyfile would give it.
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with open(fd, "wb") as out, open(src, "rb") as source:
        os.fchmod(out.fileno(), FILE_MODE)
        shutil.copyfileobj(source, out, COPY_BUFFER)


def disk_bytes(path: Path) -> int:
    """Bytes the spool file and its WAL take on disk (allocated blocks, as ``du`` counts them).
    Rows, indexes, free pages and the WAL make this several times the bytes of lines."""
    total = 0
    for p in _files(path)[:2]:
        try:
            total += os.stat(p).st_blocks * 512
        except OSError:
            continue
    return total


def _fit_header_to_length(path: Path) -> None:
    with open(path, "r+b") as f:
        header = f.read(100)
        if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
            return
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = os.fstat(f.fileno()).st_size // page_size
        if pages and int.from_bytes(header[28:32], "big") > pages:
            f.truncate(pages * page_size)
            f.seek(28)
            f.write(pages.to_bytes(4, "big"))


def _readable_ids(conn: sqlite3.Connection, table: str) -> list[int]:
    """Ids of the rows that can still be found. When the table's b-tree cannot be walked, probe
    every id up to the highest one ever given (sqlite_sequence), each lookup on its own."""
    try:
        return [r[0] for r in conn.execute(f"SELECT id FROM {table} ORDER BY id")]
    except sqlite3.DatabaseError:
        pass
    top = 0
    for sql in ("SELECT seq FROM sqlite_sequence WHERE name = ?", f"SELECT max(id) FROM {table} WHERE ? IS NOT NULL"):
        try:
            row = conn.execute(sql, (table,)).fetchone()
            top = max(top, int(row[0] or 0)) if row else top
        except sqlite3.DatabaseError:
            continue
    ids = []
    for row_id in range(max(1, top - RECOVERY_PROBE_MAX), top + 1):
        try:
            if conn.execute(f"SELECT 1 FROM {table} WHERE id = ?", (row_id,)).fetchone():
                ids.append(row_id)
        except sqlite3.DatabaseError:
            ids.append(row_id)  # unreadable: counted as lost when copied
    return ids


def _copy_progress(old: sqlite3.Connection, new: sqlite3.Connection) -> None:
    """Recovery: the progress of the rows copied, as far as it can be read. What cannot be read
    is only sent again; progress that does not fit its row is dropped on opening."""
    try:
        if not _has_progress(old):
            return
        ids = _readable_ids(old, "progress")
    except sqlite3.DatabaseError:
        return
    new.execute("BEGIN")
    for row_id in ids:
        try:
            row = old.execute("SELECT done, sent FROM progress WHERE id = ?", (row_id,)).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row is not None:
            new.execute("INSERT INTO progress (id, done, sent) SELECT ?, ?, ? WHERE EXISTS "
                        "(SELECT 1 FROM chunks WHERE id = ?)", (row_id, *row, row_id))
    new.execute("COMMIT")


def _has_progress(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'progress'").fetchone() is not None


def _migrate(conn: sqlite3.Connection) -> None:
    """Versions 1 and 2 to 3: the progress, files and tailed tables (made by _SCHEMA's CREATE
    IF NOT EXISTS) are all."""
    old = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
    structlog.get_logger().info("spool_migrated", from_schema=int(old), to_schema=SCHEMA_VERSION)


def _tidy_progress(conn: sqlite3.Connection) -> None:
    """On opening: progress that does not fit its row (or has no row) is dropped, which only
    means those lines are sent again; a row whose lines are all recorded is deleted."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM progress WHERE id NOT IN (SELECT id FROM chunks)")
        bad: list[int] = []
        full: list[int] = []
        for row_id, lines, done, sent in conn.execute(
                "SELECT p.id, c.lines, p.done, p.sent FROM progress p JOIN chunks c ON c.id = p.id").fetchall():
            keep = unsent_positions(bytes(sent), done, lines)
            if keep is None:
                bad.append(row_id)
            elif not keep:
                full.append(row_id)
        conn.executemany("DELETE FROM progress WHERE id = ?", ((i,) for i in bad + full))
        conn.executemany("DELETE FROM chunks WHERE id = ?", ((i,) for i in full))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if bad:
        structlog.get_logger().warning("spool_progress_ignored", rows=len(bad),
                                       hint="those rows' lines are all sent again")


def unsent_positions(sent: bytes, done: int, lines: int) -> list[int] | None:
    """The positions of the lines a progress bitmap does not mark as accepted, in order; None
    when the bitmap is not one this row could have (its lines are then all unsent)."""
    bits = int.from_bytes(sent, "little")
    if bits.bit_count() != done or bits >> lines:
        return None
    out: list[int] = []
    clear = _CLEAR_BITS
    for i, value in enumerate(sent):
        if value != 0xFF:
            base = i * 8
            out.extend(base + b for b in clear[value])
    if len(sent) * 8 < lines:
        out.extend(range(len(sent) * 8, lines))
    while out and out[-1] >= lines:
        out.pop()
    return out


def merge_spans(sent: bytes, spans: list[int], lines: int) -> int:
    """A row's bitmap (bit i: line i accepted) with the flat ranges [start, stop, ...] added.
    One big-int operation per range: even ranges broken up by failures every 10 records cost
    14-60 ns a line for rows of 500-100,000 lines, less than building the bitmap bit by bit."""
    bits = int.from_bytes(sent, "little")
    for i in range(0, len(spans), 2):
        start, stop = spans[i], spans[i + 1]
        bits |= ((1 << (stop - start)) - 1) << start
    return bits & ((1 << lines) - 1)


def _translate(exc: sqlite3.Error, path: Path, doing: str) -> SpoolError:
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and (
        "malformed" in text or "not a database" in text or "corrupt" in text
    ):
        return SpoolCorrupt(f"{path}: the spool is damaged ({text}) while {doing}")
    return SpoolError(f"{path}: {doing} failed: {text}")


class Spool:
    """Synchronous access to the spool file. Not thread-safe: one Worker per connection."""

    def __init__(self, path: Path, synchronous: str = "full", page_size: int = 16384) -> None:
        self.path = path
        self.synchronous = synchronous
        # Applies when the file is created (or rebuilt by recovery); an existing file keeps its
        # own, which ``page_size`` holds once the file is open.
        self.page_size = page_size
        self._w: sqlite3.Connection | None = None
        self._r: sqlite3.Connection | None = None
        # The highest row id the last read of each destination returned: a flusher is leasing
        # those rows though its cursor may not show it yet, so a drop must not delete them. The
        # lock makes a read and a drop (through its COMMIT) happen one after the other.
        self._read_high: dict[str, int] = {}
        # Ids the last commit() really deleted (a row may already be gone: dropped or expired),
        # and for each the lines it still counted as unsent and its bytes.
        self.last_deleted: set[int] = set()
        self.last_deleted_rows: dict[int, tuple[int, int]] = {}
        # What the last commit() or drop() recorded of the progress it was given, per row:
        # (id, dest, lines newly recorded, bytes of the row if that finished it, else None).
        self.last_progress: list[tuple[int, str, int, int | None]] = []
        # For each partly sent row the last read returned: the positions in the row of the lines
        # it returned (the unsent ones), which the committer's progress is counted in.
        self._positions: dict[int, list[int]] = {}
        self._read_drop_lock = threading.Lock()

    # -- opening ------------------------------------------------------------------------
    def open_writer(self) -> dict[str, DestStats]:
        """Create or open the file, check it, and return what it holds per destination.

        A damaged file (PRAGMA quick_check fails) is recovered: every readable row is copied
        into a new file, the damaged one is kept beside it (never deleted), and what was lost
        is logged. A file that is not a spool at all is an error for the operator.
        """
        try:
            make_private_dirs(self.path.parent)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
                try:
                    os.fchmod(fd, FILE_MODE)  # whatever the umask; -wal and -shm take this mode
                finally:
                    os.close(fd)
            except FileExistsError:
                pass
        except OSError as exc:
            raise SpoolError(f"{self.path}: cannot create the spool: {exc.strerror or exc}") from exc
        try:
            conn, stats = self._connect_checked()
        except _Damaged as exc:
            self._recover(str(exc))
            conn, stats = self._connect_checked()
        self._w = conn
        self.page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        return stats

    def _connect_checked(self) -> tuple[sqlite3.Connection, dict[str, DestStats]]:
        conn = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA page_size={int(self.page_size)}")  # before WAL: new files only
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            # Some builds (Debian's among them) zero every freed page: each sent row's pages would
            # be written to the WAL twice, once with its lines and once as zeros. FAST still zeroes
            # what is freed inside b-tree pages, and leaves whole free pages to be reused.
            conn.execute("PRAGMA secure_delete=FAST")
            size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            pages = max(1, min(WAL_AUTOCHECKPOINT, WAL_MAX_BYTES // size))
            conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
            conn.execute("PRAGMA busy_timeout=5000")
            db = sqlite_utils.Database(conn)
            foreign = [t for t in db.table_names() if t not in _TABLES]
            if foreign:
                raise SpoolCorrupt(f"{self.path}: not a spoold spool (it has tables {', '.join(foreign)}); "
                                   "point [spool].path at another file")
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise _Damaged("; ".join(problems))
            conn.executescript(_SCHEMA)
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if version is None:
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif version[0] in _MIGRATES:
                _migrate(conn)
            elif version[0] != str(SCHEMA_VERSION):
                raise SpoolCorrupt(f"{self.path}: spool schema {version[0]} is not {SCHEMA_VERSION}")
            _tidy_progress(conn)
            return conn, self._stats(conn)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
                raise SpoolCorrupt(f"{self.path}: not an SQLite database (or its header is destroyed); "
                                   "it was left untouched: move it away to start with an empty spool") from exc
            if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in str(exc) or "corrupt" in str(exc)):
                raise _Damaged(str(exc)) from exc
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc, self.path, "opening the spool") from exc
            raise

    def _recover(self, problem: str) -> None:
        """Copy every readable row into a fresh file; keep the damaged one beside it."""
        log = structlog.get_logger()
        log.error("spool_damaged", path=str(self.path), problem=problem[:300], action="recovering readable rows")
        stamp = time.strftime("%Y%m%dT%H%M%S")
        fresh = self.path.with_name(self.path.name + ".recovering")
        copy = self.path.with_name(self.path.name + ".reading")
        for p in _files(fresh) + _files(copy):
            p.unlink(missing_ok=True)
        # Read from a copy (the damaged file is kept as it is) whose header is made to agree with
        # the file's real length: after a truncation SQLite otherwise refuses every page.
        _private_copy(self.path, copy)
        if _files(self.path)[1].exists():
            _private_copy(_files(self.path)[1], _files(copy)[1])
        _fit_header_to_length(copy)
        old = sqlite3.connect(copy, isolation_level=None)
        new = Spool(fresh, self.synchronous, self.page_size)
        new.open_writer()
        assert new._w is not None
        copied = lost = 0
        try:
            for table, columns in (("chunks", "dest, created, lines, bytes, data"),
                                   ("files", "dest, dev, ino, fp, fp_len, path, offset, updated"),
                                   ("tailed", "dest, pattern, since"),
                                   ("dead_letters", "dest, created, failed, error, data")):
                ids = _readable_ids(old, table)
                marks = ", ".join("?" * (len(columns.split(",")) + 1))
                new._w.execute("BEGIN")
                for row_id in ids:
                    try:
                        row = old.execute(f"SELECT {columns} FROM {table} WHERE id = ?", (row_id,)).fetchone()
                    except sqlite3.DatabaseError:
                        lost += 1
                        continue
                    if row is not None:
                        new._w.execute(f"INSERT INTO {table} (id, {columns}) VALUES ({marks})", (row_id, *row))
                        copied += 1
                new._w.execute("COMMIT")
            _copy_progress(old, new._w)
            try:  # ids are never reused: carry the sequence over when it is readable
                for name, seq in old.execute("SELECT name, seq FROM sqlite_sequence"):
                    new._w.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (seq, name))
            except sqlite3.DatabaseError:
                pass
        finally:
            old.close()
            new.close()
            for p in _files(copy):
                p.unlink(missing_ok=True)
        for src in _files(self.path):
            if src.exists():
                os.rename(src, src.with_name(src.name.replace(self.path.name, f"{self.path.name}.damaged-{stamp}", 1)))
        os.rename(fresh, self.path)
        for p in _files(fresh):
            p.unlink(missing_ok=True)
        log.error("spool_recovered", rows_recovered=copied, rows_lost=lost,
                  damaged_copy=str(self.path) + f".damaged-{stamp}")

    def open_reader(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only=1")
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, "opening the spool for reading") from exc
        self._r = conn

    def close(self) -> None:
        # Reader first: the writer's close may checkpoint, and must be the last connection.
        for conn in (self._r, self._w):
            if conn is not None:
                conn.close()
        self._r = self._w = None

    @staticmethod
    def _stats(conn: sqlite3.Connection) -> dict[str, DestStats]:
        """Rows, unsent lines (less those recorded in progress), bytes and oldest row per dest."""
        out: dict[str, DestStats] = {}
        sql = "SELECT dest, count(*), sum(lines), sum(bytes), min(created) FROM chunks GROUP BY dest"
        if _has_progress(conn):
            sql = ("SELECT c.dest, count(*), sum(c.lines) - coalesce(sum(p.done), 0), sum(c.bytes), min(c.created) "
                   "FROM chunks c LEFT JOIN progress p ON p.id = c.id GROUP BY c.dest")
        for dest, rows, lines, nbytes, oldest in conn.execute(sql):
            out[dest] = DestStats(rows, lines or 0, nbytes or 0, oldest)
        return out

    # -- the writer ---------------------------------------------------------------------
    def commit(
        self, appends: list[tuple[str, list[bytes], int]], deletes: list[int], now: float,
        progress: dict[int, list[int]] | None = None, files: list[FilePosition] | None = None,
    ) -> list[tuple[int, str, list[bytes], int]]:
        """One transaction: append each (dest, lines, bytes) as rows, delete rows by id, and
        record ``progress``: per row id, the lines the service accepted, as flat ranges
        [start0, stop0, start1, stop1, ...] of line positions in the row (see _record_progress).
        ``files``: where followed files were read up to, written in order (the last of a file
        wins), so that a file's offset is on disk exactly when the lines before it are.

        Returns the appended rows as (id, dest, lines, bytes). Lines of one dest may be split
        over several rows of at most CHUNK_MAX_BYTES.
        """
        def work(conn: sqlite3.Connection) -> list[tuple[int, str, list[bytes], int]]:
            made: list[tuple[int, str, list[bytes], int]] = []
            if files:
                conn.executemany(_FILE_UPSERT, ((*f, now) for f in files))
            for dest, lines, nbytes in appends:
                for part, size in _split(lines, nbytes):
                    cur = conn.execute(
                        "INSERT INTO chunks (dest, created, lines, bytes, data) VALUES (?, ?, ?, ?, ?)",
                        (dest, now, len(part), size, b"\n".join(part)),
                    )
                    assert cur.lastrowid is not None
                    made.append((cur.lastrowid, dest, part, size))
            # One statement per DELETE_IDS_MAX ids: each call hands the GIL over and takes it
            # back, which costs up to a switch interval while the trio thread is busy. The ids
            # go as one JSON array, so the statement's text (and cached plan) is always the same.
            removed: dict[int, tuple[int, int]] = {}
            for i in range(0, len(deletes), DELETE_IDS_MAX):
                part = deletes[i:i + DELETE_IDS_MAX]
                if len(part) == 1:
                    ids: int | str = part[0]
                    delete, forget = _DELETE_ONE, _DELETE_ONE_PROGRESS
                else:
                    ids = json.dumps(part)
                    delete, forget = _DELETE_IDS, _DELETE_PROGRESS
                removed.update((row[0], (row[1], row[2])) for row in conn.execute(delete, (ids,)))
                self._forget_progress(conn, forget, ids, removed)
            self.last_deleted_rows = removed
            self.last_deleted = set(removed)
            self.last_progress = self._record_progress(conn, progress) if progress else []
            return made

        return self._transaction("writing the spool", work)

    # -- followed files: where each was read up to ----------------------------------------
    def tail_state(self, dest: str) -> tuple[set[str], list[FilePosition]]:
        """The patterns (paths or globs) ``dest`` has followed before, and each file's recorded
        position."""
        assert self._w is not None
        try:
            seen = {p for (p,) in self._w.execute("SELECT pattern FROM tailed WHERE dest = ?", (dest,))}
            rows = self._w.execute("SELECT dest, dev, ino, fp, fp_len, path, offset FROM files WHERE dest = ?",
                                   (dest,)).fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, "reading file positions") from exc
        return seen, [(d, dev, ino, bytes(fp), fp_len, path, off) for d, dev, ino, fp, fp_len, path, off in rows]

    def tail_begin(self, dest: str, patterns: list[str], files: list[FilePosition], now: float) -> None:
        """The first time ``dest`` follows ``patterns``: the positions start_at gave the files
        that were already there, and the mark that files they match later are new (read from
        their start)."""
        def work(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR IGNORE INTO tailed (dest, pattern, since) VALUES (?, ?, ?)",
                             ((dest, p, now) for p in patterns))
            conn.executemany(_FILE_UPSERT, ((*f, now) for f in files))

        self._transaction("recording file positions", work)

    def tail_forget(self, dest: str, keys: list[tuple[int, int]]) -> None:
        """Files gone for good (deleted and read to the end, or not found at start)."""
        self._transaction("forgetting files", lambda conn: conn.executemany(
            "DELETE FROM files WHERE dest = ? AND dev = ? AND ino = ?", ((dest, dev, ino) for dev, ino in keys)))

    def drop(self, dest: str, above: int, older_than: float | None, limit_rows: int,
             spare: frozenset[int] = frozenset(), progress: dict[int, list[int]] | None = None,
             ) -> list[tuple[int, int, int]]:
        """Delete up to ``limit_rows`` oldest rows of ``dest`` with id > ``above`` (and created
        before ``older_than`` when given), never one the last read returned (a flusher is leasing
        those). ``progress`` (as for commit) is recorded first, so that lines accepted are not
        counted as dropped. Returns (id, unsent lines, bytes) of each row deleted."""
        sql = "SELECT id, lines, bytes FROM chunks WHERE dest = ? AND id > ?"
        args: list[Any] = [dest, above]
        if older_than is not None:
            sql += " AND created < ?"
            args.append(older_than)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit_rows)

        if spare:  # rows the service accepted, whose delete waits for the next commit
            sql = sql.replace(" ORDER BY", f" AND id NOT IN ({','.join('?' * len(spare))}) ORDER BY")
            args[-1:-1] = sorted(spare)

        def work(conn: sqlite3.Connection) -> list[tuple[int, int, int]]:
            self.last_progress = self._record_progress(conn, progress) if progress else []
            rows = conn.execute(sql, args).fetchall()
            conn.executemany("DELETE FROM chunks WHERE id = ?", ((r[0],) for r in rows))
            removed = {int(a): (int(b), int(c)) for a, b, c in rows}
            if removed:
                self._forget_progress(conn, _DELETE_PROGRESS, json.dumps(list(removed)), removed)
            return [(row_id, lines, nbytes) for row_id, (lines, nbytes) in removed.items()]

        with self._read_drop_lock:
            args[1] = max(above, self._read_high.get(dest, 0))
            return self._transaction("dropping rows", work)

    # -- progress: lines accepted from rows that still have unsent ones ---------------------
    def line_positions(self, row_id: int) -> list[int] | None:
        """For a partly sent row as the last read returned it: the position in the row of each
        line returned (progress counts in the row's positions). None: every line was returned."""
        return self._positions.get(row_id)

    def _forget_progress(self, conn: sqlite3.Connection, sql: str, ids: int | str,
                         removed: dict[int, tuple[int, int]]) -> None:
        """Rows ``ids`` (one id, or a JSON array for _DELETE_PROGRESS) were deleted: delete their
        progress too (``sql``), and take the lines it had recorded off each one's count in
        ``removed`` (id -> (lines, bytes))."""
        for row_id, done in conn.execute(sql, (ids,)):
            self._positions.pop(row_id, None)
            if row_id in removed:
                lines, nbytes = removed[row_id]
                removed[row_id] = (max(0, lines - done), nbytes)

    def _record_progress(self, conn: sqlite3.Connection,
                         progress: dict[int, list[int]]) -> list[tuple[int, str, int, int | None]]:
        """Merge each row's newly accepted ranges into its bitmap; a row all of whose lines are
        now recorded is deleted. Rows already gone (finished, dropped, expired) are skipped."""
        out: list[tuple[int, str, int, int | None]] = []
        for row_id, spans in progress.items():
            row = conn.execute(_ROW_PROGRESS, (row_id,)).fetchone()
            if row is None:
                continue
            dest, lines, nbytes, done, sent = row
            bits = merge_spans(bytes(sent) if sent is not None else b"", spans, lines)
            now_done = bits.bit_count()
            newly = now_done - (done or 0)
            if newly <= 0:
                continue
            if now_done >= lines:
                conn.execute("DELETE FROM chunks WHERE id = ?", (row_id,))
                conn.execute("DELETE FROM progress WHERE id = ?", (row_id,))
                self._positions.pop(row_id, None)
                out.append((row_id, dest, newly, nbytes))
            else:
                conn.execute("INSERT OR REPLACE INTO progress (id, done, sent) VALUES (?, ?, ?)",
                             (row_id, now_done, bits.to_bytes((lines + 7) // 8, "little")))
                out.append((row_id, dest, newly, None))
        return out

    def _transaction(self, doing: str, work: Callable[[sqlite3.Connection], T]) -> T:
        assert self._w is not None
        conn = self._w
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, doing) from exc
        return result

    def add_dead_letters(self, dest: str, items: list[tuple[float, str, bytes]]) -> None:
        """Store lines the service refused for good: (created, error, line) each."""
        now = time.time()
        self._transaction("writing dead letters", lambda conn: conn.executemany(
            "INSERT INTO dead_letters (dest, created, failed, error, data) VALUES (?, ?, ?, ?, ?)",
            ((dest, created, now, error, data) for created, error, data in items),
        ))

    def dead_letters(self, dest: str | None, limit: int) -> list[dict[str, Any]]:
        """The oldest dead letters (of one destination, or all), for `dead-letters list`."""
        assert self._w is not None
        db = sqlite_utils.Database(self._w)
        where, args = ("dest = ?", [dest]) if dest else (None, [])
        return list(db["dead_letters"].rows_where(where, args, order_by="id", limit=limit))

    def replay_dead_letters(self, dest: str | None, now: float) -> list[tuple[int, str, list[bytes], int]]:
        """Move dead letters back into the spool as new rows; returns the rows made."""

        def work(conn: sqlite3.Connection) -> list[tuple[int, str, list[bytes], int]]:
            sql = "SELECT dest, data FROM dead_letters" + (" WHERE dest = ?" if dest else "") + " ORDER BY id"
            grouped: dict[str, list[bytes]] = {}
            for name, data in conn.execute(sql, (dest,) if dest else ()):
                grouped.setdefault(name, []).append(bytes(data))
            made = []
            for name, lines in grouped.items():
                for part, size in _split(lines):
                    cur = conn.execute(
                        "INSERT INTO chunks (dest, created, lines, bytes, data) VALUES (?, ?, ?, ?, ?)",
                        (name, now, len(part), size, b"\n".join(part)))
                    assert cur.lastrowid is not None
                    made.append((cur.lastrowid, name, part, size))
            conn.execute("DELETE FROM dead_letters" + (" WHERE dest = ?" if dest else ""), (dest,) if dest else ())
            return made

        return self._transaction("replaying dead letters", work)

    def purge_dead_letters(self, dest: str | None) -> int:
        def work(conn: sqlite3.Connection) -> int:
            where, args = (" WHERE dest = ?", (dest,)) if dest else ("", ())
            cur = conn.execute("DELETE FROM dead_letters" + where, args)
            return int(cur.rowcount)

        return self._transaction("purging dead letters", work)

    # -- the reader ---------------------------------------------------------------------
    def read(self, dest: str, above: int, max_bytes: int) -> list[Row]:
        """Rows of ``dest`` with id > ``above`` in id order, up to about ``max_bytes``. A row
        partly sent holds only its unsent lines (see line_positions)."""
        assert self._r is not None
        out: list[Row] = []
        total = 0
        try:
            with self._read_drop_lock:
                cur = self._r.execute(
                    "SELECT c.id, c.created, c.bytes, c.data, p.done, p.sent FROM chunks c "
                    "LEFT JOIN progress p ON p.id = c.id WHERE c.dest = ? AND c.id > ? ORDER BY c.id LIMIT ?",
                    (dest, above, READ_MAX_ROWS),
                )
                for id_, created, nbytes, data, done, sent in cur:
                    lines = bytes(data).split(b"\n")
                    if sent is not None:
                        keep = unsent_positions(bytes(sent), done, len(lines))
                        if keep is not None:
                            if not keep:
                                continue  # all recorded: never left so by a commit; deleted on opening
                            lines = [lines[i] for i in keep]
                            nbytes = sum(map(len, lines)) + len(lines)
                            self._positions[id_] = keep
                        else:
                            self._positions.pop(id_, None)
                    out.append(Row(id_, dest, created, lines, nbytes))
                    total += nbytes
                    if total >= max_bytes:
                        break
                cur.close()
                # A flusher's reads go up with its cursor; a lower one is a new flusher's (reload).
                self._read_high[dest] = out[-1].id if out else above
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, "reading the spool") from exc
        return out


    def forget_reads(self, dest: str) -> None:
        """The flusher gave back every row it had read: drops may take them again."""
        with self._read_drop_lock:
            self._read_high.pop(dest, None)

    def summary(self) -> dict[str, tuple[float | None, int]]:
        """Per destination: the oldest row's creation time and the dead-letter count."""
        assert self._r is not None
        return _summary(self._r)


def _summary(conn: sqlite3.Connection) -> dict[str, tuple[float | None, int]]:
    out: dict[str, tuple[float | None, int]] = {}
    for dest, oldest in conn.execute("SELECT dest, min(created) FROM chunks GROUP BY dest"):
        out[dest] = (oldest, 0)
    for dest, n in conn.execute("SELECT dest, count(*) FROM dead_letters GROUP BY dest"):
        out[dest] = (out.get(dest, (None, 0))[0], n)
    return out


def dead_letter_json(row: dict[str, Any]) -> dict[str, Any]:
    """A dead-letter row for people and JSON: the line shown as text, bad bytes escaped."""
    data = bytes(row["data"])
    return {"id": row["id"], "dest": row["dest"], "created": row["created"], "failed": row["failed"],
            "error": row["error"], "size": len(data), "data": data.decode("utf-8", "backslashreplace")}


def offline_status(path: Path) -> dict[str, Any]:
    """What the spool file holds, read-only, for `spoold status` when the daemon is down (the
    caller holds the spool's lock)."""
    from spoold.status import build_snapshot

    if not path.exists():
        raise SpoolError(f"{path}: no spool file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            stats = Spool._stats(conn)
            summary = _summary(conn)
            page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _translate(exc, path, "reading the spool") from exc
    snap = build_snapshot(now=time.time(), path=str(path), page_size=page_size,
                          held={n: (s.lines, s.bytes) for n, s in stats.items()}, summary=summary)
    snap["spool"]["disk_bytes"] = disk_bytes(path)
    return snap


def lock_path(path: Path) -> Path:
    """The lock file beside the spool file."""
    return path.with_name(path.name + ".lock")


class SpoolLock:
    """One writer, always: an exclusive ``flock`` on ``spool.db.lock`` (mode 0600) beside the
    spool, held by the running daemon for its whole life and by an offline command for the time
    it works on the file. The holder writes its pid into the file so that others can name it.

    flock and not fcntl's record locks: those are released when *any* fd of the file is closed
    by the process, and belong to the process rather than to the open file. The kernel releases
    the lock when the holder dies, even by SIGKILL; a lock file left behind is harmless.
    """

    def __init__(self, path: Path) -> None:
        self.path = lock_path(path)
        self._fd: int | None = None

    def acquire(self, make_folder: bool = False) -> None:
        """Take the lock without waiting; raise SpoolLocked naming the holder's pid if taken."""
        assert self._fd is None
        spool = self.path.with_name(self.path.name[: -len(".lock")])
        try:
            if make_folder:
                make_private_dirs(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise SpoolError(f"{self.path}: cannot open the spool's lock file: {exc.strerror or exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                who = f"process {pid}" if pid else "another process"
                raise SpoolLocked(f"{spool} is in use by {who} (it holds {self.path})", pid) from None
            if os.geteuid() == 0:
                # root (an operator's offline command) must not leave the daemon a lock file
                # it cannot open: give it to the spool file's owner.
                try:
                    st = os.stat(spool)
                    os.fchown(fd, st.st_uid, st.st_gid)
                except OSError:
                    pass
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # The pid is left in the file: unlinking a lock file races with the next taker.
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None


def _split(lines: list[bytes], nbytes: int | None = None) -> list[tuple[list[bytes], int]]:
    """Lines cut into rows of at most CHUNK_MAX_BYTES (a line is never cut). ``nbytes``, when
    known, is the lines' size with one newline each, and spares the loop when they fit one row."""
    if nbytes is not None and nbytes <= CHUNK_MAX_BYTES:
        return [(lines, nbytes)]
    parts: list[tuple[list[bytes], int]] = []
    start = 0
    size = 0
    for i, line in enumerate(lines):
        n = len(line) + 1
        if size and size + n > CHUNK_MAX_BYTES:
            parts.append((lines[start:i], size))
            start, size = i, 0
        size += n
    if start == 0:
        parts.append((lines, size))
    else:
        parts.append((lines[start:], size))
    return parts


class Worker:
    """One dedicated thread that runs the calls it is given, one at a time, in order.

    A call cannot be cancelled once queued: the awaiting task waits for its result even when
    cancelled (a write half-abandoned would leave us not knowing whether it happened).
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, deliver = item
            deliver(outcome.capture(fn, *args))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome[T]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._queue.put((fn, args, deliver))
        result: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
