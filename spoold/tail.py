"""Following log files: a destination's ``files`` (paths or globs) read as they grow.

Each file is known by its device, inode and a fingerprint of its first bytes (sha256 of up to
FINGERPRINT_BYTES, extended as the file grows), never by its name or inode alone. The offset a
file was read up to goes to the committer with the lines read before it, and is written in the
same transaction (the ``files`` table): a restart resumes exactly where the last commit ended.

Nothing is buffered between reads: a read starts at the offset (the end of the last complete
line) and takes at most READ_BYTES; an unfinished last line is simply read again next time, until
its "\\n" arrives or the file is finished (rotated away or deleted, at its end and quiet for
FINISH_GRACE), when it counts as a line. A line longer than max_line_bytes is skipped whole and
counted; skipping is the only state that outlives a read, and it is re-done after a restart.

The pure part (cut_lines, same_file, start_offset, is_finished) takes bytes and values; the
Tailer around it polls with fstat every POLL seconds and re-reads the globs every RESCAN. It
keeps a bounded number of files open (see FD_SHARE); quiet ones are closed in turn past it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import resource
import stat
import sys
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import NamedTuple

import structlog
import trio

from spoold.committer import Committer, RateLimitedLog
from spoold.config import Destination
from spoold.errors import SpoolError
from spoold.spool import FilePosition, Spool, Worker

logger = structlog.get_logger()

# How often followed files are checked for growth (one fstat each).
POLL = 0.25
# How often the globs are matched again, to find new and renamed files.
RESCAN = 5.0
# The most read from one file at a time (more when max_line_bytes is bigger: a read must be
# able to hold a whole line).
READ_BYTES = 1024 * 1024
# The fingerprint covers up to this many first bytes of a file.
FINGERPRINT_BYTES = 1024
# A file rotated away (renamed, no longer matched, or deleted) is finished once it is read to
# its end and has not changed for this long: its unfinished last line counts, and it is closed.
FINISH_GRACE = 5.0
# With start_at = "end", the end of the last complete line is looked for backwards, this many
# bytes at a time, up to max_line_bytes + 1 bytes before the end.
END_LOOKBACK = 64 * 1024
# How long to wait before trying again when the spool refused lines (full, or a write error).
RETRY_AFTER = 1.0
# A destination keeps at most 1/FD_SHARE of the process's descriptor limit open for its files
# (connections, the spool and the other destinations need the rest). Past it, files quiet for
# PARK_QUIET are closed, the longest quiet first, and opened again when a scan sees them change;
# meanwhile the globs are matched every PARK_QUIET, until every file has had its turn.
FD_SHARE = 8
PARK_QUIET = 1.0
# One submission holds at most this share of what the destination may ever store in the spool,
# so that it fits while the destination's part of a small spool is partly used.
SUBMIT_SHARE = 4


# -- the pure part ------------------------------------------------------------------------
@dataclass
class Cut:
    """What one read gives: the complete lines, where the last line boundary is (relative to the
    read's start; -1 when the read holds none), how far the read was used (more than the
    boundary only while skipping an oversized line), and how many lines were too long."""

    lines: list[bytes]
    boundary: int
    used: int
    too_long: int
    skipping: bool


def cut_lines(data: bytes, max_line: int, skipping: bool, final: bool) -> Cut:
    """Split one read. ``skipping``: the read starts inside an oversized line. ``final``: the
    file is finished and ``data`` reaches its end, so an unterminated last line counts."""
    too_long = 0
    start = 0
    boundary = -1
    if skipping:
        nl = data.find(b"\n")
        if nl < 0:
            if final:
                return Cut([], len(data), len(data), 1, False)
            return Cut([], -1, len(data), 0, True)
        too_long += 1
        start = boundary = nl + 1
    lines: list[bytes] = []
    end = data.rfind(b"\n")
    if end >= start:
        for line in data[start:end].split(b"\n"):
            if len(line) > max_line:
                too_long += 1
            elif line:
                lines.append(line)
        start = boundary = end + 1
    rest = len(data) - start
    if rest > max_line:
        if final:
            return Cut(lines, len(data), len(data), too_long + 1, False)
        return Cut(lines, boundary, len(data), too_long, True)
    if rest and final:
        lines.append(data[start:])
        boundary = len(data)
    return Cut(lines, boundary, max(boundary, 0), too_long, False)


def fitting(data: bytes, limit: int) -> int:
    """The length of the longest prefix of ``data`` that ends a line and holds at most ``limit``
    bytes (one line at least, whatever its size); 0 when ``data`` has no line end."""
    nl = data.rfind(b"\n", 0, limit)
    if nl < 0:
        nl = data.find(b"\n")
    return nl + 1


def fingerprint(head: bytes) -> bytes:
    return hashlib.sha256(head).digest()


def same_file(fp: bytes, fp_len: int, head: bytes) -> bool:
    """Does a file whose first bytes are ``head`` (at least FINGERPRINT_BYTES of them, or the
    whole file) have the recorded fingerprint?"""
    return len(head) >= fp_len and fingerprint(head[:fp_len]) == fp


def start_offset(record: tuple[bytes, int, int] | None, head: bytes, size: int, first_configured: bool,
                 start_at: str, end: int) -> tuple[int, str]:
    """Where to start reading a file found by a scan, and why. ``record``: the (fingerprint,
    fingerprint length, offset) recorded for its device and inode, if any. ``first_configured``:
    the destination follows files for the first time and this file was already there. ``end``:
    the end of the file's last complete line."""
    if record is not None and same_file(record[0], record[1], head):
        offset = record[2]
        if size < offset:
            return 0, "truncated"
        return offset, "resumed"
    if first_configured:
        return (end, "start_at_end") if start_at == "end" else (0, "start_at_beginning")
    return 0, "new" if record is None else "inode_reused"


def is_finished(*, matched: bool, renamed: bool, deleted: bool, at_end: bool, quiet_for: float) -> bool:
    """Has a file been rotated away and read to its end, with nothing new for FINISH_GRACE?"""
    return (not matched or renamed or deleted) and at_end and quiet_for >= FINISH_GRACE


def end_of_last_line(read: Callable[[int, int], bytes], size: int, max_line: int) -> int:
    """Where start_at = "end" starts in a file of ``size`` bytes: after its last "\\n". An
    unfinished last line is read from its start, however far back; unless it is already longer
    than ``max_line``: then it starts max_line + 1 bytes before the end, inside that line, which
    the reader skips whole as too long. ``read(length, offset)`` reads the file (END_LOOKBACK at
    a time, so memory stays bounded whatever the line)."""
    floor = max(0, size - max_line - 1)
    end = size
    while end > floor:
        start = max(floor, end - END_LOOKBACK)
        nl = read(end - start, start).rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        end = start
    return floor


# -- the trio part ------------------------------------------------------------------------
@dataclass
class Followed:
    dev: int
    ino: int
    path: str
    first_path: str
    fd: int
    fp: bytes
    fp_len: int
    offset: int  # the end of the last line handed to the committer
    scan: int  # where the next read starts (past offset only while skipping)
    skipping: bool = False
    size: int = 0
    mtime_ns: int = 0
    matched: bool = True
    deleted: bool = False
    last_read: float | None = None
    changed: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[int, int]:
        return self.dev, self.ino

    def position(self, dest: str) -> FilePosition:
        # The name it was first followed under: a restart that finds it under another knows it was renamed.
        return (dest, self.dev, self.ino, self.fp, self.fp_len, self.first_path, self.offset)


class Closed(NamedTuple):
    """A file closed while matched: as the last poll saw it (a change since opens it again)."""

    size: int
    mtime_ns: int
    path: str
    offset: int
    last_read: float | None
    parked: bool  # closed over the descriptor share, not finished

    @classmethod
    def of(cls, f: Followed, *, parked: bool) -> Closed:
        return cls(f.size, f.mtime_ns, f.path, f.offset, f.last_read, parked)


class TailStats:
    def __init__(self) -> None:
        self.lines = 0
        self.bytes = 0
        self.too_long = 0
        self.files_finished = 0


class Tailer:
    """Follows one destination's files and hands their lines to the committer."""

    def __init__(self, dest: Destination, committer: Committer, spool: Spool, worker: Worker,
                 reject: object = None) -> None:
        self.dest = dest
        self.name = dest.name
        self.committer = committer
        self.spool = spool
        self.worker = worker
        self.reject = reject  # IngestStats.reject, to count refused lines with the socket's
        self.stats = TailStats()
        self.files: dict[tuple[int, int], Followed] = {}
        # (fingerprint, its length, offset) per (dev, inode), as last committed, and the path.
        self.records: dict[tuple[int, int], tuple[bytes, int, int]] = {}
        self.paths: dict[tuple[int, int], str] = {}
        # Files closed while matched (finished after a rename in the globs, or parked over the
        # descriptor limit): as they were then; opened again when one changes.
        self.closed: dict[tuple[int, int], Closed] = {}
        self.waiting = False  # files left unopened at the last scan, for want of descriptors
        self.unreadable: set[str] = set()
        self._log = RateLimitedLog()
        self.read_bytes = max(READ_BYTES, dest.limits.max_line_bytes + 1)
        self.scope = trio.CancelScope()
        self.log = logger.bind(dest=dest.name)

    def stop_reading(self) -> None:
        # Safe at any await: a position is only ever written with the lines before it.
        self.scope.cancel()

    def snapshot(self) -> list[dict[str, object]]:
        """The open files and the parked ones (as they were when closed), by path."""
        rows = [(f.path, f.offset, f.size, f.last_read, f.ino, "open") for f in self.files.values()]
        rows += [(c.path, c.offset, c.size, c.last_read, ino, "parked")
                 for (_dev, ino), c in self.closed.items() if c.parked]
        return [{"path": path, "offset": offset, "size": size, "lag_bytes": max(0, size - offset),
                 "last_read": last_read, "inode": ino, "state": state}
                for path, offset, size, last_read, ino, state in sorted(rows, key=lambda r: r[0])]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            await self._start(task_status)
            next_scan = trio.current_time() + RESCAN
            while True:
                busy = False
                for f in list(self.files.values()):
                    busy = await self._poll(f) or busy
                if trio.current_time() >= next_scan:
                    await self._scan(None, [])
                    next_scan = trio.current_time() + (PARK_QUIET if self.waiting else RESCAN)
                if not busy:
                    await trio.sleep(POLL)
        self.files_close()

    # -- finding files --------------------------------------------------------------------
    def _glob(self) -> dict[tuple[int, int], tuple[str, os.stat_result, set[str]]]:
        """The regular files the patterns match, by (dev, inode): a path, its stat, and which
        patterns match it."""
        found: dict[tuple[int, int], tuple[str, os.stat_result, set[str]]] = {}
        for pattern in self.dest.files.paths:
            for path in sorted(glob.glob(pattern)):
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.setdefault((st.st_dev, st.st_ino), (path, st, set()))[2].add(pattern)
        return found

    async def _start(self, task_status: trio.TaskStatus[None]) -> None:
        """The first scan, then started (the daemon opens the socket next). A spool that fails
        here is tried again without holding the daemon's start."""
        started = False
        while True:
            try:
                await self._begin()
                break
            except SpoolError as exc:  # a failing disk: the files wait; try again
                self.log.error("files_start_failed", error=str(exc), retry_in=RETRY_AFTER * 5)
                self.files_close()
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(RETRY_AFTER * 5)
        if not started:
            task_status.started()

    def files_close(self) -> None:
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()

    async def _forget(self, keys: list[tuple[int, int]]) -> None:
        try:
            await self.worker.run(self.spool.tail_forget, self.name, keys)
        except SpoolError as exc:  # only bookkeeping: the next start prunes them again
            self.log.error("files_forget_failed", error=str(exc))
        for k in keys:
            self.closed.pop(k, None)
            self.records.pop(k, None)
            self.paths.pop(k, None)

    async def _begin(self) -> None:
        known, rows = await self.worker.run(self.spool.tail_state, self.name)
        self.records = {(dev, ino): (fp, fp_len, off) for _d, dev, ino, fp, fp_len, _p, off in rows}
        self.paths = {(dev, ino): p for _d, dev, ino, _fp, _n, p, _o in rows}
        first: list[FilePosition] = []
        found = await self._scan(known, first)
        new = [p for p in self.dest.files.paths if p not in known]
        if new:
            await self.worker.run(self.spool.tail_begin, self.name, new, first, time.time())
        self.log.info("files_following", files=len(self.files), new_patterns=new, start_at=self.dest.files.start_at)

    async def _scan(self, known: set[str] | None, first: list[FilePosition]) -> set[tuple[int, int]]:
        """Match the globs: follow new files, note renamed, unmatched and replaced ones, forget
        those proven gone (deleted or rotated out of the globs, also while we were stopped). At
        start, ``known`` holds the patterns followed before: a file none of them matches was
        there when its patterns were first configured, and starts at start_at (its position
        goes to ``first``)."""
        found = await trio.to_thread.run_sync(self._glob)
        # Only paths still matched: the set must not grow with every rotated name.
        self.unreadable.intersection_update(path for path, _st, _patterns in found.values())
        for f in self.files.values():
            if f.key in found:
                f.matched, f.path = True, found[f.key][0]
            else:
                # Renamed out of the globs, deleted, or in a folder the glob could not list (it
                # reports no error, and a file taken for gone would be read again from 0).
                f.matched = not await trio.to_thread.run_sync(_gone_from, f.path, f.key)
                if not f.matched:
                    f.deleted = f.deleted or _nlink(f.fd) == 0
            # A copytruncate followed by new writes past the offset before a poll saw the drop:
            # the first bytes are not those any more.
            try:
                head = await trio.to_thread.run_sync(os.pread, f.fd, f.fp_len, 0)
            except OSError:
                continue  # the next poll's read reports it
            if not same_file(f.fp, f.fp_len, head):
                self._restart(f, "replaced")
        # Known files not open: closed ones (at the path they had then) and those not found
        # since the start (a folder not mounted yet keeps them until it is).
        paths = {k: self.paths.get(k, "") for k in self.records if k not in self.files}
        paths.update((k, c.path) for k, c in self.closed.items())
        gone = await trio.to_thread.run_sync(self._gone, paths, found)
        if gone:  # nothing left to resume
            await self._forget(gone)
        most = _max_open()
        self.waiting = False
        for key, (path, st, patterns) in found.items():
            if key in self.files:
                continue
            c = self.closed.get(key)
            if c is not None and (c.size, c.mtime_ns, c.path) == (st.st_size, st.st_mtime_ns, path):
                continue
            if len(self.files) >= most and not self._park():
                self.waiting = True
                continue
            first_configured = known is not None and not patterns & known
            try:
                f = await trio.to_thread.run_sync(self._open, key, path, first_configured)
            except OSError as exc:
                if path not in self.unreadable:  # once, not at every rescan
                    self.unreadable.add(path)
                    self.log.warning("file_unreadable", path=path, error=exc.strerror or str(exc))
                continue
            self.unreadable.discard(path)
            self.closed.pop(key, None)
            self.files[key] = f
            if first_configured:
                first.append(f.position(self.name))
                # Also known here: a file closed before a line of it was read (finished after a
                # rename) and opened again resumes at start_at's offset, not at 0.
                self.records[key] = (f.fp, f.fp_len, f.offset)
                self.paths[key] = f.first_path
        return set(found)

    @staticmethod
    def _gone(paths: dict[tuple[int, int], str], found: Container[tuple[int, int]]) -> list[tuple[int, int]]:
        return [k for k, path in paths.items() if k not in found and _gone_from(path, k)]

    def _park(self) -> bool:
        """Close the open file quiet the longest, if one is quiet, still under its first name and
        read to its end (no unfinished line): a scan opens it again when it changes."""
        now = time.monotonic()
        quiet = [f for f in self.files.values() if f.matched and not f.deleted and f.path == f.first_path
                 and not f.skipping and f.offset == f.scan == f.size and now - f.changed >= PARK_QUIET]
        if not quiet:
            return False
        f = min(quiet, key=lambda f: f.changed)
        del self.files[f.key]
        os.close(f.fd)
        self.closed[f.key] = Closed.of(f, parked=True)
        self.log.debug("file_parked", path=f.path, offset=f.offset)
        return True

    def _open(self, key: tuple[int, int], path: str, first_configured: bool) -> Followed:
        # Non-blocking: a fifo put in the file's place since the glob would block the open
        # (in a thread no cancel reaches) until a writer came. Reads of a regular file ignore it.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{path} is not a regular file any more")
            if (st.st_dev, st.st_ino) != key:  # replaced between the glob and the open
                raise OSError(f"{path} was replaced while being opened")
            head = os.pread(fd, FINGERPRINT_BYTES, 0)
            end = st.st_size
            if first_configured and self.dest.files.start_at == "end" and st.st_size:
                end = end_of_last_line(lambda n, at: os.pread(fd, n, at), st.st_size,
                                       self.dest.limits.max_line_bytes)
            offset, why = start_offset(self.records.get(key), head, st.st_size, first_configured,
                                       self.dest.files.start_at, end)
            # A file resumed under another name than it had was renamed while we were stopped.
            first_path = self.paths.get(key, path) if why in ("resumed", "truncated") else path
        except BaseException:
            os.close(fd)
            raise
        self.log.info("file_followed", path=path, inode=key[1], offset=offset, size=st.st_size, reason=why)
        return Followed(dev=key[0], ino=key[1], path=path, first_path=first_path, fd=fd, fp=fingerprint(head),
                        fp_len=len(head), offset=offset, scan=offset, size=st.st_size, mtime_ns=st.st_mtime_ns)

    def _restart(self, f: Followed, why: str) -> None:
        self.log.warning("file_truncated", path=f.path, offset=f.offset, size=f.size, reason=why)
        f.offset = f.scan = 0
        f.skipping = False
        f.fp, f.fp_len = fingerprint(b""), 0

    # -- reading --------------------------------------------------------------------------
    async def _poll(self, f: Followed) -> bool:
        """Read what is new in one file (one read's worth); True when there may be more."""
        try:
            st = os.fstat(f.fd)
        except OSError:
            return False
        if st.st_nlink == 0:
            f.deleted = True
        if st.st_size != f.size:
            f.changed = time.monotonic()
            f.size = st.st_size
        f.mtime_ns = st.st_mtime_ns
        if f.size < f.scan:
            self._restart(f, "copytruncate")
        may_finish = is_finished(matched=f.matched, renamed=f.path != f.first_path, deleted=f.deleted,
                                 at_end=f.size - f.scan <= self.read_bytes, quiet_for=time.monotonic() - f.changed)
        if f.scan >= f.size and not may_finish:
            return False
        try:
            data, head = await trio.to_thread.run_sync(_read, f.fd, self.read_bytes, f.scan)
        except OSError as exc:  # an I/O error: tried again at the next poll
            self.log.error("file_read_failed", path=f.path, offset=f.scan, error=exc.strerror or str(exc))
            await trio.sleep(RETRY_AFTER)
            return False
        if not same_file(f.fp, f.fp_len, head):
            # Truncated and written past the offset again since the last poll (copytruncate):
            # the read may hold another file's bytes from the middle of a line. Its first bytes,
            # read after the data, tell: then nothing of the read is used.
            self._restart(f, "replaced")
            return True
        final = may_finish and f.scan + len(data) >= f.size
        cut = cut_lines(data, self.dest.limits.max_line_bytes, f.skipping, final)
        limit = max(1, self.committer.most_per_submission() // SUBMIT_SHARE)
        more = len(data) == self.read_bytes
        if cut.boundary > 0 and sum(map(len, cut.lines)) + len(cut.lines) > limit:
            # More than the spool could ever take at once (a small spool shared by several
            # destinations): the lines that fit now, the rest at the next read.
            cut = cut_lines(data[:fitting(data, limit)], self.dest.limits.max_line_bytes, f.skipping, False)
            final, more = False, True
        start = f.scan
        if cut.boundary >= 0:
            if len(head) > f.fp_len:
                f.fp, f.fp_len = fingerprint(head), len(head)
            offset = start + cut.boundary
            position = (self.name, f.dev, f.ino, f.fp, f.fp_len, f.first_path, offset)
            if not await self._submit(f, cut.lines, position):
                return False
            f.offset = offset
            self.records[f.key] = (f.fp, f.fp_len, offset)
            self.paths[f.key] = f.first_path
        # Counted once their read is stored: a read the spool refused is read again.
        if cut.too_long:
            self.stats.too_long += cut.too_long
            if callable(self.reject):
                self.reject("line too long", cut.too_long)
            self._log("file_lines_too_long", cut.too_long, dest=self.name,
                      max_line_bytes=self.dest.limits.max_line_bytes)
        f.scan = start + cut.used if cut.skipping or cut.boundary >= 0 else f.scan
        f.skipping = cut.skipping
        if cut.lines or cut.too_long:
            f.last_read = time.time()
        if final:
            await self._finish(f)
            return False
        return more

    async def _submit(self, f: Followed, lines: list[bytes], position: FilePosition) -> bool:
        nbytes = sum(map(len, lines)) + len(lines)
        ticket = await self.committer.submit(self.name, lines, nbytes, [position])
        await ticket.done.wait()
        if ticket.rejected:
            # Nothing of it was written, the offset included: the lines are read again later.
            self.log.warning("file_lines_not_spooled", path=f.path, lines=len(lines), reason=ticket.reason)
            await trio.sleep(RETRY_AFTER)
            return False
        self.stats.lines += len(lines)
        self.stats.bytes += nbytes
        return True

    async def _finish(self, f: Followed) -> None:
        del self.files[f.key]
        os.close(f.fd)
        self.stats.files_finished += 1
        self.log.info("file_finished", path=f.path, offset=f.offset, deleted=f.deleted, matched=f.matched)
        if f.deleted or not f.matched:
            # Its last position is committed (we waited for it): nothing is left to resume.
            await self._forget([f.key])
        else:
            # As the last poll saw it, before its last read: a change since, even one made
            # while that read was being committed, makes a scan open it again.
            self.closed[f.key] = Closed.of(f, parked=False)


def _read(fd: int, size: int, offset: int) -> tuple[bytes, bytes]:
    """``size`` bytes at ``offset``, then the file's first bytes (in this order: a file truncated
    and rewritten before the first read is told by the second)."""
    return os.pread(fd, size, offset), os.pread(fd, FINGERPRINT_BYTES, 0)


def _gone_from(path: str, key: tuple[int, int]) -> bool:
    """Is the file ``key`` proven gone from ``path``: none or another file there, on the device
    that held it? Not when that cannot be told (an error other than "no such file"), nor when
    the folder is missing (or another filesystem's, an empty mount point) and the nearest folder
    that exists is on another device: its filesystem is not mounted (yet), and it may come back."""
    if not path:
        return True
    try:
        st = os.stat(path)
        return st.st_dev == key[0] and st.st_ino != key[1]
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError:
        return False
    folder = os.path.dirname(path)
    while True:
        try:
            return os.stat(folder).st_dev == key[0]
        except (FileNotFoundError, NotADirectoryError):
            if folder == os.path.dirname(folder):
                return False
            folder = os.path.dirname(folder)
        except OSError:
            return False


def _max_open() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return sys.maxsize if soft == resource.RLIM_INFINITY else max(1, soft // FD_SHARE)


def _nlink(fd: int) -> int:
    try:
        return os.fstat(fd).st_nlink
    except OSError:
        return 0

