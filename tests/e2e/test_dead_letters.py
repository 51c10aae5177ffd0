"""Records the service refuses for good go to the dead-letter table, never block the queue, and
can be listed, replayed and purged with `spoold dead-letters`."""

from __future__ import annotations

import json
import os
import signal

from tests.tools.client import send_lines, wait_until

BIG = b"B" * (1024 * 1024 + 10)  # over the endpoint's 1 MiB record limit: ValidationException


def _dead(daemon, action: str, *extra: str) -> dict:
    return daemon.cli_json("dead-letters", action, *extra)


def test_refused_record_is_dead_lettered_and_the_rest_flows(make_daemon, fake_aws):
    # The destination believes records may be 2 MiB; the service says 1 MiB. One bad line in a
    # batch fails the whole request; bisection finds it, and the others are delivered.
    daemon = make_daemon({"endpoint_url": fake_aws.url, "max_record_bytes": "2MiB",
                          "max_line_bytes": 1024 * 1024 + 100, "linger": "300ms"}).start()
    good = [f"good-{i}".encode() for i in range(40)]
    payload = b"\n".join(good[:20] + [BIG] + good[20:])
    assert send_lines(daemon.sockets()[0], payload)["accepted"] == 41
    wait_until(lambda: len(fake_aws.all_records()) >= 40, what="the good lines")
    assert sorted(r.data for r in fake_aws.all_records()) == sorted(good)
    listed = wait_until(lambda: _dead(daemon, "list")["dead_letters"], what="a dead letter")
    assert len(listed) == 1 and listed[0]["size"] == len(BIG) and "ValidationException" in listed[0]["error"]
    assert daemon.status()["destinations"]["d0"]["dead_letters"] == 1
    wait_until(lambda: daemon.spool_rows() == 0, what="the spool to empty")

    # Replay puts it back in the queue: refused again, it returns to the dead letters.
    assert _dead(daemon, "replay") == {"replayed": 1}
    wait_until(lambda: len(_dead(daemon, "list")["dead_letters"]) == 1 and daemon.spool_rows() == 0,
               what="the replayed line to be refused again")
    assert _dead(daemon, "purge") == {"purged": 1}
    assert _dead(daemon, "list")["dead_letters"] == []
    daemon.stop()
    # Without a daemon the CLI works on the spool file directly.
    assert _dead(daemon, "list")["dead_letters"] == []


def test_nothing_is_dead_lettered_when_every_request_fails(make_daemon, fake_aws):
    # A stream-level validation error (every request refused) must not empty the queue into
    # the dead letters: the lines stay spooled and retry.
    fake_aws.faults.fatal = "ValidationException"
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "10ms", "retry_cap": "50ms"},
                         extra='[daemon]\nshutdown_grace = "200ms"\n').start()
    send_lines(daemon.sockets()[0], b"one\ntwo\nthree\n")
    wait_until(lambda: len(fake_aws.requests) >= 6, what="several refused requests")
    assert daemon.stop() == 0
    assert _dead(daemon, "list")["dead_letters"] == []
    assert daemon.spool_rows() > 0


def test_lines_older_than_max_age_are_dropped_and_counted(make_daemon, fake_aws):
    # The endpoint is down for longer than max_age: the lines expire, are counted in status and
    # logged, and never arrive afterwards. Nothing is dropped silently.
    fake_aws.faults.down = True
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "50ms", "retry_cap": "200ms"},
                         spool={"max_age": "1s"}).start()
    assert send_lines(daemon.sockets()[0], b"\n".join(b"old-%d" % i for i in range(100)))["accepted"] == 100

    def expired() -> int:
        return int(daemon.status()["destinations"]["d0"]["expired"])

    wait_until(lambda: expired() == 100, what="100 expired lines in status")
    wait_until(lambda: daemon.spool_rows() == 0, what="the expired rows to leave the spool")
    assert any(e.get("event") == "lines_expired" for e in daemon.log_events())
    fake_aws.faults.down = False
    assert send_lines(daemon.sockets()[0], b"fresh\n")["accepted"] == 1
    wait_until(lambda: [r.data for r in fake_aws.all_records()] == [b"fresh"], what="only the fresh line")
    daemon.stop()


def test_ordered_mode_dead_letters_a_refused_record_and_goes_on(make_daemon, fake_aws):
    daemon = make_daemon({"endpoint_url": fake_aws.url, "ordered": True, "max_record_bytes": "2MiB",
                          "max_line_bytes": 1024 * 1024 + 100, "partition_key_field": "k"}).start()
    sock = daemon.sockets()[0]
    assert send_lines(sock, b'{"k":"a","n":1}\n')["accepted"] == 1
    wait_until(lambda: len(fake_aws.all_records()) == 1, what="the first record")
    big = b'{"k":"a","n":2,"pad":"' + b"p" * (1024 * 1024) + b'"}'
    assert send_lines(sock, big + b'\n{"k":"a","n":3}\n')["accepted"] == 2
    wait_until(lambda: len(fake_aws.all_records()) == 2, what="the record after the refused one")
    assert [json.loads(r.data)["n"] for r in fake_aws.all_records()] == [1, 3]
    listed = wait_until(lambda: _dead(daemon, "list")["dead_letters"], what="the dead letter")
    assert len(listed) == 1 and listed[0]["size"] == len(big)
    daemon.stop()


def test_offline_commands_refuse_while_the_daemon_holds_the_spool(make_daemon, fake_aws):
    """One writer, always: the running daemon holds spool.db.lock; a daemon that does not answer
    (stopped with SIGSTOP) is named, never mistaken for no daemon; a second daemon does not start."""
    daemon = make_daemon({"endpoint_url": fake_aws.url}).start()
    lock = daemon.tmp / "spool.db.lock"
    pid = daemon.proc.pid
    assert os.stat(lock).st_mode & 0o777 == 0o600
    assert lock.read_text().strip() == str(pid)
    assert send_lines(daemon.sockets()[0], b"kept\n")["accepted"] == 1
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        for args in (["dead-letters", "purge"], ["dead-letters", "list"], ["status"]):
            out = daemon.cli(*args, "--timeout", "1")
            assert out.returncode == 1, (args, out.stdout, out.stderr)
            assert f"pid {pid} (stopped)" in out.stderr and "not opened behind its back" in out.stderr, out.stderr
            assert out.stdout == ""
        second = daemon.cli("run")
        assert second.returncode == 1
        assert f"in use by process {pid}" in second.stderr, second.stderr
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert _dead(daemon, "list") == {"dead_letters": []}
    assert send_lines(daemon.sockets()[0], b"after\n")["accepted"] == 1
    wait_until(lambda: {r.data for r in fake_aws.all_records()} == {b"kept", b"after"}, what="both lines")
    assert daemon.stop() == 0
    # Stopped: the CLI takes the lock itself and works on the file.
    assert _dead(daemon, "purge") == {"purged": 0}
    assert lock.read_text().strip() != str(pid)


def test_a_bad_control_request_gets_an_error_and_the_daemon_stays(make_daemon, fake_aws):
    import socket

    daemon = make_daemon({"endpoint_url": fake_aws.url}).start()
    # start() waits for the data sockets; the control socket is bound after them.
    wait_until(lambda: (daemon.tmp / "control.sock").exists(), what="the control socket")
    for request, error in [(b"dead-letters list abc\n", "JSON object"),
                           (b'{"command": "dead-letters", "action": "list", "limit": "abc"}\n', "limit"),
                           (b'{"command": "dead-letters", "action": "drop"}\n', "action"),
                           (b'{"command": "status", "x": 1}\n', "unknown field"),
                           (b'{"command": "reboot"}\n', "command must be")]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect(str(daemon.tmp / "control.sock"))
        s.sendall(request)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        s.close()
        assert error in json.loads(reply)["error"], reply
    assert daemon.cli("dead-letters", "list", "--limit", "0").returncode == 2
    assert send_lines(daemon.sockets()[0], b"still\n")["accepted"] == 1
    assert daemon.stop() == 0
