"""What the daemon creates on disk, and what it leaves alone, against the real daemon.

- Folders it makes are 0750 and its spool files (the spool, its WAL and shared memory, the copies
  a recovery makes) 0600, whatever the umask it was started with.
- A socket path is replaced only when it holds a socket that nobody answers: a regular file
  survives (the daemon exits 1 naming the key), and a live socket, stream or datagram, is never
  taken over by a second daemon.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import os
import select
import signal
import socket
import sqlite3
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.tools.client import DEADLINE, send_lines, wait_until
from tests.tools.daemon import Daemon

IN_CREATE = 0x100


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    # The daemon subprocess inherits the test process's umask.
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _other_group() -> int:
    """A group other than our own, for the socket folders to take (root may give any)."""
    if os.geteuid() != 0:
        return os.getegid()
    return next(g.gr_gid for g in grp.getgrall() if g.gr_gid not in (0, os.getegid()))


class _Inotify:
    """Files created in one folder, as the kernel reports them (none can be missed)."""

    def __init__(self, folder: Path) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert self.libc.inotify_add_watch(self.fd, str(folder).encode(), IN_CREATE) >= 0

    def created(self, timeout: float) -> list[str]:
        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        data = os.read(self.fd, 65536)
        names = []
        while data:
            _wd, _mask, _cookie, size = struct.unpack_from("iIII", data)
            names.append(data[16:16 + size].rstrip(b"\0").decode())
            data = data[16 + size:]
        return names

    def close(self) -> None:
        os.close(self.fd)


def _damage(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(4096 * 3))


def _watch_recovery(daemon: Daemon, state: Path) -> dict[str, int]:
    """Start the daemon on a damaged spool; stop it (SIGSTOP) each time recovery creates a file,
    note that file's mode, and let it go on. Returns {name: mode} of the files seen."""
    watch = _Inotify(state)
    seen: dict[str, int] = {}
    try:
        daemon.start(wait=False)
        assert daemon.proc is not None
        deadline = DEADLINE
        while not any(e.get("event") == "spool_recovered" for e in daemon.log_events()):
            assert daemon.proc.poll() is None, daemon.log()
            names = watch.created(0.05)
            deadline -= 0.05
            assert deadline > 0, "timed out waiting for the recovery"
            if not names:
                continue
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            try:
                for name in names:
                    if not name.startswith("spool.db"):
                        continue  # the control socket, bound under a temporary name then chmod
                    try:
                        seen[name] = _mode(state / name)
                    except FileNotFoundError:
                        pass  # already gone: a file that lived shorter than our reaction
            finally:
                os.kill(daemon.proc.pid, signal.SIGCONT)
    finally:
        watch.close()
    # The control socket is bound under a temporary name in the same folder, then linked in.
    wait_until(lambda: all(p.exists() for p in daemon.sockets()) and (state / "control.sock").exists()
               and not list(state.glob(".*.tmp")), what="the daemon's sockets, linked in")
    return seen


@pytest.mark.parametrize("umask", [0o007, 0o022])
def test_modes_whatever_the_umask(make_daemon, fake_aws, tmp_path, umask):
    """Under the unit's UMask=0007 and the usual 0022: folders the daemon makes are 0750 (the
    socket's folders in the socket's group), spool files 0600, the sockets as configured; and
    during a recovery the copy of the damaged spool (``.reading``) and the new one are 0600."""
    fake_aws.faults.down = True  # lines stay in the spool, so there is something to recover
    state = tmp_path / "state" / "spool"
    run = tmp_path / "run" / "spoold"
    group = _other_group()
    daemon = make_daemon({"endpoint_url": fake_aws.url, "socket": str(run / "d0.sock"), "socket_group": str(group),
                          "retry_base": "50ms", "retry_cap": "100ms"},
                         spool={"path": str(state / "spool.db")}, extra='[daemon]\nshutdown_grace = "100ms"\n')
    with _umask(umask):
        daemon.start()
        for b in range(40):
            lines = b"\n".join(f"b{b:03d}-{i:04d}-{'q' * 300}".encode() for i in range(200))
            assert send_lines(run / "d0.sock", lines)["accepted"] == 200

        for folder in (tmp_path / "state", state, tmp_path / "run", run):
            assert _mode(folder) == 0o750, folder
        assert os.stat(run).st_gid == group and os.stat(tmp_path / "run").st_gid == group
        for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
            assert _mode(state / name) == 0o600, name
        assert _mode(state / "control.sock") == 0o600
        assert _mode(run / "d0.sock") == 0o660 and os.stat(run / "d0.sock").st_gid == group
        assert daemon.stop() == 0

        _damage(state / "spool.db")
        seen = _watch_recovery(daemon, state)
    assert "spool.db.reading" in seen and "spool.db.recovering" in seen, seen
    assert {name: mode for name, mode in seen.items() if mode != 0o600} == {}
    for path in state.iterdir():
        want = 0o140600 if path.name == "control.sock" else 0o100600
        assert os.lstat(path).st_mode == want, path
    assert list(state.glob("spool.db.damaged-*")), "the damaged file is kept"
    assert daemon.stop() == 0


# ------------------------------------------------------------------ what is at a socket path


def test_regular_file_at_a_socket_path_survives(make_daemon, fake_aws, tmp_path):
    """A file where a destination's socket (or the control socket) should go is not deleted:
    the daemon exits 1 with a message naming the key, and the file is untouched."""
    precious = tmp_path / "d0.sock"
    precious.write_bytes(b"not a socket: somebody's data\n")
    daemon = make_daemon({"endpoint_url": fake_aws.url})
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=DEADLINE) == 1
    assert 'destination \\"d0\\": socket' in daemon.log() and "not a socket" in daemon.log()
    assert "Traceback" not in daemon.log()
    assert precious.read_bytes() == b"not a socket: somebody's data\n"

    precious.unlink()
    control = tmp_path / "control.sock"
    control.write_bytes(b"notes\n")
    daemon.start(wait=False)
    assert daemon.proc.wait(timeout=DEADLINE) == 1
    assert "[control] socket" in daemon.log()
    assert control.read_bytes() == b"notes\n"


@pytest.mark.parametrize("socket_type", ["stream", "datagram"])
def test_second_daemon_never_takes_a_live_socket(make_daemon, fake_aws, tmp_path, socket_type):
    """A second daemon (its own spool, the same socket path) exits 1 and leaves the first one's
    socket in place: lines written after it still reach the first daemon."""
    first = make_daemon({"endpoint_url": fake_aws.url, "socket_type": socket_type}).start()
    path = first.sockets()[0]
    inode = os.lstat(path).st_ino
    other = tmp_path / "other"
    other.mkdir()
    second = Daemon(other, first.config.read_text().replace(str(tmp_path / "spool.db"), str(other / "spool.db")),
                    first.env)
    second.start(wait=False)
    try:
        assert second.proc is not None
        assert second.proc.wait(timeout=DEADLINE) == 1
    finally:
        if second.proc is not None and second.proc.poll() is None:
            second.proc.kill()
            second.proc.wait()
    assert "another process is listening" in second.log() and 'destination \\"d0\\": socket' in second.log()
    assert os.lstat(path).st_ino == inode
    assert "ready" not in {e.get("event") for e in second.log_events()}
    if socket_type == "stream":
        assert send_lines(path, b"after the second daemon\n")["accepted"] == 1
    else:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"after the second daemon\n", str(path))
    wait_until(lambda: b"after the second daemon" in {r.data for r in fake_aws.all_records()},
               what="the line through the first daemon's socket")
    assert first.stop() == 0


@pytest.mark.parametrize("socket_type", ["stream", "datagram"])
def test_stale_socket_is_replaced(make_daemon, fake_aws, socket_type):
    """After kill -9 the socket file stays with nobody behind it: the next start replaces it."""
    daemon = make_daemon({"endpoint_url": fake_aws.url, "socket_type": socket_type}).start()
    path = daemon.sockets()[0]
    wait_until(lambda: _readies(daemon) == 1, what="the daemon to be ready")
    daemon.kill()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    daemon.start(wait=False)
    wait_until(lambda: _readies(daemon) == 2, what="the restart")
    if socket_type == "stream":
        assert send_lines(path, b"after the restart\n")["accepted"] == 1
    else:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"after the restart\n", str(path))
    wait_until(lambda: b"after the restart" in {r.data for r in fake_aws.all_records()}, what="the line")
    assert daemon.stop() == 0


def test_shutdown_unlinks_only_its_own_sockets(make_daemon, fake_aws, tmp_path):
    """At exit the daemon removes the socket files it made, but not a socket another process has
    put at the same path meanwhile (same name, another inode): that one is someone else's."""
    daemon = make_daemon({"endpoint_url": fake_aws.url}, {"endpoint_url": fake_aws.url}).start()
    mine, taken = daemon.sockets()
    control = tmp_path / "control.sock"
    wait_until(control.exists, what="the control socket")
    others = []
    for path in (taken, control):  # replaced under the running daemon, as another process may
        path.unlink()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(path))
        other.listen(1)
        others.append(other)
    try:
        assert daemon.stop() == 0
        assert not mine.exists(), "the daemon's own socket file is removed"
        for path in (taken, control):
            assert stat.S_ISSOCK(os.lstat(path).st_mode), f"{path.name}, another process's socket, was removed"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(DEADLINE)
                s.connect(str(path))  # still the other process's listening socket
    finally:
        for other in others:
            other.close()


def _readies(daemon: Daemon) -> int:
    return sum(e.get("event") == "ready" for e in daemon.log_events())


def test_status_shows_the_spool_size_on_disk(make_daemon, fake_aws, tmp_path):
    """``max_bytes`` counts bytes of lines; one-line connections make a file many times that, and
    status shows it as ``spool.disk_bytes`` (db + WAL, allocated blocks), running or not."""
    fake_aws.faults.down = True
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "50ms", "retry_cap": "100ms"},
                         extra='[daemon]\nshutdown_grace = "100ms"\n').start()
    for _ in range(300):
        assert send_lines(daemon.sockets()[0], b"x\n")["accepted"] == 1
    running = daemon.status()["spool"]
    assert running["bytes"] == 600
    assert running["disk_bytes"] >= 10 * running["bytes"]
    assert daemon.stop() == 0
    offline = daemon.status()
    assert offline["running"] is False
    on_disk = sum(os.stat(tmp_path / name).st_blocks * 512 for name in ("spool.db", "spool.db-wal")
                  if (tmp_path / name).exists())
    assert offline["spool"]["disk_bytes"] == on_disk > 0
    print(f"300 one-line connections: {running['bytes']} bytes of lines, {running['disk_bytes']} bytes on disk")


