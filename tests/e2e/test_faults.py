"""The fault suite: the real daemon against loopback endpoints that break on purpose.

Each test runs `spoold run` as a subprocess, writes through its Unix socket, injects one kind of
fault, and checks what arrived at the endpoint (tests/tools/fakeaws.py, directly or through
tests/tools/faultproxy.py) against what the daemon acknowledged. Everything listens on 127.0.0.1,
every wait has a deadline, and every fault ends by itself.

Figures (lines acknowledged, lost, duplicated; rates, CPU, RSS) are printed at the end of the
session and, with SPOOLD_FAULT_FIGURES=1, merged into tests/fault-figures.json, from which the
README's table of fault tests is filled.
"""

from __future__ import annotations

import base64
import collections
import datetime
import errno
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.tools.client import DEADLINE, connect_patiently, read_answer, send_lines, wait_until
from tests.tools.daemon import TEST_KEYS, Daemon, integrity, spool_query
from tests.tools.faultproxy import FaultProxy
from tests.tools.proc import PeakRSS, cpu_seconds, rss_bytes

FIGURES_FILE = Path(__file__).resolve().parents[1] / "fault-figures.json"
# Short backoffs, so that recovery after a fault takes well under a second.
FAST_RETRY = {"retry_base": "20ms", "retry_cap": "300ms", "retry_cap_throttle": "100ms"}
MiB = 1024 * 1024


# -- figures ------------------------------------------------------------------------------
class _FiguresReport:
    """A plugin registered for the session: prints the figures in the terminal summary (output
    written from a fixture's teardown would be captured and dropped)."""

    def __init__(self, collected: dict[str, dict[str, Any]]) -> None:
        self.collected = collected

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.collected:
            return
        terminalreporter.write_sep("-", "fault figures")
        for name, fig in self.collected.items():
            terminalreporter.write_line(f"{name}: " + ", ".join(f"{k}={v}" for k, v in fig.items()))


@pytest.fixture(scope="session")
def _all_figures(request: pytest.FixtureRequest) -> Iterator[dict[str, dict[str, Any]]]:
    collected: dict[str, dict[str, Any]] = {}
    request.config.pluginmanager.register(_FiguresReport(collected), "spoold-fault-figures")
    yield collected
    if not collected:
        return
    if os.environ.get("SPOOLD_FAULT_FIGURES") == "1":
        doc: dict[str, Any] = {}
        if FIGURES_FILE.exists():
            try:
                doc = json.loads(FIGURES_FILE.read_text())
            except ValueError:
                doc = {}
        doc.setdefault("tests", {}).update(collected)
        doc["updated"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        doc["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()}
        FIGURES_FILE.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def figures(_all_figures: dict[str, dict[str, Any]], request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A test's figures; it sets ``passed`` last, so a failed test's figures say so."""
    fig: dict[str, Any] = {}
    yield fig
    fig.setdefault("passed", False)
    if request.node.get_closest_marker("xfail") is not None:
        fig["known_bug"] = True  # an xfail: these figures show the bug
    _all_figures[request.node.name] = fig
    print(f"\nfigures {request.node.name}: {json.dumps(fig, sort_keys=True)}")


# -- helpers ------------------------------------------------------------------------------
def arrived(srv: Any, strip: bytes = b"") -> collections.Counter[bytes]:
    """Every record the endpoint stored, counted (a Firehose record ends in its delimiter)."""
    out: collections.Counter[bytes] = collections.Counter()
    for r in srv.all_records():
        data = r.data
        if strip and data.endswith(strip):
            data = data[: -len(strip)]
        out[data] += 1
    return out


def tally(acked: Iterable[bytes], got: collections.Counter[bytes]) -> dict[str, Any]:
    """Acknowledged lines against what arrived: lost, duplicated, and a sample of duplicates."""
    acked_set = set(acked)
    lost = [line for line in acked_set if not got[line]]
    dups = {line: n for line, n in got.items() if n > 1}
    return {
        "acknowledged": len(acked_set),
        "arrived": sum(got.values()),
        "lost": len(lost),
        "duplicated": sum(n - 1 for n in dups.values()),
    } | ({"lost_sample": [x.decode(errors="replace")[:60] for x in sorted(lost)[:5]]} if lost else {}) | (
        {"duplicated_sample": [x.decode(errors="replace")[:60] for x in sorted(dups)[:5]]} if dups else {})


def make_lines(tag: str, n: int, size: int = 0) -> list[bytes]:
    """n unique lines, each padded to ``size`` bytes when given."""
    out = []
    for i in range(n):
        head = f"{tag}-{i:06d}".encode()
        out.append(head + b" " + b"x" * (size - len(head) - 1) if size else head + b" payload")
    return out


def cpu_fraction(pid: int, seconds: float) -> float:
    """Share of one core the process used over the next ``seconds``."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)  # measuring over a span of time is the point here
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def dest_status(daemon: Daemon, name: str = "d0") -> dict[str, Any]:
    return daemon.status()["destinations"][name]  # type: ignore[no-any-return]


def ready_count(daemon: Daemon) -> int:
    return sum(1 for e in daemon.log_events() if e.get("event") == "ready")


def alive(daemon: Daemon) -> bool:
    return daemon.proc is not None and daemon.proc.poll() is None


def set_log_level(daemon: Daemon, level: str) -> None:
    text = daemon.config.read_text()
    assert 'level = "info"' in text
    daemon.config.write_text(text.replace('level = "info"', f'level = "{level}"', 1))


class Writers:
    """Client threads writing unique lines in batches, each batch on its own connection.

    ``acked`` holds the lines of every batch the daemon acknowledged whole; a connection that
    got no answer (daemon killed, socket refused) counts in ``unanswered`` and is retried with
    new lines; any other answer is kept in ``odd`` for the test to look at. Each writer sends at
    most ``max_rate`` lines a second, so that the volume (and the test's time and memory) stays
    modest on a fast machine.
    """

    def __init__(self, sock: Path, n: int, tag: str, *, batch: tuple[int, int] = (1, 200),
                 pad: tuple[int, int] = (0, 60), seed: int = 0, timeout: float = 10.0,
                 max_rate: float = 3000.0) -> None:
        self.sock = sock
        self.batch = batch
        self.max_rate = max_rate
        self.pad = pad
        self.timeout = timeout
        self.acked: list[bytes] = []
        self.ack_times: list[tuple[float, int]] = []
        self.unanswered = 0
        self.odd: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(f"{tag}{w}", random.Random(seed * 1000 + w)),
                                          daemon=True) for w in range(n)]

    def start(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 5)
        assert not any(t.is_alive() for t in self._threads), "a writer is stuck"

    def _run(self, tag: str, rng: random.Random) -> None:
        n = 0
        sent = 0
        began = time.monotonic()
        while not self._stop.is_set():
            ahead = began + sent / self.max_rate - time.monotonic()
            if ahead > 0:
                self._stop.wait(ahead)  # pacing, not waiting for anything to happen
            batch = [f"{tag}-{n}-{i} ".encode() + b"x" * rng.randrange(*self.pad)
                     for i in range(rng.randrange(*self.batch))]
            n += 1
            sent += len(batch)
            try:
                answer = send_lines(self.sock, b"\n".join(batch) + b"\n", timeout=self.timeout)
            except (OSError, ValueError):
                with self._lock:
                    self.unanswered += 1
                self._stop.wait(0.01)  # the daemon is down or restarting: try again shortly
                continue
            now = time.monotonic()
            with self._lock:
                if answer.get("accepted") == len(batch) and not answer.get("rejected"):
                    self.acked.extend(batch)
                    self.ack_times.append((now, len(batch)))
                else:
                    self.odd.append(answer)

    def snapshot(self) -> list[bytes]:
        with self._lock:
            return list(self.acked)

    def lines_between(self, t0: float, t1: float) -> int:
        with self._lock:
            return sum(n for t, n in self.ack_times if t0 <= t < t1)

    def rate(self, t0: float, t1: float) -> float:
        return self.lines_between(t0, t1) / (t1 - t0)


def wait_delivered(srv: Any, acked: Iterable[bytes], strip: bytes = b"", timeout: float = DEADLINE) -> None:
    want = set(acked)
    wait_until(lambda: not (want - set(arrived(srv, strip))), timeout=timeout,
               what=f"every one of {len(want)} acknowledged lines at the endpoint")


def wait_spool_empty(daemon: Daemon, name: str = "d0") -> None:
    # <= 0, then == 0: an accounting that drifts below zero fails at once, not at the deadline.
    wait_until(lambda: dest_status(daemon, name)["spooled_lines"] <= 0, what="an empty spool")
    snap = dest_status(daemon, name)
    assert (snap["spooled_lines"], snap["spooled_bytes"]) == (0, 0), snap


# -- 1. SIGKILL loop ---------------------------------------------------------------------------
def kill_and_restart(daemon: Daemon) -> int:
    """kill -9, then start again without waiting; returns how many runs had logged "ready"."""
    daemon.stop(signal.SIGKILL)
    readies = ready_count(daemon)
    daemon.start(wait=False)
    return readies


def wait_last_restart(daemon: Daemon, writers: Writers, readies: int, acks: int) -> None:
    """Until the last start is ready and the writers have had ``acks`` more answers from it."""
    wait_until(lambda: ready_count(daemon) > readies, what="the last restart")
    seen = len(writers.snapshot())
    wait_until(lambda: len(writers.snapshot()) > seen + acks, what="acks after the last restart")


def delivered_after_kills(daemon: Daemon, fake_aws: Any, writers: Writers,
                          timeout: float = DEADLINE) -> tuple[list[bytes], dict[str, Any]]:
    """Once every acknowledged line arrived and the spool emptied: the acked lines, their tally."""
    acked = writers.snapshot()
    assert not writers.odd, f"answers that did not accept the whole batch: {writers.odd[:3]}"
    wait_delivered(fake_aws, acked, timeout=timeout)
    wait_spool_empty(daemon)  # lines committed but never acknowledged (killed first) go too
    return acked, tally(acked, arrived(fake_aws))


def assert_stops_clean(daemon: Daemon) -> None:
    assert daemon.stop() == 0
    assert integrity(daemon.tmp / "spool.db") == ["ok"]
    assert daemon.spool_rows() == 0


def test_sigkill_loop_loses_no_acknowledged_line(make_daemon, fake_aws, figures):
    """kill -9 at random moments (also during start-up) while 4 clients write; restart each time.
    Every acknowledged line arrives; duplicates (lines in flight at a kill) are counted."""
    rounds = 12
    fake_aws.faults.latency = 0.02  # keeps requests in flight when the kill comes
    fake_aws.faults.record_fail_rate = 0.1
    daemon = make_daemon({"endpoint_url": fake_aws.url, **FAST_RETRY}).start()
    wait_until(lambda: ready_count(daemon) == 1, what="the daemon to be ready")
    rng = random.Random(2024)
    writers = Writers(daemon.sockets()[0], 4, "k", seed=1, timeout=10).start()
    during_startup = 0
    readies = 0  # "ready" lines logged before the current run started
    try:
        for round_ in range(rounds):
            if round_ % 4 == 3:
                # Kill it while it starts (it is ready about 0.4 s after exec on this machine):
                # opening the spool, replacing the stale socket.
                time.sleep(rng.uniform(0.2, 0.45))
            else:
                wait_until(lambda n=readies: ready_count(daemon) > n, what="the daemon to be ready")
                time.sleep(rng.uniform(0.05, 0.7))  # let the writers run for a random while
            readies_now = kill_and_restart(daemon)
            during_startup += readies_now == readies
            readies = readies_now
        wait_last_restart(daemon, writers, readies, 100)
    finally:
        writers.stop()
    acked, fig = delivered_after_kills(daemon, fake_aws, writers)
    figures.update(fig, rounds=rounds, duplicated_per_kill=round(fig["duplicated"] / rounds),
                   kills_during_startup=during_startup,
                   connections_unanswered=writers.unanswered)
    print(f"SIGKILL loop: {fig['duplicated']} duplicated records, e.g. {fig.get('duplicated_sample')}")
    assert fig["lost"] == 0, fig.get("lost_sample")
    assert len(acked) > 2000, "the writers should have got many acknowledgements"
    assert_stops_clean(daemon)
    figures["passed"] = True


# What a kill may duplicate once acceptance progress is recorded, with default settings: the
# requests whose answers it loses (max_in_flight x max_records_per_request), and the records of
# answers already in whose progress the next group commit had not yet written, at most as many
# again (a commit takes less than a round of replies). Measured per kill: 1,372-2,320 typically,
# once 4,248 over 4 kills.
KILL_DUPLICATE_BOUND = 2 * 8 * 500


def test_sigkill_at_full_speed_duplicates_only_what_was_in_flight(make_daemon, fake_aws, figures):
    """Writers send 500-line connections as fast as the daemon acknowledges them, up to 15,000 lines
    a second each (uncapped, a daemon acknowledging 230,000 lines a second took 1.9 million lines
    in 8 s, more than the check of every line gets through in its 120 s); 10% of records
    fail, answers take 5 ms; kill -9 0.5-2 s after each start is ready, for SPOOLD_KILL_LOOP_SECONDS
    (8 by default).
    Every acknowledged line arrives, and a kill duplicates at most what was in flight: the lines
    a partly sent row had already had accepted are not sent again."""
    seconds = float(os.environ.get("SPOOLD_KILL_LOOP_SECONDS", "8"))
    fake_aws.faults.latency = 0.005
    fake_aws.faults.record_fail_rate = 0.1
    daemon = make_daemon({"endpoint_url": fake_aws.url}).start()
    wait_until(lambda: ready_count(daemon) == 1, what="the daemon to be ready")
    rng = random.Random(14)
    writers = Writers(daemon.sockets()[0], 4, "f", batch=(500, 501), pad=(0, 60), seed=3, timeout=10,
                      max_rate=15_000).start()
    kills = kills_when_ready = 0
    readies = 0  # "ready" lines logged before the current run started
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            # Counted from "ready": on a busy machine the start alone can take longer than 2 s.
            wait_until(lambda n=readies: ready_count(daemon) > n, what="the daemon to be ready")
            time.sleep(rng.uniform(0.5, 2.0))  # the kill loop's period, not a wait for an event
            now_ready = kill_and_restart(daemon)
            kills += 1
            kills_when_ready += now_ready > readies
            readies = now_ready
        wait_last_restart(daemon, writers, readies, 1000)
    finally:
        writers.stop()
    _, fig = delivered_after_kills(daemon, fake_aws, writers, timeout=DEADLINE * 2)
    per_kill = fig["duplicated"] / max(1, kills_when_ready)
    figures.update(fig, seconds=seconds, kills=kills, kills_when_ready=kills_when_ready,
                   duplicated_per_kill=round(per_kill), bound_per_kill=KILL_DUPLICATE_BOUND,
                   connections_unanswered=writers.unanswered)
    assert fig["lost"] == 0, fig.get("lost_sample")
    assert kills_when_ready >= 2, "the loop should kill a running daemon a few times"
    assert per_kill <= KILL_DUPLICATE_BOUND, fig
    assert_stops_clean(daemon)
    figures["passed"] = True


# -- 2. outage -----------------------------------------------------------------------------------
# Acknowledgements in each second of the outage, at least.
OUTAGE_ACKS_MIN = 100


def test_outage_keeps_acknowledging_and_delivers_after(make_daemon, fake_aws, figures):
    """503 for a while, then connection refused (the endpoint's port closed) for a while: writers
    keep being acknowledged throughout; everything arrives once the endpoint is back."""
    daemon = make_daemon({"endpoint_url": fake_aws.url, **FAST_RETRY}).start()
    writers = Writers(daemon.sockets()[0], 3, "o", batch=(20, 80), seed=2, max_rate=5000).start()
    pid = daemon.proc.pid
    try:
        t0 = time.monotonic()
        cpu_before = cpu_fraction(pid, 1.5)  # normal operation, for the reference rate
        t1 = time.monotonic()
        fake_aws.faults.down = True
        wait_until(lambda: any(r.status == 503 for r in fake_aws.requests), what="a 503")
        cpu_503 = cpu_fraction(pid, 2.0)  # the outage lasts
        t2 = time.monotonic()
        fake_aws.stop()
        cpu_refused = cpu_fraction(pid, 2.0)  # the outage lasts, now with connections refused
        t3 = time.monotonic()
        assert alive(daemon)
        snap = dest_status(daemon)
        fake_aws.faults.down = False
        fake_aws.start()
        time.sleep(0.5)  # writers keep going while the backlog drains
    finally:
        writers.stop()
    assert not writers.odd and writers.unanswered == 0
    windows = [writers.lines_between(t, t + 1.0) for t in (t1, t1 + 1, t2, t2 + 1)]
    figures.update(acks_per_s_before=round(writers.rate(t0, t1)), acks_per_s_503=round(writers.rate(t1, t2)),
                   acks_per_s_refused=round(writers.rate(t2, t3)), backlog_at_recovery=snap["spooled_lines"],
                   daemon_cpu_before=round(cpu_before, 2), daemon_cpu_503=round(cpu_503, 2),
                   daemon_cpu_refused=round(cpu_refused, 2), acks_min_per_s_outage=min(windows))
    # Writers offer up to 15k lines/s; 100 a second is far below any rate seen on a busy machine.
    assert min(windows) >= OUTAGE_ACKS_MIN, f"acknowledgements slowed or stopped: per-second counts {windows}"
    assert snap["failures"].get("ConnectionError", 0) > 0, snap["failures"]
    assert snap["spooled_lines"] > 0
    acked = writers.snapshot()
    wait_delivered(fake_aws, acked)
    fig = tally(acked, arrived(fake_aws))
    figures.update(fig)
    assert fig["lost"] == 0 and fig["duplicated"] == 0
    assert daemon.stop() == 0 and daemon.spool_rows() == 0
    figures["passed"] = True


# -- 3. throttling and partial failures ----------------------------------------------------------
def test_throttling_and_partial_failures_deliver_exactly_once(make_daemon, fake_aws, figures):
    """30% of requests throttled, 30% of records failed: every line arrives exactly once, and only
    the failed entries (or the whole throttled request) were offered again."""
    fake_aws.faults.throttle_rate = 0.3
    fake_aws.faults.record_fail_rate = 0.3
    daemon = make_daemon({"endpoint_url": fake_aws.url, "max_records_per_request": 100, **FAST_RETRY}).start()
    sock = daemon.sockets()[0]
    per_writer = [make_lines(f"t{w}", 1000) for w in range(3)]

    answers: list[dict[str, Any]] = []

    def write(lines: list[bytes]) -> None:
        for i in range(0, len(lines), 100):
            answers.append(send_lines(sock, b"\n".join(lines[i:i + 100])))

    threads = [threading.Thread(target=write, args=(lines,)) for lines in per_writer]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DEADLINE)
    assert answers == [{"accepted": 100, "rejected": 0}] * 30
    sent = [line for lines in per_writer for line in lines]
    wait_delivered(fake_aws, sent)
    got = arrived(fake_aws)
    fig = tally(sent, got)
    puts = [r for r in fake_aws.requests if r.target.endswith("PutRecords")]
    throttled = [r for r in puts if r.status == 400]
    failed_records = sum(r.n_failed for r in puts)
    offered = sum(r.n_records for r in puts)
    figures.update(fig, requests=len(puts), throttled_requests=len(throttled), failed_records=failed_records)
    assert fig["lost"] == 0 and fig["duplicated"] == 0 and set(got) == set(sent)
    assert len(throttled) > 5 and failed_records > 500
    assert offered == len(sent) + failed_records + sum(r.n_records for r in throttled), "no needless resend"
    assert dest_status(daemon)["lines_sent"] == len(sent)
    assert daemon.stop() == 0 and daemon.spool_rows() == 0
    figures["passed"] = True


# -- 4. spool full -------------------------------------------------------------------------------
LINE_4K = 4095  # with its newline, 4096 bytes count against max_bytes: 256 fit in 1 MiB


def _one_line_each(sock: Path, lines: list[bytes], threads: int = 4) -> list[dict[str, Any]]:
    """Send each line on its own connection (so each answer says that line's fate), in order
    within each of ``threads`` interleaved streams; returns the answers by line."""
    answers: list[dict[str, Any]] = [{} for _ in lines]

    def run(k: int) -> None:
        for i in range(k, len(lines), threads):
            answers[i] = send_lines(sock, lines[i] + b"\n")

    pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=DEADLINE)
    assert all(answers), "every connection was answered"
    return answers


def test_spool_full_reject_counts_exactly(make_daemon, fake_aws, figures):
    fake_aws.faults.down = True
    daemon = make_daemon({"endpoint_url": fake_aws.url, **FAST_RETRY},
                         spool={"max_bytes": "1MiB", "when_full": "reject"}).start()
    lines = make_lines("r", 400, LINE_4K)
    answers = _one_line_each(daemon.sockets()[0], lines)
    accepted = [line for line, a in zip(lines, answers) if a == {"accepted": 1, "rejected": 0}]
    rejected = [line for line, a in zip(lines, answers)
                if a == {"accepted": 0, "rejected": 1, "reasons": {"spool full": 1}}]
    assert len(accepted) + len(rejected) == len(lines), [a for a in answers if a["accepted"] + a["rejected"] != 1]
    assert len(accepted) == MiB // (LINE_4K + 1) == 256, "exactly what fits in max_bytes"
    snap = dest_status(daemon)
    assert snap["rejected"] == {"spool full": len(rejected)}
    assert snap["spooled_bytes"] <= MiB
    fake_aws.faults.down = False
    wait_delivered(fake_aws, accepted)
    wait_spool_empty(daemon)  # nothing else can arrive now
    got = arrived(fake_aws)
    fig = tally(accepted, got)
    figures.update(fig, sent=len(lines), rejected=len(rejected))
    assert fig["lost"] == 0 and fig["duplicated"] == 0
    assert not any(got[line] for line in rejected), "a rejected line arrived"
    logged = [e for e in daemon.log_events() if e.get("event") == "spool_full_rejected"]
    assert logged and sum(e["lines"] for e in logged) <= len(rejected), "rejections are logged, rate-limited"
    # Space again: new lines are accepted.
    assert send_lines(daemon.sockets()[0], b"after\n") == {"accepted": 1, "rejected": 0}
    assert daemon.stop() == 0
    figures["passed"] = True


def test_spool_full_drop_oldest_stays_within_max_bytes(make_daemon, fake_aws, figures):
    fake_aws.faults.down = True
    daemon = make_daemon({"endpoint_url": fake_aws.url, **FAST_RETRY},
                         spool={"max_bytes": "1MiB", "when_full": "drop_oldest"}).start()
    lines = make_lines("p", 400, LINE_4K)
    answers = _one_line_each(daemon.sockets()[0], lines, threads=1)
    assert all(a == {"accepted": 1, "rejected": 0} for a in answers)
    snap = dest_status(daemon)
    figures.update(sent=len(lines), dropped=snap["dropped"], spooled_bytes=snap["spooled_bytes"])
    assert snap["spooled_bytes"] <= MiB, f"the spool holds {snap['spooled_bytes']} bytes, over max_bytes"
    fake_aws.faults.down = False
    wait_spool_empty(daemon)
    got = arrived(fake_aws)
    missing = [i for i, line in enumerate(lines) if not got[line]]
    figures.update(tally([line for line in lines if got[line]], got), missing=len(missing))
    assert snap["dropped"] == len(missing), "status counts exactly the lines lost"
    assert max(got.values()) == 1
    # Oldest first, except rows a flusher is reading or sending at the moment of a drop: those
    # are spared (they may be delivered), and the next oldest go instead.
    keep = MiB // (LINE_4K + 1)
    assert len(missing) == len(lines) - keep, "exactly what does not fit is dropped"
    figures.update(oldest_kept=min(i for i, line in enumerate(lines) if got[line]),
                   newest_dropped=max(missing))
    # Known limit: which lines go is oldest-first only among rows no flusher is reading or
    # sending at that moment; under an outage with fast retries, some newer rows can go instead
    # (see the issue note). The bound and the counts above hold exactly.
    assert daemon.stop() == 0
    figures["passed"] = True


def test_spool_full_drop_oldest_counts_every_lost_line(make_daemon, fake_aws, figures):
    """What holds under drop_oldest today (the xfail above is the bound that does not): every
    line is either delivered once or counted as dropped, never both, never neither, and the
    newest line is kept. More than the flusher's 12 MiB lease is written, so rows on disk exist
    to drop. (Before the fix in committer.py/spool.py, a drop raced with the commit that was
    about to offer its rows to the flusher: lines were both dropped and sent, and the spool's
    line count went negative, which disabled the limit.)"""
    fake_aws.faults.down = True
    daemon = make_daemon({"endpoint_url": fake_aws.url, **FAST_RETRY},
                         spool={"max_bytes": "1MiB", "when_full": "drop_oldest"}).start()
    lines = make_lines("q", 240, 64 * 1024 - 1)  # 15 MiB
    for i in range(0, len(lines), 10):
        assert send_lines(daemon.sockets()[0], b"\n".join(lines[i:i + 10])) == {"accepted": 10, "rejected": 0}
    snap = dest_status(daemon)
    fake_aws.faults.down = False
    wait_spool_empty(daemon)
    after = dest_status(daemon)
    got = arrived(fake_aws)
    missing = [i for i, line in enumerate(lines) if not got[line]]
    kept = [line for line in lines if got[line]]
    figures.update(tally(kept, got), sent=len(lines), dropped=snap["dropped"],
                   spooled_bytes_at_peak=snap["spooled_bytes"])
    assert snap["dropped"] > 0
    assert snap["dropped"] == len(missing), "status counts exactly the lines lost"
    assert after["lines_sent"] + after["dropped"] == len(lines)
    assert (after["spooled_lines"], after["spooled_bytes"]) == (0, 0), "the spool's accounting drifted"
    assert max(got.values()) == 1
    assert got[lines[-1]] == 1, "the newest line is kept"
    assert any(e.get("event") == "spool_full_dropped_oldest" for e in daemon.log_events())
    assert daemon.stop() == 0 and daemon.spool_rows() == 0
    figures["passed"] = True


def test_spool_full_block_holds_writer_until_space(make_daemon, fake_aws, figures):
    fake_aws.faults.down = True
    daemon = make_daemon({"endpoint_url": fake_aws.url, **FAST_RETRY},
                         spool={"max_bytes": "1MiB", "when_full": "block"}).start()
    sock = daemon.sockets()[0]
    first = make_lines("b", 250, LINE_4K)  # 1,024,000 bytes: fits
    assert send_lines(sock, b"\n".join(first)) == {"accepted": 250, "rejected": 0}
    more = make_lines("m", 20, LINE_4K)  # does not fit
    answer: dict[str, Any] = {}
    blocked_since = time.monotonic()

    def blocked_writer() -> None:
        answer.update(send_lines(sock, b"\n".join(more), timeout=DEADLINE))
        answer["after"] = time.monotonic() - blocked_since

    t = threading.Thread(target=blocked_writer)
    t.start()
    time.sleep(2.0)  # the endpoint stays down this long: the writer must still be waiting
    assert t.is_alive() and not answer, f"the writer was answered while the spool was full: {answer}"
    assert alive(daemon)
    snap = dest_status(daemon)
    assert snap["spooled_bytes"] <= MiB
    fake_aws.faults.down = False
    t.join(timeout=DEADLINE)
    assert answer.get("accepted") == 20 and answer.get("rejected") == 0, answer
    wait_delivered(fake_aws, first + more)
    fig = tally(first + more, arrived(fake_aws))
    figures.update(fig, blocked_s=round(answer["after"], 2), spooled_bytes_while_blocked=snap["spooled_bytes"])
    assert fig["lost"] == 0 and fig["duplicated"] == 0
    assert daemon.stop() == 0 and daemon.spool_rows() == 0
    figures["passed"] = True


# -- 5. disk full --------------------------------------------------------------------------------
class DiskFault:
    """Takes the spool's disk space away and gives it back."""

    how = ""

    def place(self, tmp: Path) -> Path:
        raise NotImplementedError

    def fill(self, daemon: Daemon) -> None:
        raise NotImplementedError

    def free(self, daemon: Daemon) -> None:
        raise NotImplementedError


class SmallTmpfs(DiskFault):
    """A 2 MiB tmpfs holds the spool; a filler file takes every free byte."""

    how = "2 MiB tmpfs filled by a file"

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.filler = mnt / "filler"

    def place(self, tmp: Path) -> Path:
        return self.mnt / "spool.db"

    def fill(self, daemon: Daemon) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for size in (64 * 1024, 4096, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        break
        finally:
            os.close(fd)
        assert os.statvfs(self.mnt).f_bavail == 0

    def free(self, daemon: Daemon) -> None:
        self.filler.unlink()


class FileSizeLimit(DiskFault):
    """RLIMIT_FSIZE of the running daemon (prlimit) just above its files' sizes: growing the WAL
    fails with EFBIG, which SQLite reports like a full disk. Works without mount privileges."""

    how = "RLIMIT_FSIZE lowered on the running daemon (prlimit)"
    soft = resource.RLIM_INFINITY

    def place(self, tmp: Path) -> Path:
        return tmp / "spool.db"

    def fill(self, daemon: Daemon) -> None:
        assert daemon.proc is not None
        files = [daemon.tmp / n for n in ("spool.db", "spool.db-wal", "spool.db-shm")] + [daemon.log_path]
        top = max(p.stat().st_size for p in files if p.exists())
        self.soft, hard = resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (top + 64 * 1024, hard))

    def free(self, daemon: Daemon) -> None:
        assert daemon.proc is not None
        _, hard = resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (self.soft, hard))


@pytest.fixture(params=["tmpfs", "fsize"])
def disk_fault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DiskFault]:
    if request.param == "fsize":
        yield FileSizeLimit()
        return
    if shutil.which("mount") is None:
        pytest.skip("no mount command; the fsize variant injects the same error without mounting")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "the fsize variant injects the same error without mounting")
    try:
        yield SmallTmpfs(mnt)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_rejects_with_reason_and_recovers(disk_fault, make_daemon, fake_aws, tmp_path, figures):
    spool_path = disk_fault.place(tmp_path)
    daemon = make_daemon({"endpoint_url": fake_aws.url, **FAST_RETRY},
                         spool={"path": str(spool_path)},
                         extra=f'[control]\nsocket = "{tmp_path / "control.sock"}"\n').start()
    sock = daemon.sockets()[0]
    before = make_lines("before", 100)
    assert send_lines(sock, b"\n".join(before))["accepted"] == 100
    wait_delivered(fake_aws, before)
    disk_fault.fill(daemon)
    # Each batch is read in pieces of up to 64 KiB, each committed (or refused) on its own: a
    # batch may be partly accepted. Which lines were is not said, but how many is.
    batches: list[tuple[list[bytes], dict[str, Any]]] = []

    def send_batch(tag: str) -> dict[str, Any]:
        lines = make_lines(f"{tag}{len(batches)}", 200, 500)  # 100 KB: more than the WAL has room for
        answer = send_lines(sock, b"\n".join(lines))
        assert answer["accepted"] + answer["rejected"] == len(lines), answer
        batches.append((lines, answer))
        return answer

    wait_until(lambda: send_batch("full")["rejected"], timeout=20, what="a rejection while the disk is full")
    bad = batches[-1][1]
    (reason,) = bad["reasons"]
    assert "spool write failed" in reason and ("disk is full" in reason or "I/O" in reason), reason
    assert alive(daemon)
    assert send_batch("still-full")["rejected"] > 0
    snap = daemon.status()
    assert snap["spool"]["write_errors"] > 0 and snap["spool"]["last_error"]
    assert any(e.get("event") == "spool_write_failed" for e in daemon.log_events())
    disk_fault.free(daemon)
    wait_until(lambda: send_batch("after")["accepted"] == 200, timeout=20, what="acceptance once space is back")
    accepted = before + [line for lines, answer in batches if answer["rejected"] == 0 for line in lines]
    wait_delivered(fake_aws, accepted)
    wait_spool_empty(daemon)  # every committed line has been sent: nothing else can arrive
    got = arrived(fake_aws)
    fig = tally(accepted, got)
    partly = [(sum(1 for line in lines if got[line]), answer["accepted"]) for lines, answer in batches
              if answer["rejected"]]
    figures.update(fig, fault=disk_fault.how, reason=reason.rsplit("failed: ", 1)[-1], rejected_batches=len(partly),
                   lines_rejected=sum(a["rejected"] for _, a in batches))
    assert fig["lost"] == 0 and fig["duplicated"] == 0
    assert all(n_arrived == n_accepted for n_arrived, n_accepted in partly), (
        f"of partly refused batches, (arrived, accepted): {partly}")
    assert alive(daemon) and daemon.stop() == 0
    assert integrity(spool_path) == ["ok"]
    assert spool_query(spool_path, "SELECT count(*) FROM chunks") == [(0,)]
    figures["passed"] = True


# -- 6. malformed input on the socket -----------------------------------------------------------
FUZZ_MAX_LINE = 3000


def _expected_lines(payload: bytes) -> tuple[list[bytes], int]:
    """What the daemon must keep of a connection's bytes (an independent oracle of the framing):
    every non-empty line up to the limit, the last one even without its newline; and how many
    lines are too long."""
    parts = payload.split(b"\n")
    kept = [p for p in parts if p and len(p) <= FUZZ_MAX_LINE]
    return kept, sum(1 for p in parts if len(p) > FUZZ_MAX_LINE)


def _fuzz_payload(rng: random.Random) -> bytes:
    kind = rng.choice(["random", "random", "text", "huge", "newlines", "mixed"])
    if kind == "random":
        return rng.randbytes(rng.randrange(0, 20000))
    if kind == "text":
        return b"\n".join(b"fz-%d-%s" % (rng.randrange(10**9), rng.randbytes(8).hex().encode())
                          for _ in range(rng.randrange(1, 50)))
    if kind == "huge":
        tail = rng.choice([b"", b"\nend-%d" % rng.randrange(10**9)])
        return rng.randbytes(8).hex().encode() * (FUZZ_MAX_LINE // 4) + tail
    if kind == "newlines":
        return b"\n" * rng.randrange(1, 5000)
    return b"".join(rng.choice([b"\n", b"\0", b"\r\n", b"\xff" * 100, rng.randbytes(50)]) for _ in range(200))


def test_socket_fuzz_keeps_daemon_up_and_every_line(make_daemon, fake_aws, figures):
    """Random bytes and abrupt disconnects from many connections, while well-behaved writers
    write: the daemon stays up; every line of the writers arrives, and of the fuzzing
    connections exactly the lines the framing rules keep.

    On a Unix stream socket a close (with or without SO_LINGER 0, which AF_UNIX ignores: there
    is no RST) reaches the daemon as an end of input after every byte sent, so even a cut-off
    last line counts, as the README says of a last line without its newline."""
    daemon = make_daemon({"endpoint_url": fake_aws.url, "max_line_bytes": FUZZ_MAX_LINE, **FAST_RETRY}).start()
    sock = str(daemon.sockets()[0])
    writers = Writers(daemon.sockets()[0], 2, "good", batch=(1, 50), seed=6).start()
    expected: collections.Counter[bytes] = collections.Counter()
    lock = threading.Lock()
    endings: collections.Counter[str] = collections.Counter()
    problems: list[str] = []

    def fuzzer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            payload = _fuzz_payload(rng)
            ending = rng.choice(["answer", "close", "linger0", "cut", "connect_only", "never_read"])
            if ending == "connect_only":
                payload = b""
            if ending == "cut":
                payload = payload[: rng.randrange(0, len(payload) + 1)]
            keep, too_long = _expected_lines(payload)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(DEADLINE)
            try:
                s.connect(sock)
                if ending == "linger0":
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                for i in range(0, len(payload), 4096):
                    s.sendall(payload[i:i + 4096])
                if ending in ("answer", "never_read"):
                    s.shutdown(socket.SHUT_WR)
                if ending == "answer":
                    answer = json.loads(read_answer(s))
                    want = {"accepted": len(keep), "rejected": too_long}
                    if too_long:
                        want["reasons"] = {"line too long": too_long}
                    if answer != want:
                        problems.append(f"answer {answer} for {want}")
            finally:
                s.close()
            with lock:
                expected.update(keep)
                endings[ending] += 1

    fuzzers = [threading.Thread(target=fuzzer, args=(seed,)) for seed in range(4)]
    try:
        for t in fuzzers:
            t.start()
        for t in fuzzers:
            t.join(timeout=DEADLINE)
        assert not any(t.is_alive() for t in fuzzers)
    finally:
        writers.stop()
    assert alive(daemon), daemon.log()[-2000:]
    assert sum(endings.values()) == 4 * 60, "a fuzzing client died"
    assert not problems, problems[:5]
    assert not writers.odd and writers.unanswered == 0
    good = writers.snapshot()
    wait_delivered(fake_aws, good)
    wait_until(lambda: sum(arrived(fake_aws).values()) >= len(good) + sum(expected.values()),
               what="the fuzzing connections' lines")
    got = arrived(fake_aws)
    fig = tally(good, collections.Counter({line: got[line] for line in good}))
    fuzz_got = got - collections.Counter(good)
    figures.update(fig, fuzz_connections=sum(endings.values()), fuzz_lines_expected=sum(expected.values()),
                   fuzz_lines_arrived=sum(fuzz_got.values()), endings=dict(endings))
    assert fig["lost"] == 0 and fig["duplicated"] == 0
    assert fuzz_got == expected, (
        f"{sum((expected - fuzz_got).values())} fuzz lines missing, {sum((fuzz_got - expected).values())} unexpected")
    assert send_lines(sock, b"still alive\n") == {"accepted": 1, "rejected": 0}
    assert daemon.stop() == 0
    figures["passed"] = True


# -- 7. malformed service answers ---------------------------------------------------------------
def _malformed_replies(kind: str, n: int) -> list[tuple[int, bytes]]:
    """Replies to an n-record request that must not mark any record as sent."""
    if kind == "firehose":
        items, ok, count = "RequestResponses", "RecordId", "FailedPutCount"
    else:
        items, ok, count = "Records", "SequenceNumber", "FailedRecordCount"

    def good(i: int) -> dict[str, Any]:
        return {ok: f"id-{i}"} if kind == "firehose" else {ok: str(10**20 + i), "ShardId": "shardId-000000000000"}

    def doc(results: Any, failed: Any = 0) -> bytes:
        return json.dumps({count: failed, items: results}).encode()

    valid = doc([good(i) for i in range(n)])
    failing = {"ErrorCode": "InternalFailure", "ErrorMessage": "x"}
    return [
        (200, doc([good(i) for i in range(n - 1)])),  # one result short
        (200, doc([good(i) for i in range(n + 1)])),  # one result too many
        (200, doc([good(i) for i in range(n)], failed=1)),  # says one failed, none did
        (200, doc([failing] + [good(i) for i in range(n - 1)], failed=0)),  # says none failed, one did
        (200, doc([good(i) for i in range(n)], failed="0")),  # a count that is not a number
        (200, doc([{ok: 12345 + i} for i in range(n)])),  # ids of the wrong type
        (200, doc([{ok: ""} for _ in range(n)])),  # empty ids
        (200, doc([None] * n)),  # results that are not objects
        (200, json.dumps({count: 0, items: {"0": good(0)}}).encode()),  # results not a list
        (200, json.dumps({count: 0}).encode()),  # no results at all
        (200, valid[: len(valid) // 2]),  # truncated JSON
        (200, b"<html><body><h1>200 OK</h1>Welcome to nginx!</body></html>"),  # an HTML 200
        (200, b""),  # an empty body
        (200, b"null"),
        (200, b'"ok"'),
        (503, b"<html>Service Unavailable</html>"),
        (400, b""),
    ]


@pytest.mark.parametrize("sender", ["inline", "process"])
@pytest.mark.parametrize("kind", ["kinesis", "firehose"])
def test_malformed_service_answers_never_mark_lines_sent(kind, sender, make_daemon, fake_aws, figures):
    batch = 10
    replies = _malformed_replies(kind, batch)
    fake_aws.faults.scripted.extend(replies)
    # A long linger: on a busy machine the 50 lines can reach the flusher in two reads, and a
    # request of fewer than 10 records would meet a reply written for 10.
    dest = {"endpoint_url": fake_aws.url, "kind": kind, "max_records_per_request": batch, "linger": "2s",
            **FAST_RETRY}
    daemon = make_daemon(dest, extra=f'[daemon]\nsender = "{sender}"\n').start()
    lines = make_lines(f"mal-{kind}", 50)  # one connection: every request is exactly 10 records
    assert send_lines(daemon.sockets()[0], b"\n".join(lines)) == {"accepted": 50, "rejected": 0}
    strip = b"\n" if kind == "firehose" else b""
    wait_delivered(fake_aws, lines, strip)
    assert not fake_aws.faults.scripted, "every malformed reply was used"
    puts = [r for r in fake_aws.requests if r.error == "scripted"]
    assert len(puts) == len(replies) and all(r.n_records == batch for r in puts), [r.n_records for r in puts]
    got = arrived(fake_aws, strip)
    fig = tally(lines, got)
    snap = dest_status(daemon)
    figures.update(fig, malformed_replies=len(replies), failures=snap["failures"])
    assert fig["lost"] == 0 and fig["duplicated"] == 0
    assert snap["lines_sent"] == len(lines), "a malformed reply was counted as sent"
    assert snap["failures"].get("MalformedReply", 0) >= len(replies) - 2
    assert daemon.stop() == 0 and daemon.spool_rows() == 0
    figures["passed"] = True


# -- 8. network faults through a TCP proxy -------------------------------------------------------
REQUEST_TIMEOUT = 2.0
# A request that gets no complete answer is abandoned by then (httpx timeout, then trio's bound).
TIMEOUT_BOUND = REQUEST_TIMEOUT + 1.0 + 1.5  # + 1 s: the flusher's fail_after; + 1.5 s slack
# Measured 0.3% to 2.0% of a core (2026-12-03, a busy 2-core machine); CPU time is the
# daemon's own, so other tenants' load barely moves it.
IDLE_CPU_MAX = 0.05

NETWORK_FAULTS: dict[str, Callable[[FaultProxy, Any], None]] = {
    "reset_mid_response": lambda proxy, srv: proxy.set(reset=True, reset_after=60),
    "latency_5s": lambda proxy, srv: proxy.set(latency=5.0),
    "bandwidth_1KBps": lambda proxy, srv: proxy.set(bandwidth=1024),
    "hang_after_accept": lambda proxy, srv: proxy.set(hang=True),
    "connection_refused": lambda proxy, srv: proxy.refuse(),
    "http_503": lambda proxy, srv: setattr(srv.faults, "down", True),
}


def _heal(fault: str, proxy: FaultProxy, srv: Any) -> None:
    if fault == "connection_refused":
        proxy.accept_again()
    srv.faults.down = False
    proxy.set()


@pytest.mark.parametrize("fault", list(NETWORK_FAULTS))
def test_network_fault_is_bounded_and_loses_nothing(fault, make_daemon, fake_aws, figures):
    """Between daemon and endpoint: the fault lasts a few seconds while lines are written, then
    a few more while the daemon has nothing new to do (its CPU is measured then); then the
    network heals and every acknowledged line arrives."""
    with FaultProxy(fake_aws.port) as proxy:
        dest = {"endpoint_url": proxy.url, "request_timeout": f"{REQUEST_TIMEOUT}s", "max_records_per_request": 5,
                "retry_base": "50ms", "retry_cap": "1s", "retry_cap_throttle": "1s"}
        daemon = make_daemon(dest).start()
        sock = daemon.sockets()[0]
        warm = make_lines(f"{fault}-warm", 20)
        assert send_lines(sock, b"\n".join(warm))["accepted"] == 20
        wait_delivered(fake_aws, warm)
        # The endpoint has them; wait until the daemon has their answers too, or a fault that
        # cuts the proxy's connections could lose an answer and make a (legitimate) duplicate.
        wait_until(lambda: dest_status(daemon)["lines_sent"] >= len(warm), what="the warm-up answers")
        base_records = len(fake_aws.all_records())
        NETWORK_FAULTS[fault](proxy, fake_aws)
        fault_start = time.monotonic()
        during = make_lines(f"{fault}-during", 60)
        for i in range(0, 60, 15):
            assert send_lines(sock, b"\n".join(during[i:i + 15]), timeout=10)["accepted"] == 15
            time.sleep(0.5)  # a steady trickle while the fault lasts
        time.sleep(max(0.0, (5.5 if fault == "latency_5s" else 3.0) - (time.monotonic() - fault_start)))
        cpu = cpu_fraction(daemon.proc.pid, 3.0)  # nothing new to send: only retries should run
        fault_end = time.monotonic()
        arrived_during = len(fake_aws.all_records()) - base_records
        conns = [c for c in proxy.conns if fault_start <= c.opened < fault_end - TIMEOUT_BOUND]
        held = [c.held if c.held is not None else fault_end - c.opened for c in conns]  # still open: so far
        up_rate = sum(c.bytes_up for c in conns) / (fault_end - fault_start) / max(1, len(conns))
        _heal(fault, proxy, fake_aws)
        after = make_lines(f"{fault}-after", 20)
        assert send_lines(sock, b"\n".join(after))["accepted"] == 20
        acked = warm + during + after
        wait_delivered(fake_aws, acked)
        snap = dest_status(daemon)
        fig = tally(acked, arrived(fake_aws))
        figures.update(fig, cpu_share_during_fault=round(cpu, 3), arrived_during_fault=arrived_during,
                       connections_during_fault=len(conns), longest_connection_s=round(max(held, default=0.0), 2),
                       bytes_per_s_per_connection=round(up_rate), failures=snap["failures"])
        assert alive(daemon)
        assert fig["lost"] == 0
        assert cpu < IDLE_CPU_MAX, f"busy while the endpoint is unreachable: {cpu:.0%} of a core"
        if fault in ("hang_after_accept", "latency_5s"):
            assert conns, "the daemon should have tried during the fault"
            assert all(h <= TIMEOUT_BOUND for h in held), f"requests held open for {held}"
            assert snap["failures"].get("Timeout", 0) > 0, snap["failures"]
        if fault in ("hang_after_accept", "connection_refused", "http_503"):
            assert arrived_during == 0
            assert fig["duplicated"] == 0, "nothing reached the service during the fault: no duplicates"
        if fault == "reset_mid_response":
            assert any(c.reset_sent for c in conns)
        if fault == "bandwidth_1KBps":
            assert conns and 0 < up_rate <= 1024 * 1.2, f"the proxy did not limit the bandwidth: {up_rate:.0f} B/s"
        assert daemon.stop() == 0 and daemon.spool_rows() == 0
    figures["passed"] = True


# -- 9. hostile clients -------------------------------------------------------------------------
HOSTILE_CONNECTIONS = 1000
RSS_MAX = 200 * MiB


@pytest.fixture
def enough_fds() -> Iterator[None]:
    """Room for the hostile connections in this process and in the daemon (which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = HOSTILE_CONNECTIONS + 500
    if soft >= need:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_hostile_clients_bounded_memory_others_served(enough_fds, make_daemon, fake_aws, figures):
    """1,000 connections that hold partial or oversized lines, a client sending one byte a
    second, a client that never reads its answer: RSS stays bounded and others get their acks."""
    daemon = make_daemon({"endpoint_url": fake_aws.url, "max_line_bytes": 64 * 1024, **FAST_RETRY}).start()
    sock = str(daemon.sockets()[0])
    pid = daemon.proc.pid
    rss = PeakRSS(pid).start()
    hostile: list[socket.socket] = []
    counts = collections.Counter[str]()
    held_lines: list[bytes] = []
    slow_answer: dict[str, Any] = {}
    latencies: list[float] = []
    try:
        for i in range(HOSTILE_CONNECTIONS):
            s = connect_patiently(sock, on_busy=lambda: counts.update(["backlog_full"]))
            hostile.append(s)
            if i % 3 == 0:
                s.sendall(b"o" * (200 * 1024))  # an oversized line, never ended: discarded as it comes
            elif i % 3 == 1:
                line = f"held-{i:04d} ".encode() + b"h" * (40 * 1024)  # a partial line, kept in memory
                held_lines.append(line)
                s.sendall(line)
        wait_until(lambda: dest_status(daemon)["connections"] >= HOSTILE_CONNECTIONS, what="1,000 connections served")

        def slow_client() -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(DEADLINE)
            try:
                s.connect(sock)
                for byte in b"slow\n":
                    s.sendall(bytes([byte]))
                    time.sleep(1.0)  # one byte a second
                s.shutdown(socket.SHUT_WR)
                slow_answer.update(json.loads(s.recv(4096)))
            finally:
                s.close()

        slow = threading.Thread(target=slow_client)
        slow.start()
        never_reads = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hostile.append(never_reads)
        never_read_lines = make_lines("never-read", 100)
        never_reads.connect(sock)
        never_reads.sendall(b"\n".join(never_read_lines))
        never_reads.shutdown(socket.SHUT_WR)  # and never reads the answer
        good: list[bytes] = []
        for k in range(20):
            batch = make_lines(f"good{k}", 10)
            t0 = time.monotonic()
            assert send_lines(sock, b"\n".join(batch), timeout=10) == {"accepted": 10, "rejected": 0}
            latencies.append(time.monotonic() - t0)
            good.extend(batch)
            time.sleep(0.2)  # spread over the slow client's life
        slow.join(timeout=DEADLINE)
        rss_loaded = rss_bytes(pid)
    finally:
        for s in hostile:
            s.close()  # an end of input: the held partial lines count
        rss.stop()
    assert slow_answer == {"accepted": 1, "rejected": 0}
    wait_delivered(fake_aws, good + never_read_lines + held_lines + [b"slow"])
    assert alive(daemon)
    fig = tally(good + never_read_lines + held_lines + [b"slow"], arrived(fake_aws))
    figures.update(fig, connections=HOSTILE_CONNECTIONS, rss_before_mib=round(rss.before / MiB, 1),
                   rss_peak_mib=round(rss.peak / MiB, 1), rss_loaded_mib=round(rss_loaded / MiB, 1),
                   ack_latency_max_s=round(max(latencies), 3),
                   ack_latency_median_s=round(sorted(latencies)[len(latencies) // 2], 3),
                   connects_retried_backlog_full=counts["backlog_full"])
    assert fig["lost"] == 0 and fig["duplicated"] == 0
    assert rss.peak < RSS_MAX, f"RSS reached {rss.peak / MiB:.0f} MiB"
    assert max(latencies) < 2.0, f"acks were slow under load: {latencies}"
    assert daemon.stop() == 0
    figures["passed"] = True


# -- 10. logs under DEBUG ------------------------------------------------------------------------
def test_debug_logs_hold_no_credentials_or_record_contents(make_daemon, fake_aws, figures):
    fake_aws.faults.record_fail_rate = 0.3
    fake_aws.faults.scripted.extend([
        (400, b'{"__type": "ValidationException", "message": "1 validation error"}'),
        (200, b"not json"),
        (500, b'{"__type": "InternalFailure"}'),
    ])
    daemon = make_daemon({"endpoint_url": fake_aws.url, "max_line_bytes": 2000, **FAST_RETRY},
                         {"name": "d1", "endpoint_url": fake_aws.url, "stream": "missing-stream",
                          "max_line_bytes": 2000, **FAST_RETRY}, extra='[daemon]\nshutdown_grace = "500ms"\n')
    set_log_level(daemon, "debug")
    fake_aws.known_streams = {"test-stream"}  # d1's stream does not exist: errors get logged
    daemon.start()
    marker = uuid.uuid4().hex
    lines = [f"MARKER{marker}-{i} secret-record-content".encode() for i in range(300)]
    too_long = f"MARKER{marker}-long ".encode() + b"L" * 3000
    for sock in daemon.sockets():
        answer = send_lines(sock, b"\n".join(lines) + b"\n" + too_long)
        assert answer["accepted"] == 300 and answer["rejected"] == 1
    wait_delivered(fake_aws, lines)
    wait_until(lambda: any(e.get("code") == "ResourceNotFoundException" for e in daemon.log_events()),
               what="the missing stream's error in the log")
    daemon.status()
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any(e.get("event") == "reloaded" for e in daemon.log_events()), what="the reload")
    assert daemon.stop() == 0
    log = daemon.log()
    events = daemon.log_events()
    secrets = {
        "access key": TEST_KEYS["AWS_ACCESS_KEY_ID"],
        "secret key": TEST_KEYS["AWS_SECRET_ACCESS_KEY"],
        "record marker": marker,
        "record contents": "secret-record-content",
        "record in base64": base64.b64encode(lines[0]).decode()[:24],
    }
    found = {what: text for what, text in secrets.items() if text in log}
    figures.update(log_lines=len(log.splitlines()), debug_lines=sum(1 for e in events if e.get("level") == "debug"),
                   leaks=sorted(found))
    assert any(e.get("level") == "debug" for e in events), "the log is not at DEBUG: the test proves nothing"
    assert not found, f"the log holds {sorted(found)}"
    figures["passed"] = True
