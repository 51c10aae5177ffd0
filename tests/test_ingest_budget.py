"""The shared budget for unfinished lines: an in-process Ingest fed through trio memory streams,
with a committer fake that implements submit() (no SQLite: this tests the budget, not storage)."""

from __future__ import annotations

import json
from pathlib import Path

import trio
import trio.testing

import spoold.ingest as ingest
from spoold.committer import Ticket
from spoold.config import Destination
from spoold.framing import LineBuffer


class FakeCommitter:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    async def submit(self, dest: str, lines: list[bytes], nbytes: int) -> Ticket:
        ticket = Ticket(lines, nbytes)
        self.lines.extend(lines)
        ticket.accepted = len(lines)
        ticket.done.set()
        return ticket


def test_discard_partial_reports_the_line_once_it_ends() -> None:
    buf = LineBuffer(1000)
    assert buf.feed(b"ok\nabcdef") == [b"ok"]
    assert buf.discard_partial() == 6 and buf.buffered == 0
    assert buf.feed(b"ghi") == [] and buf.buffered == 0
    assert buf.feed(b"jk\nnext\n") == [b"next"]
    assert buf.take_discarded() == [11] and buf.take_oversized() == []


async def test_unfinished_lines_share_a_budget(monkeypatch) -> None:
    monkeypatch.setattr(ingest, "MAX_PARTIAL_BYTES", 300_000)
    monkeypatch.setattr(ingest, "PARTIAL_FAIR_SHARE", 100_000)
    dest = Destination(name="d", kind="kinesis", socket=Path("/unused"), stream="s", region="r",
                       endpoint_url="http://127.0.0.1:9")
    committer = FakeCommitter()
    ing = ingest.Ingest(dest, committer)  # type: ignore[arg-type]
    limit = trio.Semaphore(10)
    clients = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                client, server = trio.testing.memory_stream_pair()
                await limit.acquire()
                nursery.start_soon(ing._connection, server, limit)
                clients.append(client)
            for client in clients:  # five unfinished 150 KB lines: 750 KB against a 300 KB budget
                await client.send_all(b"good line\n" + b"u" * 150_000)
            await trio.testing.wait_all_tasks_blocked()
            assert ing.partial_bytes <= 300_000
            answers = []
            for client in clients:
                await client.send_all(b"\nafter\n")
                await client.send_eof()
                answers.append(json.loads(await client.receive_some(1000)))
    kept = sum(1 for a in answers if a == {"accepted": 3, "rejected": 0})
    dropped = sum(1 for a in answers if a == {"accepted": 2, "rejected": 1, "reasons": {"memory limit": 1}})
    assert kept + dropped == 5 and dropped >= 2, answers
    assert [bytes(line) for line in committer.lines if line.startswith(b"uuu")] == [b"u" * 150_000] * kept
    assert committer.lines.count(b"good line") == 5 and committer.lines.count(b"after") == 5
    assert ing.partial_bytes == 0
    assert ing.stats.rejected == {"memory limit": dropped}
