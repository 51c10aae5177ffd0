"""One destination's sending logic as a pure state machine, with no I/O (as h11 is).

No trio, httpx, sqlite or clock here: the caller passes ``now`` (a monotonic clock) and
``wall`` (Unix time, which dates lines for max_age), does the I/O, and feeds results back.
``Outbox.next()`` says what to do next:

    Read(cursor, room)   read rows above ``cursor`` from the spool, up to ``room`` bytes,
                         then call rows_read()
    Send(batch)          sign and post it, then call on_reply(), on_single() (ordered mode)
                         or on_error()
    Wait(until)          nothing to do before ``until`` (inf: until offer(), a reply, drain())

and after every call, ``take_effects()`` hands over what must be written: rows to delete (every
line accepted or expired), lines expired, records to dead-letter (then dead_lettered() or
dead_letter_failed()), and log events.

Rows become entries lazily, a few batches ahead of the sender. When the service rejects some
entries of a batch, only those are retried: throttled ones at once but within the pace
(spoold.pacing), others each after their own exponential backoff (full jitter). When a request
fails as a whole (5xx, throttling, timeout, a fatal error such as a missing stream), the whole
destination backs off and every entry of the batch is retried first. A whole-request validation
error is bisected to find the records at fault; those go to the dead-letter table if anything
else of the destination was accepted, otherwise the request itself is wrong and backs off. A
row is deleted only when every one of its lines has been accepted (or expired, or
dead-lettered). ``RetryPolicy`` holds every error-code table and the backoff.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from spoold.aggregation import ShardMap, hash_key
from spoold.batching import Chunk, Encoder, Entry, Run, entry_size, explode, first_size, record_count, take_batch
from spoold.config import LIMITS, Destination, RecordConfig, RetryConfig, SpoolConfig
from spoold.config import Limits as LimitsConfig
from spoold.errors import FatalSendError, SendError
from spoold.pacing import BURST, SHARD_BYTES, SHARD_RECORDS, Pace, cost

# Bytes of lines one destination holds in memory (leased rows, in flight, waiting to retry).
LEASE_BYTES = 12 * 1024 * 1024
# Entries encoded ahead of the sender, in batches (records and bytes), a step at a time.
ENCODE_AHEAD_BATCHES = 2
ENCODE_STEP = 256
# Partition keys remembered for ordered mode's SequenceNumberForOrdering.
ORDERED_KEYS_MAX = 10_000
# Exponent cap for the backoff, so that hours of outage neither overflow nor stall.
MAX_BACKOFF_EXPONENT = 30
# Share of a bucket's burst a batch waits for, so a slow pace sends fewer, fuller requests.
MIN_BATCH_SHARE = 1.0
# How often every entry waiting to be resent is checked against max_age (the first one is
# checked on every call): entries re-queued after failures are not in age order.
EXPIRY_SCAN = 1.0
# With a shard map, entries queued per shard ahead of the sender, in batches in all: a hot
# shard's backlog must not stop lines bound for the other shards from being encoded.
SHARD_AHEAD_BATCHES = 8
# KPL aggregates under byte throttling: at most this many seconds of the pace each, never
# below the floor (an aggregate larger than a shard's remaining budget is throttled forever).
AGGREGATE_PACE_SECONDS = 0.25
AGGREGATE_MIN_BYTES = 16 * 1024
# A batch held back by pace waits for a random share of the bucket's burst, between 1 - this
# and all of it. Hosts whose buckets refill in step send at the same moments of every cycle, and
# the first to arrive after a shard's refill takes it each time: fixed phases make fixed winners
# (in slow start too, where a lucky host keeps doubling while the others leave it).
PHASE_JITTER = 0.5
# Paced per shard, aggregates stay at most this big: one the size of a shard's second (1 MiB)
# passes only a full bucket, which a shared shard seldom has, while aggregates of 64 KiB already
# keep the record count (1,000/s) far from binding before the bytes (1 MiB/s) do.
AGGREGATE_MAX_PACED_BYTES = 64 * 1024

# Whole-request errors that an operator must fix; retrying alone cannot (records stay spooled).
FATAL_CODES = frozenset({
    "ResourceNotFoundException", "AccessDeniedException", "UnrecognizedClientException",
    "InvalidSignatureException", "IncompleteSignature", "MissingAuthenticationToken",
    "InvalidClientTokenId", "SignatureDoesNotMatch", "NotAuthorized",
    "KMSDisabledException", "KMSInvalidStateException", "KMSAccessDeniedException",
    "KMSNotFoundException", "KMSOptInRequired", "InvalidKMSResourceException",
    "ValidationException", "InvalidArgumentException", "SerializationException",
    "ResourceInUseException",
})
# Codes that mean "slow down" or "try again soon": retried with the short backoff cap.
THROTTLE_CODES = frozenset({
    "ProvisionedThroughputExceededException", "InternalFailure", "ServiceUnavailableException",
    "ThrottlingException", "LimitExceededException", "KMSThrottlingException",
})
# The subset that says the stream is over its rate: the pacing signal.
RATE_CODES = frozenset({"ProvisionedThroughputExceededException", "ThrottlingException",
                        "LimitExceededException"})
# Whole-request errors that one bad record can cause: the batch is bisected to find it.
BISECT_CODES = frozenset({"ValidationException", "InvalidArgumentException", "SerializationException"})
# Per-record errors that no retry can fix: the record goes to the dead-letter table.
PERMANENT_RECORD_CODES = frozenset({"ValidationException", "InvalidArgumentException"})


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    exp = min(max(attempt, 0), MAX_BACKOFF_EXPONENT)
    return rng.uniform(0.0, min(cap, base * (1 << exp)))


@dataclass(frozen=True)
class RetryPolicy:
    """Every rule about error codes, and the backoff."""

    base: float = RetryConfig.base
    cap: float = RetryConfig.cap
    cap_throttle: float = RetryConfig.cap_throttle

    @staticmethod
    def is_fatal(code: str) -> bool:
        return code in FATAL_CODES

    @staticmethod
    def is_throttle(code: str) -> bool:
        return code in THROTTLE_CODES

    @staticmethod
    def is_rate(code: str) -> bool:
        return code in RATE_CODES

    @staticmethod
    def bisects(code: str) -> bool:
        return code in BISECT_CODES

    @staticmethod
    def is_permanent(code: str) -> bool:
        return code in PERMANENT_RECORD_CODES

    def delay(self, attempt: int, code: str, rng: random.Random, fatal: bool = False) -> float:
        cap = self.cap if fatal or code not in THROTTLE_CODES else self.cap_throttle
        return backoff(attempt, self.base, cap, rng)


# -- decisions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Read:
    cursor: int
    room: int
    epoch: int
    offered: int


@dataclass(frozen=True)
class Wait:
    until: float


class _Group:
    """The sub-batches of one request being bisected (or just the request itself)."""

    __slots__ = ("pending", "refused", "ok")

    def __init__(self) -> None:
        self.pending = 1
        self.refused: list[tuple[Entry, str]] = []
        self.ok = False


class Send:
    """A batch to sign and post (ordered mode: one record, with ``sequence`` for ordering).

    ``items`` holds entries and runs (``records`` records in all); ``batch`` is the same as
    single entries."""

    __slots__ = ("items", "records", "group", "sent_at", "units", "ordered", "sequence", "shards", "split",
                 "paces")

    def __init__(self, batch: list[Entry | Run], group: _Group, sent_at: float, units: float,
                 ordered: bool = False, sequence: str | None = None, records: int | None = None) -> None:
        self.items = batch
        self.records = len(batch) if records is None else records
        self.group = group
        self.sent_at = sent_at
        self.units = units
        self.ordered = ordered
        self.sequence = sequence
        # Paced per shard: each entry's shard (an index in ``paces``, -1: spread over them all)
        # and, per shard, [records, unit-seconds].
        self.shards: list[int] | None = None
        self.split: dict[int, list[float]] = {}
        self.paces: list[Pace] = []

    @property
    def batch(self) -> list[Entry]:
        """The batch as one entry per record: its runs are exploded, once (later reads and the
        replies see the same entries)."""
        if Run in set(map(type, self.items)):
            self.items = explode(self.items)
        return self.items  # type: ignore[return-value]


@dataclass
class Effects:
    """What the caller must write after a call: rows to delete, expired lines, dead letters, logs."""

    accepted: list[Entry | Run] = field(default_factory=list)  # done: accepted, expired or dead-lettered
    deleted: list[Chunk] = field(default_factory=list)
    expired: int = 0
    dead: list[tuple[Entry, str]] = field(default_factory=list)
    logs: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    # A reply put a record in another shard than the map predicted: (predicted, reply's ShardId).
    stale_map: tuple[str, str] | None = None

    def __bool__(self) -> bool:
        return bool(self.accepted or self.deleted or self.expired or self.dead or self.logs or self.stale_map)


@dataclass(frozen=True)
class Limits:
    """The destination's settings the machine needs (a subset of config.Destination). The
    defaults are the config's, for a Kinesis destination: written there, not here."""

    max_records: int = LIMITS["kinesis"][0]
    max_bytes: int = LIMITS["kinesis"][1]
    max_in_flight: int = LimitsConfig.max_in_flight
    linger: float = LimitsConfig.linger
    ordered: bool = RecordConfig.ordered
    max_age: float = SpoolConfig.max_age
    aggregation: str = RecordConfig.aggregation
    max_record_bytes: int = LIMITS["kinesis"][2]


class Outbox:
    """One destination's leases, queues, batches and reactions to replies."""

    def __init__(self, limits: Limits, encoder: Encoder, policy: RetryPolicy, now: float,
                 rng: random.Random | None = None) -> None:
        self.limits = limits
        self.encoder = encoder
        self.policy = policy
        self.rng = rng or random.Random()
        # Rows
        self.cursor = 0  # highest row id leased (or known gone)
        self.highest_offered = 0
        self.caught_up = False
        self.leased: dict[int, Chunk] = {}
        self.leased_bytes = 0
        self._to_encode: deque[tuple[Chunk, Iterator[Entry | Run]]] = deque()
        self._epoch = 0  # bumped by release(): reads begun before it are stale
        # Entries, and runs (columnar: many records each) in fresh and _any; so records and
        # bytes are counted beside those queues, as len() counts items
        self._columnar = encoder.columnar and not limits.ordered
        self.fresh: deque[Entry | Run] = deque()
        self._fresh_records = 0
        self._fresh_bytes = 0
        self._fresh_since: float | None = None
        self._due: deque[Entry] = deque()
        self._retry: list[tuple[float, int, Entry]] = []
        self._probes: deque[tuple[list[Entry], _Group]] = deque()
        self._seq = itertools.count()
        self.in_flight = 0
        # Entries whose dead letter the caller is writing: their rows stay leased until
        # dead_lettered() or dead_letter_failed(), so neither release() nor, in ordered mode,
        # the next record of a key may go ahead meanwhile.
        self.dead_writing = 0
        self._next_expiry_scan = 0.0
        # Ordered mode sends one record at a time, so each key's records keep their order.
        self.slots = 1 if limits.ordered else limits.max_in_flight
        self.blocked_until = 0.0
        self._whole_attempt = 0
        self.draining = False
        self.holding = False
        self._ordered_seq: dict[str, str] = {}
        self._next_error_log = 0.0
        self.pace = Pace(now)
        # KPL aggregates are paced by nothing but the replies for now: an aggregate built at full
        # size before the first throttle may need more than a pace cut for it ever allows.
        self.paced = limits.aggregation != "kpl"
        self._unit_cost = 1.0 / SHARD_RECORDS  # running mean cost of one record
        # Per shard, once the stream's shard map is known (set_shard_map): a pace and a queue
        # each. Entries with random keys wait in one queue and are routed (ExplicitHashKey) to
        # shards with room, once throttling has been seen; until then they spread as their keys fall.
        self.shard_map: ShardMap | None = None
        self._paces: list[Pace] = []
        self._queues: list[deque[Entry]] = []
        self._any: deque[Entry | Run] = deque()
        self._any_records = 0
        self._queued = 0
        self._queued_bytes = 0
        self._queued_due = False  # some queued entries are retries: no linger
        self._starts: list[int] = []
        self._ehks: list[str] = []
        self._routed = False
        self._rotor = 0
        self._fill = 1.0  # the share of a bucket's burst the next batch waits for
        enc = encoder
        self._routable = enc.kind != "firehose" and not enc.partition_key_field and enc.explicit_hash_key is None
        # An aggregate's sub-records carry its partition key, which must hash into the shard that
        # takes it (KCL drops the others): such aggregates spread as their random keys fall.
        self._spread_only = enc.aggregation == "kpl"
        self._effects = Effects()
        # Figures
        self.lines_sent = 0
        self.records_sent = 0
        self.retried_records = 0
        self.dead_letters = 0
        self.throttled_records = 0
        self.failures: Counter[str] = Counter()
        self.last_error = ""
        self.last_error_at = 0.0
        self.last_success_at = 0.0

    @classmethod
    def for_destination(cls, dest: Destination, max_age: float, now: float,
                        rng: random.Random | None = None) -> Outbox:
        rng = rng or random.Random()
        rec, lim = dest.records, dest.limits
        encoder = Encoder(dest.kind, delimiter=rec.delimiter, pack_lines=rec.pack_lines,
                          max_record_bytes=lim.max_record_bytes, partition_key_field=rec.partition_key_field,
                          explicit_hash_key=rec.explicit_hash_key, aggregation=rec.aggregation, rng=rng)
        limits = Limits(max_records=lim.max_records_per_request, max_bytes=lim.max_request_bytes,
                        max_in_flight=lim.max_in_flight, linger=lim.linger, ordered=rec.ordered,
                        max_age=max_age, aggregation=rec.aggregation, max_record_bytes=lim.max_record_bytes)
        policy = RetryPolicy(dest.retry.base, dest.retry.cap, dest.retry.cap_throttle)
        return cls(limits, encoder, policy, now, rng)

    # -- rows in ------------------------------------------------------------------------------
    def offer(self, row_id: int, lines: list[bytes], nbytes: int, created: float, now: float,
              wall: float) -> None:
        """A row was just committed; take it from memory if caught up and there is room."""
        self.highest_offered = max(self.highest_offered, row_id)
        # While backing off, rows wait on disk (as next() reads none), where a full spool can drop them.
        if self.caught_up and row_id > self.cursor and self.leased_bytes < LEASE_BYTES and now >= self.blocked_until:
            self._lease(Chunk(row_id, created, lines, nbytes), now, wall)
        else:
            self.caught_up = False

    def rows_read(self, read: Read, rows: list[tuple[int, float, list[bytes], int]], now: float,
                  wall: float) -> None:
        """The rows (id, created, lines, nbytes) a Read returned."""
        if read.epoch != self._epoch:
            return  # a release() gave every row back meanwhile: this read is stale
        for row_id, created, lines, nbytes in rows:
            if row_id > self.cursor:
                self._lease(Chunk(row_id, created, lines, nbytes), now, wall)
        if not rows:
            # Nothing above the cursor: rows offered earlier were dropped or expired since.
            self.cursor = max(self.cursor, read.offered)
            self.caught_up = self.cursor >= self.highest_offered

    def _lease(self, chunk: Chunk, now: float, wall: float) -> None:
        self.cursor = max(self.cursor, chunk.id)
        if chunk.created < wall - self.limits.max_age:
            self._effects.expired += len(chunk.lines)
            self._effects.deleted.append(chunk)
            return
        self.leased[chunk.id] = chunk
        self.leased_bytes += chunk.nbytes
        encoder = self.encoder
        self._to_encode.append((chunk, encoder.items(chunk, now) if self._columnar else encoder.entries(chunk, now)))

    @property
    def busy(self) -> bool:
        """Requests in flight or dead letters being written: entries of leased rows are out."""
        return bool(self.in_flight or self.dead_writing)

    def release(self) -> bool:
        """Forget every leased row (the caller gives them back to the spool). Refused (False)
        while busy: a reply or dead letter that came back later would settle lines of rows
        read again since, and they would be sent or dead-lettered twice."""
        if self.busy:
            return False
        self._epoch += 1
        self.leased.clear()
        self.leased_bytes = 0
        self._to_encode.clear()
        self.fresh.clear()
        self._fresh_records = self._fresh_bytes = 0
        self._fresh_since = None
        self._due.clear()
        self._retry.clear()
        self._probes.clear()
        for q in (*self._queues, self._any):
            q.clear()
        self._queued = self._queued_bytes = self._any_records = 0
        self._queued_due = False
        self.encoder.discard_open()
        self.cursor = 0
        self.caught_up = False
        return True

    def drain(self) -> None:
        """Shutdown: send whatever is waiting now, without lingering."""
        self.draining = True

    @property
    def idle(self) -> bool:
        """Nothing leased, nothing on disk that we know of, nothing in flight."""
        return self.caught_up and not self.leased and not self.busy

    def take_effects(self) -> Effects:
        effects, self._effects = self._effects, Effects()
        return effects

    # -- what next ----------------------------------------------------------------------------
    def next(self, now: float, wall: float) -> Read | Send | Wait:
        lim = self.limits
        if self.holding:
            return Wait(math.inf)
        if now < self.blocked_until:
            # Backing off: no reads either, so that rows wait on disk, where a full spool can
            # drop them, rather than in memory.
            return Wait(self.blocked_until)
        if not self.caught_up and self.leased_bytes < LEASE_BYTES:
            return Read(self.cursor, LEASE_BYTES - self.leased_bytes, self._epoch, self.highest_offered)
        self._collect_due(now, wall)
        self._encode_ahead(now)
        if self.in_flight >= self.slots or (lim.ordered and self.dead_writing):
            # Ordered: a refused record whose dead letter fails to be written is sent again,
            # so the records after it wait for the write.
            return Wait(math.inf)
        if self._probes:
            batch, group = self._probes.popleft()
            return self._send(batch, group, now)
        if self._paces:
            self._classify(now)
        waiting = len(self._due) + self._fresh_records + self._queued
        if waiting:
            full = (waiting >= lim.max_records or self._to_encode
                    or self._fresh_bytes + self._queued_bytes >= lim.max_bytes)
            lingered = self._fresh_since is None or now - self._fresh_since >= lim.linger
            if full or lingered or self.draining or self._due or self._queued_due:
                if self._paces:
                    got = self._take_sharded(now)
                    return got if isinstance(got, Send) else Wait(min(got, self._retry[0][0] if self._retry else got))
                ready = self._paced(now, min(waiting, lim.max_records)) if self.paced else now
                if ready > now:
                    return Wait(ready)
                return self._take(now)
        self.pace.idle(now)
        deadline = math.inf
        if self._retry:
            deadline = self._retry[0][0]
        if (self.fresh or self._queued) and self._fresh_since is not None:
            deadline = min(deadline, self._fresh_since + lim.linger)
        since = self.encoder.open_since
        if since is not None:
            deadline = min(deadline, since + lim.linger)
        return Wait(deadline)

    def _paced(self, now: float, records: int) -> float:
        """When the pace lets the next batch go (now, or later)."""
        ready = self.pace.ready_at(now)
        if ready > now:
            return ready
        # Wait for a useful batch rather than send one record per refill.
        want = min(self.pace.rate * BURST * MIN_BATCH_SHARE * self._fill, records * self._unit_cost)
        short = want - self.pace.tokens
        return now if short <= 0 else now + (short + 1e-9) / self.pace.rate

    def _take(self, now: float) -> Send:
        lim = self.limits
        if lim.ordered:
            if self._due:
                entry = self._due.popleft()
            else:
                entry = self.fresh.popleft()  # type: ignore[assignment]  (never a run: ordered)
                self._fresh_bytes -= entry.size
                self._fresh_records -= 1
            batch = [entry]
        else:
            budget = max(self.pace.budget(now), 0.0) if self.paced else math.inf
            max_records = max(1, int(min(lim.max_records, budget * SHARD_RECORDS)))
            max_bytes = max(1, int(min(lim.max_bytes, budget * SHARD_BYTES)))
            due = len(self._due)
            batch, _ = take_batch((self._due, self.fresh), max_records, max_bytes)
            from_fresh = batch[due - len(self._due):]
            self._fresh_bytes -= sum(map(entry_size, from_fresh))
            self._fresh_records -= sum(map(record_count, from_fresh))
        if not self.fresh:
            self._fresh_since = None
        return self._send(batch, _Group(), now)

    def _send(self, batch: list[Entry | Run], group: _Group, now: float) -> Send:
        records = sum(map(record_count, batch))
        units = cost(records, sum(map(entry_size, batch)))
        self.pace.spend(now, units)
        self._fill = 1.0 - PHASE_JITTER * self.rng.random()
        self.in_flight += 1
        if self.limits.ordered:
            return Send(batch, group, now, units, ordered=True,
                        sequence=self._ordered_seq.get(batch[0].key))  # type: ignore[union-attr]
        return Send(batch, group, now, units, records=records)

    def _collect_due(self, now: float, wall: float) -> None:
        cutoff = wall - self.limits.max_age
        due = self._due
        if (due or self._queued) and ((due and due[0].created < cutoff) or now >= self._next_expiry_scan):
            # Retried as a whole batch for too long, here or in the shard queues.
            self._next_expiry_scan = now + EXPIRY_SCAN
            self._expire_queued(due, cutoff)
            for queue in (*self._queues, self._any):
                count, nbytes = self._expire_queued(queue, cutoff)
                self._queued -= count
                self._queued_bytes -= nbytes
                if queue is self._any:
                    self._any_records -= count
            if not self._queued:
                self._queued_due = False
        while self._retry and self._retry[0][0] <= now:
            entry = heapq.heappop(self._retry)[2]
            if not self._expire(entry, cutoff):
                self._due.append(entry)

    def _expire_queued(self, queue: deque[Entry | Run], cutoff: float) -> tuple[int, int]:
        """Drop the entries and runs of ``queue`` past max_age: their records and bytes."""
        if not any(e.created < cutoff for e in queue):
            return 0, 0
        kept = [e for e in queue if not self._expire(e, cutoff)]
        count = sum(map(record_count, queue)) - sum(map(record_count, kept))
        nbytes = sum(map(entry_size, queue)) - sum(map(entry_size, kept))
        queue.clear()
        queue.extend(kept)
        return count, nbytes

    def _expire(self, item: Entry | Run, cutoff: float) -> bool:
        if item.created >= cutoff:
            return False
        self._effects.expired += self._settle((item,))
        return True

    def _encode_ahead(self, now: float) -> None:
        # A few batches ahead, counted in records and in bytes (aggregates are big records).
        lim = self.limits
        target = lim.max_records * ENCODE_AHEAD_BATCHES
        byte_target = lim.max_bytes * ENCODE_AHEAD_BATCHES
        fresh = self.fresh
        while self._to_encode and self._room_ahead(target, byte_target):
            _, entries = self._to_encode[0]
            # At least one item: a run (a whole row) can leave fresh past the target when the
            # shard map comes, and the shard queues, not fresh, say whether there is room then.
            step = max(min(target - self._fresh_records, ENCODE_STEP), 1)
            got = list(itertools.islice(entries, step))
            fresh.extend(got)
            self._fresh_bytes += sum(map(entry_size, got))
            self._fresh_records += sum(map(record_count, got))
            if len(got) < step:
                self._to_encode.popleft()
            if self._paces:
                self._classify(now)
        since = self.encoder.open_since
        if since is not None and not self._to_encode and self._fresh_records < target and (
            self.draining or now - since >= lim.linger
        ):
            for entry in self.encoder.flush():  # an aggregate that waited linger for more lines
                fresh.append(entry)
                self._fresh_bytes += entry.size
                self._fresh_records += 1
        if fresh and self._fresh_since is None:
            self._fresh_since = now

    def _room_ahead(self, target: int, byte_target: int) -> bool:
        if not self._paces:
            return self._fresh_records < target and self._fresh_bytes < byte_target
        # Per shard: entries beyond one batch for a shard do not count towards the target, so
        # a shard whose pace holds its entries back does not hold back the others.
        cap = self.limits.max_records
        sendable = self._any_records + sum(min(len(q), cap) for q in self._queues)
        return (sendable < target and self._queued < target * SHARD_AHEAD_BATCHES // ENCODE_AHEAD_BATCHES
                and self._queued_bytes < byte_target)

    # -- per shard ----------------------------------------------------------------------------
    def set_shard_map(self, shard_map: ShardMap | None, now: float) -> None:
        """The stream's open shards (ListShards / DescribeStream): pace each of them; None:
        pace the destination as a whole. A pace is kept for a shard that stays."""
        self.encoder.shard_map = shard_map
        old = self.shard_map
        if shard_map is not None and (self.limits.ordered or self.encoder.kind == "firehose"):
            return  # one record at a time, or a delivery stream: paced as a whole
        if shard_map is not None and old is not None and shard_map.shards == old.shards:
            return
        # Whatever waits in the shard queues is classified again, first in line.
        waiting = explode(e for q in (*self._queues, self._any) for e in q)
        self._due.extendleft(reversed(waiting))
        self._queues, self._any = [], deque()
        self._queued = self._queued_bytes = self._any_records = 0
        self._queued_due = False
        self.shard_map = shard_map
        if shard_map is None:
            self._paces = []
            return
        shards = shard_map.shards
        kept = dict(zip((s.shard_id for s in old.shards), self._paces)) if old is not None else {}
        base = self.pace if not self._paces else self._paces[0]
        rate = (sum(p.rate for p in self._paces) if self._paces else self.pace.rate) / len(shards)
        self._paces = [kept.get(s.shard_id) or base.fork(now, rate, 1.0 / len(shards)) for s in shards]
        self._queues = [deque() for _ in shards]
        self._starts = [s.start for s in shards]
        self._ehks = [str(self.rng.randint(s.start, s.end)) for s in shards]
        self._shrink_aggregates()

    def _shard_of(self, entry: Entry) -> int:
        key = int(entry.hash_key) if entry.hash_key else hash_key(entry.key)
        return bisect.bisect_right(self._starts, key) - 1

    def _classify(self, now: float) -> None:
        """Move due entries (to the front) and fresh ones into the shard queues."""
        due, fresh = self._due, self.fresh
        if not (due or fresh):
            return
        if self._fresh_since is None:
            self._fresh_since = now
        nbytes = self._fresh_bytes
        count = len(due) + self._fresh_records
        if due:
            self._queued_due = True
            for e in reversed(due):
                (self._any if self._routable else self._queues[self._shard_of(e)]).appendleft(e)
                nbytes += e.size
            due.clear()
        if self._routable:
            self._any.extend(fresh)
            self._any_records += count
        else:  # the shard queues hold entries only (len() counts their records)
            for e in explode(fresh) if self._columnar else fresh:
                self._queues[self._shard_of(e)].append(e)  # type: ignore[arg-type]
        fresh.clear()
        self._fresh_bytes = self._fresh_records = 0
        self._queued += count
        self._queued_bytes += nbytes

    def _take_sharded(self, now: float) -> Send | float:
        """A batch within each shard's budget, or the time when one can go."""
        lim = self.limits
        paces, queues, anyq = self._paces, self._queues, self._any
        n = len(paces)
        unit = self._unit_cost
        ready = math.inf
        takes = []
        for i, q in enumerate(queues):
            if q:
                t = paces[i].ready_for(now, len(q) * unit * MIN_BATCH_SHARE, self._fill)
                if t <= now:
                    takes.append(i)
                else:
                    ready = min(ready, t)
        spread = not self._routed or self._spread_only
        take_any = False
        if anyq:
            want = self._any_records * unit * MIN_BATCH_SHARE
            t = (max(p.ready_for(now, want / n, self._fill) for p in paces) if spread
                 else min(p.ready_for(now, want, self._fill) for p in paces))
            take_any = t <= now
            ready = min(ready, t)
        if not takes and not take_any:
            self.pace.wait(now)
            return ready
        tokens = [p.tokens for p in paces]
        batch: list[Entry | Run] = []
        shards: list[int] = []
        split: dict[int, list[float]] = {}
        size = records = 0
        max_records, max_bytes = lim.max_records, lim.max_bytes

        def fill(q: deque[Entry | Run], i: int, room: float, ehk: str | None = None) -> float:
            nonlocal size, records
            left_records, left_bytes = max_records - records, max_bytes - size
            if room <= 0 or not q or left_records <= 0 or (batch and first_size(q[0]) > left_bytes):
                return room
            # At least one entry: a bucket may go into debt for it.
            got, nbytes = take_batch((q,), max(1, min(left_records, math.ceil(room * SHARD_RECORDS))),
                                     max(1, min(left_bytes, math.ceil(room * SHARD_BYTES))))
            if ehk is not None:
                for e in got:
                    e.hash_key = ehk
            n = sum(map(record_count, got))
            if q is anyq:
                self._any_records -= n
            batch.extend(got)
            shards.extend([i] * n)
            size += nbytes
            records += n
            units = cost(n, nbytes)
            done = split.setdefault(i, [0, 0.0])
            done[0] += n
            done[1] += units
            return room - units

        self._rotor = (self._rotor + 1) % max(len(takes), 1)
        for i in takes[self._rotor:] + takes[:self._rotor]:  # no shard always first in line
            tokens[i] = fill(queues[i], i, tokens[i])
        if take_any and spread:
            fill(anyq, -1, min(tokens) * n)
        elif take_any:
            for i in sorted(range(n), key=tokens.__getitem__, reverse=True):
                if tokens[i] <= 0 or not anyq:
                    break
                tokens[i] = fill(anyq, i, tokens[i], self._ehks[i])
        for i, (_, units) in split.items():
            for p in (paces if i < 0 else (paces[i],)):
                p.spend(now, units / (n if i < 0 else 1))
        if not batch:
            return ready
        self._queued -= records
        self._queued_bytes -= size
        if not self._queued:
            self._fresh_since = None
            self._queued_due = False
        self.pace.idle(now)
        self.in_flight += 1
        send = Send(batch, _Group(), now, cost(records, size), records=records)
        send.shards, send.split, send.paces = shards, split, paces
        self._fill = 1.0 - PHASE_JITTER * self.rng.random()
        return send

    def _shard_reply(self, send: Send, outcomes: list[str | None] | None, now: float, rtt: float,
                     hint: tuple[int, str] | None = None) -> int:
        """Feed a reply to the paces of the shards it went to; the records throttled. ``hint``:
        where the reply says one record went (protocol.Outcomes.shard), checked against the map."""
        assert send.shards is not None
        if hint is not None and send.paces is self._paces and 0 <= hint[0] < len(send.shards):
            i = send.shards[hint[0]]  # -1: spread, no shard predicted
            if i >= 0 and self.shard_map is not None and self.shard_map.shards[i].shard_id != hint[1]:
                self._effects.stale_map = (self.shard_map.shards[i].shard_id, hint[1])
        counts = {i: [r, u, r, 0] for i, (r, u) in send.split.items()}  # records, units, accepted, throttled
        throttled = 0
        if outcomes is not None:
            for i, code in zip(send.shards, outcomes):
                if code is not None:
                    c = counts[i]
                    c[2] -= 1
                    if self.policy.is_rate(code):
                        c[3] += 1
                        throttled += 1
        paces = send.paces
        for i, (records, units, accepted, thr) in counts.items():
            # Spread records: each shard sees the reply's shares (not its counts split in n).
            for p in (paces if i < 0 else (paces[i],)):
                p.on_reply(now, units / (len(paces) if i < 0 else 1), int(records), int(accepted), int(thr), rtt)
        if throttled and not self._routed and paces is self._paces:
            self._routed = not all(p.slow_start for p in paces)
        return throttled

    # -- replies ------------------------------------------------------------------------------
    def on_reply(self, send: Send, outcomes: list[str | None], now: float, wall: float) -> None:
        """A PutRecords/PutRecordBatch reply: None (accepted) or an error code per record."""
        self.in_flight -= 1
        self._whole_attempt = 0
        self.last_success_at = wall
        group, records = send.group, send.records
        rtt = now - send.sent_at
        self._unit_cost += 0.1 * (send.units / records - self._unit_cost)
        if not any(outcomes):  # the common case, kept tight: every record accepted, runs whole
            self._accept(send.items)
            if send.shards is None:
                self.pace.on_reply(now, send.units, records, records, 0, rtt)
            else:
                self._shard_reply(send, None, now, rtt, getattr(outcomes, "shard", None))
                self._shrink_aggregates()
            group.ok = True
            self._finish(group, now, wall)
            return
        batch = send.batch
        policy = self.policy
        paced = self.paced or send.shards is not None
        accepted: list[Entry] = []
        throttled: list[Entry] = []
        failed = rate = 0
        for entry, code in zip(batch, outcomes):
            if code is None:
                accepted.append(entry)
                continue
            self.failures[code] += 1
            if policy.is_permanent(code):
                group.refused.append((entry, code))
                continue
            failed += 1
            entry.attempts += 1
            if policy.is_rate(code):
                rate += 1
            if paced and policy.is_rate(code):
                throttled.append(entry)  # resent at once, but within the pace
            else:
                due = now + policy.delay(entry.attempts - 1, code, self.rng)
                heapq.heappush(self._retry, (due, next(self._seq), entry))
        self._accept(accepted)
        if throttled:
            self._due.extendleft(reversed(throttled))
        self.throttled_records += rate
        self.retried_records += failed
        if failed:
            self._log("debug", "records_retried", failed=failed, throttled=len(throttled), batch=len(batch))
        if send.shards is None:
            self.pace.on_reply(now, send.units, len(batch), len(accepted), len(throttled), rtt)
        else:
            self._shard_reply(send, outcomes, now, rtt, getattr(outcomes, "shard", None))
        if throttled:
            self._shrink_aggregates()
        group.ok = group.ok or bool(accepted)
        self._finish(group, now, wall)

    def on_single(self, send: Send, sequence: str, now: float, wall: float) -> None:
        """Ordered mode: the PutRecord reply's SequenceNumber."""
        self.in_flight -= 1
        self._whole_attempt = 0
        self.last_success_at = wall
        entry = send.batch[0]
        self.pace.on_reply(now, send.units, 1, 1, 0, now - send.sent_at)
        self._ordered_seq.pop(entry.key, None)
        self._ordered_seq[entry.key] = sequence
        if len(self._ordered_seq) > ORDERED_KEYS_MAX:
            self._ordered_seq.pop(next(iter(self._ordered_seq)))
        self._accept(send.batch)

    def on_error(self, send: Send, exc: SendError, now: float, wall: float) -> None:
        """The request failed as a whole."""
        self.in_flight -= 1
        batch, group = send.batch, send.group  # as single entries: bisected or retried
        bisects = isinstance(exc, FatalSendError) and self.policy.bisects(exc.code)
        if send.ordered:
            if bisects and self.records_sent:
                # Other records went through: this one is refused for good. Keeping it first
                # in line would block the destination forever.
                self.failures[exc.code] += 1
                self._dead_letter([(batch[0], str(exc))])
            else:
                self._whole_failure(batch, exc, now, wall, send)
            return
        if bisects:
            self.failures[exc.code] += 1
            if len(batch) == 1:
                group.refused.append((batch[0], str(exc)))
            else:
                half = len(batch) // 2
                group.pending += 2
                self._probes.appendleft((batch[half:], group))
                self._probes.appendleft((batch[:half], group))
            self._finish(group, now, wall)
            return
        self._whole_failure(batch, exc, now, wall, send)
        self._finish(group, now, wall)

    def _finish(self, group: _Group, now: float, wall: float) -> None:
        group.pending -= 1
        if group.pending or not group.refused:
            return
        if group.ok or self.records_sent:
            # Other records of this destination went through: these ones are refused for good.
            self._dead_letter(group.refused)
        else:
            # Nothing passes: the request, not a record, is wrong (a stream name, say). Its
            # failures were counted per record or per request already.
            entries = [e for e, _ in group.refused]
            exc = FatalSendError(group.refused[0][1], code="ValidationException")
            self._whole_failure(entries, exc, now, wall, counted=True)

    def _dead_letter(self, refused: list[tuple[Entry, str]]) -> None:
        self._effects.dead.extend(refused)
        self.dead_writing += len(refused)

    def dead_lettered(self, refused: list[tuple[Entry, str]]) -> None:
        """The dead letters of take_effects() were written."""
        self.dead_writing -= len(refused)
        for entry, error in refused:
            self.dead_letters += entry.nlines
            self._log("error", "dead_lettered", lines=entry.nlines, size=len(entry.data), error=error[:200],
                      hint="spoold dead-letters list|replay|purge")
            self._settle((entry,))

    def dead_letter_failed(self, refused: list[tuple[Entry, str]], exc: SendError, now: float,
                           wall: float) -> None:
        """The dead letters of take_effects() could not be written: their records are kept."""
        self.dead_writing -= len(refused)
        self._whole_failure([e for e, _ in refused], exc, now, wall)

    def _whole_failure(self, batch: list[Entry], exc: SendError, now: float, wall: float,
                       send: Send | None = None, counted: bool = False) -> None:
        fatal = isinstance(exc, FatalSendError)
        delay = self.policy.delay(self._whole_attempt, exc.code, self.rng, fatal=fatal)
        self._whole_attempt += 1
        self.blocked_until = max(self.blocked_until, now + delay)
        if not counted:
            self.failures[exc.code or "Error"] += 1
        for entry in batch:
            entry.attempts += 1
        # Retried first, in their original order, once the destination's backoff is over.
        self._due.extendleft(reversed(batch))
        if not fatal and self.policy.is_rate(exc.code):
            self.throttled_records += len(batch)
            # Sent before the last cut, it says nothing of the rate since (send: its send time).
            rtt = now - send.sent_at if send is not None else 0.0
            if send is not None and send.shards is not None:
                self._shard_reply(send, [exc.code] * len(batch), now, rtt)
            else:
                self.pace.on_whole_throttle(now, len(batch), rtt)
            self._shrink_aggregates()
        self.last_error = str(exc)
        self.last_error_at = wall
        if now >= self._next_error_log:
            # At most one line per backoff period (and per second), however many requests fail.
            self._next_error_log = now + max(1.0, self.blocked_until - now)
            self._log("error" if fatal else "warning", "send_failed", code=exc.code, error=str(exc),
                      retry_in=round(delay, 3), records=len(batch))

    def note_error(self, code: str, message: str, now: float, wall: float, *, fatal: bool) -> None:
        """An error of the caller's own (a spool read), for figures and the log."""
        self.last_error = message
        self.last_error_at = wall
        if now >= self._next_error_log:
            self._next_error_log = now + 1.0
            self._log("error" if fatal else "warning", "send_failed", code=code, error=message)

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self._effects.logs.append((level, event, fields))

    def _shrink_aggregates(self) -> None:
        # An aggregate larger than the pace's share may never pass a shard's bucket whole: new
        # aggregates are cut to fit (lines already aggregated keep theirs). Paced per shard, the
        # size follows the pace both ways, from the start; per destination (KPL is not paced
        # then), it is cut under throttling only.
        lim = self.limits
        if lim.aggregation != "kpl":
            return
        if self._paces:
            rate = sum(p.rate for p in self._paces) / len(self._paces)
            size = min(AGGREGATE_MAX_PACED_BYTES, int(rate * SHARD_BYTES * AGGREGATE_PACE_SECONDS))
        else:
            size = int(self.pace.rate * SHARD_BYTES * AGGREGATE_PACE_SECONDS)
        self.encoder.max_record_bytes = max(AGGREGATE_MIN_BYTES, min(lim.max_record_bytes, size))

    # -- acknowledgement: the one place that counts lines as accepted ---------------------------
    def _accept(self, batch: list[Entry | Run]) -> None:
        """The service accepted every entry and run of ``batch``: their lines are sent."""
        self.lines_sent += self._settle(batch)
        self.records_sent += sum(map(record_count, batch))

    def _settle(self, items: Iterable[Entry | Run]) -> int:
        """``items`` are done (accepted, expired, dead-lettered): their chunks' finished rows
        are deleted. Returns the lines they carried."""
        nlines = 0
        deleted = self._effects.deleted
        leased = self.leased
        for item in items:
            if type(item) is Run:
                refs: Iterable[tuple[Chunk, int]] = ((item.chunk, item.records),)
                nlines += item.records
            else:
                refs = item.refs  # type: ignore[union-attr]
                nlines += item.nlines  # type: ignore[union-attr]
            for chunk, n in refs:
                chunk.remaining -= n
                if chunk.remaining == 0 and leased.pop(chunk.id, None) is not None:
                    self.leased_bytes -= chunk.nbytes
                    deleted.append(chunk)
        self._effects.accepted += items
        return nlines

    # -- figures ------------------------------------------------------------------------------
    def figures(self, now: float) -> dict[str, Any]:
        """This destination's part of the status snapshot."""
        pace = self.pace
        waited = pace.waited + (now - pace.wait_from if pace.wait_from is not None else 0.0)
        paces = self._paces or [pace]
        return {
            "lines_sent": self.lines_sent,
            "records_sent": self.records_sent,
            "retried_records": self.retried_records,
            "dead_lettered": self.dead_letters,
            "failures": dict(self.failures),
            "in_flight": self.in_flight,
            "leased_bytes": self.leased_bytes,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at or None,
            "last_success_at": self.last_success_at or None,
            "backing_off": max(0.0, self.blocked_until - now),
            "pace_records_per_s": round(sum(p.records_per_s(self._unit_cost) for p in paces), 1),
            "pace_slow_start": any(p.slow_start for p in paces),
            "pace_shards": len(self._paces),
            "throttled_records": self.throttled_records,
            "pace_wait_seconds": round(waited, 3),
        }
