"""The shared budget for unfinished lines: an in-process Ingest fed through real socket pairs,
with a committer fake that implements submit() (no SQLite: this tests the budget, not storage)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

import spoold.ingest as ingest
from spoold.committer import Ticket
from spoold.config import Destination, Limits, SocketConfig
from spoold.framing import LineBuffer


class FakeCommitter:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def submit_nowait(self, dest: str, lines: list[bytes], nbytes: int) -> Ticket | None:
        ticket = Ticket(lines, nbytes)
        self.lines.extend(lines)
        ticket.accepted = len(lines)
        ticket.done.set()
        return ticket

    async def submit(self, dest: str, lines: list[bytes], nbytes: int) -> Ticket:
        ticket = self.submit_nowait(dest, lines, nbytes)
        assert ticket is not None
        return ticket


@asynccontextmanager
async def serving(committer: FakeCommitter) -> AsyncIterator[tuple[ingest.Ingest, trio.Nursery]]:
    """An Ingest with ``committer``, and a nursery for its connections, under a deadline."""
    ing = ingest.Ingest(DEST, committer)  # type: ignore[arg-type]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            yield ing, nursery


def pair(ing: ingest.Ingest, nursery: trio.Nursery, uid: int) -> tuple[trio.SocketStream, ingest.Conn]:
    """A client stream, and the connection that serves its other end."""
    client, server = socket.socketpair()
    conn = ing.open(uid, server)
    nursery.start_soon(ing._connection, server, conn)
    return trio.SocketStream(trio.socket.from_stdlib_socket(client)), conn


def test_discard_partial_reports_the_line_once_it_ends() -> None:
    buf = LineBuffer(1000)
    assert buf.feed(b"ok\nabcdef") == [b"ok"]
    assert buf.discard_partial() == 6 and buf.buffered == 0
    assert buf.feed(b"ghi") == [] and buf.buffered == 0
    assert buf.feed(b"jk\nnext\n") == [b"next"]
    assert buf.take_discarded() == [11] and buf.take_oversized() == []


DEST = Destination(name="d", kind="kinesis", socket=SocketConfig(Path("/unused")), stream="s", region="r",
                   endpoint_url="http://127.0.0.1:9", limits=Limits.of_kind("kinesis"))


async def test_unfinished_lines_share_a_hard_budget(monkeypatch) -> None:
    monkeypatch.setattr(ingest, "MAX_HELD_BYTES", 310_000)
    committer = FakeCommitter()
    async with serving(committer) as (ing, nursery):
        clients = [pair(ing, nursery, 1000)[0] for _ in range(5)]
        for client in clients:  # five unfinished 150 KB lines: 750 KB against a 310 KB budget
            await client.send_all(b"good line\n" + b"u" * 150_000)
            await trio.testing.wait_all_tasks_blocked()
            assert ing.held_bytes <= 310_000
        answers = []
        for client in clients:
            await client.send_all(b"\nafter\n")
            await client.send_eof()
            answers.append(json.loads(await client.receive_some(1000)))
            await client.aclose()
    kept = sum(1 for a in answers if a == {"accepted": 3, "rejected": 0})
    dropped = sum(1 for a in answers if a == {"accepted": 2, "rejected": 1, "reasons": {"memory limit": 1}})
    assert kept + dropped == 5 and kept == 2, answers
    assert [bytes(line) for line in committer.lines if line.startswith(b"uuu")] == [b"u" * 150_000] * kept
    assert committer.lines.count(b"good line") == 5 and committer.lines.count(b"after") == 5
    assert ing.held_bytes == 0
    assert ing.stats.rejected == {"memory limit": dropped}


def conn(slots: ingest.Slots, uid: int, last_active: float, reading: bool = True) -> ingest.Conn:
    c = ingest.Conn(uid, LineBuffer(100), last_active)
    c.reading = reading
    slots.add(c)
    return c


def test_slots_close_the_longest_idle_once_idle_long_enough() -> None:
    slots = ingest.Slots(size=4, share=3, min_idle=1.0)
    old = conn(slots, 1, last_active=10.0)
    conn(slots, 2, last_active=10.5)
    conn(slots, 1, last_active=9.0, reading=False)  # waiting on the spool or answering: not idle
    conn(slots, 3, last_active=10.8)
    assert slots.full()
    assert slots.victim(10.9) == (None, "", 11.0)  # nobody idle for a second yet: look again at 11.0
    assert slots.victim(11.0) == (old, ingest.CLOSED_IDLE, 11.0)
    slots.mark_closing(old, ingest.CLOSED_IDLE)
    assert slots.closing == 1 and slots.victim(20.0)[0] is not old  # never picked twice
    slots.remove(old)
    assert slots.closing == 0 and not slots.full() and slots.users == {1: 1, 2: 1, 3: 1}


def test_slots_close_a_user_over_its_share_first_even_if_busy() -> None:
    slots = ingest.Slots(size=5, share=2, min_idle=1.0)
    quiet = conn(slots, 1, last_active=0.0)  # idle for long, but its user is within its share
    hogs = [conn(slots, 2, last_active=9.9 + i / 100) for i in range(3)]
    conn(slots, 3, last_active=9.0)
    assert slots.at_share(2) and not slots.at_share(1)
    assert slots.victim(10.0) == (hogs[0], ingest.CLOSED_USER_SHARE, 10.0)
    slots.mark_closing(hogs[0], ingest.CLOSED_USER_SHARE)
    slots.remove(hogs[0])
    # The user now holds its share and no more: the longest-idle is next.
    assert slots.victim(10.0) == (quiet, ingest.CLOSED_IDLE, 10.0)


def test_slots_with_nobody_reading_wait_without_a_deadline() -> None:
    slots = ingest.Slots(size=1, share=1, min_idle=1.0)
    conn(slots, 1, last_active=0.0, reading=False)
    assert slots.victim(100.0) == (None, "", float("inf"))


async def test_connection_closed_for_room_is_told_why_and_keeps_its_complete_lines() -> None:
    committer = FakeCommitter()
    async with serving(committer) as (ing, nursery):
        client, c = pair(ing, nursery, 1000)
        await client.send_all(b"one\ntwo\nunfini")
        await trio.testing.wait_all_tasks_blocked()
        assert c.reading and ing.held_bytes == 6
        ing.close_for_room(c, ingest.CLOSED_IDLE)
        answer = json.loads(await client.receive_some(1000))
        await client.aclose()
    assert answer == {"error": ingest.CLOSED_IDLE, "accepted": 2, "rejected": 1,
                      "reasons": {"connection closed": 1}}
    assert committer.lines == [b"one", b"two"]
    assert ing.stats.rejected == {"connection closed": 1} and ing.held_bytes == 0
    assert not ing.slots.conns and ing.slots.closing == 0


class BlockedCommitter(FakeCommitter):
    """Takes nothing until ``open`` is set, as a full commit queue or spool would."""

    def __init__(self) -> None:
        super().__init__()
        self.open = trio.Event()

    def submit_nowait(self, dest: str, lines: list[bytes], nbytes: int) -> Ticket | None:
        return super().submit_nowait(dest, lines, nbytes) if self.open.is_set() else None

    async def submit(self, dest: str, lines: list[bytes], nbytes: int) -> Ticket:
        await self.open.wait()
        return await super().submit(dest, lines, nbytes)


async def test_complete_lines_waiting_for_the_committer_count_in_the_budget(monkeypatch) -> None:
    monkeypatch.setattr(ingest, "MAX_HELD_BYTES", 300_000)
    committer = BlockedCommitter()
    async with serving(committer) as (ing, nursery):
        waiting = pair(ing, nursery, 1)[0]
        unfinished = pair(ing, nursery, 2)[0]
        await waiting.send_all(b"w" * 200_000 + b"\n")
        await trio.testing.wait_all_tasks_blocked()
        assert ing.held_bytes == 200_001
        await unfinished.send_all(b"u" * 150_000)  # over the budget: the unfinished line goes
        await trio.testing.wait_all_tasks_blocked()
        assert ing.held_bytes == 200_001 and ing.stats.rejected == {"memory limit": 1}
        committer.open.set()
        answers = []
        for client in (waiting, unfinished):
            await client.send_all(b"\nlast\n")
            await client.send_eof()
            answers.append(json.loads(await client.receive_some(1000)))
            await client.aclose()
    assert answers == [{"accepted": 2, "rejected": 0},
                       {"accepted": 1, "rejected": 1, "reasons": {"memory limit": 1}}]
    assert committer.lines == [b"w" * 200_000, b"last", b"last"] and ing.held_bytes == 0


def test_spoold_send_fails_on_an_error_answer(tmp_path: Path, capsys) -> None:
    import io
    import socket
    import threading

    from spoold import cli

    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    answer = json.dumps({"error": ingest.REFUSED_USER_SHARE}).encode() + b"\n"

    def refuse() -> None:
        conn, _ = server.accept()
        with conn:
            while conn.recv(4096):
                pass
            conn.sendall(answer)

    t = threading.Thread(target=refuse)
    t.start()
    lines = tmp_path / "lines"
    lines.write_bytes(b"a\nb\n")
    out = io.BytesIO()
    try:
        assert cli.send(str(path), [str(lines)], out=out) == cli.EXIT_FAILED
    finally:
        t.join(timeout=10)
        server.close()
    assert out.getvalue() == answer
    assert ingest.REFUSED_USER_SHARE in capsys.readouterr().err


async def test_shutdown_stops_reads_and_waits_for_room_and_answers_whoever_finished() -> None:
    """stop_reading() ends every read (an idle writer gets no answer: it sends again; its
    complete lines were committed) and cuts a wait for room short (those lines are not taken,
    and their writer gets no answer either)."""
    committer = BlockedCommitter()
    async with serving(committer) as (ing, nursery):
        idle, idle_conn = pair(ing, nursery, 1)
        waiting, _ = pair(ing, nursery, 2)
        committer.open.set()
        await idle.send_all(b"kept\nunfinished")
        await trio.testing.wait_all_tasks_blocked()
        committer.open = trio.Event()  # no room from now on
        await waiting.send_all(b"waits for room\n")
        await trio.testing.wait_all_tasks_blocked()
        assert idle_conn.reading and len(ing._waiting) == 1
        ing.stop_reading()
        await trio.testing.wait_all_tasks_blocked()
        assert not ing._waiting
        committer.open.set()
        answers = [await idle.receive_some(1000), await waiting.receive_some(1000)]
        for client in (idle, waiting):
            await client.aclose()
    assert answers == [b"", b""]
    assert committer.lines == [b"kept"]
    assert not ing.slots.conns and ing.held_bytes == 0


async def test_a_writer_that_ended_is_answered_after_its_commit() -> None:
    committer = FakeCommitter()
    async with serving(committer) as (ing, nursery):
        client, _ = pair(ing, nursery, 1)
        await client.send_all(b"a\nb\n\nc")
        await client.send_eof()
        answer = await client.receive_some(1000)
        await client.aclose()
    assert answer == json.dumps({"accepted": 3, "rejected": 0}).encode() + b"\n"
    assert committer.lines == [b"a", b"b", b"c"]
