"""The systemd side of spoold: readiness notification and socket activation.

Both protocols are small and stable, so they are spoken directly with the stdlib rather than
through python-systemd, a C extension that needs libsystemd's headers to build. Every function
here is a no-op outside systemd: without $NOTIFY_SOCKET, notify() returns False; without
$LISTEN_PID/$LISTEN_FDS, listen_fds() returns [].

Messages the daemon sends (one datagram per notify() call, states joined by "\\n"):

    READY=1                 once the spool is open and every listener accepts; with Type=notify
                            systemd holds back units ordered after spoold until then, and
                            `systemctl start` returns only then.
    STATUS=<one line>       whenever the human-readable state changes ("shipping; 120 spooled",
                            "kinesis unreachable, retrying"); shown by `systemctl status`.
    WATCHDOG=1              every min(5 s, watchdog_interval() / 2), and only after a round trip
                            through the spool's writer thread completes within that period (not
                            a free-running timer), so a wedged disk or a stuck event loop stops
                            the pings and gets the service restarted.
    RELOADING=1             on SIGHUP, before re-reading the config, in the same datagram as
    MONOTONIC_USEC=<us>     the CLOCK_MONOTONIC time (reloading() sends both); the Type=notify-
                            reload convention, which older systemd accepts with Type=notify too.
                            Followed by READY=1 when the reload is done, whether it worked or not.
                            A refused reload keeps the old config and sends, with that READY=1,
                            STATUS=reload refused: <reason>; every STATUS= after it keeps saying
                            so (`systemctl status` shows it) until a reload succeeds.
    STOPPING=1              as soon as shutdown starts, so systemd shows "deactivating" while
                            the grace period drains connections.

Socket activation: systemd passes the listening sockets as fds 3, 4, ... with $LISTEN_FDS,
$LISTEN_PID and $LISTEN_FDNAMES (from FileDescriptorName= in the .socket unit). listen_fds()
returns (name, fd) pairs and socket_from_fd() turns one into a checked AF_UNIX socket.
"""

from __future__ import annotations

import os
import socket
import threading
import time

__all__ = [
    "listen_fds",
    "notify",
    "reloading",
    "socket_from_fd",
    "watchdog_interval",
]

# sd_listen_fds(3): the first passed fd is always 3, right after stdin/stdout/stderr.
LISTEN_FDS_START = 3
# A send may block only while systemd's receive queue is full; past this the message is
# dropped (notify() returns False) rather than stalling the trio thread behind a stuck PID 1.
NOTIFY_SEND_TIMEOUT = 1.0

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class _Notifier:
    """One lazily created datagram socket, shared by every notify() call.

    The socket is never connected: each send names $NOTIFY_SOCKET as read at that moment, so a
    changed variable (tests do this) or a restarted systemd needs no reconnect logic. The lock
    covers creation and sending, so worker threads may notify as well as the trio thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def send(self, address: bytes, message: bytes) -> bool:
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.settimeout(NOTIFY_SEND_TIMEOUT)
                    self._sock = sock
                self._sock.sendto(message, address)
            except OSError:
                # ENOENT/ECONNREFUSED (systemd gone or restarting), EAGAIN/timeout (queue
                # full), EMSGSIZE: none of them is a reason for the daemon to stop.
                return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


_notifier = _Notifier()


def _notify_address() -> bytes | None:
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        # Linux abstract namespace: a leading NUL instead of a file.
        return b"\0" + os.fsencode(path[1:])
    if path.startswith("/"):
        return os.fsencode(path)
    # Unset, empty, or a form we do not speak (vsock:, relative paths): not under systemd.
    return None


def notify(*states: str) -> bool:
    """Send `states` ("READY=1", "STATUS=...") to systemd as one datagram.

    Returns True when the datagram was sent, False when $NOTIFY_SOCKET is unset or the send
    failed; never raises for a send error. Raises ValueError for a state that is not
    "KEY=value" on one line: a newline would smuggle in a second assignment. Validation happens
    even outside systemd, so such a bug shows up in tests.
    """
    if not states:
        raise ValueError("notify() needs at least one state such as 'READY=1'")
    for state in states:
        if "\n" in state or "=" not in state or state.startswith("="):
            raise ValueError(f"a notify state must be one line of KEY=value, got {state!r}")
    address = _notify_address()
    if address is None:
        return False
    return _notifier.send(address, "\n".join(states).encode())


def reloading(*states: str) -> bool:
    """Tell systemd a reload started: RELOADING=1 and MONOTONIC_USEC in one datagram.

    With Type=notify-reload (systemd >= 253) a RELOADING=1 whose MONOTONIC_USEC predates the
    reload request does not count as the answer to it; older systemd ignores the extra field.
    Send READY=1 when the reload is done.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *states)


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds (WatchdogSec=), or None when it is not for us.

    Ping with notify("WATCHDOG=1") at half this interval, as sd_watchdog_enabled(3) advises.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        interval = int(usec)
    except ValueError:
        return None
    if interval <= 0:
        return None
    return interval / 1_000_000


def listen_fds(unset_environment: bool = True) -> list[tuple[str, int]]:
    """The sockets systemd passed to this process, as (name, fd) pairs in fd order.

    Names come from $LISTEN_FDNAMES (FileDescriptorName=); an fd without one is "unknown".
    Each fd is made close-on-exec so it does not leak into child processes. With
    `unset_environment` (the default) the LISTEN_* variables are removed whatever the outcome,
    so a second call, or a child process, does not take the same fds again.
    """
    try:
        pid = os.environ.get("LISTEN_PID", "")
        count = os.environ.get("LISTEN_FDS", "")
        names_var = os.environ.get("LISTEN_FDNAMES")
        try:
            if not pid or int(pid) != os.getpid():
                # Meant for another process, e.g. our parent, or not under systemd at all.
                return []
            n = int(count)
        except ValueError:
            return []
        if n <= 0:
            return []
        names = names_var.split(":") if names_var else []
        # libsystemd rejects a count mismatch; a name per fd we can match is more useful
        # to a daemon than refusing to start, and "unknown" is what systemd itself uses.
        names = (names + ["unknown"] * n)[:n]
        fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + n))
        for fd in fds:
            os.set_inheritable(fd, False)
        return list(zip(names, fds, strict=True))
    finally:
        if unset_environment:
            for var in _LISTEN_VARS:
                os.environ.pop(var, None)


def socket_from_fd(fd: int) -> socket.socket:
    """Wrap a passed fd as a socket, checking it is an AF_UNIX stream listener or datagram.

    Raises ValueError naming the fd and what it is instead; the fd is then left open and still
    the caller's. On success the returned socket owns the fd.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"fd {fd} is not a socket: {exc.strerror}") from exc
    problem = ""
    if sock.family != socket.AF_UNIX:
        problem = f"is {_name(sock.family)}, expected AF_UNIX"
    elif sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        problem = f"is {_name(sock.type)}, expected SOCK_STREAM or SOCK_DGRAM"
    elif sock.type == socket.SOCK_STREAM and not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        # A connected stream socket is what Accept=yes passes: one connection per instance.
        problem = "is a stream socket that is not listening (the .socket unit needs Accept=no)"
    if problem:
        sock.detach()
        raise ValueError(f"fd {fd} {problem}")
    return sock


def _name(constant: int) -> str:
    # socket.socket reports values the socket module has no enum member for as plain ints.
    return getattr(constant, "name", str(constant))
