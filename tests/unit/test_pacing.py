"""The pace controller with a fake clock, alone and as a small simulated fleet of state machines
sharing token-bucket shards (no sockets: the end-to-end fleet runs in tests/bench)."""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from typing import Any

import pytest

from spoold.batching import Encoder
from spoold.errors import RetryableSendError
from spoold.machine import PHASE_JITTER, Limits, Outbox, Read, RetryPolicy, Send, Wait
from spoold.pacing import (
    BURST,
    CUT_INTERVAL,
    EXIT_SETTLE,
    MAX_CUT,
    INITIAL_RATE,
    MIN_RATE,
    SHARD_BYTES,
    SHARD_RECORDS,
    SLOW_START_DELIVERED,
    SLOW_START_DOUBLING,
    SLOW_START_EXIT_CUT,
    Pace,
    cost,
)

PTEE = "ProvisionedThroughputExceededException"


def test_cost_counts_the_limit_that_binds() -> None:
    assert cost(1000, 1000) == pytest.approx(1.0)
    assert cost(1, SHARD_BYTES) == pytest.approx(1.0)
    assert cost(500, SHARD_BYTES // 4) == pytest.approx(0.5)


def test_bucket_goes_into_debt_for_a_big_record_and_waits_it_off() -> None:
    p = Pace(0.0, rate=1.0)
    assert p.budget(0.0) == pytest.approx(BURST)
    p.spend(0.0, 1.0)  # a 1 MiB aggregate with only 0.1 of budget
    assert p.ready_at(0.0) == pytest.approx(1.0 - BURST)
    assert p.ready_at(1.0) == 1.0


def test_slow_start_doubles_by_the_clock_only_while_binding() -> None:
    p = Pace(0.0)
    for i in range(1, 11):
        t = i * SLOW_START_DOUBLING / 2
        p.ready_at(t)
        p.on_reply(t, 0.1, 100, 100, 0, 0.01)
    assert p.rate == pytest.approx(INITIAL_RATE * 2 ** 5)
    idle = p.rate
    p.on_reply(10.0, 0.01, 10, 10, 0, 0.01)  # nothing waited for pace lately
    assert p.rate == idle


def test_slow_start_grows_no_faster_than_replies_confirm() -> None:
    # Replies a second late (a busy host): the clock alone would allow 2**10 at once.
    p = Pace(0.0)
    p.ready_at(1.0)
    p.on_reply(1.0, INITIAL_RATE * 1.0, 200, 200, 0, 1.0)
    assert p.rate == pytest.approx(2 * INITIAL_RATE)


def test_throttle_leaves_slow_start_by_halving_then_cuts_per_epoch_by_the_share() -> None:
    p = Pace(0.0, rate=8.0)
    p.ready_at(0.1)
    p.on_reply(0.1, 0.1, 100, 70, 30, 0.01)
    assert not p.slow_start and p.rate == pytest.approx(4.0)
    # The first epoch begins EXIT_SETTLE after leaving: 20 of 100 throttled.
    first = 0.1 + EXIT_SETTLE + CUT_INTERVAL + 0.01
    p.on_reply(first, 0.1, 100, 80, 20, 0.01)
    assert p.rate == pytest.approx(4.0 * 0.8)
    p.on_reply(first + 0.4, 0.1, 100, 0, 100, 0.01)
    assert p.rate == pytest.approx(3.2), "one decision per epoch"
    p.on_whole_throttle(first + CUT_INTERVAL, 100, 0.01)  # a whole request throttled: 200 of 200
    assert p.rate == pytest.approx(3.2 * (1 - MAX_CUT))
    assert p.throttled == 250 and p.cuts == 3


def test_replies_to_requests_sent_while_the_others_leave_slow_start_do_not_cut() -> None:
    # Hosts that left slow start first would otherwise be cut again for the overshoot of the
    # hosts still in it, and keep smaller shares for good.
    p = Pace(0.0, rate=8.0)
    p.ready_at(0.1)
    p.on_reply(0.1, 0.1, 100, 70, 30, 0.01)
    left = p.rate
    for i in range(1, 12):  # sent up to EXIT_SETTLE after leaving, answered an epoch later
        p.on_reply(0.1 + CUT_INTERVAL + i * 0.1, 0.1, 100, 50, 50, CUT_INTERVAL + i * 0.1 - EXIT_SETTLE / 2)
    assert p.rate == left and p.cuts == 1
    p.on_reply(0.1 + 3 * CUT_INTERVAL, 0.1, 100, 50, 50, 0.01)  # sent since: counted
    assert p.rate < left


def test_leaving_slow_start_falls_to_what_the_stream_took_not_to_half_a_lucky_rate() -> None:
    # The pace grew to 8 shards' worth while a shard's burst hid the limit; replies over 0.5 s
    # accepted 0.25 unit-seconds (0.5 units/s): it leaves at most at that, then halves.
    p = Pace(0.0, rate=8.0)
    p.ready_at(0.0)
    p.on_reply(0.0, 0.1, 100, 100, 0, 0.01)  # the first reply starts the count
    p.on_reply(0.25, 0.125, 100, 100, 0, 0.01)
    p.on_reply(0.5, 0.25, 100, 50, 50, 0.01)  # half throttled: slow start ends
    assert not p.slow_start
    assert p.rate == pytest.approx(SLOW_START_DELIVERED * (0.125 + 0.125) / 0.5 * SLOW_START_EXIT_CUT)
    assert p.rate <= (0.125 + 0.125) / 0.5 * SLOW_START_EXIT_CUT, "not above what the stream took"


def test_a_whole_request_throttled_that_was_sent_before_the_last_cut_does_not_cut_again() -> None:
    m = Outbox(Limits(linger=0.0), Encoder("kinesis", max_record_bytes=1 << 20, rng=random.Random(1)),
               RetryPolicy(), 0.0, random.Random(1))
    m.caught_up = True
    m.offer(1, [b"line-%d" % i for i in range(50)], 500, 1e9, 0.0, 1e9)
    m.pace.slow_start = False
    send = m.next(0.0, 1e9)
    assert isinstance(send, Send)
    m.pace.on_reply(1.0, 0.1, 100, 50, 50, 0.01)  # an epoch with half throttled: the rate is cut
    cut = m.pace.rate
    assert m.pace.cuts == 1
    # The request sent at 0, before that cut, comes back throttled as a whole an epoch later.
    m.on_error(send, RetryableSendError("slow down", code=PTEE, status=400), 1.0 + CUT_INTERVAL, 1e9)
    assert m.pace.rate == cut and m.pace.cuts == 1


@pytest.mark.parametrize("shards", [0, 2])
def test_batches_held_back_by_pace_wait_for_a_random_share_of_the_burst(shards: int) -> None:
    # Hosts whose buckets refill in step would send at the same moments of every cycle, and the
    # first to reach a shard after its refill would win it every time.
    from tests.unit.test_machine import WALL, lines, offer, outbox, sharded

    rate = 1.0
    if shards:
        m, _ = sharded(shards, rate=rate / shards, linger=0.0)
    else:
        m = outbox(fast=False, linger=0.0)
        m.pace.rate, m.pace.tokens, m.pace.slow_start = rate, rate * BURST, False
    offer(m, 1, lines(3000))
    t, sizes = 0.0, []
    while len(sizes) < 12:
        d = m.next(t, WALL)
        if isinstance(d, Send):
            sizes.append(len(d.batch))
            m.on_reply(d, [None] * len(d.batch), t, WALL)
        else:
            assert isinstance(d, Wait) and d.until > t
            t = d.until
    full = rate * BURST * SHARD_RECORDS
    later = sizes[1:]  # the first batch takes the full bucket a new pace starts with
    assert all((1 - PHASE_JITTER) * full - 2 <= n <= full + 2 for n in later), sizes
    assert max(later) - min(later) >= 0.1 * full, sizes


def test_calm_epochs_grow_faster_and_faster() -> None:
    p = Pace(0.0, rate=0.2)
    p.slow_start = False
    rates = []
    for epoch in range(1, 7):
        t = float(epoch)
        p.ready_at(t)
        p.on_reply(t, 0.01, 10, 10, 0, 0.01)
        rates.append(p.rate)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert all(b > a for a, b in zip(steps, steps[1:])) and rates[-1] <= 0.2 * 2 ** 6


def test_rate_never_falls_below_the_floor_rate() -> None:
    p = Pace(0.0, rate=1.0)
    for i in range(50):
        p.on_whole_throttle(float(i), 500, 0.0)
    assert p.rate >= MIN_RATE


# -- a simulated fleet --------------------------------------------------------------------------
def simulate(daemons: int, lines: int, shards: int, rtt: float = 0.02, seed: int = 1) -> dict[str, Any]:
    """``daemons`` state machines, each with ``lines`` queued at once, against ``shards`` token
    buckets of SHARD_RECORDS records/s (one second of burst), random partition keys."""
    rng = random.Random(seed)
    buckets = [[float(SHARD_RECORDS), 0.0] for _ in range(shards)]
    wall = 1e9
    boxes, events, seq = [], [], 0
    for i in range(daemons):
        m = Outbox(Limits(), Encoder("kinesis", max_record_bytes=1 << 20, rng=random.Random(i)),
                   RetryPolicy(), 0.0, random.Random(i))
        m.caught_up = True
        m.offer(1, [b"%d-%d" % (i, j) for j in range(lines)], lines * 10, wall, 0.0, wall)
        boxes.append(m)
        heapq.heappush(events, (0.0, seq, i, None))
        seq += 1
    sent = accepted = 0
    finish: list[float | None] = [None] * daemons
    while events:
        t, _, i, reply_to = heapq.heappop(events)
        assert t < 300, "the fleet did not finish"
        m = boxes[i]
        if reply_to is not None:
            outcomes: list[str | None] = []
            for e in reply_to.batch:
                shard = int.from_bytes(hashlib.md5(e.key.encode()).digest(), "big") * shards >> 128
                b = buckets[shard]
                b[0] = min(SHARD_RECORDS, b[0] + (t - b[1]) * SHARD_RECORDS)
                b[1] = t
                ok = b[0] >= 1
                b[0] -= ok
                outcomes.append(None if ok else PTEE)
            sent += len(outcomes)
            accepted += outcomes.count(None)
            m.on_reply(reply_to, outcomes, t, wall)
            m.take_effects()
            if m.lines_sent == lines and finish[i] is None:
                finish[i] = t
        while True:
            d = m.next(t, wall)
            m.take_effects()
            if isinstance(d, Send):
                heapq.heappush(events, (t + rtt * (0.5 + rng.random()), seq, i, d))
                seq += 1
            elif isinstance(d, Read):
                m.rows_read(d, [], t, wall)
            else:
                if d.until < math.inf:
                    heapq.heappush(events, (max(d.until, t + 1e-6), seq, i, None))
                    seq += 1
                break
    done = [f for f in finish if f is not None]
    return {"sent": sent, "accepted": accepted, "first": min(done), "last": max(done),
            "goodput": accepted / max(done) / (shards * SHARD_RECORDS)}


def test_simulated_fleet_shares_the_shards_with_little_waste() -> None:
    fig = simulate(daemons=8, lines=600, shards=1)
    assert fig["accepted"] == 8 * 600
    assert fig["sent"] / fig["accepted"] <= 1.5, fig
    assert fig["goodput"] >= 0.85, fig


def test_lone_daemon_is_not_held_back_without_throttling() -> None:
    fig = simulate(daemons=1, lines=20_000, shards=1000, rtt=0.01)
    assert fig["sent"] == fig["accepted"] == 20_000
    assert fig["last"] < 1.0, "slow start reaches 20,000 records within a second"


def test_entries_waiting_in_a_shard_queue_expire_at_max_age() -> None:
    # The per-shard helpers of the state machine's own tests.
    from tests.unit.test_machine import WALL, keyed_lines, keys_on, offer, sharded

    m, smap = sharded(2, rate=0.1, linger=0.0, max_age=60.0, partition_key_field="k")
    hot = keys_on(smap, 0, 1)
    offer(m, 1, keyed_lines(hot * 5), created=WALL - 59)
    offer(m, 2, keyed_lines(hot * 3), created=WALL)
    m._paces[0].tokens = -10.0  # the hot shard's pace holds its queue back
    m._paces[0].rate = MIN_RATE
    d = m.next(0.0, WALL)
    assert isinstance(d, Wait) and m._queued == 8
    assert m.take_effects().expired == 0
    d = m.next(1.0, WALL + 2)  # row 1 is past max_age while still queued for its shard
    effects = m.take_effects()
    assert effects.expired == 5 and [c.id for c in effects.deleted] == [1]
    assert m._queued == 3 and len(m._queues[0]) == 3 and m._queued_bytes == sum(e.size for e in m._queues[0])
