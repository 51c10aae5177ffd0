"""The benchmark's loopback endpoint: tests/fakeaws.py's FakeAWS plus what a benchmark needs.

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

Listens on 127.0.0.1 only; exits on SIGTERM/SIGINT or when its parent dies.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script: make the repository root importable (for tests.fakeaws).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import argparse
import binascii
import random
import time
from typing import Any

import orjson

from tests.fakeaws import FakeAWS, _Ctx, _Request, serve_until_stopped

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file")
    parser.add_argument("--access-key", default="AKIDSPOOLDTEST")
    parser.add_argument("--secret-key", default="spoold-test-secret")
    parser.add_argument("--verify", action="store_true", help="check SigV4 signatures (off by default)")
    parser.add_argument("--record-fail-rate", type=float, default=0.0)
    parser.add_argument("--throttle-rate", type=float, default=0.0)
    parser.add_argument("--http500-rate", type=float, default=0.0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each answer")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reservoir", type=int, default=50_000, help="latency samples kept per stream")
    args = parser.parse_args(argv)

    server = BenchAWS(args.access_key, args.secret_key, verify=args.verify, store=False, seed=args.seed,
                      shards=args.shards, port=args.port, reservoir=args.reservoir)
    return serve_until_stopped(server, args)


if __name__ == "__main__":
    raise SystemExit(main())
