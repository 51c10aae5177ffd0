"""Accepting connections on a listening socket without dying or spinning when a resource runs out.

Every listening surface of the daemon (writers' sockets, the control socket, the metrics port)
accepts through :func:`accept`. When the process or the host is out of file descriptors or
buffers, ``accept`` fails with EMFILE, ENFILE, ENOMEM or ENOBUFS; the connection stays in the
kernel's backlog and a retry right away would fail again. As ``trio.serve_listeners`` does, we
log it (at most once a period), sleep a little, and try again: the daemon keeps serving the
connections it has, and accepts again once something closes.

The socket files the daemon creates are unlinked at shutdown only if they still are the files it
bound (:func:`unlink_if_same`): the path may have been taken over meanwhile by another process,
whose socket must survive this one's exit.
"""

from __future__ import annotations

import errno
import os
import socket as stdsocket
from pathlib import Path

import structlog
import trio

logger = structlog.get_logger()

# Errors that mean "out of a resource for now", not "this listener is broken".
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Errors of one connection that went away before it was accepted: accept the next one (the
# errnos trio.SocketListener ignores).
GONE_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
                         errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                         errno.ENETUNREACH})
# How long to wait before trying accept() again after such an error (trio.serve_listeners: 0.1 s).
ACCEPT_RETRY = 0.1
# At most one log line per listener per this many seconds while accept keeps failing.
ACCEPT_LOG_EVERY = 10.0


class Acceptor:
    """Wraps a ``trio.SocketListener`` (``accept()`` returns the next stream) or a listening
    stdlib socket whose fd is non-blocking (``accept_socket()`` returns the next connection as
    a stdlib socket, for a caller that does its own non-blocking I/O), waiting out resource
    exhaustion. ``failures`` counts the accept calls that failed so."""

    def __init__(self, listener: trio.SocketListener | stdsocket.socket, what: str) -> None:
        self.listener = listener
        self.what = what
        self.failures = 0
        self._next_log = 0.0

    async def accept(self) -> trio.SocketStream:
        assert not isinstance(self.listener, stdsocket.socket)
        while True:
            try:
                return await self.listener.accept()
            except OSError as exc:
                await self._wait_out(exc)

    async def accept_socket(self) -> stdsocket.socket:
        """The next connection, in blocking mode (its I/O goes with MSG_DONTWAIT), after one
        checkpoint, as trio's own accept does."""
        sock = self.listener
        assert isinstance(sock, stdsocket.socket)
        while True:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                if exc.errno not in GONE_ERRNOS:
                    await self._wait_out(exc)
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return conn

    async def _wait_out(self, exc: OSError) -> None:
        if exc.errno not in RESOURCE_ERRNOS:
            raise exc
        self.failures += 1
        now = trio.current_time()
        if now >= self._next_log:
            self._next_log = now + ACCEPT_LOG_EVERY
            logger.error("accept_failed_out_of_resources", listener=self.what,
                         error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                         retry_in=ACCEPT_RETRY, failures=self.failures)
        await trio.sleep(ACCEPT_RETRY)


def file_identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what is at ``path`` itself (a link is not followed); None if nothing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def unlink_if_same(path: Path, identity: tuple[int, int] | None) -> bool:
    """Unlink ``path`` if it is still the file recorded as ``identity`` when it was bound."""
    if identity is None or file_identity(path) != identity:
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
