"""Following log files: throughput, idle CPU and memory of the real daemon. Prints figures.

    python tests/bench/tail.py busy --lines 1000000 --size 100
    python tests/bench/tail.py idle --files 10 --seconds 30
    python tests/bench/tail.py grow --bytes 1GiB --size 200

busy: a file of N lines exists before the daemon starts (start_at = "beginning"); lines/s from
the file into the spool, from the first line spooled to the last (startup excluded).
idle: F files that do not change; CPU seconds (utime + stime, all threads) the daemon uses over
the window, after a warm-up.
grow: a writer appends lines to one file until it has grown by the given size while the daemon
follows it; the daemon's peak RSS (VmHWM) and its RSS at the end.

The endpoint is a closed port on 127.0.0.1 (nothing is sent: the spool is what is measured), the
spool synchronous = "full" (the default). Everything in a temporary folder, bounded in time.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script: make the repository root importable (for tests.tools).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import argparse
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

from tests.tools.proc import cpu_seconds

REPO = Path(__file__).resolve().parents[2]


def parse_size(text: str) -> int:
    from spoold.config import parse_size as ps

    return ps(text)


def rss(pid: int) -> tuple[int, int]:
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            vals[line.split(":")[0]] = int(line.split()[1]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def spooled(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute("SELECT coalesce(sum(lines), 0) FROM chunks").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def start(work: Path, files: list[str], extra_spool: str = "") -> subprocess.Popen[bytes]:
    cfg = work / "spoold.toml"
    cfg.write_text(f'[spool]\npath = "{work / "spool.db"}"\nmax_bytes = "4GiB"\n{extra_spool}\n'
                   '[log]\nformat = "json"\n[[destination]]\nname = "t"\nkind = "kinesis"\nstream = "s"\n'
                   'region = "us-east-1"\nendpoint_url = "http://127.0.0.1:9"\nretry_cap = "60s"\n'
                   f'start_at = "beginning"\nfiles = {files!r}\n'.replace("'", '"'))
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ACCESS_KEY_ID": "AKIDBENCH", "AWS_SECRET_ACCESS_KEY": "x"}
    log = open(work / "daemon.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "spoold", "run", "--config", str(cfg)], env=env,
                            stdout=log, stderr=log)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def line_bytes(i: int, size: int) -> bytes:
    head = f"{i:012d} "
    return (head + "x" * max(0, size - len(head) - 1) + "\n").encode()


def busy(args: argparse.Namespace, work: Path) -> None:
    path = work / "big.log"
    with open(path, "wb") as f:
        block = b"".join(line_bytes(i, args.size) for i in range(1000))
        for _ in range(args.lines // 1000):
            f.write(block)
    n = args.lines // 1000 * 1000
    proc = start(work, [str(path)])
    try:
        first = last = None
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            got = spooled(work / "spool.db")
            now = time.monotonic()
            if got and first is None:
                first = (now, got)
            if got >= n:
                last = now
                break
            time.sleep(0.05)
        cpu = cpu_seconds(proc.pid)
    finally:
        stop(proc)
    if first is None or last is None:
        sys.exit(f"timed out: {spooled(work / 'spool.db')} of {n} lines spooled")
    rate = (n - first[1]) / max(last - first[0], 1e-9)
    print(f"busy: {n} lines of {args.size} bytes: {rate:,.0f} lines/s ({rate * args.size / 1e6:.1f} MB/s) "
          f"file -> spool; daemon CPU {cpu:.1f} s in all")


def idle(args: argparse.Namespace, work: Path) -> None:
    paths = []
    for i in range(args.files):
        p = work / f"idle-{i}.log"
        p.write_bytes(b"".join(line_bytes(j, 100) for j in range(100)))
        paths.append(str(p))
    proc = start(work, [str(work / "idle-*.log")])
    try:
        deadline = time.monotonic() + 60
        while spooled(work / "spool.db") < 100 * args.files and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(args.warmup)
        c0 = cpu_seconds(proc.pid)
        time.sleep(args.seconds)
        c1 = cpu_seconds(proc.pid)
    finally:
        stop(proc)
    used = c1 - c0
    print(f"idle: {args.files} files unchanged for {args.seconds:.0f} s: {used:.2f} CPU s "
          f"({100 * used / args.seconds:.2f}% of one core)")


def grow(args: argparse.Namespace, work: Path) -> None:
    total = parse_size(args.bytes)
    path = work / "grow.log"
    path.write_bytes(b"")
    proc = start(work, [str(path)])
    try:
        time.sleep(2)
        block = b"".join(line_bytes(i, args.size) for i in range(5000))
        written = 0
        peak_rss = 0
        t0 = time.monotonic()
        with open(path, "ab", buffering=0) as f:
            while written < total:
                f.write(block)
                written += len(block)
                if written % (len(block) * 200) < len(block):
                    peak_rss = max(peak_rss, rss(proc.pid)[0])
        t_write = time.monotonic() - t0
        want = written // args.size
        deadline = time.monotonic() + args.timeout
        while spooled(work / "spool.db") < want and time.monotonic() < deadline:
            peak_rss = max(peak_rss, rss(proc.pid)[0])
            time.sleep(0.5)
        t_all = time.monotonic() - t0
        got = spooled(work / "spool.db")
        now_rss, hwm = rss(proc.pid)
    finally:
        stop(proc)
    print(f"grow: file grew by {written / 2**20:,.0f} MiB ({want:,} lines of {args.size} B) in {t_write:.0f} s; "
          f"{got:,} lines spooled after {t_all:.0f} s; daemon RSS peak (VmHWM) {hwm / 2**20:.0f} MiB, "
          f"sampled max {peak_rss / 2**20:.0f} MiB, at the end {now_rss / 2**20:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("busy")
    b.add_argument("--lines", type=int, default=1_000_000)
    b.add_argument("--size", type=int, default=100)
    b.add_argument("--timeout", type=float, default=600)
    i = sub.add_parser("idle")
    i.add_argument("--files", type=int, default=10)
    i.add_argument("--seconds", type=float, default=30)
    i.add_argument("--warmup", type=float, default=6)
    g = sub.add_parser("grow")
    g.add_argument("--bytes", default="1GiB")
    g.add_argument("--size", type=int, default=200)
    g.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="spoold-tail-bench-") as tmp:
        {"busy": busy, "idle": idle, "grow": grow}[args.mode](args, Path(tmp))


if __name__ == "__main__":
    main()
