"""The per-destination state machine, driven with a fake clock and scripted replies: no sockets,
threads, SQLite or trio. Each test plays what the flusher does (next(), then feed the result
back) and checks the decisions and effects that come out."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from spoold.aggregation import Shard, ShardMap, hash_key
from spoold.batching import Encoder, Entry
from spoold.errors import FatalSendError, RetryableSendError
from spoold.machine import (
    AGGREGATE_MIN_BYTES,
    FATAL_CODES,
    LEASE_BYTES,
    Limits,
    Outbox,
    Read,
    RetryPolicy,
    Send,
    Wait,
)
from spoold.pacing import BURST, MAX_RATE

WALL = 1_000_000.0
PTEE = "ProvisionedThroughputExceededException"


def outbox(fast: bool = True, kind: str = "kinesis", **limits: Any) -> Outbox:
    """An Outbox caught up with its spool. ``fast``: a pace so high it never binds, so that the
    tests of other paths see no pacing."""
    enc_args = {k: limits.pop(k) for k in ("partition_key_field", "aggregation_enc") if k in limits}
    aggregation = limits.get("aggregation", "none")
    encoder = Encoder(kind, max_record_bytes=limits.get("max_record_bytes", 1024 * 1024),
                      partition_key_field=enc_args.get("partition_key_field"), aggregation=aggregation,
                      rng=random.Random(1))
    m = Outbox(Limits(**limits), encoder, RetryPolicy(base=0.1, cap=60.0, cap_throttle=5.0), 0.0,
               random.Random(2))
    m.caught_up = True
    if fast:
        m.pace.rate = MAX_RATE
        m.pace.tokens = MAX_RATE
        m.pace.slow_start = False
    return m


def offer(m: Outbox, row_id: int, lines: list[bytes], now: float = 0.0, created: float = WALL) -> None:
    m.offer(row_id, lines, sum(len(x) + 1 for x in lines), created, now, WALL)


def lines(n: int, tag: str = "l") -> list[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


def data(batch: list[Entry]) -> list[bytes]:
    return [e.data for e in batch]


def send(m: Outbox, now: float) -> Send:
    d = m.next(now, WALL)
    assert isinstance(d, Send), d
    return d


def deleted(m: Outbox) -> list[int]:
    return [c.id for c in m.take_effects().deleted]


# -- rows, linger, batches ----------------------------------------------------------------------
def test_lingers_then_sends_and_deletes_the_row_once_all_accepted() -> None:
    m = outbox(linger=0.2)
    offer(m, 1, lines(3))
    assert m.next(0.0, WALL) == Wait(0.2)
    s = send(m, 0.2)
    assert data(s.batch) == lines(3)
    m.on_reply(s, [None] * 3, 0.25, WALL)
    assert deleted(m) == [1] and m.lines_sent == 3 and m.idle


def test_a_full_batch_does_not_linger_and_limits_hold() -> None:
    m = outbox(max_records=2, max_bytes=1000, max_in_flight=2)
    offer(m, 1, lines(5))
    a, b = send(m, 0.0), send(m, 0.0)
    assert data(a.batch) == lines(5)[:2] and data(b.batch) == lines(5)[2:4]
    assert m.next(0.0, WALL) == Wait(math.inf), "both slots busy: wait for a reply"
    m.on_reply(a, [None, None], 0.01, WALL)
    assert m.next(0.01, WALL) == Wait(0.2), "the last line lingers"
    assert deleted(m) == []


def test_not_caught_up_reads_rows_and_a_stale_read_after_release_is_ignored() -> None:
    m = outbox()
    m.caught_up = False
    m.highest_offered = 7
    r = m.next(0.0, WALL)
    assert isinstance(r, Read) and r.cursor == 0 and r.room == LEASE_BYTES
    m.release()
    m.rows_read(r, [(3, WALL, [b"x"], 2)], 0.0, WALL)
    assert not m.leased, "rows read before a release are not leased"
    r = m.next(0.0, WALL)
    assert isinstance(r, Read)
    m.rows_read(r, [(3, WALL, [b"x"], 2)], 0.0, WALL)
    assert list(m.leased) == [3] and m.cursor == 3
    r = m.next(0.0, WALL)
    m.rows_read(r, [], 0.0, WALL)
    assert m.caught_up and m.cursor == 7, "nothing above the cursor: offered rows are gone"


def test_offer_while_behind_is_left_on_disk() -> None:
    m = outbox()
    m.caught_up = False
    offer(m, 5, lines(2))
    assert not m.leased and m.highest_offered == 5


def test_expired_row_is_dropped_at_lease_and_counted() -> None:
    m = outbox(max_age=60.0)
    offer(m, 1, lines(4), created=WALL - 61)
    e = m.take_effects()
    assert e.expired == 4 and [c.id for c in e.deleted] == [1] and not m.leased


def test_drain_sends_without_lingering() -> None:
    m = outbox(linger=5.0)
    offer(m, 1, lines(1))
    assert m.next(0.0, WALL) == Wait(5.0)
    m.drain()
    assert data(send(m, 0.0).batch) == [b"l0"]


# -- replies ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("outcomes", "resent_at_once", "retried_later"), [
    ([None, PTEE, None], [b"l1"], []),
    ([None, "InternalFailure", None], [], [b"l1"]),
    (["ThrottlingException", "ServiceUnavailableException", PTEE], [b"l0", b"l2"], [b"l1"]),
])
def test_per_record_failures_retry_only_those(outcomes: list[str | None], resent_at_once: list[bytes],
                                              retried_later: list[bytes]) -> None:
    m = outbox(linger=0.0)
    offer(m, 1, lines(3))
    s = send(m, 0.0)
    m.on_reply(s, outcomes, 0.01, WALL)
    assert deleted(m) == [] and m.retried_records == sum(o is not None for o in outcomes)
    if resent_at_once:
        again = send(m, 0.01)
        assert data(again.batch) == resent_at_once, "throttled records go again at once, within the pace"
        m.on_reply(again, [None] * len(again.batch), 0.02, WALL)
    if retried_later:
        d = m.next(0.02, WALL)
        assert isinstance(d, Wait) and 0.02 < d.until <= 0.01 + 0.1, "each after its own backoff"
        later = send(m, d.until)
        assert data(later.batch) == retried_later
        m.on_reply(later, [None], d.until + 0.01, WALL)
    assert deleted(m) == [1] and m.lines_sent == 3 and m.failures[outcomes[1] or PTEE] >= 1


@pytest.mark.parametrize(("exc", "cap"), [
    (RetryableSendError("HTTP 500", code="InternalFailure", status=500), 5.0),
    (RetryableSendError("timed out", code="Timeout"), 60.0),
    (FatalSendError("HTTP 400 ResourceNotFoundException", code="ResourceNotFoundException"), 60.0),
])
def test_whole_request_failure_backs_off_and_resends_first_in_order(exc: Any, cap: float) -> None:
    m = outbox(max_records=2, linger=0.0)
    offer(m, 1, lines(3))
    s = send(m, 0.0)
    m.on_error(s, exc, 0.01, WALL)
    assert 0.01 <= m.blocked_until <= 0.01 + 0.1
    assert m.next(0.01, WALL) == Wait(m.blocked_until), "no reads or sends while backing off"
    effects = m.take_effects()
    assert [ev for _, ev, _ in effects.logs] == ["send_failed"]
    level = effects.logs[0][0]
    assert level == ("error" if isinstance(exc, FatalSendError) else "warning")
    again = send(m, m.blocked_until)
    assert data(again.batch) == [b"l0", b"l1"] and all(e.attempts == 1 for e in again.batch)
    assert m.failures[exc.code] == 1 and m.last_error == str(exc)
    # A second failure in a row doubles the bound of the next backoff (up to the cap).
    m.on_error(again, exc, 1.0, WALL)
    assert m.blocked_until <= 1.0 + min(cap, 0.2)
    assert m.take_effects().logs == [], "one log line per backoff period"


def test_bisect_finds_the_bad_record_and_dead_letters_it() -> None:
    m = outbox(linger=0.0)
    offer(m, 1, lines(4))
    bad = FatalSendError("HTTP 400 ValidationException", code="ValidationException")
    s = send(m, 0.0)
    m.on_error(s, bad, 0.01, WALL)
    first, second = send(m, 0.01), send(m, 0.01)
    assert data(first.batch) == [b"l0", b"l1"] and data(second.batch) == [b"l2", b"l3"]
    m.on_reply(first, [None, None], 0.02, WALL)
    m.on_error(second, bad, 0.02, WALL)
    a, b = send(m, 0.02), send(m, 0.02)
    m.on_reply(a, [None], 0.03, WALL)
    assert m.take_effects().dead == []
    m.on_error(b, bad, 0.03, WALL)
    effects = m.take_effects()
    assert [(e.data, err) for e, err in effects.dead] == [(b"l3", str(bad))]
    m.dead_lettered(effects.dead)
    effects = m.take_effects()
    assert [c.id for c in effects.deleted] == [1] and m.dead_letters == 1
    assert effects.logs[0][1] == "dead_lettered" and m.failures["ValidationException"] == 3


def test_bisect_with_nothing_ever_accepted_blames_the_request() -> None:
    m = outbox(linger=0.0)
    offer(m, 1, lines(2))
    bad = FatalSendError("HTTP 400 ValidationException", code="ValidationException")
    m.on_error(send(m, 0.0), bad, 0.01, WALL)
    a, b = send(m, 0.01), send(m, 0.01)
    m.on_error(a, bad, 0.02, WALL)
    m.on_error(b, bad, 0.02, WALL)
    assert m.take_effects().dead == [] and m.blocked_until > 0.0
    assert sorted(m._due, key=lambda e: e.data) and len(m._due) == 2, "kept, backing off"


def test_permanent_record_code_dead_letters_when_others_pass() -> None:
    m = outbox(linger=0.0)
    offer(m, 1, lines(2))
    s = send(m, 0.0)
    m.on_reply(s, [None, "ValidationException"], 0.01, WALL)
    effects = m.take_effects()
    assert [e.data for e, _ in effects.dead] == [b"l1"]


def test_dead_letter_write_failure_keeps_the_record() -> None:
    m = outbox(linger=0.0)
    offer(m, 1, lines(2))
    m.on_reply(send(m, 0.0), [None, "InvalidArgumentException"], 0.01, WALL)
    dead = m.take_effects().dead
    m.dead_letter_failed(dead, RetryableSendError("disk full", code="SpoolWriteError"), 0.02, WALL)
    assert m.blocked_until > 0.0 and [e.data for e in m._due] == [b"l1"] and m.leased


def test_retry_past_max_age_expires() -> None:
    m = outbox(linger=0.0, max_age=60.0)
    offer(m, 1, lines(1), created=WALL - 59)
    m.on_reply(send(m, 0.0), ["InternalFailure"], 0.01, WALL)
    m.take_effects()
    d = m.next(0.01, WALL)
    assert isinstance(d, Wait)
    assert m.next(d.until, WALL + 2) == Wait(math.inf)
    effects = m.take_effects()
    assert effects.expired == 1 and [c.id for c in effects.deleted] == [1]


def test_ordered_sends_one_at_a_time_and_threads_sequence_numbers() -> None:
    m = outbox(ordered=True, linger=0.0, partition_key_field="k")
    offer(m, 1, [b'{"k":"a","n":1}', b'{"k":"a","n":2}'])
    s = send(m, 0.0)
    assert s.ordered and s.sequence is None and len(s.batch) == 1
    assert m.next(0.0, WALL) == Wait(math.inf), "one in flight"
    m.on_single(s, "100", 0.01, WALL)
    s2 = send(m, 0.01)
    assert s2.sequence == "100" and s2.batch[0].data == b'{"k":"a","n":2}'
    m.on_error(s2, RetryableSendError("slow down", code=PTEE), 0.02, WALL)
    s3 = send(m, m.blocked_until)
    assert s3.batch[0].data == b'{"k":"a","n":2}' and s3.sequence == "100"
    m.on_single(s3, "101", 1.0, WALL)
    assert deleted(m) == [1] and m.lines_sent == 2


def test_ordered_refused_record_is_dead_lettered_once_others_passed() -> None:
    m = outbox(ordered=True, linger=0.0)
    offer(m, 1, lines(2))
    m.on_single(send(m, 0.0), "1", 0.01, WALL)
    m.on_error(send(m, 0.01), FatalSendError("bad", code="InvalidArgumentException"), 0.02, WALL)
    assert [e.data for e, _ in m.take_effects().dead] == [b"l1"] and m.blocked_until == 0.0


def test_malformed_reply_marks_nothing_sent() -> None:
    m = outbox(linger=0.0)
    offer(m, 1, lines(2))
    m.on_error(send(m, 0.0), RetryableSendError("malformed", code="MalformedReply"), 0.01, WALL)
    assert m.lines_sent == 0 and deleted(m) == [] and len(m._due) == 2


def test_policy_tables() -> None:
    p = RetryPolicy()
    assert p.is_rate(PTEE) and not p.is_rate("InternalFailure") and p.is_throttle("InternalFailure")
    assert p.bisects("ValidationException") and not p.bisects("AccessDeniedException")
    assert "AccessDeniedException" in FATAL_CODES and p.is_permanent("InvalidArgumentException")
    rng = random.Random(3)
    assert all(0 <= p.delay(50, "Timeout", rng) <= 60.0 for _ in range(100))
    assert all(0 <= p.delay(50, PTEE, rng) <= 5.0 for _ in range(100))


# -- pacing in the machine ------------------------------------------------------------------------
def test_pace_binds_batch_size_and_throttling_slows_it() -> None:
    m = outbox(fast=False, linger=0.0)
    offer(m, 1, lines(1000))
    s = send(m, 0.0)
    assert len(s.batch) == 20, "a new destination starts at a fifth of a shard's pace, 0.1 s of burst"
    d = m.next(0.0, WALL)
    assert isinstance(d, Wait) and d.until > 0.0, "the bucket is spent"
    rate = m.pace.rate
    m.on_reply(s, [PTEE] * 10 + [None] * 10, 0.02, WALL)
    assert m.pace.rate == pytest.approx(rate / 2) and not m.pace.slow_start
    again = send(m, m.next(0.02, WALL).until)  # type: ignore[union-attr]
    got = [e.data for e in again.batch]
    assert got == lines(1000)[:len(got)], "throttled records go first, within the pace"
    figures = m.figures(1.0)
    assert figures["throttled_records"] == 10 and figures["pace_wait_seconds"] > 0


def test_kpl_is_not_paced_yet_and_throttled_aggregates_back_off() -> None:
    m = outbox(fast=False, linger=0.0, aggregation="kpl", max_record_bytes=1024 * 1024)
    offer(m, 1, [b"x" * 1000] * 3000)
    s = send(m, 0.0)
    assert not m.paced and len(s.batch) > 1, "a full batch of aggregates"
    m.on_reply(s, [PTEE] * len(s.batch), 0.05, WALL)
    assert m.figures(0.05)["throttled_records"] == len(s.batch)
    assert m.encoder.max_record_bytes == 1024 * 1024
    d = m.next(0.05, WALL)
    assert not isinstance(d, Send) or d.batch[0] is not s.batch[0], "throttled aggregates wait their backoff"


# -- per shard ------------------------------------------------------------------------------------
HASH_SPACE = 2 ** 128


def shard_map(n: int, first: int = 0) -> ShardMap:
    return ShardMap(Shard(f"shardId-{first + i:012d}", HASH_SPACE * i // n, HASH_SPACE * (i + 1) // n - 1)
                    for i in range(n))


def keys_on(smap: ShardMap, shard: int, count: int) -> list[str]:
    """Partition keys that hash into ``shard``."""
    out: list[str] = []
    i = 0
    while len(out) < count:
        if smap.shard_for(hash_key(f"k{i}")).shard_id == smap.shards[shard].shard_id:
            out.append(f"k{i}")
        i += 1
    return out


def sharded(n: int = 2, rate: float | None = None, **limits: Any) -> tuple[Outbox, ShardMap]:
    m = outbox(fast=False, **limits)
    smap = shard_map(n)
    m.set_shard_map(smap, 0.0)
    if rate is not None:
        for p in m._paces:
            p.rate, p.tokens, p.slow_start = rate, rate * BURST, False
    return m, smap


def shard_of(smap: ShardMap, entry: Entry) -> str:
    key = int(entry.hash_key) if entry.hash_key else hash_key(entry.key)
    return smap.shard_for(key).shard_id


def keyed_lines(keys: list[str]) -> list[bytes]:
    return [b'{"k":"%s","n":%d}' % (k.encode(), i) for i, k in enumerate(keys)]


def test_a_throttled_shard_never_holds_back_keyed_records_of_the_others() -> None:
    m, smap = sharded(2, rate=0.1, linger=0.0, partition_key_field="k")
    hot, cold = keys_on(smap, 0, 1) * 300, keys_on(smap, 1, 20)
    offer(m, 1, keyed_lines(hot + cold))
    s = send(m, 0.0)
    by_shard = {shard_of(smap, e) for e in s.batch}
    assert by_shard == {"shardId-000000000000", "shardId-000000000001"}
    m.on_reply(s, [PTEE if shard_of(smap, e).endswith("0") else None for e in s.batch], 0.01, WALL)
    hot_pace, cold_pace = m._paces
    for now in (1.2, 2.4, 3.6):  # epochs of hot-shard throttling cut the hot shard's pace only
        while isinstance(d := m.next(now, WALL), Send):
            m.on_reply(d, [PTEE if shard_of(smap, e).endswith("0") else None for e in d.batch], now, WALL)
    assert hot_pace.rate < 0.1 and cold_pace.rate >= 0.1
    assert m.figures(3.6)["throttled_records"] > 0 and m.figures(3.6)["pace_shards"] == 2
    sent_cold = sum(1 for e in m.take_effects().accepted if shard_of(smap, e).endswith("1"))
    assert sent_cold + sum(1 for e in s.batch if shard_of(smap, e).endswith("1")) >= len(cold), \
        "every line bound for the calm shard went, whatever the hot one's backlog"


def test_random_keys_spread_until_throttled_then_are_routed_to_shards_with_room() -> None:
    m, smap = sharded(4, linger=0.0, max_records=40)
    offer(m, 1, lines(400))
    s = send(m, 0.0)
    assert all(e.hash_key is None for e in s.batch), "no throttling yet: keys fall where they hash"
    assert s.shards == [-1] * len(s.batch)
    m.on_reply(s, [PTEE] * len(s.batch), 0.01, WALL)  # a reply all throttled ends slow start
    assert not any(p.slow_start for p in m._paces)
    m._paces[2].tokens = -1.0  # shard 2 is in debt: nothing routed there
    sends = []
    now = 0.01
    while len(sends) < 3:
        d = m.next(now, WALL)
        if isinstance(d, Send):
            sends.append(d)
        else:
            now = d.until
    routed = [e for d in sends for e in d.batch]
    assert all(e.hash_key is not None for e in routed)
    assert {shard_of(smap, e) for e in routed} <= {"shardId-000000000000", "shardId-000000000001",
                                                   "shardId-000000000003"}
    for d in sends:
        assert [shard_of(smap, e) for e in d.batch] == [smap.shards[i].shard_id for i in d.shards]
    # Throttled routed records are resent once each, and the row goes only when all are accepted.
    first = sends[0]
    m.on_reply(first, [PTEE] + [None] * (len(first.batch) - 1), now, WALL)
    assert m.take_effects().deleted == []


def test_every_line_is_sent_exactly_once_under_per_shard_throttling() -> None:
    rng = random.Random(5)
    m, smap = sharded(3, linger=0.0, max_records=50, partition_key_field="k")
    keys = [f"key{rng.randrange(40)}" for _ in range(600)]
    for row in range(6):
        offer(m, row + 1, keyed_lines(keys[row * 100:(row + 1) * 100]))
    accepted: list[bytes] = []
    done: list[int] = []
    now = 0.0
    while len(accepted) < 600 and now < 600:
        d = m.next(now, WALL)
        if isinstance(d, Send):
            out = [PTEE if shard_of(smap, e).endswith("1") and rng.random() < 0.5 else None for e in d.batch]
            m.on_reply(d, out, now + 0.01, WALL)
            accepted += [e.data for e, o in zip(d.batch, out) if o is None]
        else:
            now = min(d.until, now + 0.05)
        done += deleted(m)
    assert sorted(accepted) == sorted(x for r in range(6) for x in keyed_lines(keys[r * 100:(r + 1) * 100]))
    assert sorted(done) == [1, 2, 3, 4, 5, 6] and not m.leased


def test_shard_map_refresh_keeps_paces_and_a_reshard_requeues_without_loss() -> None:
    m, smap = sharded(2, rate=0.5, linger=0.0, partition_key_field="k")
    paces = list(m._paces)
    m.set_shard_map(shard_map(2), 1.0)
    assert m._paces == paces, "the same shards: the same paces"
    offer(m, 1, keyed_lines(keys_on(smap, 0, 5) + keys_on(smap, 1, 5)))
    m._paces[0].tokens = m._paces[1].tokens = -10.0  # nothing may go yet: all queued per shard
    assert isinstance(m.next(1.0, WALL), Wait)
    m.set_shard_map(shard_map(4, first=2), 1.0)  # resharded: queued entries are classified again
    assert len(m._paces) == 4 and m._paces[0] is not paces[0]
    m.set_shard_map(None, 1.0)  # no map any more: per destination, nothing lost
    m.pace.rate = m.pace.tokens = MAX_RATE
    s = send(m, 1.0)
    assert len(s.batch) == 10 and s.shards is None and m.figures(1.0)["pace_shards"] == 0


def test_whole_request_throttle_slows_only_the_shards_of_that_batch() -> None:
    m, smap = sharded(2, rate=0.5, linger=0.0, partition_key_field="k")
    offer(m, 1, keyed_lines(keys_on(smap, 1, 10)))
    s = send(m, 0.0)
    m.on_error(s, RetryableSendError("HTTP 400", code=PTEE, status=400), 1.5, WALL)
    assert m._paces[0].rate == 0.5 and m._paces[1].rate < 0.5
    assert m.figures(1.5)["throttled_records"] == 10 and m.blocked_until > 1.5


def test_ordered_and_firehose_destinations_stay_paced_as_a_whole() -> None:
    for m in (outbox(fast=False, ordered=True), outbox(fast=False, kind="firehose")):
        m.set_shard_map(shard_map(2), 0.0)
        assert m._paces == [] and m.figures(0.0)["pace_shards"] == 0


def test_kpl_aggregates_follow_the_shard_pace_from_the_start() -> None:
    m, _ = sharded(4, linger=0.0, aggregation="kpl", max_record_bytes=1024 * 1024)
    assert m.encoder.max_record_bytes == AGGREGATE_MIN_BYTES, "a new destination starts small"
    offer(m, 1, [b"x" * 1000] * 200)
    s = send(m, 0.0)
    assert all(e.size <= AGGREGATE_MIN_BYTES + 200 for e in s.batch)
    assert s.shards is not None and set(s.shards) == {-1}, "paced per shard, spread as their keys fall"
    assert all(e.hash_key is None for e in s.batch), "never routed: sub-records must hash where it goes"
    now = 0.0
    for _ in range(30):  # all accepted: the pace and the aggregates grow
        now += 0.05
        m.on_reply(s, [None] * len(s.batch), now, WALL)
        offer(m, int(now * 100) + 2, [b"x" * 1000] * 200, now)
        while not isinstance(d := m.next(now, WALL), Send):
            now = d.until
        s = d
    assert m.encoder.max_record_bytes > AGGREGATE_MIN_BYTES
