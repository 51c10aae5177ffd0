"""spoold.systemd against the real protocols: these tests play systemd's side.

notify() is checked by a datagram socket bound here, as systemd binds /run/systemd/notify;
listen_fds() by a child process that receives real listening sockets on fds 3 and 4, as
systemd passes them; the unit files by `systemd-analyze verify` when it is installed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spoold import systemd
from tests.tools.notify import ENV_VARS, RECV_TIMEOUT, receive

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
# Generous: a child process only imports spoold.systemd, but CI machines can be slow.
CHILD_TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def _outside_systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The suite itself may run under systemd (a CI runner's unit); start every test outside it.
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    yield
    systemd._notifier.close()  # the socket notify() keeps open for the daemon's lifetime


# --- notify --------------------------------------------------------------------------------


def test_notify_sends_one_datagram_to_a_path(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.getsockname())

    assert systemd.notify("READY=1", "STATUS=listening on 2 sockets") is True

    data, pid = receive(receiver)
    assert data == b"READY=1\nSTATUS=listening on 2 sockets"
    # NotifyAccess=main: systemd accepts the message only from the main PID.
    assert pid == os.getpid()


def test_notify_sends_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"spoold-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(RECV_TIMEOUT)
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)

        assert systemd.notify("STOPPING=1") is True

        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_reuses_one_socket(receiver: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.getsockname())
    notifier = systemd._Notifier()
    monkeypatch.setattr(systemd, "_notifier", notifier)
    try:
        assert systemd.notify("WATCHDOG=1")
        first = notifier._sock
        assert systemd.notify("WATCHDOG=1")
        assert first is not None and notifier._sock is first
    finally:
        notifier.close()
    assert receiver.recv(4096) == receiver.recv(4096) == b"WATCHDOG=1"


def test_notify_from_threads_keeps_datagrams_whole(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.getsockname())
    threads, per_thread = 4, 25
    results: list[bool] = []

    def send(i: int) -> None:
        for j in range(per_thread):
            results.append(systemd.notify(f"STATUS=thread {i} message {j}", "WATCHDOG=1"))

    workers = [threading.Thread(target=send, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    # Receive while they send: the kernel's datagram queue is short (net.unix.max_dgram_qlen).
    received = {receiver.recv(4096) for _ in range(threads * per_thread)}
    for worker in workers:
        worker.join(timeout=RECV_TIMEOUT)

    assert all(results) and len(results) == threads * per_thread
    assert received == {
        f"STATUS=thread {i} message {j}\nWATCHDOG=1".encode()
        for i in range(threads)
        for j in range(per_thread)
    }


def test_reloading_sends_monotonic_usec(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.getsockname())
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    assert systemd.reloading("STATUS=reloading config") is True

    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic, status = receiver.recv(4096).decode().split("\n")
    assert reloading == "RELOADING=1"
    key, _, usec = monotonic.partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    assert status == "STATUS=reloading config"


def test_notify_without_notify_socket_is_a_no_op() -> None:
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize("value", ["", "relative/notify", "vsock:2:1234"])
def test_notify_ignores_addresses_it_does_not_speak(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert systemd.notify("READY=1") is False


def test_notify_to_a_missing_socket_returns_false(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(sockdir / "gone"))
    assert systemd.notify("READY=1") is False


def test_notify_to_a_dead_socket_returns_false(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a crashed systemd leaves behind: the file exists, nobody reads it (ECONNREFUSED).
    path = sockdir / "stale"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))

    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize(
    "states",
    [
        (),
        ("READY=1\nSTATUS=two lines",),
        ("READY",),
        ("=1",),
        ("READY=1", "STATUS=a\nb"),
    ],
)
def test_notify_rejects_malformed_states_even_outside_systemd(
    states: tuple[str, ...],
) -> None:
    with pytest.raises(ValueError):
        systemd.notify(*states)


# --- watchdog_interval ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("2500000", "self", 2.5),
        ("30000000", "other", None),
        ("30000000", "not-a-pid", None),
        (None, "self", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    usec: str | None,
    pid: str | None,
    expected: float | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        value = {"self": str(os.getpid()), "other": str(os.getppid())}.get(pid, pid)
        monkeypatch.setenv("WATCHDOG_PID", value)

    assert systemd.watchdog_interval() == expected


# --- listen_fds: in this process, only the cases that must not touch any fd ------------------


def test_listen_fds_outside_systemd_is_empty() -> None:
    assert systemd.listen_fds() == []


@pytest.mark.parametrize(
    ("pid", "count"),
    [("other", "2"), ("self", "0"), ("self", "two"), ("", "2"), ("not-a-pid", "2")],
)
def test_listen_fds_not_for_us_is_empty_and_unsets(
    pid: str, count: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = {"self": str(os.getpid()), "other": str(os.getppid())}.get(pid, pid)
    monkeypatch.setenv("LISTEN_PID", value)
    monkeypatch.setenv("LISTEN_FDS", count)
    monkeypatch.setenv("LISTEN_FDNAMES", "app:metrics")

    assert systemd.listen_fds() == []

    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & os.environ.keys()


# --- listen_fds: a child process receives real sockets on fds 3 and 4 -----------------------

# Runs in the child. It plays the part of systemd's exec step: move the inherited sockets to
# 3 and 4, set LISTEN_PID to the pid that will call listen_fds(), then hand over. The sources
# are above 10 so moving one never overwrites another.
TRAMPOLINE = r"""
import json, os, sys
mode, unset, *sources = sys.argv[1:]
for target, source in enumerate(map(int, sources), start=3):
    os.dup2(source, target)
    os.close(source)
os.environ["LISTEN_PID"] = str(os.getpid() if mode == "self" else os.getppid())

from spoold import systemd
from tests.tools.notify import ENV_VARS, RECV_TIMEOUT, receive

fds = systemd.listen_fds(unset_environment=unset == "unset")
sockets = [systemd.socket_from_fd(fd) for _, fd in fds]
print(json.dumps({
    "fds": fds,
    "env": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
    "inheritable": [os.get_inheritable(fd) for fd in (3, 4)],
    "types": [s.type.name for s in sockets],
    "names": [s.getsockname() for s in sockets],
}), flush=True)
if sockets:
    conn, _ = sockets[0].accept()
    with conn:
        conn.sendall(b"accepted by %d" % os.getpid())
"""


def _activate(
    sockdir: Path, *, names: str | None, mode: str = "self", unset: bool = True
) -> tuple[dict[str, object], bytes]:
    """Pass a listening stream socket and a datagram socket to a child; return its report
    and what the child sent over a connection accepted on the first one (b"" if none)."""
    stream_path, dgram_path = str(sockdir / "app.sock"), str(sockdir / "metrics.sock")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram,
    ):
        stream.bind(stream_path)
        stream.listen()
        dgram.bind(dgram_path)
        sources = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for s in (stream, dgram)]
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["LISTEN_FDS"] = "2"
        if names is not None:
            env["LISTEN_FDNAMES"] = names
        argv = [sys.executable, "-c", TRAMPOLINE, mode, "unset" if unset else "keep"]
        try:
            proc = subprocess.Popen(
                [*argv, *map(str, sources)],
                pass_fds=sources,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        finally:
            for fd in sources:
                os.close(fd)
        with proc:
            try:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                greeting = b""
                if line:
                    report = json.loads(line)
                    if report["fds"]:
                        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                            client.settimeout(CHILD_TIMEOUT)
                            client.connect(stream_path)
                            greeting = client.recv(4096)
                _, stderr = proc.communicate(timeout=CHILD_TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert proc.returncode == 0 and line, stderr.decode()
    return report, greeting


def test_listen_fds_with_names(sockdir: Path) -> None:
    report, greeting = _activate(sockdir, names="app:metrics")

    assert report["fds"] == [["app", 3], ["metrics", 4]]
    assert report["types"] == ["SOCK_STREAM", "SOCK_DGRAM"]
    assert report["names"] == [str(sockdir / "app.sock"), str(sockdir / "metrics.sock")]
    # Close-on-exec, so a child the daemon spawns does not inherit the listeners.
    assert report["inheritable"] == [False, False]
    assert report["env"] == {
        "LISTEN_PID": None,
        "LISTEN_FDS": None,
        "LISTEN_FDNAMES": None,
    }
    # The child accepted our connection on fd 3: the very socket this test listens on.
    assert greeting.startswith(b"accepted by ")


def test_listen_fds_without_names(sockdir: Path) -> None:
    report, greeting = _activate(sockdir, names=None)

    assert report["fds"] == [["unknown", 3], ["unknown", 4]]
    assert greeting.startswith(b"accepted by ")


def test_listen_fds_with_too_few_names(sockdir: Path) -> None:
    report, _ = _activate(sockdir, names="app")

    assert report["fds"] == [["app", 3], ["unknown", 4]]


def test_listen_fds_for_another_process(sockdir: Path) -> None:
    report, greeting = _activate(sockdir, names="app:metrics", mode="parent")

    assert report["fds"] == []
    assert greeting == b""
    # Not ours, so left as they were, but the variables are gone all the same.
    assert report["inheritable"] == [True, True]
    assert report["env"] == {
        "LISTEN_PID": None,
        "LISTEN_FDS": None,
        "LISTEN_FDNAMES": None,
    }


def test_listen_fds_can_keep_the_environment(sockdir: Path) -> None:
    report, _ = _activate(sockdir, names="app:metrics", unset=False)

    assert report["fds"] == [["app", 3], ["metrics", 4]]
    env = report["env"]
    assert isinstance(env, dict)
    assert env["LISTEN_FDS"] == "2" and env["LISTEN_FDNAMES"] == "app:metrics"


# --- socket_from_fd ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_socket_from_fd_accepts_unix_listeners(sockdir: Path, kind: socket.SocketKind) -> None:
    with socket.socket(socket.AF_UNIX, kind) as original:
        original.bind(str(sockdir / "s"))
        if kind == socket.SOCK_STREAM:
            original.listen()
        with systemd.socket_from_fd(os.dup(original.fileno())) as sock:
            assert sock.family == socket.AF_UNIX
            assert sock.type == kind
            assert sock.getsockname() == str(sockdir / "s")


def _unix_seqpacket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _inet_stream() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def _unix_unlistened_stream() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_inet_stream, "AF_INET, expected AF_UNIX"),
        (_unix_seqpacket, "SOCK_SEQPACKET, expected SOCK_STREAM or SOCK_DGRAM"),
        (_unix_unlistened_stream, "Accept=no"),
    ],
)
def test_socket_from_fd_rejects_other_sockets(
    make: Callable[[], socket.socket], message: str
) -> None:
    with make() as original:
        fd = os.dup(original.fileno())
        try:
            with pytest.raises(ValueError, match=f"fd {fd} .*{message}"):
                systemd.socket_from_fd(fd)
            os.fstat(fd)  # still open: a rejected fd stays the caller's
        finally:
            os.close(fd)


def test_socket_from_fd_rejects_a_pipe() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ValueError, match=f"fd {read_end} is not a socket"):
            systemd.socket_from_fd(read_end)
        os.fstat(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)


# --- the unit files ------------------------------------------------------------------------


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd): units unchecked")
    service = (UNITS / "spoold.service").read_text()
    exec_start = "ExecStart=/usr/local/bin/spoold "
    assert exec_start in service
    # verify fails when ExecStart's binary does not exist, and /usr/local/bin/spoold exists only
    # on an installed host: point it at this interpreter, leaving every other line as shipped.
    binary = shutil.which("spoold") or f"{sys.executable} -m spoold"
    (tmp_path / "spoold.service").write_text(service.replace(exec_start, f"ExecStart={binary} "))
    shutil.copy(UNITS / "spoold.socket", tmp_path / "spoold.socket")

    result = subprocess.run(
        [
            analyze,
            "verify",
            str(tmp_path / "spoold.service"),
            str(tmp_path / "spoold.socket"),
        ],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify also loads the units ours depend on (sockets.target, ...) and may grumble about
    # them on some hosts; only lines about our two units count. There are none to excuse: the
    # missing spoold user and group are not checked by verify, and the credential file is
    # read only when the unit starts.
    ours = [line for line in output.splitlines() if "spoold.s" in line]
    assert ours == [], output


def _unit_groups() -> set[str]:
    """The groups the units make systemd look up when it starts them."""
    groups = set()
    for unit in ("spoold.service", "spoold.socket"):
        for line in (UNITS / unit).read_text().splitlines():
            key, _, value = line.partition("=")
            if key in ("Group", "SupplementaryGroups", "SocketGroup"):
                groups.update(value.split())
    return groups


def _created_groups(text: str) -> set[str]:
    """Groups that the shell commands in ``text`` create (comment markers stripped)."""
    made = set()
    for line in text.splitlines():
        words = line.lstrip("# ").split(" #")[0].split()
        if words[:1] == ["groupadd"] or (words[:1] == ["useradd"] and "--user-group" in words):
            made.add(words[-1])
    return made


def test_every_group_the_units_need_is_created_by_the_install_steps() -> None:
    # systemd fails a unit whose group is missing (216/GROUP): the steps must create each one.
    needed = _unit_groups()
    assert {"spoold", "spoold-writers"} <= needed
    service = (UNITS / "spoold.service").read_text().replace("\\\n#", "")
    docs = {name: (REPO / name).read_text().replace("\\\n", "") for name in ("README.md", "docs/operations.md")}
    for where, text in (("spoold.service's install comment", service), *docs.items()):
        missing = needed - _created_groups(text)
        assert not missing, f"{where} never creates {sorted(missing)}, which the units need"


# Runs in a child: the kernel's PR_SET_MDWE applies the policy of MemoryDenyWriteExecute=yes
# (no W+X mappings, no mprotect to executable) and cannot be undone, hence the child.
MDWE_PROBE = r"""
import ctypes, mmap, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
try:
    mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit("PR_SET_MDWE did not refuse a W+X mapping")

import sqlite3, ssl, botocore.session, httpx, structlog, trio
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

db = sqlite3.connect(":memory:")
db.execute("create table t (x)")
db.execute("insert into t values (1)")
request = AWSRequest(method="POST", url="https://kinesis.us-east-1.amazonaws.com/", data=b"{}")
SigV4Auth(Credentials("AKID", "SECRET"), "kinesis", "us-east-1").add_auth(request)
ssl.create_default_context()

async def main():
    a, b = trio.socket.socketpair()
    with a, b:
        await a.send(b"x")
        assert await b.recv(1) == b"x"
    async with httpx.AsyncClient():
        pass

trio.run(main)
"""


def test_dependencies_run_under_memory_deny_write_execute() -> None:
    result = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3) to emulate the unit's setting")
    assert result.returncode == 0, result.stderr
