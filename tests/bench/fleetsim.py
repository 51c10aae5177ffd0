"""The fleet of tests/bench/fleet.py, simulated: N real ``Outbox`` state machines (spoold.machine,
pure) against per-shard token buckets, on a discrete-event clock. No processes, sockets or CPU
contention, so a run takes a second and is repeatable: for tuning the pacing before measuring it
with fleet.py, which stays the measurement of record.

    python tests/bench/fleetsim.py [--daemons 20] [--lines 3000] [--shards 4] [--mode records|hot|kpl]
        [--seed 1] [--rtt 0.01] [--no-map] [--set pacing.NAME=VALUE] [--set machine.NAME=VALUE]

Prints goodput against capacity, records sent per record accepted, the first/last finish ratio,
and in hot mode when the other shards' lines were all accepted against their own need.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import argparse
import bisect
import hashlib
import heapq
import math
import random
from typing import Any

import spoold.machine as machine
import spoold.pacing as pacing
from spoold.aggregation import Shard, ShardMap
from spoold.batching import Encoder, Entry
from spoold.machine import Limits, Outbox, Read, RetryPolicy, Send
from tests.tools.fakeaws import shard_ranges

SHARD_RECORDS, SHARD_BYTES = 1000.0, 1024.0 * 1024.0
MAX_SIMULATED_S = 600.0
PTEE = "ProvisionedThroughputExceededException"


class Bucket:
    def __init__(self, rate: float) -> None:
        self.rate, self.tokens, self.at = rate, rate, 0.0  # one second of burst, full at start

    def refill(self, now: float) -> None:
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now


class Stream:
    def __init__(self, shards: int) -> None:
        self.starts = [start for start, _ in shard_ranges(shards)]
        self.buckets = [(Bucket(SHARD_RECORDS), Bucket(SHARD_BYTES)) for _ in range(shards)]
        self.offered = [0] * shards
        self.accepted = [0] * shards
        self.last = [0.0] * shards

    def shard_of(self, entry: Entry) -> int:
        key = int(entry.hash_key) if entry.hash_key else int.from_bytes(hashlib.md5(entry.key.encode()).digest(), "big")
        return bisect.bisect_right(self.starts, key) - 1

    def put(self, batch: list[Entry], now: float) -> list[str | None]:
        out: list[str | None] = []
        for records, nbytes in self.buckets:
            records.refill(now)
            nbytes.refill(now)
        for e in batch:
            s = self.shard_of(e)
            records, nbytes = self.buckets[s]
            self.offered[s] += 1
            if records.tokens >= 1 and nbytes.tokens >= e.size:
                records.tokens -= 1
                nbytes.tokens -= e.size
                self.accepted[s] += 1
                self.last[s] = now
                out.append(None)
            else:
                out.append(PTEE)
        return out


def make_outbox(args: argparse.Namespace, d: int, rng: random.Random) -> Outbox:
    kpl = args.mode == "kpl"
    enc = Encoder("kinesis", max_record_bytes=1 << 20, partition_key_field="k" if args.mode == "hot" else None,
                  aggregation="kpl" if kpl else "none", rng=random.Random(d))
    m = Outbox(Limits(linger=0.2, aggregation="kpl" if kpl else "none"), enc, RetryPolicy(), 0.0,
               random.Random(1000 + d))
    if not args.no_map:
        ranges = shard_ranges(args.shards)
        m.set_shard_map(ShardMap(Shard(f"shardId-{i:012d}", a, b) for i, (a, b) in enumerate(ranges)), 0.0)
    m.caught_up = True
    size = args.size or (1000 if kpl else 100)
    lines = []
    for i in range(args.lines):
        key = "hot" if args.mode == "hot" and rng.random() < 0.5 else f"{rng.getrandbits(64):016x}"
        head = b'{"id":"%03d-%07d","k":"%s","p":"' % (d, i, key.encode())
        lines.append(head + b"x" * (size - len(head) - 2) + b'"}')
    for row, at in enumerate(range(0, args.lines, 100)):
        part = lines[at:at + 100]
        m.offer(row + 1, part, sum(map(len, part)), 1e9, 0.0, 1e9)
    return m


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    stream = Stream(args.shards)
    boxes = [make_outbox(args, d, rng) for d in range(args.daemons)]
    events: list[tuple[float, int, str, int, Any]] = []
    seq = 0

    def push(t: float, kind: str, d: int, payload: Any = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, d, payload))

    for d in range(args.daemons):
        push(0.0, "wake", d)
    finish: list[float | None] = [None] * args.daemons
    waking = [math.inf] * args.daemons
    now = 0.0
    while events and now < MAX_SIMULATED_S and not all(f is not None for f in finish):
        now, _, kind, d, payload = heapq.heappop(events)
        m = boxes[d]
        if kind == "arrive":  # at the endpoint: judged against the buckets, answered half an RTT later
            push(now + args.rtt / 2 * (0.5 + rng.random()), "reply", d, (payload, stream.put(payload.batch, now)))
            continue
        if kind == "reply":
            send, outcomes = payload
            m.on_reply(send, outcomes, now, 1e9)
            m.take_effects()
            if m.lines_sent >= args.lines and finish[d] is None:
                finish[d] = now
        while True:
            decision = m.next(now, 1e9)
            m.take_effects()
            if isinstance(decision, Send):
                push(now + args.rtt / 2 * (0.5 + rng.random()), "arrive", d, decision)
            elif isinstance(decision, Read):
                m.rows_read(decision, [], now, 1e9)
            else:
                if decision.until < math.inf and decision.until != waking[d]:
                    waking[d] = decision.until
                    push(decision.until, "wake", d)
                break
    done = [f for f in finish if f is not None]
    elapsed = max(done) if done else now
    size = args.size or (1000 if args.mode == "kpl" else 100)
    total = args.daemons * args.lines
    capacity = args.shards * (SHARD_BYTES / size if args.mode == "kpl" else SHARD_RECORDS)
    out: dict[str, Any] = {
        "complete": len(done) == args.daemons, "elapsed_s": round(elapsed, 2),
        "goodput_pct": round(100 * total / elapsed / capacity, 1),
        "sent_per_accepted": round(sum(stream.offered) / max(sum(stream.accepted), 1), 2),
        "first_last": round(min(done) / max(done), 2) if len(done) == args.daemons else None,
    }
    if args.mode == "hot":
        hot = bisect.bisect_right(stream.starts, int.from_bytes(hashlib.md5(b"hot").digest(), "big")) - 1
        others = [i for i in range(args.shards) if i != hot]
        alone = max(stream.accepted[i] for i in others) / SHARD_RECORDS
        out["others_ratio"] = round(max(stream.last[i] for i in others) / alone, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--daemons", type=int, default=20)
    p.add_argument("--lines", type=int, default=3000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--mode", choices=("records", "hot", "kpl"), default="records")
    p.add_argument("--size", type=int, help="bytes per line (default 100; 1000 with --mode kpl)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rtt", type=float, default=0.01, help="seconds per round trip (jittered +-50%%)")
    p.add_argument("--no-map", action="store_true", help="no shard map: paced per destination")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="set a constant of spoold.pacing or spoold.machine")
    args = p.parse_args(argv)
    if not 1 <= args.daemons <= 200 or not 1 <= args.lines <= 100_000 or args.shards < 1:
        p.error("--daemons 1-200, --lines 1-100000, --shards >= 1")
    for item in args.set:
        name, _, value = item.partition("=")
        module, _, const = name.partition(".")
        target = {"pacing": pacing, "machine": machine}[module]
        setattr(target, const, type(getattr(target, const))(float(value)))
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
