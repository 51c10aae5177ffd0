"""Many spoold daemons, one stream: how a fleet shares throttled shards. Bounded, 127.0.0.1 only.

    python tests/bench/fleet.py --daemons 20 --lines 3000 --shards 4 [--mode records|hot|kpl] \\
        [--shard-records 1000] [--shard-bytes 1048576] [--size 100] [--json out.json] \\
        [--whole-throttle-share 0.5] [--dest KEY=VALUE] [--patch MODULE.NAME=VALUE] [--keep]

What one run does:

1. Starts one loopback endpoint (tests/bench/endpoint.py in fleet mode, a subprocess): every
   shard of the stream has a token bucket for records/s and one for bytes/s (data + partition
   key), ``--burst`` seconds deep and full at start. Over-budget records get
   ``ProvisionedThroughputExceededException`` inside a 200 PutRecords reply, with a message naming
   the shard; accepted entries carry their ShardId; ListShards and DescribeStream answer the map.
   With ``--whole-throttle-share S`` a request of which at least S would be throttled is refused
   whole (HTTP 400, ``--whole-code``). The endpoint holds every request until step 4.
2. Starts N real daemons (``python -m spoold run``, each with its own spool, sockets and config;
   kind = "kinesis", synchronous = "full", defaults otherwise) pointed at it.
3. Writes M lines to each daemon over its socket, one connection each, and checks the durable
   acknowledgements. Each line is a JSON object that starts with a unique id,
   ``{"id":"DAEMON-SEQ","k":KEY,"p":"xxx..."}``, padded to ``--size`` bytes.
4. Releases the endpoint: every daemon starts from a full backlog at the same moment (t0).
   (``--start live`` skips the hold: t0 is when the lines are written.)
5. Waits until the endpoint has seen every id, then until every daemon reports an empty spool
   and nothing in flight (so late duplicates are counted), or until ``--timeout``.

Modes: ``records`` (the daemons pick random partition keys); ``hot`` (``partition_key_field =
"k"``; ``--hot-share`` of the lines carry one key, the rest random keys: the report says when the
lines bound for the other shards were all delivered against the time those shards alone need at
their record rate); ``kpl`` (``aggregation = "kpl"``, lines of 1,000 bytes by default, so the byte
budget binds).

Printed (``--json`` writes it all, plus each daemon's final status): goodput against the shards'
capacity (records/s and bytes/s), records sent per record accepted (aggregates for KPL), each
daemon's finish time (last new line accepted, from t0) with the first/last ratio, lines lost and
duplicated, per-shard figures, and the daemons' own counters (requests, retried records,
failures by code). Exit status 0 when every line arrived, 1 otherwise.

``--dest``, ``--spool``, ``--daemon KEY=VALUE`` add config keys to every daemon and ``--patch
MODULE.NAME=VALUE`` sets a spoold constant in each (as bench.py does); ``--keep`` keeps the work
folder (configs, daemon logs, endpoint log, results.json).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script: make the repository root importable (for tests.bench.bench, tests.tools.fakeaws).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import random
import shlex
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.bench import DaemonProc, Endpoint, MiB, family_cpu, log
from tests.tools.client import send_lines
from tests.tools.fakeaws import shard_ranges

HOT_KEY = "hot"  # the partition key of the hot lines in --mode hot
MAX_DAEMONS = 64
MAX_TOTAL_LINES = 2_000_000
START_CONCURRENCY = 4  # daemons starting at once (each import costs about a second of CPU)
POLL_SECONDS = 0.25
PROGRESS_SECONDS = 5.0
SETTLE_SECONDS = 30.0  # after the last id: how long daemons get to report an empty spool
SEND_TIMEOUT = 120.0
DAEMON_FIGURES = ("requests", "records_sent", "lines_sent", "retried_records", "dead_lettered")
NOT_SUMMED = frozenset({"oldest_age", "last_error_at", "last_success_at"})  # times, not amounts


# ---- lines -------------------------------------------------------------------------------------

def line_of(daemon: int, seq: int, key: str, size: int) -> bytes:
    head = b'{"id":"%03d-%07d","k":"%s","p":"' % (daemon, seq, key.encode())
    pad = size - len(head) - 2
    if pad < 0:
        raise SystemExit(f"--size {size} is too small: a line needs at least {len(head) + 2} bytes")
    return head + b"x" * pad + b'"}'


def shard_of_key(key: str, ranges: list[tuple[int, int]]) -> int:
    h = int.from_bytes(hashlib.md5(key.encode()).digest(), "big")
    for i, (start, end) in enumerate(ranges):
        if start <= h <= end:
            return i
    raise AssertionError("hash outside every shard")


def make_lines(args: argparse.Namespace, daemon: int) -> tuple[bytes, list[str]]:
    """All of one daemon's lines (newline-terminated, one payload) and their keys."""
    rng = random.Random(args.seed * 1_000_003 + daemon)
    keys = []
    for _ in range(args.lines):
        hot = args.mode == "hot" and rng.random() < args.hot_share
        keys.append(HOT_KEY if hot else f"{rng.getrandbits(64):016x}")
    payload = b"".join(line_of(daemon, seq, key, args.size) + b"\n" for seq, key in enumerate(keys))
    return payload, keys


# ---- processes ---------------------------------------------------------------------------------

class FleetEndpoint(Endpoint):
    """tests/bench/endpoint.py in fleet mode, as a subprocess (bench.Endpoint's client methods)."""

    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        cmd = ["--shards", str(args.shards), "--burst", str(args.burst), "--reservoir", "1000",
               "--whole-code", args.whole_code, "--fleet"]
        if args.shard_records > 0:
            cmd += ["--shard-records", str(args.shard_records)]
        if args.shard_bytes > 0:
            cmd += ["--shard-bytes", str(args.shard_bytes)]
        if args.whole_throttle_share is not None:
            cmd += ["--whole-throttle-share", str(args.whole_throttle_share)]
        if args.start == "held":
            cmd.append("--hold")
        if args.yds_shard_ids:
            cmd.append("--yds-shard-ids")
        super().__init__(tmp, 0.0, 0.0, options=cmd)

    def release(self) -> int:
        """Let the held requests through; the endpoint's release time (monotonic ns)."""
        self.proc.send_signal(signal.SIGUSR1)
        end = time.monotonic() + 10
        while True:
            fleet = self.stats()["fleet"]
            if not fleet["held"] and fleet["released_ns"]:
                return int(fleet["released_ns"])
            if time.monotonic() > end:
                raise SystemExit("the endpoint did not release its held requests")
            time.sleep(0.02)


def daemon_options(args: argparse.Namespace) -> argparse.Namespace:
    """What bench.DaemonProc reads from its arguments, for this mode."""
    dest = list(args.dest)
    if args.mode == "hot" and not any(kv.startswith("partition_key_field=") for kv in dest):
        dest.append("partition_key_field=k")
    return argparse.Namespace(spool=args.spool, dest=dest, daemon=args.daemon, patch=args.patch,
                              aggregation="kpl" if args.mode == "kpl" else "none")


def start_daemons(tmp: Path, url: str, args: argparse.Namespace,
                  starter: concurrent.futures.ThreadPoolExecutor) -> list[DaemonProc]:
    """Start the daemons a few at a time on ``starter``'s threads, which must outlive them: a
    daemon gets SIGTERM when the thread that started it ends (PR_SET_PDEATHSIG is per thread)."""
    opts = daemon_options(args)
    dirs = []
    for i in range(args.daemons):
        d = tmp / f"d{i:03d}"
        d.mkdir()
        dirs.append(d)
    daemons: list[DaemonProc] = []
    futures = [starter.submit(DaemonProc, d, url, opts) for d in dirs]
    failure: BaseException | None = None
    for f in futures:
        try:
            daemons.append(f.result())
        except BaseException as exc:  # SystemExit from DaemonProc: stop the others, then raise
            failure = failure or exc
    if failure is not None:
        stop_daemons(daemons)
        raise failure
    return daemons


def stop_daemons(daemons: list[DaemonProc]) -> None:
    if daemons:
        with concurrent.futures.ThreadPoolExecutor(len(daemons)) as pool:
            list(pool.map(DaemonProc.stop, daemons))


# ---- one run -----------------------------------------------------------------------------------

def run(args: argparse.Namespace, argv: list[str]) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="spoold-fleet-"))
    endpoint: FleetEndpoint | None = None
    daemons: list[DaemonProc] = []
    starter = concurrent.futures.ThreadPoolExecutor(START_CONCURRENCY, thread_name_prefix="start")
    try:
        ranges = shard_ranges(args.shards)
        payloads = []
        lines_per_shard = [0] * args.shards
        for i in range(args.daemons):
            payload, keys = make_lines(args, i)
            payloads.append(payload)
            if args.mode == "hot":
                for key in keys:
                    lines_per_shard[shard_of_key(key, ranges)] += 1
        endpoint = FleetEndpoint(tmp, args)
        log(f"endpoint {endpoint.url}: {args.shards} shards x {args.shard_records:,.0f} records/s, "
            f"{args.shard_bytes:,.0f} bytes/s, burst {args.burst:g} s; starting {args.daemons} daemons")
        t_start = time.monotonic()
        daemons = start_daemons(tmp, endpoint.url, args, starter)
        log(f"{len(daemons)} daemons up in {time.monotonic() - t_start:.1f} s; writing {args.lines} lines each")
        t0 = time.monotonic_ns()
        with concurrent.futures.ThreadPoolExecutor(len(daemons)) as pool:
            acks = list(pool.map(send_lines, [d.socket for d in daemons], payloads, [SEND_TIMEOUT] * len(payloads)))
        bad = [(i, a) for i, a in enumerate(acks) if a.get("accepted") != args.lines]
        if bad:
            raise SystemExit(f"daemons did not accept every line: {bad[:5]}")
        if args.start == "held":
            t0 = endpoint.release()
            log("every line acknowledged; endpoint released")
        else:
            log(f"every line acknowledged {(time.monotonic_ns() - t0) / 1e9:.2f} s after the first write")
        complete = wait_complete(endpoint, daemons, args, t0)
        settled = wait_settled(daemons) if complete else False
        dump = endpoint.dump()
        statuses = [d.status() for d in daemons]
        cpu = {"daemons_s": round(sum(family_cpu(d.pid) for d in daemons), 2),
               "endpoint_s": round(endpoint.cpu(), 2)}
        result = figures(args, dump["fleet"], t0, lines_per_shard)
        result.update(complete=complete, settled=settled, cpu=cpu,
                      daemon_status=statuses, loadavg=os.getloadavg(),
                      command="python tests/bench/fleet.py " + shlex.join(argv),
                      date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"))
        result["daemon_totals"] = daemon_totals(statuses)
        print(report(args, result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        if args.keep:
            (tmp / "results.json").write_text(json.dumps({"result": result, "dump": dump}, indent=1))
        return 0 if complete and result["lost"] == 0 else 1
    finally:
        stop_daemons(daemons)
        starter.shutdown()
        if endpoint is not None:
            endpoint.stop()
        if args.keep:
            log(f"work folder kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def wait_complete(endpoint: FleetEndpoint, daemons: list[DaemonProc], args: argparse.Namespace,
                  t0: int) -> bool:
    """Until every daemon's every id has been accepted once, --timeout, or a daemon exits."""
    end = time.monotonic() + args.timeout
    next_progress = time.monotonic() + PROGRESS_SECONDS
    expected = args.daemons * args.lines
    while True:
        fleet = endpoint.stats()["fleet"]
        counts = fleet["daemons"]
        distinct = sum(v[0] for v in counts.values())
        if len(counts) == args.daemons and all(v[0] >= args.lines for v in counts.values()):
            return True
        dead = [i for i, d in enumerate(daemons) if d.proc.poll() is not None]
        if dead:
            log(f"daemons {dead} exited (--keep keeps their logs): {distinct:,} of {expected:,} lines arrived")
            return False
        now = time.monotonic()
        if now > end:
            log(f"timed out after {args.timeout:g} s: {distinct:,} of {expected:,} lines arrived")
            return False
        if now >= next_progress:
            next_progress = now + PROGRESS_SECONDS
            log(f"  {(fleet['now_ns'] - t0) / 1e9:6.1f} s: {distinct:,} of {expected:,} lines")
        time.sleep(POLL_SECONDS)


def wait_settled(daemons: list[DaemonProc]) -> bool:
    """Until every daemon reports an empty spool and nothing in flight."""
    end = time.monotonic() + SETTLE_SECONDS
    pending = list(daemons)
    while pending:
        pending = [d for d in pending
                   if not ((s := d.status()) and s.get("spooled_lines") == 0 and s.get("in_flight") == 0)]
        if not pending:
            return True
        if time.monotonic() > end:
            log(f"{len(pending)} daemons still report lines or requests in flight")
            return False
        time.sleep(POLL_SECONDS)
    return True


# ---- figures -----------------------------------------------------------------------------------

def figures(args: argparse.Namespace, fleet: dict[str, Any], t0: int,
            lines_per_shard: list[int]) -> dict[str, Any]:
    shards = fleet["shards"].get("spoold", [])
    daemons = fleet["daemons"]
    finish = []
    lost = duplicated = unexpected = 0
    missing: dict[str, list[int]] = {}
    for i in range(args.daemons):
        d = daemons.get(str(i))
        if d is None:
            finish.append(None)
            lost += args.lines
            continue
        below = d["ids_below"]
        lost += args.lines - d["distinct"]
        unexpected += d["unexpected"] + max(0, below - args.lines)
        duplicated += d["duplicates"]
        finish.append((d["last_new_ns"] - t0) / 1e9 if d["distinct"] >= args.lines else None)
        if d["missing_below"][1]:
            missing[str(i)] = d["missing_below"][1]
    done = [f for f in finish if f is not None]
    offered = sum(s["offered"] for s in shards)
    accepted = sum(s["accepted"] for s in shards)
    accepted_bytes = sum(s["accepted_bytes"] for s in shards)
    last_ns = max([s["last_ns"] for s in shards if s["last_ns"]] or [t0])
    elapsed = max(done) if len(done) == args.daemons else (last_ns - t0) / 1e9
    elapsed = max(elapsed, 1e-9)
    out: dict[str, Any] = {
        "mode": args.mode, "daemons": args.daemons, "lines_per_daemon": args.lines, "size": args.size,
        "shards": args.shards, "shard_records": args.shard_records, "shard_bytes": args.shard_bytes,
        "burst": args.burst, "start": args.start,
        "elapsed_s": round(elapsed, 3),
        "records_offered": offered, "records_accepted": accepted,
        "sent_per_accepted": round(offered / accepted, 3) if accepted else None,
        "put_requests": fleet["put_requests"], "refused_requests": fleet["refused_requests"],
        "records_per_s": round(accepted / elapsed, 1), "bytes_per_s": round(accepted_bytes / elapsed, 1),
        "lines_delivered": args.daemons * args.lines - lost,
        "lost": lost, "duplicated": duplicated, "unexpected": unexpected + fleet["unparsed_lines"],
        "missing_sample": missing,
        "finish_s": [None if f is None else round(f, 3) for f in finish],
        "first_last_ratio": round(min(done) / max(done), 3) if len(done) == args.daemons and max(done) > 0 else None,
        "per_shard": [{k: s[k] for k in ("shard", "offered", "accepted", "throttled", "refused",
                                         "accepted_lines", "accepted_bytes")}
                      | {"last_s": round((s["last_ns"] - t0) / 1e9, 3) if s["last_ns"] else None}
                      for s in shards],
        "per_second": fleet["seconds"],
    }
    # The busiest shard's own need at its budget (no burst): how much of the run the keys' spread
    # alone explains, whatever the daemons do.
    needs = [max(s["accepted"] / args.shard_records if args.shard_records > 0 else 0.0,
                 s["accepted_bytes"] / args.shard_bytes if args.shard_bytes > 0 else 0.0) for s in shards]
    out["busiest_shard_needs_s"] = round(max(needs or [0.0]), 3)
    if args.shard_records > 0:
        out["goodput_records_pct"] = round(100 * accepted / elapsed / (args.shards * args.shard_records), 1)
    if args.shard_bytes > 0:
        out["goodput_bytes_pct"] = round(100 * accepted_bytes / elapsed / (args.shards * args.shard_bytes), 1)
    if args.mode == "hot" and shards:
        hot = shard_of_key(HOT_KEY, shard_ranges(args.shards))
        others = [i for i in range(args.shards) if i != hot]
        delivered = [(shards[i]["last_ns"] - t0) / 1e9 for i in others if shards[i]["last_ns"]]
        alone = max(lines_per_shard[i] / args.shard_records for i in others) if args.shard_records > 0 else None
        out["hot"] = {
            "hot_shard": shards[hot]["shard"], "lines_per_shard": lines_per_shard,
            "others_delivered_s": round(max(delivered), 3) if len(delivered) == len(others) else None,
            "others_alone_s": None if alone is None else round(alone, 3),
            "hot_delivered_s": round((shards[hot]["last_ns"] - t0) / 1e9, 3) if shards[hot]["last_ns"] else None,
            "hot_alone_s": round(lines_per_shard[hot] / args.shard_records, 3) if args.shard_records > 0 else None,
        }
        h = out["hot"]
        if h["others_delivered_s"] is not None and h["others_alone_s"]:
            h["others_ratio"] = round(h["others_delivered_s"] / h["others_alone_s"], 2)
        other_offered = sum(shards[i]["offered"] for i in others)
        other_accepted = sum(shards[i]["accepted"] for i in others)
        h["others_sent_per_accepted"] = round(other_offered / other_accepted, 3) if other_accepted else None
        h["hot_sent_per_accepted"] = (round(shards[hot]["offered"] / shards[hot]["accepted"], 3)
                                      if shards[hot]["accepted"] else None)
    return out


def daemon_totals(statuses: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The daemons' status figures summed: every number (a pace summed is the fleet's pace) and
    every dict of numbers (failures by code), so figures a newer daemon adds show up too."""
    totals: dict[str, Any] = {k: 0 for k in DAEMON_FIGURES}
    for s in statuses:
        for k, v in (s or {}).items():
            if k in NOT_SUMMED:
                continue
            if isinstance(v, int | float) and not isinstance(v, bool):
                totals[k] = totals.get(k, 0) + v
            elif isinstance(v, dict) and all(isinstance(x, int | float) for x in v.values()):
                into = totals.setdefault(k, {})
                for name, x in v.items():
                    into[name] = into.get(name, 0) + x
    totals.setdefault("failures", {})
    totals["no_status"] = sum(1 for s in statuses if not s)
    return totals


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    def n(x: float | None, spec: str = ",.0f") -> str:
        return "n/a" if x is None else format(x, spec)

    kind = "aggregates" if args.mode == "kpl" else "records"
    out = [f"fleet {r['date']}: {r['command']}",
           f"  {args.daemons} daemons x {args.lines:,} lines of {args.size} B, mode {args.mode}, "
           f"{args.shards} shards x {n(args.shard_records)} records/s, {n(args.shard_bytes)} bytes/s, "
           f"start {args.start}; load average {r['loadavg'][0]:.1f}"]
    if not r["complete"]:
        out.append("  INCOMPLETE: not every line arrived (timeout or a daemon exited)")
    goodput = []
    if "goodput_records_pct" in r:
        goodput.append(f"{n(r['records_per_s'])} records/s = {r['goodput_records_pct']:.1f}% of record capacity")
    if "goodput_bytes_pct" in r:
        goodput.append(f"{n(r['bytes_per_s'] / 1024)} KiB/s = {r['goodput_bytes_pct']:.1f}% of byte capacity")
    if not goodput:
        goodput.append(f"{n(r['records_per_s'])} records/s, {n(r['bytes_per_s'] / 1024)} KiB/s (shards unlimited)")
    elif args.mode == "kpl":
        goodput.reverse()  # the byte budget is the one that binds
    needs = (f" (the busiest shard alone needs {r['busiest_shard_needs_s']:.2f} s at its budget)"
             if r["busiest_shard_needs_s"] else "")
    out += [
        f"  all lines delivered in {r['elapsed_s']:.2f} s{needs}; goodput " + "; ".join(goodput),
        f"  {kind} sent per {kind[:-1]} accepted: {n(r['sent_per_accepted'], '.2f')} "
        f"({r['records_offered']:,} sent, {r['records_accepted']:,} accepted, {r['put_requests']:,} requests, "
        f"{r['refused_requests']:,} refused whole)",
    ]
    done = [f for f in r["finish_s"] if f is not None]
    if done:
        out.append(f"  daemon finish: first {min(done):.2f} s, median {sorted(done)[len(done) // 2]:.2f} s, "
                   f"last {max(done):.2f} s; first/last {n(r['first_last_ratio'], '.2f')}")
    out.append(f"  lines lost {r['lost']:,}, duplicated {r['duplicated']:,}, unexpected {r['unexpected']:,}"
               + (f"; missing ids e.g. {r['missing_sample']}" if r["missing_sample"] else ""))
    if "hot" in r:
        h = r["hot"]
        out.append(f"  hot key on {h['hot_shard']}: other shards delivered in {n(h['others_delivered_s'], '.2f')} s"
                   f" vs {n(h['others_alone_s'], '.2f')} s alone at their record rate"
                   f" ({n(h.get('others_ratio'), '.2f')}x); hot shard {n(h['hot_delivered_s'], '.2f')} s vs"
                   f" {n(h['hot_alone_s'], '.2f')} s; sent per accepted: others"
                   f" {n(h['others_sent_per_accepted'], '.2f')}, hot {n(h['hot_sent_per_accepted'], '.2f')}")
    out.append("  shard              offered   accepted  throttled  refused     lines      bytes  last")
    for s in r["per_shard"]:
        out.append(f"  {s['shard']:<17}{s['offered']:>9,}{s['accepted']:>11,}{s['throttled']:>11,}"
                   f"{s['refused']:>9,}{s['accepted_lines']:>10,}{s['accepted_bytes']:>11,}  {n(s['last_s'], '.2f')} s")
    t = r["daemon_totals"]
    out.append(f"  daemons: {t['requests']:,} requests, {t['retried_records']:,} records retried, failures "
               + (", ".join(f"{k}={v:,}" for k, v in sorted(t["failures"].items())) or "none")
               + f"; CPU daemons {r['cpu']['daemons_s']:.1f} s, endpoint {r['cpu']['endpoint_s']:.1f} s")
    paced = {k: v for k, v in t.items() if k.startswith("pace") and isinstance(v, int | float)}
    if paced:  # a daemon that paces says how (summed over the daemons)
        out.append("  daemons' pacing, summed: " + ", ".join(f"{k} {v:,.1f}" for k, v in sorted(paced.items())))
    return "\n".join(out)


# ---- command line ------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--daemons", type=int, default=20)
    p.add_argument("--lines", type=int, default=3000, help="lines queued on each daemon")
    p.add_argument("--mode", choices=("records", "hot", "kpl"), default="records")
    p.add_argument("--size", type=int, help="bytes per line (default 100; 1000 with --mode kpl)")
    p.add_argument("--hot-share", type=float, default=0.5, help="share of lines on the hot key (--mode hot)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--shard-records", type=float, default=1000.0, help="records/s per shard (0: no limit)")
    p.add_argument("--shard-bytes", type=float, default=float(MiB), help="bytes/s per shard (0: no limit)")
    p.add_argument("--burst", type=float, default=1.0, help="seconds of budget a shard holds")
    p.add_argument("--whole-throttle-share", type=float,
                   help="refuse a request whole (400) when at least this share of its records is over budget")
    p.add_argument("--whole-code", default="ProvisionedThroughputExceededException",
                   choices=("ProvisionedThroughputExceededException", "LimitExceededException",
                            "ThrottlingException"))
    p.add_argument("--start", choices=("held", "live"), default="held",
                   help="held: the endpoint holds requests until every backlog is queued; live: no hold")
    p.add_argument("--yds-shard-ids", action="store_true",
                   help='the endpoint names shards "shard-000001", as Yandex Data Streams does')
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every line")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the figures (and each daemon's final status) here")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--dest", action="append", default=[], metavar="KEY=VALUE", help="destination key, every daemon")
    p.add_argument("--spool", action="append", default=[], metavar="KEY=VALUE", help="[spool] key")
    p.add_argument("--daemon", action="append", default=[], metavar="KEY=VALUE", help="[daemon] key")
    p.add_argument("--patch", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="set a spoold constant in every daemon (what-if experiments)")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = 1000 if args.mode == "kpl" else 100
    if not 1 <= args.daemons <= MAX_DAEMONS:
        p.error(f"--daemons must be 1 to {MAX_DAEMONS}")
    if not 1 <= args.lines or args.daemons * args.lines > MAX_TOTAL_LINES:
        p.error(f"--daemons x --lines must be 1 to {MAX_TOTAL_LINES:,}")
    if args.shards < 1 or args.burst <= 0 or args.timeout <= 0:
        p.error("--shards, --burst and --timeout must be positive")
    if not 0 <= args.hot_share <= 1:
        p.error("--hot-share must be 0 to 1")
    if args.mode == "hot" and args.shard_records <= 0:
        p.error("--mode hot needs --shard-records")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run(parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
