"""Operations, end to end: status and metrics, datagram sockets with util-linux `logger`, SIGHUP
reload, and the systemd protocols played from the test's side (notify socket, socket activation)."""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.tools.client import send_lines, wait_until
from tests.tools.daemon import destination_toml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_from_daemon_and_from_spool(make_daemon, fake_aws):
    fake_aws.faults.fatal = "AccessDeniedException"
    daemon = make_daemon({"name": "app", "endpoint_url": fake_aws.url, "retry_base": "10ms", "retry_cap": "100ms"},
                         spool={"page_size": 16384}, extra='[daemon]\nshutdown_grace = "200ms"\n').start()
    send_lines(daemon.sockets()[0], b"a\nb\nc\n")
    wait_until(lambda: len(fake_aws.requests) >= 2, what="failing requests")

    def snap():
        out = daemon.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    s = wait_until(lambda: (s := snap())["destinations"]["app"].get("failures") and s, what="failures in status")
    app = s["destinations"]["app"]
    assert s["running"] is True
    assert s["spool"]["page_size"] == 16384
    assert app["spooled_lines"] == 3 and app["lines_in"] == 3 and app["lines_sent"] == 0
    assert app["failures"]["AccessDeniedException"] >= 1
    assert "AccessDenied" in app["last_error"]
    assert app["oldest_age"] is not None and app["oldest_age"] >= 0
    table = daemon.cli("status")
    assert table.returncode == 0 and "app" in table.stdout and "AccessDenied" in table.stdout

    daemon.stop()
    offline = json.loads(daemon.cli("status", "--json").stdout)
    assert offline["running"] is False
    assert offline["spool"]["page_size"] == 16384
    assert offline["destinations"]["app"]["spooled_lines"] == 3
    assert "daemon not running" in daemon.cli("status").stdout


def test_prometheus_metrics_parse(make_daemon, fake_aws):
    from prometheus_client.parser import text_string_to_metric_families

    port = _free_port()
    daemon = make_daemon({"name": "app", "endpoint_url": fake_aws.url},
                         extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n').start()
    send_lines(daemon.sockets()[0], b"x\ny\n")
    wait_until(lambda: len(fake_aws.all_records()) >= 2, what="2 records")

    def sent() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            body = reply.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert "spoold_spool_lines" in families and "spoold_lines_sent" in families
        for sample in families["spoold_lines_sent"].samples:
            if sample.name == "spoold_lines_sent_total" and sample.labels == {"destination": "app"}:
                return sample.value
        raise AssertionError("no spoold_lines_sent_total for app")

    assert wait_until(lambda: sent() == 2.0, what="lines_sent_total == 2")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
    assert err.value.code == 404
    err.value.close()
    daemon.stop()


@pytest.mark.skipif(shutil.which("logger") is None, reason="util-linux logger is not installed")
def test_datagram_socket_with_logger(make_daemon, fake_aws, tmp_path):
    sock = tmp_path / "log.sock"
    daemon = make_daemon({"name": "syslog", "socket": str(sock), "socket_type": "datagram",
                          "endpoint_url": fake_aws.url}).start()
    for i in range(5):
        subprocess.run(["logger", "-u", str(sock), "--socket-errors=on", "-t", "app", f"message {i}"],
                       check=True, timeout=30)
    wait_until(lambda: len(fake_aws.all_records()) >= 5, what="5 syslog lines")
    data = [r.data for r in fake_aws.all_records()]
    for i in range(5):
        assert sum(d.endswith(f"app: message {i}".encode()) for d in data) == 1, data
    assert all(d.startswith(b"<") and not d.endswith(b"\n") for d in data)  # syslog PRI kept, newline stripped
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["destinations"]["syslog"]["lines_in"] == 5
    daemon.stop()


def test_sighup_reload_adds_a_destination_without_losing_lines(make_daemon, fake_aws, tmp_path):
    daemon = make_daemon({"name": "first", "endpoint_url": fake_aws.url}).start()
    first = daemon.sockets()[0]
    send_lines(first, b"before-1\nbefore-2\n")
    second = tmp_path / "second.sock"
    daemon.config.write_text(daemon.config.read_text().replace('level = "info"', 'level = "debug"') + "\n"
                             + destination_toml(name="second", kind="kinesis", socket=str(second), stream="other",
                                                region="us-east-1", endpoint_url=fake_aws.url, linger="20ms"))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(second.exists, what="the new destination's socket")
    assert send_lines(second, b"to-second\n") == {"accepted": 1, "rejected": 0}
    assert send_lines(first, b"after\n") == {"accepted": 1, "rejected": 0}
    wait_until(lambda: len(fake_aws.all_records()) >= 4, what="4 records")
    assert {r.data: r.stream for r in fake_aws.all_records()} == {
        b"before-1": "test-stream", b"before-2": "test-stream", b"after": "test-stream", b"to-second": "other"}
    assert any(e.get("event") == "reloaded" for e in daemon.log_events())

    # A broken config on reload is refused; the daemon goes on with the old one.
    daemon.config.write_text(daemon.config.read_text() + "\nbogus = 1\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any(e.get("event") == "reload_failed" for e in daemon.log_events()), what="reload_failed")
    assert send_lines(first, b"still-up\n")["accepted"] == 1
    assert daemon.stop() == 0


def _notify_socket(tmp_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify.sock"))
    s.settimeout(60)
    return s


def test_sd_notify_ready_watchdog_stopping(make_daemon, fake_aws, tmp_path):
    notify = _notify_socket(tmp_path)
    daemon = make_daemon({"endpoint_url": fake_aws.url},
                         env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"})
    daemon.start(wait=False)
    messages: list[str] = []

    def got(word: str) -> bool:
        while not any(word in m for m in messages):
            messages.append(notify.recv(4096).decode())
        return True

    got("READY=1")
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=" in ready
    assert all(p.exists() for p in daemon.sockets()), "READY=1 only once the sockets listen"
    got("WATCHDOG=1")
    daemon.proc.send_signal(signal.SIGTERM)
    got("STOPPING=1")
    assert daemon.proc.wait(timeout=60) == 0
    notify.close()


def test_socket_activation_by_name(make_daemon, fake_aws, tmp_path):
    """Play systemd: create the listening socket, pass it as fd 3 named after the destination,
    connect and write BEFORE the daemon has started; the line must be accepted."""
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    daemon = make_daemon({"name": "app", "socket": str(path), "endpoint_url": fake_aws.url})
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.connect(str(path))  # queued by the kernel; nobody accepts yet
    early.sendall(b"written-before-start\n")
    early.shutdown(socket.SHUT_WR)
    trampoline = textwrap.dedent(f"""
        import os, sys
        os.dup2({listener.fileno()}, 3)
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="app")
        sys.argv = ["spoold", "run", "--config", {str(daemon.config)!r}]
        from spoold.cli import main
        raise SystemExit(main())
    """)
    log = open(daemon.log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-c", trampoline], env=daemon.env, stdout=log, stderr=log,
                            pass_fds=[listener.fileno()])
    log.close()
    daemon.proc = proc
    early.settimeout(60)
    answer = early.recv(4096)
    assert json.loads(answer) == {"accepted": 1, "rejected": 0}
    wait_until(lambda: [r.data for r in fake_aws.all_records()] == [b"written-before-start"], what="the record")
    assert daemon.stop() == 0
    assert path.exists(), "systemd owns an activated socket's path: the daemon must not unlink it"
    listener.close()
    early.close()


def test_socket_and_spool_permissions(make_daemon, fake_aws):
    daemon = make_daemon({"endpoint_url": fake_aws.url, "socket_mode": "0620"}).start()
    wait_until((daemon.tmp / "control.sock").exists, what="the control socket")
    assert os.stat(daemon.sockets()[0]).st_mode & 0o777 == 0o620
    assert os.stat(daemon.tmp / "spool.db").st_mode & 0o777 == 0o600
    assert os.stat(daemon.tmp / "control.sock").st_mode & 0o777 == 0o600

    assert daemon.stop() == 0


@pytest.mark.parametrize("by", ["number", "name"])
def test_reload_applies_socket_mode_and_group_to_a_kept_socket(make_daemon, fake_aws, by):
    gid = _another_group()
    if gid is None:
        pytest.skip("no group other than ours that this user may give a file to")
    group = str(gid) if by == "number" else grp.getgrgid(gid).gr_name
    daemon = make_daemon({"endpoint_url": fake_aws.url, "socket_mode": "0620"}).start()
    path = daemon.sockets()[0]
    assert os.stat(path).st_gid != gid
    text = daemon.config.read_text()
    assert 'socket_mode = "0620"' in text
    daemon.config.write_text(text.replace('socket_mode = "0620"', f'socket_mode = "0640"\nsocket_group = "{group}"'))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any(e.get("event") == "reloaded" for e in daemon.log_events()), what="the reload")
    st = os.stat(path)
    assert (st.st_mode & 0o777, st.st_gid) == (0o640, gid)
    assert send_lines(path, b"after-reload\n") == {"accepted": 1, "rejected": 0}
    assert daemon.stop() == 0


def _another_group() -> int | None:
    """A group other than ours that we may give a file to (any, as root), or None."""
    ours = os.getgid()
    groups = [g.gr_gid for g in grp.getgrall()] if os.geteuid() == 0 else os.getgroups()
    return next((g for g in groups if g != ours), None)
