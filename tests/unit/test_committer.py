"""The committer's accounting of a full spool while a commit is on the writer thread.

The spool's writer thread is held on a gate so that a commit is in progress for as long as the
test needs: what the fault suite (tests/e2e/test_faults.py) hits by chance happens here every time.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import trio
import trio.testing

from spoold.committer import Committer
from spoold.config import SpoolConfig
from spoold.spool import Spool, Worker
from tests.tools.daemon import spooled_ids

MiB = 1024 * 1024
LINE_4K = 4095  # with its newline, 4096 bytes count against max_bytes: 256 fit in 1 MiB


async def _gated(worker: Any, gate: threading.Event) -> None:
    await worker.run(gate.wait)


async def _committer(tmp_path: Path, when_full: str, offered: list[int], cursor: list[int]) -> Any:
    """A Committer on a real spool and writer thread, with a flusher that leases every row."""
    spool = Spool(tmp_path / "spool.db")
    worker = Worker("test-writer")
    stats = await worker.run(spool.open_writer)

    def on_rows(rows: list[tuple[int, str, list[bytes], int]], created: float) -> None:
        for row_id, *_ in rows:  # a flusher with room leases every row it is offered
            offered.append(row_id)
            cursor[0] = max(cursor[0], row_id)

    cfg = SpoolConfig(path=tmp_path / "spool.db", max_bytes=MiB, when_full=when_full)
    return Committer(spool, worker, cfg, stats, on_rows, lambda dest: cursor[0])


async def test_reject_counts_bytes_being_committed(tmp_path):
    """A submission that arrives while another is being committed counts the bytes on the
    writer thread: they are in neither the pending queue nor the spool's total yet."""
    c = await _committer(tmp_path, "reject", [], [0])
    gate = threading.Event()
    line = b"x" * (LINE_4K)
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run)
        nursery.start_soon(_gated, c.worker, gate)
        await trio.testing.wait_all_tasks_blocked()
        first = await c.submit("d", [line] * 200, 200 * 4096)  # 800 KiB
        await trio.testing.wait_all_tasks_blocked()  # the commit loop took it: it waits on the gate
        second = await c.submit("d", [line] * 100, 100 * 4096)  # 400 KiB more: over 1 MiB
        gate.set()
        await first.done.wait()
        await second.done.wait()
        nursery.cancel_scope.cancel()
    await c.worker.run(c.spool.close)
    c.worker.stop()
    assert (first.accepted, second.rejected, second.reason) == (200, 100, "spool full")
    assert c.total_bytes <= MiB


async def test_drop_oldest_never_drops_a_row_being_offered(tmp_path):
    """A drop never runs between a commit and the hand-over of its rows to the flusher: going
    by the flusher's old cursor it would delete the new row, which is then leased and sent too
    (counted as dropped and delivered, the spool's counts negative)."""
    offered: list[int] = []
    c = await _committer(tmp_path, "drop_oldest", offered, [0])
    gate = threading.Event()
    line = b"x" * (LINE_4K)
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run)
        base = await c.submit("d", [line] * 100, 100 * 4096)
        await base.done.wait()  # a row on disk, leased: the flusher's cursor is on it
        nursery.start_soon(_gated, c.worker, gate)
        await trio.testing.wait_all_tasks_blocked()
        first = await c.submit("d", [line] * 150, 150 * 4096)
        await trio.testing.wait_all_tasks_blocked()  # its commit waits on the gate
        tickets = []
        submitted = trio.Event()

        async def second() -> None:
            tickets.append(await c.submit("d", [line] * 100, 100 * 4096))  # does not fit: drops
            submitted.set()

        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
        await first.done.wait()
        await submitted.wait()
        await tickets[0].done.wait()
        nursery.cancel_scope.cancel()
    await c.worker.run(c.spool.close)
    c.worker.stop()
    rows = spooled_ids(c.spool.path)
    assert c.dropped == {}, f"dropped {c.dropped} lines of rows the flusher had leased: {offered}"
    assert sorted(rows) == sorted(offered), "every row offered to the flusher is still spooled"
    assert c.stats["d"].lines == 350
