"""Durability ordering, seen from the kernel: every acknowledgement the daemon writes to a client
follows the fsync/fdatasync of the WAL that made that client's lines durable.

The real daemon runs under ``strace -f``; writers send lines with unique tokens. From the trace,
in the order the kernel saw the calls:
- what each client connection delivered (``recvfrom``/``read`` on its socket),
- when each token first reached the WAL (``pwrite64``/``write`` on ``spool.db-wal``),
- when a sync of the WAL returned (``fdatasync``/``fsync`` on ``spool.db-wal``),
- when each acknowledgement was written (``sendto``/``write`` on the connection, its start).
Each acknowledgement must come after a WAL sync that itself comes after the connection's last
data and after the first WAL write of each of its lines. With ``synchronous = "normal"`` (no sync
at commit) the same check finds acknowledgements that no sync precedes: the check can fail.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.tools.client import DEADLINE, send_lines, wait_until

WRITERS = 4
CONNECTIONS = 25  # per writer
LINES = 5  # per connection
TOKEN = re.compile(rb"dur-\d{2}-\d{4}-\d{2}\.")
STRACE_CALLS = "read,write,pwrite64,recvfrom,sendto,fsync,fdatasync"

_LINE = re.compile(r"^(\d+)\s+(.*)$")
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)")
# The fd argument as -yy shows it: a Unix stream socket (its inode), a file (its path, in hex
# with -xx, then maybe <device numbers>), or anything else (pipes, eventfds, TCP).
_FD = re.compile(r'^\d+<(?:UNIX-STREAM:\[(\d+)(?:->\d+)?(?:,"[^"]*")?\]|((?:\\x[0-9a-f]{2})+)(?:<[^>]*>)?|[^>]*)>')
_DATA = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')


def _strace_usable() -> str | None:
    """None when strace can trace here, else the reason it cannot."""
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get install strace)"
    probe = subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True, timeout=DEADLINE)
    if probe.returncode != 0:
        return f"strace cannot trace here: {probe.stderr.decode(errors='replace').strip()[:200]}"
    return None


def _unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


@dataclass
class Trace:
    received: dict[int, bytearray] = field(default_factory=dict)  # connection inode -> bytes read
    last_read: dict[int, int] = field(default_factory=dict)  # inode -> event index of its last data
    first_in_wal: dict[bytes, int] = field(default_factory=dict)  # token -> first WAL write
    syncs: list[int] = field(default_factory=list)  # event index of each WAL sync's return
    acks: list[tuple[int, int, bytes]] = field(default_factory=list)  # (start index, inode, answer)


def parse(path: Path) -> Trace:
    """Read an ``strace -f -yy -xx`` log. A call split by another thread's (``<unfinished ...>``,
    then ``<... resumed>``) starts at its first line and returns at its second."""
    trace = Trace()
    pending: dict[str, tuple[str, str, int]] = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for index, raw in enumerate(f):
            m = _LINE.match(raw.rstrip("\n"))
            if not m:
                continue
            pid, rest = m.groups()
            if u := _UNFINISHED.match(rest):
                pending[pid] = (u.group(1), u.group(2), index)
                continue
            if r := _RESUMED.match(rest):
                if pid not in pending:
                    continue
                name, head, start = pending.pop(pid)
                rest = f"{name}({head}{r.group(2)}"
            else:
                start = index
            call = _CALL.match(rest)
            if call:
                _event(trace, call.group(1), call.group(2), int(call.group(3)), start, index)
    return trace


def _event(trace: Trace, name: str, args: str, ret: int, start: int, end: int) -> None:
    fd = _FD.match(args)
    if fd is None or ret < 0:
        return
    inode, file = fd.group(1), fd.group(2)
    is_wal = file is not None and _unhex(file).endswith(b"spool.db-wal")
    if name in ("fsync", "fdatasync"):
        if is_wal:
            trace.syncs.append(end)
        return
    data = _DATA.search(args, fd.end())
    if data is None:
        return
    payload = _unhex(data.group(1))
    if inode is not None:
        conn = int(inode)
        if name in ("read", "recvfrom") and ret > 0:
            trace.received.setdefault(conn, bytearray()).extend(payload[:ret])
            trace.last_read[conn] = end
        elif name in ("write", "sendto") and payload.startswith(b'{"accepted"'):
            trace.acks.append((start, conn, payload))
    elif is_wal and name in ("write", "pwrite64"):
        for token in TOKEN.findall(payload):
            trace.first_in_wal.setdefault(token, end)


def violations(trace: Trace) -> tuple[list[str], int]:
    """Acknowledgements not preceded by the WAL sync that made their lines durable; and how
    many of the acknowledged tokens were seen in the WAL (the rest fell across a page edge)."""
    problems: list[str] = []
    found = 0
    for start, conn, answer in trace.acks:
        tokens = TOKEN.findall(bytes(trace.received.get(conn, b"")))
        accepted = json.loads(answer)["accepted"]
        if accepted != len(tokens):
            problems.append(f"connection {conn}: {accepted} acknowledged, {len(tokens)} lines read")
        i = bisect.bisect_left(trace.syncs, start)
        sync = trace.syncs[i - 1] if i else None
        if sync is None or sync < trace.last_read.get(conn, -1):
            problems.append(f"connection {conn}: acknowledged at event {start} with no WAL sync "
                            f"after its last data (event {trace.last_read.get(conn)})")
            continue
        for token in tokens:
            seen = trace.first_in_wal.get(token)
            if seen is None:
                continue
            found += 1
            if seen > sync:
                problems.append(f"connection {conn}: {token!r} reached the WAL (event {seen}) after the "
                                f"last sync (event {sync}) before its acknowledgement (event {start})")
    return problems, found


def _run_traced(make_daemon, fake_aws, tmp_path: Path, synchronous: str) -> Trace:
    daemon = make_daemon({"endpoint_url": fake_aws.url}, spool={"synchronous": synchronous})
    out = tmp_path / "strace.log"
    with open(daemon.log_path, "ab") as log:
        strace = subprocess.Popen(
            ["strace", "-f", "-yy", "-xx", "-s", "70000", "-e", f"trace={STRACE_CALLS}", "-e", "signal=none",
             "-o", str(out), sys.executable, "-m", "spoold", "run", "--config", str(daemon.config)],
            env=daemon.env, stdout=log, stderr=log)
    pid = None
    try:
        wait_until(lambda: any(e.get("event") == "ready" for e in daemon.log_events()) or strace.poll() is not None,
                   what="the traced daemon to be ready")
        assert strace.poll() is None, daemon.log()
        # Only now: strace forks short-lived children of its own while it starts.
        pid = _child(strace.pid)
        assert pid is not None
        sock = daemon.sockets()[0]
        errors: list[BaseException] = []

        def writer(w: int) -> None:
            try:
                for c in range(CONNECTIONS):
                    lines = b"".join(b"dur-%02d-%04d-%02d.\n" % (w, c, n) for n in range(LINES))
                    assert send_lines(sock, lines)["accepted"] == LINES
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads), "a writer did not finish"
        os.kill(pid, signal.SIGTERM)
        assert strace.wait(timeout=DEADLINE) == 0, daemon.log()[-2000:]
    finally:
        if strace.poll() is None:
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            strace.kill()
            strace.wait()
    return parse(out)


def _child(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


@pytest.fixture
def strace_ok() -> None:
    reason = _strace_usable()
    if reason:
        pytest.skip(reason)


def test_every_ack_follows_the_wal_sync_of_its_lines(strace_ok, make_daemon, fake_aws, tmp_path):
    trace = _run_traced(make_daemon, fake_aws, tmp_path, "full")
    problems, found = violations(trace)
    total = WRITERS * CONNECTIONS * LINES
    assert len(trace.acks) == WRITERS * CONNECTIONS
    assert trace.syncs, "no WAL sync traced"
    assert not problems, "\n".join(problems[:20])
    # Tokens are looked for in single WAL writes; one that falls across two pages is not seen.
    assert found >= total * 9 // 10, f"only {found} of {total} lines seen in the WAL: is the trace parsed?"
    print(f"{len(trace.acks)} acknowledgements, {len(trace.syncs)} WAL syncs, {found}/{total} lines seen "
          "in the WAL: every acknowledgement after the sync of its lines")


def test_the_check_finds_acks_without_a_sync(strace_ok, make_daemon, fake_aws, tmp_path):
    """synchronous = "normal" does not sync the WAL at commit: the check must say so."""
    trace = _run_traced(make_daemon, fake_aws, tmp_path, "normal")
    problems, _ = violations(trace)
    assert len(trace.acks) == WRITERS * CONNECTIONS
    assert sum("no WAL sync" in p for p in problems) >= len(trace.acks) // 2, problems[:5]
