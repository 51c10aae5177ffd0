"""The machine's accounting around dead letters, release(), ordered mode, expiry and backoff,
each played as the flusher drives it (next(), then the result fed back): a line is sent, expired
or dead-lettered once, a row deleted once, and ordered records never overtake a refused one."""

from __future__ import annotations

import math
import random
from typing import Any

from spoold.aggregation import Shard, ShardMap
from spoold.batching import Encoder, Entry
from spoold.errors import FatalSendError, RetryableSendError
from spoold.machine import EXPIRY_SCAN, Limits, Outbox, Read, RetryPolicy, Send, Wait
from spoold.pacing import MAX_RATE

WALL = 1_000_000.0
REFUSED = "InvalidArgumentException"  # per record: no retry helps, the record is dead-lettered
PTEE = "ProvisionedThroughputExceededException"
DISK_FULL = RetryableSendError("disk full", code="SpoolWriteError")


def outbox(**limits: Any) -> Outbox:
    encoder = Encoder("kinesis", max_record_bytes=1024 * 1024, rng=random.Random(1))
    policy = RetryPolicy(base=0.1, cap=60.0, cap_throttle=5.0)
    m = Outbox(Limits(**{"linger": 0.0, **limits}), encoder, policy, 0.0, random.Random(2))
    m.caught_up = True
    m.pace.rate = m.pace.tokens = MAX_RATE
    m.pace.slow_start = False
    return m


def offer(m: Outbox, row_id: int, lines: list[bytes], now: float = 0.0, created: float = WALL) -> None:
    m.offer(row_id, lines, sum(len(x) + 1 for x in lines), created, now, WALL)


def sent(m: Outbox, now: float, wall: float = WALL) -> Send:
    d = m.next(now, wall)
    assert isinstance(d, Send), d
    return d


def run_out(m: Outbox, disk: dict[int, list[bytes]], now: float) -> list[int]:
    """Play the flusher until the machine has nothing left to do: reads come from ``disk`` (the
    unsent lines of each row), every record is refused if it is b"bad", else accepted, dead
    letters are written. Returns the rows deleted."""
    deleted: list[int] = []
    for _ in range(100):
        d = m.next(now, WALL)
        effects = m.take_effects()
        deleted += [c.id for c in effects.deleted]
        if isinstance(d, Read):
            rows = [(i, WALL, lines, sum(len(x) + 1 for x in lines)) for i, lines in sorted(disk.items())
                    if i > d.cursor]
            m.rows_read(d, rows, now, WALL)
        elif isinstance(d, Send):
            m.on_reply(d, [REFUSED if e.data == b"bad" else None for e in d.batch], now, WALL)
            effects = m.take_effects()
            deleted += [c.id for c in effects.deleted]
            if effects.dead:
                m.dead_lettered(effects.dead)
                deleted += [c.id for c in m.take_effects().deleted]
        elif isinstance(d, Wait) and d.until < math.inf:
            now = d.until
        else:
            return deleted
    raise AssertionError("the machine never settled")


# -- dead letters and release() -------------------------------------------------------------------
def refused_then_release(second: bytes) -> tuple[Outbox, list[tuple[Entry, str]]]:
    """Row 1 holds b"good" and ``second``: the service takes the first and refuses the second,
    whose dead letter the flusher now writes. Meanwhile the spool fills (when_full =
    "drop_oldest") and the committer asks the flusher to release its rows, which it does once
    the machine is no longer busy."""
    m = outbox()
    offer(m, 1, [b"good", second])
    m.on_reply(sent(m, 0.0), [None, REFUSED], 0.01, WALL)
    dead = m.take_effects().dead
    assert [e.data for e, _ in dead] == [second]
    assert m.in_flight == 0 and m.busy and not m.idle, "a dead letter being written keeps the machine busy"
    assert not m.release(), "rows released while a dead letter of theirs is being written"
    assert list(m.leased) == [1]
    return m, dead


def test_release_waits_for_a_dead_letter_being_written_which_is_written_once() -> None:
    m, dead = refused_then_release(b"bad")
    m.dead_lettered(dead)
    assert [c.id for c in m.take_effects().deleted] == [1] and not m.busy and m.idle
    assert run_out(m, {}, 0.02) == []
    assert m.dead_letters == 1 and m.lines_sent == 1 and m.leased_bytes == 0


def test_release_waits_for_a_failed_dead_letter_write_and_each_line_is_sent_once() -> None:
    m, dead = refused_then_release(b"flaky")
    m.dead_letter_failed(dead, DISK_FULL, 0.02, WALL)
    assert not m.busy and m.blocked_until > 0.02
    deleted = run_out(m, {1: [b"flaky"]}, 0.02)  # now the service takes it
    assert m.lines_sent == 2, f"{m.lines_sent} lines counted sent for 2"
    assert deleted == [1], f"row deletes: {deleted}"
    assert m.leased_bytes == 0 and m.dead_letters == 0 and m.failures["SpoolWriteError"] == 1


def test_release_once_the_dead_letter_is_written_reads_the_rows_again() -> None:
    m, dead = refused_then_release(b"flaky")
    offer(m, 2, [b"later"])
    m.dead_lettered(dead)
    m.take_effects()
    assert m.release() and not m.leased and m.leased_bytes == 0
    deleted = run_out(m, {2: [b"later"]}, 0.02)
    assert deleted == [2] and m.lines_sent == 2 and m.dead_letters == 1


# -- ordered mode ---------------------------------------------------------------------------------
def ordered_second_refused() -> tuple[Outbox, list[tuple[Entry, str]]]:
    m = outbox(ordered=True)
    offer(m, 1, [b"first", b"second", b"third"])
    m.on_single(sent(m, 0.0), "1", 0.01, WALL)
    m.on_error(sent(m, 0.01), FatalSendError("bad", code=REFUSED), 0.02, WALL)
    dead = m.take_effects().dead
    assert [e.data for e, _ in dead] == [b"second"]
    assert m.next(0.02, WALL) == Wait(math.inf), "the next record waits for the refused one's dead letter"
    return m, dead


def test_ordered_sends_the_next_record_once_the_dead_letter_is_written() -> None:
    m, dead = ordered_second_refused()
    m.dead_lettered(dead)
    s = sent(m, 0.02)
    assert s.batch[0].data == b"third"


def test_ordered_resends_the_refused_record_first_when_its_dead_letter_fails() -> None:
    m, dead = ordered_second_refused()
    m.dead_letter_failed(dead, DISK_FULL, 0.03, WALL)
    s = sent(m, m.blocked_until)
    assert s.batch[0].data == b"second", "a later record went before the refused one"


# -- figures, expiry, backoff ---------------------------------------------------------------------
def test_a_refused_request_counts_each_failure_once() -> None:
    m = outbox()
    offer(m, 1, [b"a", b"b"])
    m.on_reply(sent(m, 0.0), [REFUSED, REFUSED], 0.01, WALL)
    assert m.take_effects().dead == [] and m.blocked_until > 0.01, "nothing ever passed: the request is blamed"
    assert m.failures == {REFUSED: 2}, "one per record refused"

    m = outbox()
    offer(m, 1, [b"a", b"b"])
    bad = FatalSendError("HTTP 400 ValidationException", code="ValidationException")
    m.on_error(sent(m, 0.0), bad, 0.01, WALL)
    a, b = sent(m, 0.01), sent(m, 0.01)
    m.on_error(a, bad, 0.02, WALL)
    m.on_error(b, bad, 0.02, WALL)
    assert m.blocked_until > 0.02 and m.failures == {"ValidationException": 3}, "one per request"


def test_an_entry_past_max_age_behind_a_younger_one_expires() -> None:
    m = outbox(max_age=60.0, max_in_flight=1)
    offer(m, 1, [b"old"], created=WALL - 59)
    m.on_reply(sent(m, 0.0), ["InternalFailure"], 0.01, WALL)  # retried after its own backoff
    offer(m, 2, [b"young"], 0.01)
    young = sent(m, 0.01)
    assert m.next(1.0, WALL) == Wait(math.inf), "b'old' is due again, but the one slot is busy"
    m.on_reply(young, [PTEE], 1.0, WALL)  # throttled: b"young" goes first, b"old" behind it
    m.take_effects()
    d = m.next(1.0, WALL + 2)
    effects = m.take_effects()
    assert effects.expired == 1 and [c.id for c in effects.deleted] == [1]
    assert not isinstance(d, Send) or [e.data for e in d.batch] == [b"young"], d


def test_an_entry_past_max_age_in_a_shard_queue_expires_within_a_scan_period() -> None:
    m = outbox(max_age=60.0)
    half = 2 ** 127
    m.set_shard_map(ShardMap([Shard("shardId-0", 0, half - 1), Shard("shardId-1", half, 2 ** 128 - 1)]), 0.0)
    offer(m, 1, [b"young"])
    offer(m, 2, [b"old"], created=WALL - 59)
    m.on_error(sent(m, 0.0), RetryableSendError("HTTP 503", code="ServiceUnavailableException"), 0.01, WALL)
    m.take_effects()
    start = m.blocked_until
    for p in m._paces:  # the shards' buckets are empty: both entries wait in the shard queues
        p.rate, p.tokens, p.slow_start = 1.0, -100.0, False
    assert isinstance(m.next(start, WALL), Wait) and m._queued == 2
    assert isinstance(m.next(start + EXPIRY_SCAN, WALL + 2), Wait)
    effects = m.take_effects()
    assert effects.expired == 1 and [c.id for c in effects.deleted] == [2]
    assert [e.data for e in m._any] == [b"young"], "random keys wait in the one queue routed to shards"
    assert m._queued == 1 and m._queued_bytes == m._any[0].size


def test_rows_committed_while_backing_off_stay_on_disk() -> None:
    m = outbox()
    offer(m, 1, [b"a"])
    m.on_error(sent(m, 0.0), RetryableSendError("HTTP 503", code="ServiceUnavailableException"), 0.01, WALL)
    offer(m, 2, [b"b"], 0.01)
    assert list(m.leased) == [1] and not m.caught_up, "row 2 is left on disk during the backoff"
    d = m.next(m.blocked_until, WALL)
    assert isinstance(d, Read) and d.cursor == 1 and d.offered == 2
