"""The real daemon against the fault-injecting loopback endpoint (tests/tools/fakeaws.py).

Each test checks what arrived against what was acknowledged, and that only failed entries were
sent again (the endpoint counts every record it was offered)."""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.tools.client import send_lines, wait_until
from tests.tools.daemon import TEST_KEYS


def _lines(n: int, tag: str = "l") -> list[bytes]:
    return [f"{tag}-{i:06d} payload {'z' * (i % 50)}".encode() for i in range(n)]


def _arrived(srv) -> collections.Counter[bytes]:
    return collections.Counter(r.data for r in srv.all_records())


def _offered(srv) -> int:
    return sum(r.n_records for r in srv.requests if r.target.endswith("PutRecords"))


@pytest.mark.parametrize("sender", ["inline", "process"])
def test_partial_failures_resend_only_failed_entries(make_daemon, fake_aws, sender):
    fake_aws.faults.record_fail_rate = 0.3
    lines = _lines(3000)
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "10ms"},
                         extra=f'[daemon]\nsender = "{sender}"\n').start()
    assert send_lines(daemon.sockets()[0], b"\n".join(lines)) == {"accepted": 3000, "rejected": 0}
    wait_until(lambda: len(fake_aws.all_records()) >= 3000, what="3000 records")
    arrived = _arrived(fake_aws)
    assert set(arrived) == set(lines)
    assert max(arrived.values()) == 1, "no duplicates without a crash"
    failed = sum(r.n_failed for r in fake_aws.requests)
    assert failed > 300, "the endpoint should have failed about 30% of records"
    # Every record offered was either accepted once or failed: a whole-batch resend would add more.
    assert _offered(fake_aws) == 3000 + failed
    assert daemon.stop() == 0
    assert daemon.spool_rows() == 0


def test_signatures_are_valid_sigv4(make_daemon, fake_aws):
    daemon = make_daemon({"endpoint_url": fake_aws.url, "region": "eu-west-1"}).start()
    send_lines(daemon.sockets()[0], b"\n".join(_lines(50)))
    wait_until(lambda: len(fake_aws.all_records()) >= 50, what="50 records")
    puts = [r for r in fake_aws.requests if r.target.endswith("PutRecords")]
    assert puts and all(r.signature_ok for r in puts)
    want = {("eu-west-1", "kinesis", TEST_KEYS["AWS_ACCESS_KEY_ID"])}
    assert {(r.region, r.service, r.access_key) for r in puts} == want
    assert fake_aws.bad_signatures == 0
    daemon.stop()


def test_wrong_secret_keeps_lines_until_fixed(make_daemon, fake_aws):
    dest = {"endpoint_url": fake_aws.url, "retry_base": "10ms", "retry_cap": "200ms"}
    daemon = make_daemon(dest, env={"AWS_SECRET_ACCESS_KEY": "wrong"},
                         extra='[daemon]\nshutdown_grace = "500ms"\n').start()
    assert send_lines(daemon.sockets()[0], b"\n".join(_lines(20)))["accepted"] == 20
    wait_until(lambda: fake_aws.bad_signatures >= 3, what="rejected signatures")
    assert fake_aws.all_records() == []
    assert daemon.stop() == 0
    assert daemon.spool_rows() > 0, "refused lines stay spooled"
    events = [e for e in daemon.log_events() if e.get("event") == "send_failed"]
    assert events and events[0]["code"] == "InvalidSignatureException" and events[0]["level"] == "error"
    assert len(events) < fake_aws.bad_signatures, "errors are logged once per backoff period, not per request"
    daemon.env["AWS_SECRET_ACCESS_KEY"] = TEST_KEYS["AWS_SECRET_ACCESS_KEY"]
    daemon.start()
    wait_until(lambda: len(fake_aws.all_records()) >= 20, what="the spooled lines after the fix")
    assert set(_arrived(fake_aws)) == set(_lines(20))
    daemon.stop()
    assert daemon.spool_rows() == 0


def test_whole_request_failures_retry_until_delivered(make_daemon, fake_aws):
    fake_aws.faults.throttle_rate = 0.4
    fake_aws.faults.http500_rate = 0.2
    lines = _lines(2000)
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "5ms", "retry_cap": "100ms",
                          "max_records_per_request": 100}).start()
    send_lines(daemon.sockets()[0], b"\n".join(lines))
    wait_until(lambda: len(fake_aws.all_records()) >= 2000, what="2000 records")
    arrived = _arrived(fake_aws)
    assert set(arrived) == set(lines) and max(arrived.values()) == 1
    assert any(r.status == 400 for r in fake_aws.requests) and any(r.status == 500 for r in fake_aws.requests)
    daemon.stop()


def test_fatal_error_keeps_records_then_resumes(make_daemon, fake_aws):
    fake_aws.faults.fatal = "ResourceNotFoundException"
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "10ms", "retry_cap": "100ms"}).start()
    send_lines(daemon.sockets()[0], b"\n".join(_lines(100)))
    wait_until(lambda: len(fake_aws.requests) >= 3, what="failing requests")
    assert fake_aws.all_records() == []
    wait_until(lambda: any(e.get("code") == "ResourceNotFoundException" for e in daemon.log_events()),
               what="the error in the log")
    fake_aws.faults.fatal = None
    wait_until(lambda: len(fake_aws.all_records()) >= 100, what="delivery after the fix")
    assert max(_arrived(fake_aws).values()) == 1
    daemon.stop()


def test_malformed_replies_never_mark_lines_sent(make_daemon, fake_aws):
    bad = [
        (200, b"not json at all"),
        (200, b"[]"),
        (200, b"{}"),
        (200, b'{"FailedRecordCount": 0, "Records": []}'),
        (200, b'{"FailedRecordCount": 0, "Records": [{}]}'),
        (502, b"<html>bad gateway</html>"),
    ]
    fake_aws.faults.scripted.extend(bad)
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "5ms", "retry_cap": "50ms"}).start()
    send_lines(daemon.sockets()[0], b"\n".join(_lines(30)))
    wait_until(lambda: len(fake_aws.all_records()) >= 30, what="delivery after the malformed replies")
    assert not fake_aws.faults.scripted, "every scripted reply was used"
    assert set(_arrived(fake_aws)) == set(_lines(30))
    assert max(_arrived(fake_aws).values()) == 1
    daemon.stop()


def test_oversized_lines_are_rejected_whole_and_counted(make_daemon, fake_aws):
    daemon = make_daemon({"endpoint_url": fake_aws.url, "max_line_bytes": 1000}).start()
    good = [b"a" * 1000, b"short", b"b" * 999]
    payload = good[0] + b"\n" + b"X" * 5000 + b"\n" + good[1] + b"\n" + b"Y" * 1001 + b"\n" + good[2]
    assert send_lines(daemon.sockets()[0], payload) == {
        "accepted": 3, "rejected": 2, "reasons": {"line too long": 2}}
    wait_until(lambda: len(fake_aws.all_records()) >= 3, what="the good lines")
    assert sorted(_arrived(fake_aws)) == sorted(good)
    # Rate-limited: one log line per period, with the size of the longest line it reports.
    events = [e for e in daemon.log_events() if e.get("event") == "line_rejected_too_long"]
    assert len(events) == 1 and events[0]["size"] in (1001, 5000) and events[0]["max_line_bytes"] == 1000
    daemon.stop()


def test_sigterm_keeps_unsent_lines_for_next_start(make_daemon, fake_aws):
    fake_aws.faults.down = True
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "10ms", "retry_cap": "100ms"},
                         extra='[daemon]\nshutdown_grace = "1s"\n').start()
    lines = _lines(500)
    assert send_lines(daemon.sockets()[0], b"\n".join(lines))["accepted"] == 500
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 15
    assert daemon.spool_rows() > 0
    assert not daemon.sockets()[0].exists(), "the socket file is removed on a clean stop"
    fake_aws.faults.down = False
    daemon.start()
    wait_until(lambda: len(fake_aws.all_records()) >= 500, what="the backlog after restart")
    assert set(_arrived(fake_aws)) == set(lines)
    assert daemon.stop() == 0
    assert daemon.spool_rows() == 0


def test_hung_request_does_not_block_shutdown(make_daemon, fake_aws):
    fake_aws.faults.hang = True
    daemon = make_daemon({"endpoint_url": fake_aws.url, "request_timeout": "30s"},
                         extra='[daemon]\nshutdown_grace = "1s"\n').start()
    send_lines(daemon.sockets()[0], b"one\ntwo\n")
    wait_until(lambda: fake_aws.count_requests >= 1, what="the request to hang")
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10
    assert daemon.spool_rows() > 0
    fake_aws.faults.hang = False


def test_sigkill_loses_no_acknowledged_line(make_daemon, fake_aws):
    """kill -9 at random moments while clients write; restart; every acked line arrives."""
    fake_aws.faults.latency = 0.02
    fake_aws.faults.record_fail_rate = 0.1
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "5ms"}).start()
    sock = daemon.sockets()[0]
    acked: list[bytes] = []
    lock = threading.Lock()
    rng = random.Random(11)

    def writer(tag: str, stop: threading.Event) -> None:
        n = 0
        while not stop.is_set():
            batch = [f"{tag}-{n}-{i}".encode() for i in range(rng.randrange(1, 200))]
            n += 1
            try:
                answer = send_lines(sock, b"\n".join(batch) + b"\n", timeout=10)
            except (OSError, ValueError):
                time.sleep(0.01)  # daemon down: nothing was acknowledged, try again
                continue
            assert answer["accepted"] == len(batch)
            with lock:
                acked.extend(batch)

    for round_ in range(6):
        stop = threading.Event()
        threads = [threading.Thread(target=writer, args=(f"r{round_}w{w}", stop)) for w in range(3)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.2, 0.6))  # let the writers run for a random while
        daemon.stop(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        daemon.start()
    wait_until(lambda: set(acked) <= set(_arrived(fake_aws)), what="every acknowledged line")
    assert len(acked) > 1000
    daemon.stop()


def test_shutdown_does_not_hang_on_a_full_spool(make_daemon, fake_aws):
    """A writer blocked on a full spool (when_full = "block") must not hold SIGTERM forever:
    it gets no answer (so it knows to resend) and the daemon exits 0."""
    import socket as socketmod

    fake_aws.faults.down = True
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "50ms", "retry_cap": "100ms"},
                         spool={"max_bytes": "1MiB"}, extra='[daemon]\nshutdown_grace = "1s"\n').start()
    sock = daemon.sockets()[0]
    assert send_lines(sock, b"f" * 1000 + b"\n" + b"\n".join(b"x" * 1000 for _ in range(1000)))["accepted"] == 1001
    blocked = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
    blocked.connect(str(sock))
    blocked.sendall(b"y" * 100_000)  # no newline: the last line counts at end of input
    blocked.shutdown(socketmod.SHUT_WR)
    time.sleep(0.5)  # let it reach the full spool; the test is about what SIGTERM does next
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 20
    blocked.settimeout(5)
    assert blocked.recv(100) == b"", "no acknowledgement for lines that were not stored"
    blocked.close()


def _sender_pid(daemon) -> int | None:
    """The daemon's child process (a child belongs to the thread that started it)."""
    for task in Path(f"/proc/{daemon.proc.pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        if children:
            return int(children[0])
    return None


def test_sender_process_killed_loses_nothing(make_daemon, fake_aws):
    """kill -9 of the HTTP sender process (three times, while clients write and requests are in
    flight): the daemon starts a new one and every acknowledged line arrives."""
    fake_aws.faults.latency = 0.02
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "5ms"},
                         extra='[daemon]\nsender = "process"\n').start()
    sock = daemon.sockets()[0]
    acked: list[bytes] = []
    for round_ in range(3):
        pid = wait_until(lambda: _sender_pid(daemon), what="the sender process")
        for n in range(20):
            batch = [f"k{round_}-{n}-{i}".encode() for i in range(50)]
            assert send_lines(sock, b"\n".join(batch) + b"\n")["accepted"] == len(batch)
            acked.extend(batch)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda old=pid: _sender_pid(daemon) not in (None, old), what="a new sender process")
    wait_until(lambda: set(acked) <= set(_arrived(fake_aws)), what="every acknowledged line")
    assert sum(1 for e in daemon.log_events() if e.get("event") == "sender_exited") >= 3
    daemon.stop()


@pytest.mark.parametrize(("aggregation", "sender", "helper"), [
    ("none", None, False),  # the default: inline
    ("none", "process", True),
    ("kpl", "process", False),  # few large records per request: inline even so
])
def test_sender_modes_deliver(make_daemon, fake_aws, aggregation, sender, helper):
    """Inline by default (no child process); with sender = "process", a helper serves the
    destinations of one line per record; a KPL destination stays inline."""
    fake_aws.faults.record_fail_rate = 0.2
    extra = f'[daemon]\nsender = "{sender}"\n' if sender else ""
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "5ms", "aggregation": aggregation},
                         extra=extra).start()
    lines = [f"inline-{i}".encode() for i in range(300)]
    assert send_lines(daemon.sockets()[0], b"\n".join(lines) + b"\n")["accepted"] == 300
    if aggregation == "none":
        wait_until(lambda: set(lines) <= set(_arrived(fake_aws)), what="every line")
    wait_until(lambda: daemon.spool_rows() == 0, what="an empty spool")
    assert (_sender_pid(daemon) is not None) is helper
    assert daemon.stop() == 0
