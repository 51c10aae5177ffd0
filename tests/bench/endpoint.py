"""The benchmark's loopback endpoint: tests/tools/fakeaws.py's FakeAWS plus what a benchmark needs.

On top of FakeAWS (same HTTP server, same Kinesis/Firehose handling, same fault injection), per
stream:

- lines accepted, counting the sub-records of KPL aggregates (cheaply: for lines of one size the
  count is arithmetic on the aggregate's length; other aggregates are walked);
- the monotonic time of the first and last acceptance, and lines accepted per 100 ms bucket;
- a bounded reservoir of latency samples: lines written by tests/bench/bench.py start with their
  send time (16 hex digits of time.monotonic_ns(), CLOCK_MONOTONIC, shared by every process of
  the machine); for the first, middle and last accepted record of each request (the first and
  last sub-record of each aggregate) the endpoint keeps receipt time minus that stamp.

GET /_stats answers FakeAWS's counters plus ``bench``: {stream: {lines, records, first_ns,
last_ns}} (cheap, for progress bars). POST with ``X-Amz-Target: SpooldBench.Dump`` answers
everything, samples and buckets included.

    python tests/bench/endpoint.py --port 0 --port-file F [--record-fail-rate R] [--latency S]

Fleet mode (tests/bench/fleet.py; ``--fleet`` or any fleet option): FleetAWS puts a token bucket
per shard (records/s and bytes/s, ``--burst`` seconds of capacity, full at start) in front of
PutRecords and answers over-budget records as Kinesis does: a 200 reply whose entry carries
``ProvisionedThroughputExceededException`` and a message naming the shard, while accepted entries
carry their ShardId. A rejected record takes nothing from the budget. With
``--whole-throttle-share S``, a request of which at least that share would be throttled is refused
whole (400 ``--whole-code``) instead. Lines that start ``{"id":"DAEMON-SEQ"`` are counted per
daemon and per id (KPL aggregates are walked), so the harness can tell lost and duplicated lines.
``--hold`` keeps every request waiting until the process gets SIGUSR1 (all daemons then start
from a full backlog at the same moment); the dump says when that was. ``--yds-shard-ids`` names
shards as Yandex Data Streams does (``shard-000001``) in every reply, DescribeStream included.

Listens on 127.0.0.1 only; exits on SIGTERM/SIGINT or when its parent dies.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script: make the repository root importable (for tests.tools.fakeaws).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import argparse
import binascii
import random
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import orjson

from tests.tools.fakeaws import (
    ACCOUNT_ID,
    KINESIS_MAX_REQUEST_BYTES,
    SEQUENCE_BASE,
    FakeAWS,
    Record,
    _ApiError,
    _Ctx,
    _Request,
    _validation,
    add_server_arguments,
    serve_until_stopped,
)

KPL_MAGIC = b"\xf3\x89\x9a\xc2"
KPL_MAGIC_B64 = "84ma"  # base64 of the magic's first three bytes: a cheap pre-check
STAMP_HEX = 16  # leading hex digits of a bench line: its send time in monotonic ns
BUCKET_NS = 100_000_000  # lines-accepted series resolution
DUMP_TARGET = "SpooldBench.Dump"


def stamp_of(data: bytes) -> int | None:
    """The send time a bench line starts with, or None."""
    head = data[:STAMP_HEX]
    if len(head) < STAMP_HEX:
        return None
    try:
        return int(head, 16)
    except ValueError:
        return None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _data_offset(body: bytes, start: int, end: int) -> tuple[int, int] | None:
    """(offset, length) of the data field of the Record message in body[start:end]."""
    pos = start
    while pos < end:
        tag, pos = _varint(body, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = _varint(body, pos)
        elif wire == 2:
            n, pos = _varint(body, pos)
            if tag >> 3 == 3:
                return pos, n
            pos += n
        else:
            return None
    return None


def deaggregate_summary(agg: bytes) -> tuple[int, list[bytes]]:
    """(sub-records in a KPL aggregate, [first sub-record's data, last one's]); (0, []) if it is
    not a well-formed aggregate. Lines of one size are counted without walking every record."""
    if len(agg) < 4 + 16 or not agg.startswith(KPL_MAGIC):
        return 0, []
    body = agg[4:-16]
    end = len(body)
    pos = 0
    # Skip the key tables (fields 1 and 2), up to the first record (field 3).
    while pos < end and body[pos] in (0x0A, 0x12):
        n, p = _varint(body, pos + 1)
        pos = p + n
    if pos >= end or body[pos] != 0x1A:
        return 0, []
    first = pos
    inner, p = _varint(body, pos + 1)
    rec_len = p - pos + inner
    head = body[first:p]
    samples: list[bytes] = []
    where = _data_offset(body, p, p + inner)
    if where:
        samples.append(body[where[0]:where[0] + where[1]])
    remaining = end - first
    last = end - rec_len
    count = remaining // rec_len
    mid = first + rec_len * (count // 2)
    if (remaining % rec_len == 0 and last >= first and body[last:last + len(head)] == head
            and body[mid:mid + len(head)] == head):
        where = _data_offset(body, last + len(head), end)
        if where and count > 1:
            samples.append(body[where[0]:where[0] + where[1]])
        return count, samples
    # Lines of several sizes: walk every record.
    count = 0
    pos = first
    last_start = first
    while pos < end:
        if body[pos] != 0x1A:
            return 0, []
        inner, p = _varint(body, pos + 1)
        last_start = pos
        pos = p + inner
        count += 1
    if count > 1:
        inner, p = _varint(body, last_start + 1)
        where = _data_offset(body, p, p + inner)
        if where:
            samples.append(body[where[0]:where[0] + where[1]])
    return count, samples


class _StreamBench:
    __slots__ = ("lines", "records", "first_ns", "last_ns", "buckets", "samples", "seen", "aggregates")

    def __init__(self) -> None:
        self.lines = 0
        self.records = 0
        self.aggregates = 0
        self.first_ns = 0
        self.last_ns = 0
        self.buckets: dict[int, int] = {}
        self.samples: list[tuple[int, int]] = []  # (receipt ns, latency ns)
        self.seen = 0  # samples offered to the reservoir


class BenchAWS(FakeAWS):
    def __init__(self, *args: Any, reservoir: int = 50_000, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reservoir = reservoir
        self._bench: dict[str, _StreamBench] = {}
        self._sample_rng = random.Random(7)

    # -- accounting, on the loop thread ------------------------------------------------------
    def _sample(self, sb: _StreamBench, now: int, data: bytes) -> None:
        sent = stamp_of(data)
        if sent is None or sent > now:
            return
        sb.seen += 1
        item = (now, now - sent)
        if len(sb.samples) < self.reservoir:
            sb.samples.append(item)
        else:
            j = self._sample_rng.randrange(sb.seen)
            if j < self.reservoir:
                sb.samples[j] = item

    def _account(self, stream: str, accepted_data_b64: list[str], now: int) -> None:
        sb = self._bench.get(stream)
        if sb is None:
            sb = self._bench[stream] = _StreamBench()
        lines = 0
        aggregated = [i for i, d in enumerate(accepted_data_b64) if d.startswith(KPL_MAGIC_B64)]
        if aggregated:
            for i, d in enumerate(accepted_data_b64):
                if not d.startswith(KPL_MAGIC_B64):
                    lines += 1
                    continue
                data = binascii.a2b_base64(d)
                count, subs = deaggregate_summary(data)
                if count == 0:  # starts like the magic but is a plain record
                    lines += 1
                    if i in (0, len(accepted_data_b64) - 1):
                        self._sample(sb, now, data)
                    continue
                lines += count
                sb.aggregates += 1
                for sub in subs:
                    self._sample(sb, now, sub)
        else:
            lines = len(accepted_data_b64)
            last = len(accepted_data_b64) - 1
            picks = {0, last // 2, last}
            for i in picks:
                self._sample(sb, now, binascii.a2b_base64(accepted_data_b64[i][:24]))
        sb.lines += lines
        sb.records += len(accepted_data_b64)
        if not sb.first_ns:
            sb.first_ns = now
        sb.last_ns = now
        bucket = now // BUCKET_NS
        sb.buckets[bucket] = sb.buckets.get(bucket, 0) + lines

    def _accepted(self, payload: dict[str, Any], ctx: _Ctx, body: bytes, results_key: str,
                  ok_key: str) -> list[str]:
        records = payload["Records"]
        if ctx.accepted == len(records):
            return [r["Data"] for r in records]
        if ctx.accepted == 0:
            return []
        results = orjson.loads(body)[results_key]
        return [r["Data"] for r, res in zip(records, results) if ok_key in res]

    def _op_kinesis_PutRecords(self, payload: dict[str, Any], ctx: _Ctx) -> tuple[int, bytes]:
        status, body = super()._op_kinesis_PutRecords(payload, ctx)
        if status == 200 and ctx.stream is not None:
            data = self._accepted(payload, ctx, body, "Records", "SequenceNumber")
            if data:
                self._account(ctx.stream, data, time.monotonic_ns())
        return status, body

    def _op_firehose_PutRecordBatch(self, payload: dict[str, Any], ctx: _Ctx) -> tuple[int, bytes]:
        status, body = super()._op_firehose_PutRecordBatch(payload, ctx)
        if status == 200 and ctx.stream is not None:
            data = self._accepted(payload, ctx, body, "RequestResponses", "RecordId")
            if data:
                # Firehose records may hold several delimited lines: count newlines.
                sb_lines = [binascii.a2b_base64(d) for d in data]
                self._account_firehose(ctx.stream, sb_lines, time.monotonic_ns())
        return status, body

    def _account_firehose(self, stream: str, blobs: list[bytes], now: int) -> None:
        sb = self._bench.get(stream)
        if sb is None:
            sb = self._bench[stream] = _StreamBench()
        lines = sum(max(1, b.count(b"\n")) for b in blobs)
        for blob in (blobs[0], blobs[-1]):
            self._sample(sb, now, blob)
        sb.lines += lines
        sb.records += len(blobs)
        sb.first_ns = sb.first_ns or now
        sb.last_ns = now
        bucket = now // BUCKET_NS
        sb.buckets[bucket] = sb.buckets.get(bucket, 0) + lines

    # -- reporting ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        doc = super().stats()
        doc["bench"] = {
            name: {"lines": sb.lines, "records": sb.records, "aggregates": sb.aggregates,
                   "first_ns": sb.first_ns, "last_ns": sb.last_ns}
            for name, sb in list(self._bench.items())
        }
        return doc

    def dump(self) -> dict[str, Any]:
        out = self.stats()
        for name, sb in list(self._bench.items()):
            out["bench"][name].update(
                buckets=sorted(sb.buckets.items()),
                samples=list(sb.samples),
                samples_seen=sb.seen,
                bucket_ns=BUCKET_NS,
            )
        return out

    def _handle_aws(self, request: _Request, ctx: _Ctx) -> tuple[int, bytes]:
        if ctx.target == DUMP_TARGET:
            return 200, orjson.dumps(self.dump())
        return super()._handle_aws(request, ctx)


# ---- fleet mode: per-shard budgets, line ids ---------------------------------------------------

FLEET_ID = re.compile(rb'\{"id":"([0-9]{1,6})-([0-9]{1,9})"')
MAX_TRACKED_SEQ = 10_000_000  # ids per daemon counted; higher ones are reported as unexpected
MISSING_SHOWN = 20  # missing ids listed per daemon in the dump
THROTTLE_CODES = ("ProvisionedThroughputExceededException", "LimitExceededException", "ThrottlingException")


def subrecords(agg: bytes) -> list[bytes] | None:
    """Every sub-record's data of a KPL aggregate, or None if it is not a well-formed one."""
    if len(agg) < 4 + 16 or not agg.startswith(KPL_MAGIC):
        return None
    body = agg[4:-16]
    end = len(body)
    pos = 0
    out: list[bytes] = []
    try:
        while pos < end:
            tag, pos = _varint(body, pos)
            if tag & 7 != 2:
                return None
            n, pos = _varint(body, pos)
            if tag >> 3 == 3:
                where = _data_offset(body, pos, pos + n)
                if where is None:
                    return None
                out.append(body[where[0]:where[0] + where[1]])
            pos += n
    except IndexError:
        return None
    return out if pos == end else None


class TokenBucket:
    """``rate`` tokens a second, at most ``rate * burst`` held; starts full (an idle shard)."""

    __slots__ = ("rate", "capacity", "tokens", "stamp_ns")

    def __init__(self, rate: float, burst: float, now_ns: int) -> None:
        self.rate = rate
        self.capacity = rate * burst
        self.tokens = self.capacity
        self.stamp_ns = now_ns

    def refill(self, now_ns: int) -> None:
        if now_ns > self.stamp_ns:
            self.tokens = min(self.capacity, self.tokens + self.rate * (now_ns - self.stamp_ns) / 1e9)
            self.stamp_ns = now_ns


class _ShardBudget:
    __slots__ = ("records", "bytes", "offered", "accepted", "throttled", "refused", "accepted_bytes",
                 "accepted_lines", "first_ns", "last_ns")

    def __init__(self, records: TokenBucket | None, bytes_: TokenBucket | None) -> None:
        self.records = records
        self.bytes = bytes_
        self.offered = 0  # records sent to this shard, accepted or not
        self.accepted = 0
        self.throttled = 0  # per-record ProvisionedThroughputExceededException
        self.refused = 0  # records of requests refused whole
        self.accepted_bytes = 0
        self.accepted_lines = 0
        self.first_ns = 0
        self.last_ns = 0

    def room(self, records: float, nbytes: float) -> bool:
        return ((self.records is None or self.records.tokens >= records)
                and (self.bytes is None or self.bytes.tokens >= nbytes))

    def doc(self) -> dict[str, Any]:
        return {"offered": self.offered, "accepted": self.accepted, "throttled": self.throttled,
                "refused": self.refused, "accepted_bytes": self.accepted_bytes,
                "accepted_lines": self.accepted_lines, "first_ns": self.first_ns, "last_ns": self.last_ns}


class _DaemonLines:
    __slots__ = ("counts", "distinct", "total", "first_ns", "last_new_ns", "unexpected")

    def __init__(self) -> None:
        self.counts = bytearray()  # acceptances per sequence number, saturating at 255
        self.distinct = 0
        self.total = 0
        self.first_ns = 0
        self.last_new_ns = 0  # when the last id not seen before arrived: the daemon's finish
        self.unexpected = 0

    def doc(self) -> dict[str, Any]:
        counts = self.counts
        missing = [i for i, c in enumerate(counts) if c == 0][:MISSING_SHOWN]
        return {"distinct": self.distinct, "total": self.total, "duplicates": self.total - self.distinct,
                "ids_below": len(counts), "missing_below": [len(counts) - self.distinct, missing],
                "first_ns": self.first_ns, "last_new_ns": self.last_new_ns, "unexpected": self.unexpected}


class FleetAWS(BenchAWS):
    """BenchAWS with per-shard token buckets on PutRecords and per-line id accounting.

    Each budget applies per stream and shard. ``clock`` (monotonic ns) is injectable for tests.
    Everything here is touched only on the server's loop thread (GET /_stats and the dump are
    answered there too)."""

    def __init__(self, *args: Any, shard_records: float | None = None, shard_bytes: float | None = None,
                 burst: float = 1.0, whole_throttle_share: float | None = None,
                 whole_code: str = "ProvisionedThroughputExceededException", hold: bool = False,
                 yds_shard_ids: bool = False, clock: Callable[[], int] = time.monotonic_ns,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if yds_shard_ids:
            # Yandex Data Streams names shards its own way; a sender must not assume AWS's format.
            self._shard_ids = [f"shard-{i:06d}" for i in range(self.shards)]
        if whole_code not in THROTTLE_CODES:
            raise ValueError(f"whole_code must be one of {THROTTLE_CODES}")
        self.shard_records = shard_records
        self.shard_bytes = shard_bytes
        self.burst = burst
        self.whole_throttle_share = whole_throttle_share
        self.whole_code = whole_code
        self.clock = clock
        self.faults.hang = hold
        self.released_ns = 0 if hold else clock()
        self._budgets: dict[str, list[_ShardBudget]] = {}
        self._daemons: dict[int, _DaemonLines] = {}
        self.put_requests = 0
        self.refused_requests = 0
        self.unparsed_lines = 0
        self._seconds: dict[int, list[int]] = {}  # second since release -> [offered, accepted]

    def release(self) -> None:
        """Let held requests through (called from a signal handler: only sets two attributes)."""
        if self.faults.hang:
            self.released_ns = self.clock()
            self.faults.hang = False

    def _shard_budgets(self, stream: str, now: int) -> list[_ShardBudget]:
        budgets = self._budgets.get(stream)
        if budgets is None:
            budgets = self._budgets[stream] = [
                _ShardBudget(None if self.shard_records is None else TokenBucket(self.shard_records, self.burst, now),
                             None if self.shard_bytes is None else TokenBucket(self.shard_bytes, self.burst, now))
                for _ in range(self.shards)]
        for b in budgets:
            for bucket in (b.records, b.bytes):
                if bucket is not None:
                    bucket.refill(now)
        return budgets

    def _second(self, now: int) -> list[int]:
        key = max(0, now - self.released_ns) // 1_000_000_000 if self.released_ns else 0
        slot = self._seconds.get(key)
        if slot is None:
            slot = self._seconds[key] = [0, 0]
        return slot

    def _op_kinesis_PutRecords(self, payload: dict[str, Any], ctx: _Ctx) -> tuple[int, bytes]:
        stream = self._kinesis_stream(payload, ctx)
        records = self._record_list(payload, "records", ctx)
        parsed = [self._kinesis_record(r, i) for i, r in enumerate(records)]
        total = sum(item[4] for item in parsed)
        if total > KINESIS_MAX_REQUEST_BYTES:
            raise _validation(f"Records total {total} bytes, more than {KINESIS_MAX_REQUEST_BYTES}")
        now = self.clock()
        self.put_requests += 1
        budgets = self._shard_budgets(stream, now)
        shards = [self._shard_of(key, hash_key) for _, key, _, hash_key, _ in parsed]
        self._second(now)[0] += len(parsed)
        for s in shards:
            budgets[s].offered += 1
        self._whole_request_faults("kinesis", stream)
        # Decide every record against what the records before it in this request would take.
        spent: dict[int, list[float]] = {}
        passes: list[bool] = []
        for (_, _, _, _, size), s in zip(parsed, shards):
            took = spent.setdefault(s, [0.0, 0.0])
            ok = budgets[s].room(took[0] + 1, took[1] + size)
            if ok:
                took[0] += 1
                took[1] += size
            passes.append(ok)
        n_throttled = passes.count(False)
        share = self.whole_throttle_share
        if share is not None and n_throttled and n_throttled >= share * len(parsed):
            self.refused_requests += 1
            for s in shards:
                budgets[s].refused += 1
            raise _ApiError(400, self.whole_code, f"Rate exceeded for stream {stream} under account {ACCOUNT_ID}.")
        for s, (nrec, nbytes) in spent.items():
            b = budgets[s]
            if b.records is not None:
                b.records.tokens -= nrec
            if b.bytes is not None:
                b.bytes.tokens -= nbytes
        results: list[dict[str, str]] = []
        stored: list[Record] = []
        accepted_b64: list[str] = []
        sequence = self._next_sequence
        for (data, key, explicit, _, size), s, ok, raw in zip(parsed, shards, passes, records):
            shard = self._shard_ids[s]
            b = budgets[s]
            if not ok:
                b.throttled += 1
                results.append({"ErrorCode": "ProvisionedThroughputExceededException",
                                "ErrorMessage": f"Rate exceeded for shard {shard} in stream {stream} "
                                                f"under account {ACCOUNT_ID}."})
                continue
            sequence += 1
            number = str(SEQUENCE_BASE + sequence)
            results.append({"SequenceNumber": number, "ShardId": shard})
            b.accepted += 1
            b.accepted_bytes += size
            b.accepted_lines += self._count_lines(data, now)
            b.first_ns = b.first_ns or now
            b.last_ns = now
            accepted_b64.append(raw["Data"])
            if self.store:
                stored.append(Record(stream, key, explicit, data, number, shard, None))
        self._next_sequence = sequence
        self._second(now)[1] += len(accepted_b64)
        ctx.n_failed = n_throttled
        ctx.accepted = len(accepted_b64)
        ctx.stored = stored
        if accepted_b64:
            self._account(stream, accepted_b64, now)
        return 200, orjson.dumps({"FailedRecordCount": n_throttled, "Records": results})

    def _count_lines(self, data: bytes, now: int) -> int:
        """Count the lines of one accepted record by id; returns how many lines it held."""
        lines = subrecords(data) if data.startswith(KPL_MAGIC) else None
        if lines is None:
            lines = [data]
        for line in lines:
            m = FLEET_ID.match(line)
            if m is None:
                self.unparsed_lines += 1
                continue
            daemon, seq = int(m.group(1)), int(m.group(2))
            d = self._daemons.get(daemon)
            if d is None:
                d = self._daemons[daemon] = _DaemonLines()
            d.total += 1
            d.first_ns = d.first_ns or now
            if seq >= MAX_TRACKED_SEQ:
                d.unexpected += 1
                continue
            counts = d.counts
            if seq >= len(counts):
                counts.extend(bytes(seq + 1 - len(counts)))
            if counts[seq] == 0:
                d.distinct += 1
                d.last_new_ns = now
            if counts[seq] < 255:
                counts[seq] += 1
        return len(lines)

    # -- reporting ---------------------------------------------------------------------------
    def fleet_summary(self) -> dict[str, Any]:
        """Cheap progress figures (GET /_stats)."""
        return {"released_ns": self.released_ns, "now_ns": self.clock(), "held": self.faults.hang,
                "daemons": {str(k): [d.distinct, d.total] for k, d in self._daemons.items()}}

    def fleet_dump(self) -> dict[str, Any]:
        shards = {stream: [dict(b.doc(), shard=self._shard_ids[i]) for i, b in enumerate(budgets)]
                  for stream, budgets in self._budgets.items()}
        return {
            "released_ns": self.released_ns, "now_ns": self.clock(),
            "config": {"shards": self.shards, "shard_records": self.shard_records, "shard_bytes": self.shard_bytes,
                       "burst": self.burst, "whole_throttle_share": self.whole_throttle_share,
                       "whole_code": self.whole_code},
            "put_requests": self.put_requests, "refused_requests": self.refused_requests,
            "unparsed_lines": self.unparsed_lines, "shards": shards,
            "daemons": {str(k): d.doc() for k, d in sorted(self._daemons.items())},
            "seconds": sorted((k, v[0], v[1]) for k, v in self._seconds.items()),
        }

    def stats(self) -> dict[str, Any]:
        doc = super().stats()
        doc["fleet"] = self.fleet_summary()
        return doc

    def dump(self) -> dict[str, Any]:
        out = super().dump()
        out["fleet"] = self.fleet_dump()
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_server_arguments(parser)
    parser.add_argument("--verify", action="store_true", help="check SigV4 signatures (off by default)")
    parser.add_argument("--reservoir", type=int, default=50_000, help="latency samples kept per stream")
    fleet = parser.add_argument_group("fleet mode (FleetAWS)")
    fleet.add_argument("--fleet", action="store_true", help="fleet mode even without budgets")
    fleet.add_argument("--shard-records", type=float, help="records/s each shard accepts")
    fleet.add_argument("--shard-bytes", type=float, help="bytes/s (data + partition key) each shard accepts")
    fleet.add_argument("--burst", type=float, default=1.0, help="seconds of budget a shard's buckets hold")
    fleet.add_argument("--whole-throttle-share", type=float,
                       help="refuse a request whole (400) when at least this share of it is over budget")
    fleet.add_argument("--whole-code", default="ProvisionedThroughputExceededException", choices=THROTTLE_CODES)
    fleet.add_argument("--hold", action="store_true", help="hold every request until SIGUSR1")
    fleet.add_argument("--yds-shard-ids", action="store_true", help='name shards "shard-000001", as YDS does')
    args = parser.parse_args(argv)

    common = dict(verify=args.verify, store=False, seed=args.seed, shards=args.shards, port=args.port,
                  reservoir=args.reservoir)
    if not (args.fleet or args.hold or args.yds_shard_ids) and args.shard_records is None and args.shard_bytes is None:
        server: BenchAWS = BenchAWS(args.access_key, args.secret_key, **common)
    else:
        fleet_server = FleetAWS(args.access_key, args.secret_key, shard_records=args.shard_records,
                                shard_bytes=args.shard_bytes, burst=args.burst,
                                whole_throttle_share=args.whole_throttle_share, whole_code=args.whole_code,
                                hold=args.hold, yds_shard_ids=args.yds_shard_ids, **common)
        signal.signal(signal.SIGUSR1, lambda *_: fleet_server.release())
        server = fleet_server
    return serve_until_stopped(server, args)


if __name__ == "__main__":
    raise SystemExit(main())
