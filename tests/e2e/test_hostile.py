"""Hostile and careless writers against the real daemon: idle connections that hold every slot,
unfinished lines that would hold memory, more clients than file descriptors, datagrams over the
line limit, and a flood of oversized lines that would flood the log.

Other users are real: a forked child switches to another UID before it connects, so the daemon
sees it through SO_PEERCRED as it would see another user on the host (these tests need root).
"""

from __future__ import annotations

import collections
import json
import os
import resource
import select
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold import ingest
from tests.tools.client import DEADLINE, connect_patiently, send_lines, wait_until
from tests.tools.daemon import Daemon
from tests.tools.proc import PeakRSS, rss_bytes

MiB = 1024 * 1024
OTHER_UIDS = (65534, 65533, 65532)
# How long a holder waits for one connect() before it gives up (the daemon accepts at once
# unless it has stopped accepting).
CONNECT_TIMEOUT = 10.0
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="another user's connections need root (setuid)")


# -- helpers ---------------------------------------------------------------------------------------
def status(daemon: Daemon) -> dict[str, Any]:
    return daemon.status()["destinations"]["d0"]  # type: ignore[no-any-return]


def records(fake_aws: Any) -> collections.Counter[bytes]:
    return collections.Counter(r.data for r in fake_aws.all_records())


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == name]


@pytest.fixture
def many_fds() -> Iterator[int]:
    """This process's RLIMIT_NOFILE soft limit raised to the hard one (the daemon inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if want < 4096:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} leaves no room for 2,000 connections and the daemon's")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield want
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Holder:
    """``n`` connections opened, in order, by a forked child running as ``uid``, then held idle.
    ``collect(k)`` waits until ``k`` of them got an answer or an end from the daemon and returns
    what they got: {"answers": {error: count}, "closed_indexes": [...], "eof": n}."""

    # The parent's ends of every live holder's pipes: a child closes them, or a holder forked
    # later would keep an earlier one's command pipe open and it would never see its end.
    _parent_fds: set[int] = set()

    def __init__(self, sock_path: Path, uid: int, n: int) -> None:
        self.uid = uid
        report_r, report_w = os.pipe()
        command_r, command_w = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child only uses sockets
            pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                for fd in (report_r, command_w, *Holder._parent_fds):
                    os.close(fd)
                _hold(sock_path, uid, n, report_w, command_r)
                code = 0
            finally:
                os._exit(code)
        os.close(report_w)
        os.close(command_r)
        Holder._parent_fds |= {report_r, command_w}
        self.pid = pid
        self._report = os.fdopen(report_r, "r")
        self._command = os.fdopen(command_w, "w")
        self.connected = self._read()["connected"]

    def _read(self) -> dict[str, Any]:
        ready, _, _ = select.select([self._report], [], [], DEADLINE * 2)
        assert ready, f"holder {self.uid} did not report"
        line = self._report.readline()
        assert line, f"holder {self.uid} died"
        return json.loads(line)  # type: ignore[no-any-return]

    def collect(self, k: int) -> dict[str, Any]:
        self._command.write(f"{k}\n")
        self._command.flush()
        return self._read()

    def close(self) -> None:
        Holder._parent_fds -= {self._report.fileno(), self._command.fileno()}
        self._command.close()
        self._report.close()
        os.waitpid(self.pid, 0)


def _hold(sock_path: Path, uid: int, n: int, report_w: int, command_r: int) -> None:
    os.chdir(sock_path.parent)  # as root; then a relative path needs only the socket's own mode
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    out = os.fdopen(report_w, "w")
    commands = os.fdopen(command_r, "r")
    socks: list[socket.socket] = []
    for _ in range(n):
        s = _connect(sock_path.name)
        if s is None:
            break
        socks.append(s)
    out.write(json.dumps({"connected": len(socks)}) + "\n")
    out.flush()
    for line in commands:  # one "collect k" per line; EOF: close everything and exit
        want = int(line)
        answers: collections.Counter[str] = collections.Counter()
        closed: list[int] = []
        eof = 0
        poller = select.poll()
        index = {s.fileno(): i for i, s in enumerate(socks)}
        for s in socks:
            poller.register(s, select.POLLIN)
        data: dict[int, bytes] = {}
        end = time.monotonic() + DEADLINE
        while len(closed) < want and time.monotonic() < end:
            for fd, _ in poller.poll(500):
                i = index[fd]
                try:
                    chunk = socks[i].recv(4096)
                except OSError:
                    chunk = b""
                if chunk:
                    data[i] = data.get(i, b"") + chunk
                    continue
                poller.unregister(fd)
                closed.append(i)
                if data.get(i):
                    answers[json.loads(data[i]).get("error", "no error")] += 1
                else:
                    eof += 1
        out.write(json.dumps({"answers": answers, "closed_indexes": sorted(closed), "eof": eof}) + "\n")
        out.flush()
    for s in socks:
        s.close()


def _connect(path: str) -> socket.socket | None:
    """A patient client's connection; None: the daemon took none within CONNECT_TIMEOUT."""
    try:
        return connect_patiently(path, CONNECT_TIMEOUT)
    except OSError:
        return None


def open_other_user_socket(tmp_path: Path) -> None:
    # The holders chdir here as root; the socket file itself is 0666 in these tests.
    os.chmod(tmp_path, 0o711)


# -- 1. idle connections do not lock writers out ---------------------------------------------------
@needs_root
def test_writer_served_while_another_user_holds_2000_idle_connections(many_fds, make_daemon, fake_aws, tmp_path):
    open_other_user_socket(tmp_path)
    daemon = make_daemon({"endpoint_url": fake_aws.url, "socket_mode": "0666"}).start()
    sock = daemon.sockets()[0]
    holder = Holder(sock, OTHER_UIDS[0], 2000)
    try:
        assert holder.connected == 2000
        refused = 2000 - ingest.MAX_CONNECTIONS
        # Slots were free for the first 1,024; past them, that user is at its share: refused at once.
        wait_until(lambda: status(daemon).get("connections_closed", {}).get(ingest.REFUSED_USER_SHARE) == refused,
                   what=f"{refused} connections refused")
        assert send_lines(sock, b"writer-1\nwriter-2\n", timeout=30) == {"accepted": 2, "rejected": 0}
        got = holder.collect(refused + 1)
        # The refused learn why; one held connection made room for the writer, and learns why too.
        assert got["answers"] == {ingest.REFUSED_USER_SHARE: refused, ingest.CLOSED_USER_SHARE: 1}, got
        assert got["eof"] == 0
        assert got["closed_indexes"][0] == 0  # the longest-idle of the user over its share
        st = status(daemon)
        assert st["connections_closed"] == {ingest.REFUSED_USER_SHARE: refused, ingest.CLOSED_USER_SHARE: 1}
        wait_until(lambda: records(fake_aws) == {b"writer-1": 1, b"writer-2": 1}, what="the writer's lines")
    finally:
        holder.close()
    assert daemon.stop() == 0


@needs_root
def test_longest_idle_closed_first_when_slots_run_short_quiet_stream_kept_till_then(
        many_fds, make_daemon, fake_aws, tmp_path):
    open_other_user_socket(tmp_path)
    daemon = make_daemon({"endpoint_url": fake_aws.url, "socket_mode": "0666"}).start()
    sock = daemon.sockets()[0]
    quiet = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # like `tail -F app.log | spoold send`
    quiet.settimeout(DEADLINE)
    quiet.connect(str(sock))
    quiet.sendall(b"quiet-1\nunfinished")
    # A quiet stream idle for longer than EVICT_MIN_IDLE keeps its slot while slots are free.
    time.sleep(ingest.EVICT_MIN_IDLE * 1.5)  # the idle time itself is what is tested
    assert send_lines(sock, b"other\n") == {"accepted": 1, "rejected": 0}
    assert not select.select([quiet], [], [], 0)[0], "a quiet stream was closed while slots were free"
    quiet.sendall(b"-now-finished\nquiet-2\nheld")

    per_user = 360  # three users, each within its share; together more than the slots
    holders: list[Holder] = []
    try:
        for uid in OTHER_UIDS:
            holders.append(Holder(sock, uid, per_user))
            assert holders[-1].connected == per_user
        over = 1 + len(OTHER_UIDS) * per_user - ingest.MAX_CONNECTIONS
        wait_until(lambda: status(daemon).get("connections_closed", {}).get(ingest.CLOSED_IDLE) == over,
                   what=f"{over} idle connections closed for room")
        # The quiet stream was the longest idle: closed first, its complete lines kept, its
        # unfinished line dropped and counted.
        answer = json.loads(quiet.recv(4096))
        assert answer == {"error": ingest.CLOSED_IDLE, "accepted": 3, "rejected": 1,
                          "reasons": {"connection closed": 1}}
        first = holders[0].collect(over - 1)
        assert first["answers"] == {ingest.CLOSED_IDLE: over - 1} and first["closed_indexes"] == list(range(over - 1))
        # A writer still gets in: one more idle connection (the first user's next) makes room.
        assert send_lines(sock, b"writer\n", timeout=30) == {"accepted": 1, "rejected": 0}
        st = status(daemon)
        assert st["connections_closed"] == {ingest.CLOSED_IDLE: over + 1}
        assert st["rejected"] == {"connection closed": 1}
        wait_until(lambda: records(fake_aws) == {b"quiet-1": 1, b"unfinished-now-finished": 1, b"quiet-2": 1,
                                                 b"other": 1, b"writer": 1}, what="every acknowledged line")
    finally:
        quiet.close()
        for h in holders:
            h.close()
    assert events(daemon, "connection_closed_for_room")
    assert daemon.stop() == 0


# -- 2. unfinished lines have a hard memory budget -------------------------------------------------
WRITERS = 1000
HELD = 255 * 1024  # just under 256 KiB: a per-connection cap of that size would keep every one of them
RSS_MAX = 150 * MiB


def test_memory_bounded_with_1000_writers_holding_255_kib_unfinished_lines(many_fds, make_daemon, fake_aws):
    daemon = make_daemon({"endpoint_url": fake_aws.url}).start()
    sock = str(daemon.sockets()[0])
    pid = daemon.proc.pid
    rss = PeakRSS(pid).start()
    writers: list[socket.socket] = []
    answers: list[dict[str, Any]] = []
    try:
        for i in range(WRITERS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(DEADLINE)
            s.connect(sock)
            s.sendall(f"w{i:04d}-".encode().ljust(HELD, b"x"))
            writers.append(s)
        rss_held = rss_bytes(pid)
        for s in writers:
            s.sendall(b"\nend\n")
            s.shutdown(socket.SHUT_WR)
            answers.append(json.loads(s.recv(4096)))
    finally:
        for s in writers:
            s.close()
        rss.stop()
    kept = [i for i, a in enumerate(answers) if a == {"accepted": 2, "rejected": 0}]
    dropped = [i for i, a in enumerate(answers)
               if a == {"accepted": 1, "rejected": 1, "reasons": {"memory limit": 1}}]
    assert len(kept) + len(dropped) == WRITERS, [a for a in answers if a["accepted"] + a["rejected"] != 2][:3]
    assert len(kept) * HELD <= ingest.MAX_HELD_BYTES
    st = status(daemon)
    assert st["rejected"] == {"memory limit": len(dropped)}
    want = {f"w{i:04d}-".encode().ljust(HELD, b"x"): 1 for i in kept} | {b"end": WRITERS}
    wait_until(lambda: records(fake_aws) == want, what="every acknowledged line, once")
    logged = events(daemon, "partial_line_dropped")
    assert 1 <= len(logged) <= 5 and logged[0]["budget"] == ingest.MAX_HELD_BYTES  # rate-limited
    print(f"\nRSS {rss.before / MiB:.0f} MiB before, {rss_held / MiB:.0f} MiB holding, peak {rss.peak / MiB:.0f} MiB; "
          f"{len(kept)} unfinished lines kept, {len(dropped)} dropped")
    assert rss.peak < RSS_MAX, f"RSS reached {rss.peak / MiB:.0f} MiB"
    assert daemon.stop() == 0


# -- 3. more clients than file descriptors ---------------------------------------------------------
CLIENTS = 300
FD_LIMIT = 64


def test_accept_waits_out_fd_exhaustion_and_acknowledges_every_client(make_daemon, fake_aws):
    daemon = make_daemon({"endpoint_url": fake_aws.url}).start()
    sock = str(daemon.sockets()[0])
    assert send_lines(sock, b"warm-up\n") == {"accepted": 1, "rejected": 0}  # the endpoint's connection is open
    pid = daemon.proc.pid
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    limit = max(FD_LIMIT, in_use + 8)
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    clients: list[socket.socket] = []
    answers: dict[int, bytes] = {}
    try:
        for _ in range(CLIENTS):  # all at once: those the daemon has no descriptor for wait in its backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(DEADLINE)
            s.connect(sock)
            clients.append(s)
        wait_until(lambda: events(daemon, "accept_failed_out_of_resources"), what="the daemon out of descriptors")
        for i, s in enumerate(clients):
            s.sendall(f"client-{i:03d}\n".encode())
            s.shutdown(socket.SHUT_WR)
        poller = select.poll()
        for s in clients:
            poller.register(s, select.POLLIN)
        index = {s.fileno(): i for i, s in enumerate(clients)}
        end = time.monotonic() + DEADLINE * 2
        while len(answers) < CLIENTS and time.monotonic() < end:
            for fd, _ in poller.poll(500):
                answers[index[fd]] = clients[index[fd]].recv(4096)
                poller.unregister(fd)
    finally:
        for s in clients:
            s.close()
    assert daemon.proc.poll() is None, f"the daemon died:\n{daemon.log()[-2000:]}"
    assert len(answers) == CLIENTS, f"{CLIENTS - len(answers)} clients got no answer in time"
    assert all(json.loads(a) == {"accepted": 1, "rejected": 0} for a in answers.values())
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (4096, hard))
    want = {f"client-{i:03d}".encode(): 1 for i in range(CLIENTS)} | {b"warm-up": 1}
    wait_until(lambda: records(fake_aws) == want, what="every client's line")
    assert send_lines(sock, b"after\n") == {"accepted": 1, "rejected": 0}
    assert daemon.stop() == 0


# -- 4. datagrams: whole or rejected, never cut ----------------------------------------------------
def send_datagram(path: Path, data: bytes) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * len(data) + 4096)
        s.sendto(data, str(path))
    finally:
        s.close()


def test_datagrams_arrive_whole_up_to_max_line_bytes_and_longer_ones_are_rejected(make_daemon, fake_aws):
    max_line = 400_000
    daemon = make_daemon({"endpoint_url": fake_aws.url, "socket_type": "datagram",
                          "max_line_bytes": max_line}).start()
    path = daemon.sockets()[0]
    big = b"b" * 300_000  # bigger than any one stream read, under the line limit: must not be cut
    longest = b"L" * max_line
    send_datagram(path, big)
    send_datagram(path, longest + b"\n")  # the longest line with its newline fits
    send_datagram(path, b"o" * (max_line + 1))  # one byte over: rejected, not cut
    send_datagram(path, b"t" * 500_000)  # longer than the receive buffer: rejected, not cut
    send_datagram(path, b"marker")
    wait_until(lambda: records(fake_aws)[b"marker"], what="the marker")
    wait_until(lambda: status(daemon)["lines_in"] == 3, what="three lines in")
    assert records(fake_aws) == {big: 1, longest: 1, b"marker": 1}
    assert status(daemon)["rejected"] == {"line too long": 2}
    assert events(daemon, "datagram_rejected_too_long") or events(daemon, "line_rejected_too_long")
    assert daemon.stop() == 0


# -- 5. oversized lines are counted, and logged at most once a period ------------------------------
def test_a_flood_of_oversized_lines_is_counted_not_logged_line_by_line(make_daemon, fake_aws):
    daemon = make_daemon({"endpoint_url": fake_aws.url, "max_line_bytes": 100}).start()
    n = 100_000
    payload = (b"z" * 200 + b"\n") * n + b"fits\n"  # 20 MB of lines over the limit, then one that fits
    started = time.monotonic()
    assert send_lines(daemon.sockets()[0], payload) == {
        "accepted": 1, "rejected": n, "reasons": {"line too long": n}}
    elapsed = time.monotonic() - started
    assert status(daemon)["rejected"] == {"line too long": n}
    logged = events(daemon, "line_rejected_too_long")
    periods = 1 + int(elapsed / 10.0)  # committer.LOG_EVERY
    assert 1 <= len(logged) <= periods + 1, f"{len(logged)} log lines for {n} oversized lines"
    assert logged[0]["max_line_bytes"] == 100 and logged[0]["size"] == 200 and logged[0]["dest"] == "d0"
    wait_until(lambda: records(fake_aws) == {b"fits": 1}, what="the line that fits")
    assert daemon.stop() == 0
