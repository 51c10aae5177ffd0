"""Following log files, end to end: the real daemon on real files, kill -9 included, lines
delivered to the loopback endpoint (tests/tools/fakeaws.py), the spool read back with sqlite3."""

from __future__ import annotations

import collections
import json
import os
import random
import resource
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.tools.client import wait_until
from tests.tools.daemon import spool_query

DEADLINE = 120.0


def _status(daemon: Any) -> dict[str, Any]:
    out = daemon.cli("status", "--json")
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout else {}


def _files(daemon: Any, dest: str = "d0") -> list[dict[str, Any]]:
    return _status(daemon).get("destinations", {}).get(dest, {}).get("files") or []


def _spooled(daemon: Any) -> collections.Counter[bytes]:
    return collections.Counter(line for (data,) in spool_query(daemon.tmp / "spool.db", "SELECT data FROM chunks")
                               for line in bytes(data).split(b"\n"))


def _arrived(srv: Any) -> collections.Counter[bytes]:
    return collections.Counter(r.data for r in srv.all_records())


def _started(daemon: Any) -> Any:
    """Start and wait for "ready": the files that start_at applies to are found by then (the
    socket file exists earlier)."""
    daemon.start()
    wait_until(lambda: sum(e.get("event") == "ready" for e in daemon.log_events()) == daemon.runs
               or daemon.proc.poll() is not None, DEADLINE, "ready")
    assert daemon.proc.poll() is None, daemon.log()[-3000:]
    return daemon


def _dest(tmp: Path, srv: Any, **keys: Any) -> dict[str, Any]:
    return {"endpoint_url": srv.url, "retry_base": "10ms", "retry_cap": "200ms",
            "files": [str(tmp / "logs" / "*.log*")], **keys}


class Writer(threading.Thread):
    """An application writing numbered lines to app.log, which logrotate renames (app.log ->
    app.log.1, app.log.1 -> app.log.2 and so on, then a new app.log; the app writes a little more to the old file
    before it reopens). ``written`` is every complete line, in order."""

    def __init__(self, folder: Path, tag: str) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.tag = tag
        self.written: list[bytes] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()  # held while writing, so the test can rotate between lines
        self.n = 0

    def line(self) -> bytes:
        self.n += 1
        return f"{self.tag}-{self.n:07d} {'x' * (self.n % 90)}".encode()

    def run(self) -> None:
        rng = random.Random(self.tag)
        f = open(self.folder / f"{self.tag}.log", "ab", buffering=0)
        try:
            while not self.stop.is_set():
                with self.lock:
                    batch = [self.line() for _ in range(rng.randint(1, 40))]
                    f.write(b"".join(b + b"\n" for b in batch))
                    self.written += batch
                    if getattr(self, "reopen", False):
                        f.close()
                        f = open(self.folder / f"{self.tag}.log", "ab", buffering=0)
                        self.reopen = False
                self.stop.wait(0.002)
        finally:
            f.close()

    def rotate(self) -> None:
        """Rename and create: the writer keeps writing to the renamed file until it reopens."""
        base = self.folder / f"{self.tag}.log"
        rotated = sorted(int(p.suffix[1:]) for p in self.folder.glob(f"{base.name}.*"))
        for i in reversed(rotated):  # none is overwritten: a file not read yet must not go
            os.rename(base.with_name(f"{base.name}.{i}"), base.with_name(f"{base.name}.{i + 1}"))
        os.rename(base, base.with_name(base.name + ".1"))
        base.touch()
        self.reopen = True


def test_rotation_and_kill9_lose_and_duplicate_nothing(make_daemon, fake_aws, tmp_path):
    """A writer appends while logrotate renames one file and copytruncates another, and the daemon
    is killed with SIGKILL several times: the spool holds every line written exactly once (the
    endpoint is down meanwhile, so nothing leaves it), and then every line arrives."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "copies").mkdir()
    fake_aws.faults.down = True
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws, start_at="beginning")))
    app = Writer(logs, "app")
    ct = Writer(logs, "ct")
    app.start()
    ct.start()
    rng = random.Random(5)
    try:
        for round_ in range(4):
            for _ in range(3):
                threading.Event().wait(rng.uniform(0.3, 0.8))  # let the writers write
                with app.lock:
                    app.rotate()
            # copytruncate, while the daemon runs and has read the file to its end: the lines
            # written between a copy and its truncation are lost by every tailer, by design.
            with ct.lock:
                size = os.path.getsize(logs / "ct.log")
                wait_until(lambda size=size: any(f["path"].endswith("ct.log") and f["offset"] == size
                                                 for f in _files(daemon)), DEADLINE, "ct.log read to its end")
                shutil.copy(logs / "ct.log", tmp_path / "copies" / f"ct.log.{round_}")
                os.truncate(logs / "ct.log", 0)
            threading.Event().wait(rng.uniform(0.1, 0.6))
            daemon.kill()
            threading.Event().wait(rng.uniform(0.0, 0.3))  # the writers go on while it is down
            _started(daemon)
    finally:
        app.stop.set()
        ct.stop.set()
        app.join()
        ct.join()
    want = collections.Counter(app.written + ct.written)
    assert len(want) == sum(want.values()) > 1000
    wait_until(lambda: sum(_spooled(daemon).values()) >= len(want), DEADLINE, "every line spooled")
    spooled = _spooled(daemon)
    assert set(spooled) == set(want), (len(set(want) - set(spooled)), len(set(spooled) - set(want)))
    assert max(spooled.values()) == 1, "a line was read twice"
    assert daemon.runs == 5
    fake_aws.faults.down = False
    wait_until(lambda: set(_arrived(fake_aws)) >= set(want), DEADLINE, "every line delivered")
    arrived = _arrived(fake_aws)
    assert set(arrived) == set(want)
    print(f"lines {len(want)}, delivery duplicates {sum(arrived.values()) - len(arrived)}")
    assert daemon.stop() == 0


def test_inode_reuse_is_read_from_its_start(make_daemon, fake_aws, tmp_path):
    """A file deleted while the daemon is stopped, whose inode a new file takes: its recorded
    offset belongs to the old file, and the new one is read from its start."""
    logs = tmp_path / "logs"
    logs.mkdir()
    old = logs / "a.log"
    old.write_bytes(b"".join(f"old-{i:03d} {'o' * 40}\n".encode() for i in range(30)))
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws, start_at="beginning")))
    wait_until(lambda: len(fake_aws.all_records()) >= 30, DEADLINE, "the old file's lines")
    assert daemon.stop() == 0
    inode = old.stat().st_ino
    old.unlink()
    new = logs / "b.log"
    for _ in range(200):  # ext4 hands a freed inode out again; make sure this one got it
        new.write_bytes(b"")
        if new.stat().st_ino == inode:
            break
        new.rename(logs / f"spare-{_}")  # keep it (not matched), so the next file gets another
    else:
        raise AssertionError("the filesystem gave no file the freed inode")
    for p in logs.glob("spare-*"):
        p.unlink()
    lines = [f"new-{i:03d}".encode() for i in range(100)]
    new.write_bytes(b"".join(line + b"\n" for line in lines))  # longer than the old offset
    _started(daemon)
    wait_until(lambda: set(_arrived(fake_aws)) >= set(lines), DEADLINE, "every line of the new file")
    assert daemon.stop() == 0
    assert any(e.get("event") == "file_followed" and e.get("reason") == "inode_reused" for e in daemon.log_events())


def test_deleted_file_is_finished_and_a_new_one_read_while_running(make_daemon, fake_aws, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws)))
    f = open(logs / "a.log", "ab", buffering=0)
    f.write(b"one\ntwo\n")
    wait_until(lambda: {b"one", b"two"} <= set(_arrived(fake_aws)), DEADLINE, "a file new while running, from 0")
    f.write(b"three\nfour")  # then the file is deleted, still open: its last lines are read
    os.unlink(logs / "a.log")
    f.write(b"\nfive")
    f.close()
    wait_until(lambda: {b"three", b"four", b"five"} <= set(_arrived(fake_aws)), DEADLINE, "the deleted file's end")
    wait_until(lambda: _files(daemon) == [], DEADLINE, "the deleted file forgotten")
    assert daemon.stop() == 0
    assert sorted(_arrived(fake_aws).elements()) == sorted([b"one", b"two", b"three", b"four", b"five"])


def test_start_at_end_and_beginning(make_daemon, fake_aws, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"before-1\nbefore-2\nhalf")
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws, stream="end"),
                         _dest(tmp_path, fake_aws, stream="beginning", start_at="beginning")))
    with open(logs / "a.log", "ab") as f:
        f.write(b"-done\nafter-1\n")
    want_end = {b"half-done", b"after-1"}  # the unfinished line counts from its start
    want_all = {b"before-1", b"before-2", b"half-done", b"after-1"}
    wait_until(lambda: {r.data for r in fake_aws.records("end")} == want_end
               and {r.data for r in fake_aws.records("beginning")} == want_all, DEADLINE, "both destinations")
    assert daemon.stop() == 0
    # A file created while stopped is new: read from its start, whatever start_at says.
    (logs / "b.log").write_bytes(b"later-1\n")
    _started(daemon)
    wait_until(lambda: b"later-1" in {r.data for r in fake_aws.records("end")}, DEADLINE, "the new file")
    assert daemon.stop() == 0
    assert sorted(r.data for r in fake_aws.records("end")) == sorted(want_end | {b"later-1"})


def test_partial_last_line_waits_then_counts_when_rotated_away(make_daemon, fake_aws, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws, files=[str(logs / "app.log")],
                                        max_line_bytes=100)))
    f = open(logs / "app.log", "ab", buffering=0)
    f.write(b"complete\n" + b"L" * 500 + b"\nparti")
    wait_until(lambda: b"complete" in set(_arrived(fake_aws)), DEADLINE, "the complete line")
    f.write(b"al\nlast without newline")
    wait_until(lambda: b"partial" in set(_arrived(fake_aws)), DEADLINE, "the completed line")
    assert b"last without newline" not in set(_arrived(fake_aws))
    st = _status(daemon)["destinations"]["d0"]
    [info] = st["files"]
    assert info["lag_bytes"] == len(b"last without newline") and info["size"] == info["offset"] + info["lag_bytes"]
    assert st["rejected"] == {"line too long": 1}
    os.rename(logs / "app.log", logs / "app.log.1")  # out of the glob: finished, its last line counts
    f.close()
    wait_until(lambda: b"last without newline" in set(_arrived(fake_aws)), DEADLINE, "the last line")
    assert daemon.stop() == 0
    assert sorted(_arrived(fake_aws).elements()) == [b"complete", b"last without newline", b"partial"]


def test_a_full_spool_pauses_reading_and_the_file_waits(make_daemon, fake_aws, tmp_path):
    """when_full = "block": reading stops at the spool's limit (nothing is dropped or skipped);
    once the service takes lines, the rest of the file follows."""
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [f"{i:07d} {'p' * 200}".encode() for i in range(15_000)]  # about 3 MiB, the spool 1 MiB
    (logs / "big.log").write_bytes(b"".join(line + b"\n" for line in lines))
    fake_aws.faults.down = True
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws, start_at="beginning"),
                         spool={"max_bytes": "1MiB", "when_full": "block"}))
    wait_until(lambda: (_files(daemon) or [{}])[0].get("offset", 0) > 0, DEADLINE, "reading to start")
    # Reading stops below the limit (give it time to go wrong, then look: a condition cannot
    # prove that something does not happen).
    threading.Event().wait(2.0)
    [info] = _files(daemon)
    assert 0 < info["offset"] <= 1024 * 1024 and info["lag_bytes"] == info["size"] - info["offset"] > 1024 * 1024
    assert sum(_spooled(daemon).values()) < len(lines)
    fake_aws.faults.down = False
    wait_until(lambda: set(_arrived(fake_aws)) >= set(lines), DEADLINE, "the whole file")
    assert daemon.stop() == 0
    assert set(_arrived(fake_aws)) == set(lines)


def test_a_pattern_added_later_starts_at_start_at(make_daemon, fake_aws, tmp_path):
    """start_at applies to the files a pattern matches when that pattern is first configured:
    adding a glob to a destination does not read old logs from their start."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"a-1\n")
    (logs / "b.txt").write_bytes(b"b-old\n")
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws, files=[str(logs / "*.log")], start_at="beginning")))
    wait_until(lambda: b"a-1" in set(_arrived(fake_aws)), DEADLINE, "a.log")
    assert daemon.stop() == 0
    text = daemon.config.read_text()
    daemon.config.write_text(text.replace('start_at = "beginning"', 'start_at = "end"').replace(
        json.dumps([str(logs / "*.log")]), json.dumps([str(logs / "*.log"), str(logs / "*.txt")])))
    (logs / "c.log").write_bytes(b"c-1\n")  # new under a known pattern: from its start
    _started(daemon)
    with open(logs / "b.txt", "ab") as f:
        f.write(b"b-new\n")
    wait_until(lambda: {b"c-1", b"b-new"} <= set(_arrived(fake_aws)), DEADLINE, "c.log and b.txt's new line")
    assert daemon.stop() == 0
    assert sorted(_arrived(fake_aws).elements()) == [b"a-1", b"b-new", b"c-1"]


def _positions(daemon: Any) -> list[tuple[str, int]]:
    return sorted(spool_query(daemon.tmp / "spool.db", "SELECT path, offset FROM files"))


def test_a_rotated_file_is_finished_then_forgotten_once_deleted(make_daemon, fake_aws, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    app = logs / "app.log"
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws, files=[str(logs / "app.log*")])))
    app.write_bytes(b"r-1\nr-2 unfinished")
    wait_until(lambda: b"r-1" in set(_arrived(fake_aws)), DEADLINE, "the first line")
    os.rename(app, logs / "app.log.1")  # rename and create: the old file is finished, its last line counts
    app.write_bytes(b"n-1\n")
    wait_until(lambda: {b"r-2 unfinished", b"n-1"} <= set(_arrived(fake_aws)), DEADLINE, "the rotated file's end")
    assert _positions(daemon) == [(str(app), 4), (str(app), 18)]  # both known by the name first seen
    os.unlink(logs / "app.log.1")
    wait_until(lambda: _positions(daemon) == [(str(app), 4)], DEADLINE, "the deleted file forgotten")
    assert daemon.stop() == 0
    assert sorted(_arrived(fake_aws).elements()) == [b"n-1", b"r-1", b"r-2 unfinished"]


def test_truncated_and_regrown_past_the_offset_between_two_polls(make_daemon, fake_aws, tmp_path):
    """copytruncate, then the application writes more than the old offset before the next poll:
    reading at the old offset would take a piece of a line and then, once the first bytes are
    seen to differ, read again what it had read. The new content is read once, from its start."""
    logs = tmp_path / "logs"
    logs.mkdir()
    fake_aws.faults.down = True  # nothing leaves the spool: it holds what was read
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws)))
    path = logs / "ct.log"
    old = [f"old-{i:04d}".encode() for i in range(60)]
    path.write_bytes(b"".join(line + b"\n" for line in old))
    size = path.stat().st_size
    wait_until(lambda: any(f["offset"] == size for f in _files(daemon)), DEADLINE, "the file read to its end")
    new = [f"new-{i:04d} {'n' * 23}".encode() for i in range(200)]  # the old offset falls inside a line
    with open(path, "r+b", buffering=0) as f:
        f.truncate(0)  # and, microseconds later, far past the old offset
        f.write(b"".join(line + b"\n" for line in new))
    wait_until(lambda: set(new) <= set(_spooled(daemon))
               and any(e.get("event") == "file_truncated" for e in daemon.log_events()), DEADLINE, "the new lines")
    wait_until(lambda: any(f["offset"] == path.stat().st_size for f in _files(daemon)), DEADLINE, "the new end")
    spooled = _spooled(daemon)
    assert daemon.stop() == 0
    assert set(spooled) - {b""} == set(old) | set(new), sorted(set(spooled) - set(old) - set(new))[:3]
    assert max(spooled.values()) == 1, [line for line, n in spooled.items() if n > 1][:3]


def test_a_read_larger_than_the_destinations_share_of_the_spool_is_taken_in_parts(make_daemon, fake_aws, tmp_path):
    """Two destinations share a 1 MiB spool, so each has about 512 KiB of its own: one read of
    1 MiB of lines could never be stored whole (when_full = "block" would wait for ever). The
    file is spooled in parts that fit, and every line arrives."""
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [f"{i:06d} {'s' * 240}".encode() for i in range(6000)]  # about 1.5 MiB
    (logs / "big.log").write_bytes(b"".join(line + b"\n" for line in lines))
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws, stream="files", start_at="beginning"),
                                  {"endpoint_url": fake_aws.url, "stream": "socket"},
                                  spool={"max_bytes": "1MiB", "when_full": "block"}))
    wait_until(lambda: {r.data for r in fake_aws.records("files")} >= set(lines), 60.0, "the whole file")
    assert daemon.stop() == 0
    assert {r.data for r in fake_aws.records("files")} == set(lines)


def test_a_long_line_is_counted_once_however_often_its_read_is_refused(make_daemon, fake_aws, tmp_path):
    """when_full = "reject": a read the full spool refuses is read again a second later. The line
    too long in it is rejected once, not at every try."""
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [f"{i:06d} {'r' * 190}".encode() for i in range(6000)]  # about 1.2 MiB, the spool 1 MiB
    lines[5600] = b"L" * 500
    (logs / "app.log").write_bytes(b"".join(line + b"\n" for line in lines))
    fake_aws.faults.down = True
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws, start_at="beginning", max_line_bytes=300),
                                  spool={"max_bytes": "1MiB", "when_full": "reject"}))
    wait_until(lambda: sum(e.get("event") == "file_lines_not_spooled" for e in daemon.log_events()) >= 3,
               DEADLINE, "three refused tries")
    assert _status(daemon)["destinations"]["d0"].get("rejected", {}).get("line too long", 0) <= 1
    fake_aws.faults.down = False
    good = set(lines) - {lines[5600]}
    wait_until(lambda: set(_arrived(fake_aws)) >= good, DEADLINE, "every other line")
    assert _status(daemon)["destinations"]["d0"]["rejected"] == {"line too long": 1}
    assert daemon.stop() == 0


def test_a_file_started_at_its_end_and_reopened_after_rotation_is_not_read_from_its_start(
        make_daemon, fake_aws, tmp_path):
    """start_at = "end" skips what a file held when its pattern was first configured. The file is
    rotated (renamed, still matched) and finished with nothing read; the application then writes
    one more line to it: the file is opened again and resumed, its old lines still skipped."""
    logs = tmp_path / "logs"
    logs.mkdir()
    old = [f"old-{i:03d}".encode() for i in range(50)]
    app = logs / "app.log"
    app.write_bytes(b"".join(line + b"\n" for line in old))
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws, files=[str(logs / "app.log*")])))
    with open(app, "ab", buffering=0) as f:
        os.rename(app, logs / "app.log.1")
        wait_until(lambda: any(e.get("event") == "file_finished" for e in daemon.log_events()), DEADLINE,
                   "the rotated file finished")
        f.write(b"late\n")  # the application had not reopened its log yet
    wait_until(lambda: b"late" in set(_arrived(fake_aws)), DEADLINE, "the late line")
    assert daemon.stop() == 0
    assert sorted(_arrived(fake_aws).elements()) == [b"late"]


def test_more_files_than_descriptors_are_followed_in_turns(make_daemon, fake_aws, tmp_path):
    """A glob matching more files than the daemon may keep open (its descriptor limit lowered
    while it runs): the files quiet the longest are closed, then opened again when they grow,
    so every line of every file arrives and the sockets and the spool keep their descriptors."""
    logs = tmp_path / "logs"
    logs.mkdir()
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws, start_at="beginning")))
    pid = daemon.proc.pid
    _soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 40, hard))
    names = [logs / f"f{i:03d}.log" for i in range(60)]
    for i, path in enumerate(names):
        path.write_bytes(f"first-{i}\n".encode())
    first = {f"first-{i}".encode() for i in range(len(names))}
    wait_until(lambda: set(_arrived(fake_aws)) >= first, DEADLINE, "the first line of every file")
    # Every file is in the status, the closed ones as parked, at their offset.
    wait_until(lambda: len(_files(daemon)) == len(names), DEADLINE, "every file in the status")
    listed = _files(daemon)
    assert {f["path"] for f in listed} == {str(p) for p in names}
    parked = [f for f in listed if f["state"] == "parked"]
    assert parked and all(f["offset"] == f["size"] == os.path.getsize(f["path"]) for f in parked), parked[:3]
    for i, path in enumerate(names):
        with open(path, "ab") as f:
            f.write(f"second-{i}\n".encode())
    second = {f"second-{i}".encode() for i in range(len(names))}
    wait_until(lambda: set(_arrived(fake_aws)) >= second, DEADLINE, "the second line of every file")
    assert daemon.stop() == 0
    assert set(_arrived(fake_aws)) == first | second
    events = daemon.log_events()
    assert not any(e.get("event") == "file_unreadable" for e in events)
    reasons = collections.Counter(e["reason"] for e in events if e.get("event") == "file_followed")
    assert reasons["new"] == len(names) and reasons["resumed"] > 0, reasons


def test_a_folder_the_glob_cannot_list_for_a_while_loses_no_file(make_daemon, fake_aws, tmp_path):
    """glob reports no error: a folder it cannot list (here: no descriptor left to open it)
    looks empty. The followed files are not taken for gone (finished, forgotten, and read again
    from 0 once the folder lists again): each is read once, and goes on."""
    logs = tmp_path / "logs"
    logs.mkdir()
    daemon = _started(make_daemon(_dest(tmp_path, fake_aws)))
    names = [logs / f"a{i}.log" for i in range(3)]
    for path in names:
        path.write_bytes(path.stem.encode() + b"-1\n")
    wait_until(lambda: len(_files(daemon)) == 3 and all(f["offset"] == f["size"] for f in _files(daemon)),
               DEADLINE, "the files read")
    pid = daemon.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")), hard))
    # Two scans and the finishing grace, for the bug to show (nothing to wait for otherwise).
    threading.Event().wait(2 * 5.0 + 5.0 + 1.0)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    for path in names:
        with open(path, "ab") as f:
            f.write(path.stem.encode() + b"-2\n")
    want = {f"a{i}-{n}".encode() for i in range(3) for n in (1, 2)}
    wait_until(lambda: set(_arrived(fake_aws)) >= want, DEADLINE, "every line")
    assert daemon.stop() == 0
    events = daemon.log_events()
    assert not [e for e in events if e.get("event") == "file_finished"]
    assert sum(e.get("event") == "file_followed" for e in events) == 3


def test_a_folder_not_mounted_at_start_keeps_its_files_positions(make_daemon, fake_aws, tmp_path):
    """The logs folder is another filesystem's (a symlink into /dev/shm stands for a mount) and
    missing when the daemon starts: its files are not taken for gone. Once it is back, each
    file resumes at its offset: nothing is read twice."""
    real = Path("/dev/shm") / f"spoold-{os.getpid()}-{tmp_path.name}"
    if not real.parent.is_dir() or real.parent.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip(f"needs {real.parent} on another filesystem than {tmp_path}")
    real.mkdir()
    try:
        logs = tmp_path / "logs"
        logs.symlink_to(real)
        (real / "a.log").write_bytes(b"a-1\na-2\n")
        (real / "b.log").write_bytes(b"b-1\n")
        daemon = _started(make_daemon(_dest(tmp_path, fake_aws, start_at="beginning")))
        wait_until(lambda: set(_arrived(fake_aws)) >= {b"a-1", b"a-2", b"b-1"}, DEADLINE, "the first lines")
        assert daemon.stop() == 0
        logs.unlink()  # "unmounted"
        _started(daemon)
        logs.symlink_to(real)  # "mounted" again
        with open(real / "a.log", "ab") as f:
            f.write(b"a-3\n")
        wait_until(lambda: b"a-3" in set(_arrived(fake_aws)), DEADLINE, "the line written once it is back")
        wait_until(lambda: len(_files(daemon)) == 2, DEADLINE, "both files followed again")
        assert daemon.stop() == 0
        assert sorted(_arrived(fake_aws).elements()) == [b"a-1", b"a-2", b"a-3", b"b-1"]
        reasons = [e["reason"] for e in daemon.log_events() if e.get("event") == "file_followed"]
        assert reasons.count("resumed") == 2, reasons
    finally:
        shutil.rmtree(real)
