"""systemd's side of sd_notify(3): a bound notify socket and the reading of one datagram."""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The variables systemd sets for a service; a test starts without them.
ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# How long a read waits for a datagram that should already be queued.
RECV_TIMEOUT = 5.0
# sun_path is 108 bytes including the NUL; leave room for the file name.
MAX_SOCKET_DIR = 80


@contextmanager
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a shorter directory when tmp_path is too long for a socket address."""
    if len(str(tmp_path)) <= MAX_SOCKET_DIR:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="spoold-", dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short)


@contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    """A bound notify socket with SO_PASSCRED, as systemd's own is."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(RECV_TIMEOUT)
        sock.bind(str(path))
        yield sock


def receive(sock: socket.socket) -> tuple[bytes, int]:
    """One datagram and the sender's pid from SCM_CREDENTIALS, as systemd reads them."""
    creds_size = struct.calcsize("3i")
    data, ancdata, _flags, _address = sock.recvmsg(4096, socket.CMSG_SPACE(creds_size))
    pid = -1
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, _uid, _gid = struct.unpack("3i", payload[:creds_size])
    return data, pid
