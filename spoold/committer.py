"""Group commit: many connections' lines become durable in one SQLite transaction.

Connections ``submit`` their complete lines and wait on the returned Ticket; the commit loop takes
everything pending, writes it (plus the deletes of rows the service has accepted, and which lines
it accepted of rows that still have unsent ones) in one transaction on the spool's writer thread,
then wakes every waiter at once. A ticket is answered only after COMMIT returned, so an
acknowledgement always means "on disk".

It also owns the spool's size accounting and the ``when_full`` policy.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import structlog
import trio

from spoold.batching import Run
from spoold.config import SpoolConfig
from spoold.errors import SpoolError
from spoold.spool import DestStats, FilePosition, Spool, Worker

if TYPE_CHECKING:
    from spoold.batching import Chunk, Entry

logger = structlog.get_logger()

# Lines waiting for the next commit across all connections; past it, submitters wait.
MAX_PENDING_BYTES = 8 * 1024 * 1024
# How long acked-row deletes may wait to share a commit with other deletes.
DELETE_LINGER = 0.05
# Rows dropped per transaction under when_full = "drop_oldest" and expiry.
DROP_BATCH_ROWS = 64
# At most one log line per this many seconds for each kind of drop or rejection.
LOG_EVERY = 10.0


class Ticket:
    """One submission's fate: filled in after its commit, then ``done`` is set."""

    __slots__ = ("lines", "nbytes", "done", "accepted", "rejected", "reason", "files")

    def __init__(self, lines: list[bytes], nbytes: int, files: list[FilePosition] | None = None) -> None:
        self.lines = lines
        self.nbytes = nbytes
        self.files = files
        self.done = trio.Event()
        self.accepted = 0
        self.rejected = 0
        self.reason = ""


class Cursors(Protocol):
    def __call__(self, dest: str) -> int: ...


class RateLimitedLog:
    """Logs an event at most once per period, with the count of what it summarises."""

    def __init__(self, period: float = LOG_EVERY) -> None:
        self.period = period
        self._next: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def __call__(self, event: str, n: int, level: str = "warning", **fields: object) -> None:
        self._count[event] = self._count.get(event, 0) + n
        now = time.monotonic()
        if now >= self._next.get(event, 0.0):
            getattr(logger, level)(event, lines=self._count.pop(event), **fields)
            self._next[event] = now + self.period


class Committer:
    def __init__(
        self,
        spool: Spool,
        worker: Worker,
        cfg: SpoolConfig,
        stats: dict[str, DestStats],
        on_rows: Callable[[list[tuple[int, str, list[bytes], int]], float], None],
        cursor_of: Cursors,
        destinations: Callable[[], Iterable[str]] | None = None,
        release: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.spool = spool
        self.worker = worker
        self.cfg = cfg
        self.stats = stats
        self.on_rows = on_rows
        self.cursor_of = cursor_of
        self.destinations = destinations or (lambda: list(self.stats))
        self.release = release
        self.total_bytes = sum(s.bytes for s in stats.values())
        self.dropped: dict[str, int] = {}
        self.expired: dict[str, int] = {}
        self.rejected_full = 0
        self.write_errors = 0
        self.last_error = ""
        self._pending: list[tuple[str, Ticket]] = []
        self._pending_bytes = 0
        # Bytes of the commit on the writer thread now: no longer pending, not yet in total_bytes.
        self._committing_bytes = 0
        self._rows_lock = trio.Lock()
        self._deletes: list[tuple[int, str, int, int]] = []
        # Per row id, lines accepted since the last commit, as flat ranges of positions in the row.
        self._progress: dict[int, list[int]] = {}
        self._last: tuple[object, list[int], list[int] | None] = (None, [], None)
        self._last_for: dict[int, list[int]] | None = None
        self._wake = trio.Event()
        self._lines_waiting = trio.Event()
        self._space = trio.Event()
        self._log = RateLimitedLog()
        self._closed = False

    # -- for connections ------------------------------------------------------------------
    async def submit(self, dest: str, lines: list[bytes], nbytes: int,
                     files: list[FilePosition] | None = None) -> Ticket:
        """Queue lines for the next commit; waits while too much is pending or the spool is full
        (``when_full = "block"``). Await ``ticket.done`` for the outcome. ``files``: where the
        followed files these lines come from were read up to, written in the same transaction."""
        ticket = self.submit_nowait(dest, lines, nbytes, files)
        if ticket is not None:
            return ticket
        ticket = Ticket(lines, nbytes, files)
        while not self._closed and (
            self._pending_bytes > MAX_PENDING_BYTES
            or (self.cfg.when_full == "block" and self._full(dest, nbytes))
        ):
            await self._wait_for_space()
        if self._closed:
            self._reject(ticket, "shutting down")
            return ticket
        if self._full(dest, nbytes):
            if self.cfg.when_full == "reject":
                return self._reject_full(ticket)
            if self.cfg.when_full == "drop_oldest":
                await self._drop_oldest(dest, nbytes)
        self._queue(dest, ticket)
        return ticket

    def submit_nowait(self, dest: str, lines: list[bytes], nbytes: int,
                      files: list[FilePosition] | None = None) -> Ticket | None:
        """submit() when it needs no wait, the common case; None when it would wait (for room in
        the commit queue or the spool, or to drop the oldest rows)."""
        if self._pending_bytes > MAX_PENDING_BYTES and not self._closed:
            return None
        ticket = Ticket(lines, nbytes, files)
        if self._closed:
            self._reject(ticket, "shutting down")
        elif not self._full(dest, nbytes):
            self._queue(dest, ticket)
        elif self.cfg.when_full == "reject":
            self._reject_full(ticket)
        else:
            return None
        return ticket

    def _queue(self, dest: str, ticket: Ticket) -> None:
        self._pending.append((dest, ticket))
        self._pending_bytes += ticket.nbytes
        self._wake.set()
        self._lines_waiting.set()

    def _reject_full(self, ticket: Ticket) -> Ticket:
        self.rejected_full += len(ticket.lines)
        self._log("spool_full_rejected", len(ticket.lines), max_bytes=self.cfg.max_bytes)
        self._reject(ticket, "spool full")
        return ticket

    def _full(self, dest: str, nbytes: int) -> bool:
        """Would ``nbytes`` more for ``dest`` overfill the spool? Each configured destination
        keeps an equal share of max_bytes reserved while it uses less than that share, so a
        destination that is down fills at most the rest and never blocks the others' writers."""
        in_memory = self._pending_bytes + self._committing_bytes
        return self.total_bytes + in_memory + nbytes + self._reserved_for_others(dest) > self.cfg.max_bytes

    def most_per_submission(self) -> int:
        """The most bytes one submission can hold and ever fit: a destination's share of
        max_bytes when the others keep theirs reserved (see _full)."""
        n = len(list(self.destinations()))
        return self.cfg.max_bytes - (n - 1) * (self.cfg.max_bytes // n) if n > 1 else self.cfg.max_bytes

    def _reserved_for_others(self, dest: str) -> int:
        names = [n for n in self.destinations()]
        if len(names) < 2:
            return 0
        share = self.cfg.max_bytes // len(names)
        stats = self.stats
        return sum(max(0, share - (stats[n].bytes if n in stats else 0)) for n in names if n != dest)

    async def _wait_for_space(self) -> None:
        if self._space.is_set():
            self._space = trio.Event()
        await self._space.wait()

    @staticmethod
    def _reject(ticket: Ticket, reason: str) -> None:
        ticket.rejected = len(ticket.lines)
        ticket.reason = reason
        ticket.done.set()

    # -- for flushers ---------------------------------------------------------------------
    def delete(self, row_id: int, dest: str, lines: int, nbytes: int) -> None:
        """The service accepted every line of this row: remove it with the next commit."""
        self._deletes.append((row_id, dest, lines, nbytes))
        self._wake.set()

    def accepted(self, entries: Iterable[Entry | Run]) -> None:
        """The service accepted these entries and runs (or they were dead-lettered or expired): record,
        with the next commit, which lines they took from rows that still have unsent lines, so
        that a restart does not send those again. Call it after the entries' chunks' ``remaining``
        counts were lowered: a chunk at 0 is finished, and its delete() is what counts."""
        pending = self._progress
        wake = not pending
        positions_of = self.spool.line_positions
        # The chunk of the last call, kept while its spans are still pending: entries are often
        # acknowledged one call each (a batch with failures).
        last, spans, index = self._last if self._last_for is pending else (None, [], None)
        same = None  # the refs of one-line entries of one chunk are one shared list
        for entry in entries:
            if type(entry) is Run:  # the hot path: many lines of one chunk at once
                at: int | list[int] = entry.start
                refs: list[tuple[Chunk, int]] | tuple[tuple[Chunk, int]] = ((entry.chunk, entry.records),)
            else:
                at = entry.at  # type: ignore[union-attr]
                refs = entry.refs  # type: ignore[union-attr]
                if refs is same:  # the next line of the same chunk
                    if spans[-1] == at:
                        spans[-1] = at + 1  # type: ignore[operator]
                    else:
                        spans += (at, at + 1)  # type: ignore[operator]
                    continue
            same = None
            for chunk, n in refs:
                if not chunk.remaining:
                    at = 0
                    continue
                if chunk is not last:
                    last = chunk
                    got = pending.get(chunk.id)
                    spans = pending[chunk.id] = [] if got is None else got
                    index = positions_of(chunk.id)
                if type(at) is int:
                    if index is None:
                        if spans and spans[-1] == at:
                            spans[-1] = at + n
                        else:
                            spans += (at, at + n)
                        if n == 1 and len(refs) == 1:
                            same = refs
                    else:
                        _add_positions(spans, [index[p] for p in range(at, at + n)])
                    at = 0
                else:  # a list: the entry has one ref
                    _add_positions(spans, at if index is None else [index[p] for p in at])
        self._last = (last, spans, index)
        self._last_for = pending
        if wake and pending:
            self._wake.set()

    def accepted_one(self, entry: Entry) -> None:
        """accepted() for one entry, the common kind (one chunk, contiguous lines) kept short."""
        refs = entry.refs
        at = entry.at
        if len(refs) != 1 or type(at) is not int:
            self.accepted((entry,))
            return
        chunk, n = refs[0]
        if not chunk.remaining:
            return
        pending = self._progress
        last, spans, index = self._last
        if chunk is not last or self._last_for is not pending:
            self.accepted((entry,))
            return
        if index is not None:
            _add_positions(spans, [index[p] for p in range(at, at + n)])
        elif spans and spans[-1] == at:
            spans[-1] = at + n
        else:
            spans += (at, at + n)

    def progress(self, row_id: int, positions: Iterable[int]) -> None:
        """Lines of a row (positions in it as the spool last returned it) were accepted while
        others are still unsent; recorded with the next commit."""
        index = self.spool.line_positions(row_id)
        spans = self._progress.setdefault(row_id, [])
        _add_positions(spans, positions if index is None else [index[p] for p in positions])
        self._wake.set()

    def _restore_progress(self, progress: dict[int, list[int]]) -> None:
        for row_id, spans in progress.items():
            self._progress.setdefault(row_id, []).extend(spans)

    def _account_progress(self) -> None:
        for _row_id, dest, newly, finished in self.spool.last_progress:
            if finished is None:
                self._account(dest, 0, -newly, 0)
            else:  # every line recorded: the row was deleted
                self._account(dest, -1, -newly, -finished)
                self._space.set()

    # -- the loop -------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not self._pending:
                # Only deletes: let more gather, but never make new lines wait for them.
                self._lines_waiting = trio.Event()
                with trio.move_on_after(DELETE_LINGER):
                    await self._lines_waiting.wait()
            await self.commit_once()

    async def commit_once(self) -> None:
        pending, self._pending = self._pending, []
        deletes, self._deletes = self._deletes, []
        progress, self._progress = self._progress, {}
        committing, self._pending_bytes = self._pending_bytes, 0
        if not pending and not deletes and not progress:
            return
        self._committing_bytes += committing
        grouped: dict[str, list[bytes]] = {}
        sizes: dict[str, int] = {}
        files: list[FilePosition] = []
        for dest, ticket in pending:
            if ticket.files:
                files += ticket.files
            if not ticket.lines:  # only a file position (the lines read were all refused)
                continue
            grouped.setdefault(dest, []).extend(ticket.lines)
            sizes[dest] = sizes.get(dest, 0) + ticket.nbytes
        appends = [(d, lines, sizes[d]) for d, lines in grouped.items()]
        now = time.time()
        # Held until the new rows are offered: a drop that ran in between would go by cursors
        # that do not know of them yet, and delete rows that a flusher is about to lease.
        async with self._rows_lock:
            try:
                made = await self.worker.run(self.spool.commit, appends, [d[0] for d in deletes], now, progress,
                                             files)
            except SpoolError as exc:
                failed: SpoolError | None = exc
            else:
                failed = None
                self._committing_bytes -= committing
                # The spool's own figures: a row partly sent before counts only its unsent lines.
                gone = self.spool.last_deleted_rows
                for row_id, dest, _lines, _nbytes in deletes:
                    if row_id in gone:  # not already dropped or expired
                        lines, nbytes = gone[row_id]
                        self._account(dest, -1, -lines, -nbytes)
                self._account_progress()
                for _row_id, dest, lines_, nbytes in made:
                    self._account(dest, 1, len(lines_), nbytes)
                for _, ticket in pending:
                    ticket.accepted = len(ticket.lines)
                    ticket.done.set()
                self._space.set()
                if made:
                    self.on_rows(made, now)
        if failed is not None:
            self._committing_bytes -= committing
            self.write_errors += 1
            self.last_error = str(failed)
            self._deletes[:0] = deletes  # those rows are still there; try again next time
            self._restore_progress(progress)
            n = sum(len(t.lines) for _, t in pending)
            self._log("spool_write_failed", n, level="error", error=str(failed))
            for _, ticket in pending:
                self._reject(ticket, f"spool write failed: {failed}")
            self._space.set()
            if (deletes or progress) and not pending:
                await trio.sleep(1.0)  # a failing disk: do not spin on the deletes
                self._wake.set()

    def account_rows(self, dest: str, rows: int, lines: int, nbytes: int) -> None:
        """Rows written outside a commit of ours (dead-letter replay)."""
        self._account(dest, rows, lines, nbytes)

    def _account(self, dest: str, rows: int, lines: int, nbytes: int) -> None:
        s = self.stats.setdefault(dest, DestStats())
        s.rows += rows
        s.lines += lines
        s.bytes += nbytes
        self.total_bytes += nbytes

    async def _drop_oldest(self, dest: str, need: int) -> None:
        # Drops whole rows, oldest first, that no flusher has loaded (loaded rows are being
        # sent), from the destinations holding the most first: usually the one that is down.
        while self._full(dest, need):
            candidates = sorted((d for d, s in self.stats.items() if s.rows), key=lambda d: -self.stats[d].bytes)
            best: list[tuple[int, str, int, int]] = []
            for victim in candidates:
                try:
                    rows = await self._drop(victim, None, 1)
                except SpoolError as exc:
                    self._log("spool_drop_failed", 0, level="error", error=str(exc))
                    return
                best.extend((r[0], victim, r[1], r[2]) for r in rows)
                if rows:
                    break
            if not best:
                # The oldest rows are leased by flushers; those not sending can give them back.
                released = False
                if self.release is not None:
                    for victim in candidates:
                        released = await self.release(victim) or released
                if released:
                    continue
                return  # everything left is in flight; the caller stores over the limit
            for _row_id, victim, lines, nbytes in best:
                self._account(victim, -1, -lines, -nbytes)
                self.dropped[victim] = self.dropped.get(victim, 0) + lines
                self._log("spool_full_dropped_oldest", lines, dest=victim, max_bytes=self.cfg.max_bytes)

    async def _drop(self, dest: str, older_than: float | None, limit_rows: int) -> list[tuple[int, int, int]]:
        # The cursor is read under the lock, once every committed row has been offered.
        async with self._rows_lock:
            spare = frozenset(d[0] for d in self._deletes if d[1] == dest)
            # Progress goes first, in the same transaction: lines accepted are not counted dropped.
            progress, self._progress = self._progress, {}
            try:
                rows = await self.worker.run(self.spool.drop, dest, self.cursor_of(dest), older_than, limit_rows,
                                             spare, progress)
            except BaseException:
                self._restore_progress(progress)
                raise
            self._account_progress()
            return rows

    async def expire(self, dest: str, cutoff: float) -> int:
        """Drop rows of ``dest`` older than ``cutoff`` that no flusher holds; returns lines."""
        total = 0
        while True:
            rows = await self._drop(dest, cutoff, DROP_BATCH_ROWS)
            for _, lines, nbytes in rows:
                self._account(dest, -1, -lines, -nbytes)
                total += lines
            if len(rows) < DROP_BATCH_ROWS:
                break
        if total:
            self.expired[dest] = self.expired.get(dest, 0) + total
            self._log("lines_expired", total, dest=dest, max_age=self.cfg.max_age)
            self._space.set()
        return total

    def count_expired(self, dest: str, lines: int) -> None:
        self.expired[dest] = self.expired.get(dest, 0) + lines
        self._log("lines_expired", lines, dest=dest, max_age=self.cfg.max_age)

    def close(self) -> None:
        """No new submissions; waiters are released and rejected."""
        self._closed = True
        self._space.set()


def _add_positions(spans: list[int], positions: Iterable[int]) -> None:
    """Append positions to flat ranges [start, stop, ...], growing the last range when they follow it."""
    for pos in positions:
        if spans and spans[-1] == pos:
            spans[-1] = pos + 1
        else:
            spans += (pos, pos + 1)
