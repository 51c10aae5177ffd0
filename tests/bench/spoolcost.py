"""What one group commit costs the spool's writer thread, and where: CPU (this thread's
time.thread_time, kernel time included: the WAL's writes and fsync) and wall time per commit.

    PYTHONPATH=. python tests/bench/spoolcost.py [--commits 400] [--lines 10,40,4000] \
        [--synchronous full,normal] [--page-size 16384] [--only steady] [--dir /var/tmp]

Each scenario runs ``--commits`` commits (``Spool.commit``, as the committer calls it) on a fresh
spool in a temporary folder (under --dir: put it on the disk that matters) in the steady state
of a running daemon: every commit appends one row of N lines of 100 bytes and deletes the row
appended LAG commits earlier (the flusher sent it), so the file stays small and the WAL is
checkpointed as usual. Variants change one thing at a time (the WAL size that triggers a
checkpoint, no delete, nothing at all, progress records instead of a delete), so the differences
say what each piece costs. Printed per commit: median and mean CPU (us), mean CPU per line (ns),
mean, p99 and longest wall time (ms), and the checkpoints that completed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from spoold.spool import Spool

LAG = 4  # commits between a row's append and its delete
LINE = b"x" * 100


def scenario(folder: Path, name: str, commits: int, lines: int, synchronous: str, page_size: int,
             step: Callable[[Spool, int, list[int]], None], wal_mib: float | None) -> dict[str, float]:
    spool = Spool(folder / f"{name}.db", synchronous, page_size)
    spool.open_writer()
    assert spool._w is not None
    if wal_mib is not None:  # else the spool's own setting
        spool._w.execute(f"PRAGMA wal_autocheckpoint={int(wal_mib * 1024 * 1024) // spool.page_size}")
    ids: list[int] = []
    cpu: list[float] = []
    walls: list[float] = []
    wal = folder / f"{name}.db-wal"
    checkpoints = 0
    last_seq = _wal_sequence(wal)
    for i in range(commits):
        t0, w0 = time.thread_time(), time.perf_counter()
        step(spool, lines, ids)
        cpu.append(time.thread_time() - t0)
        walls.append(time.perf_counter() - w0)
        # The WAL header's checkpoint sequence number goes up each time the WAL starts over
        # after a complete checkpoint.
        seq = _wal_sequence(wal)
        checkpoints += seq != last_seq and i > 0
        last_seq = seq
    spool.close()
    walls.sort()
    return {"cpu_med_us": statistics.median(cpu) * 1e6, "cpu_mean_us": statistics.fmean(cpu) * 1e6,
            "wall_ms": statistics.fmean(walls) * 1e3, "wall_p99_ms": walls[int(len(walls) * 0.99)] * 1e3,
            "wall_max_ms": walls[-1] * 1e3, "checkpoints": checkpoints}


def _wal_sequence(wal: Path) -> int:
    try:
        with open(wal, "rb") as f:
            return int.from_bytes(f.read(16)[12:16], "big")
    except OSError:
        return -1


def steady(spool: Spool, lines: int, ids: list[int]) -> None:
    due = [ids[-LAG]] if len(ids) >= LAG else []
    made = spool.commit([("d", [LINE] * lines, lines * 101)], due, time.time())
    ids.append(made[0][0])


def append_only(spool: Spool, lines: int, ids: list[int]) -> None:
    made = spool.commit([("d", [LINE] * lines, lines * 101)], [], time.time())
    ids.append(made[0][0])


def empty(spool: Spool, lines: int, ids: list[int]) -> None:
    spool.commit([], [], time.time())


def progress_then_delete(spool: Spool, lines: int, ids: list[int]) -> None:
    """Half of the row LAG commits ago recorded as progress, then the rest (deleting it)."""
    made = spool.commit([("d", [LINE] * lines, lines * 101)], [],
                        time.time(), _progress(ids, lines))
    ids.append(made[0][0])


def _progress(ids: list[int], lines: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    if len(ids) >= LAG:
        out[ids[-LAG]] = [lines // 2, lines]
    if len(ids) >= LAG - 1:
        out[ids[-LAG + 1]] = [0, lines // 2]
    return out


# label -> (commit step, WAL size at which SQLite checkpoints in MiB; None: the spool's own).
SCENARIOS: dict[str, tuple[Callable[[Spool, int, list[int]], None], float | None]] = {
    "steady: append + delete": (steady, None),
    "steady, checkpoint at 4 MiB": (steady, 4),
    "steady, checkpoint at 1 MiB": (steady, 1),
    "steady, no checkpoint": (steady, 0),
    "append only": (append_only, None),
    "empty commit": (empty, None),
    "append + progress (half rows)": (progress_then_delete, None),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=400)
    ap.add_argument("--only", default="", help="run the scenarios whose label contains this")
    ap.add_argument("--lines", default="10,40,4000", help="lines per commit, comma-separated")
    ap.add_argument("--synchronous", default="full,normal")
    ap.add_argument("--page-size", type=int, default=16384)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args(argv)
    print(f"{args.commits} commits per scenario, {args.page_size}-byte pages; LAG {LAG}")
    print(f"{'scenario':30} {'lines':>6} {'sync':>6} {'cpu med us':>10} {'cpu mean us':>11} "
          f"{'ns/line':>7} {'wall ms':>7} {'p99 ms':>7} {'max ms':>7} {'ckpts':>5}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        for sync in args.synchronous.split(","):
            for n in (int(x) for x in args.lines.split(",")):
                for label, (step, wal) in SCENARIOS.items():
                    if args.only not in label:
                        continue
                    r = scenario(folder, f"s{len(list(folder.iterdir()))}", args.commits, n, sync,
                                 args.page_size, step, wal)
                    print(f"{label:30} {n:>6} {sync:>6} {r['cpu_med_us']:>10.0f} {r['cpu_mean_us']:>11.0f} "
                          f"{r['cpu_mean_us'] * 1000 / n:>7.0f} {r['wall_ms']:>7.2f} {r['wall_p99_ms']:>7.2f} "
                          f"{r['wall_max_ms']:>7.2f} {r['checkpoints']:>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
