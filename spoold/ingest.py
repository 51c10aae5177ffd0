"""Unix socket listeners and the durable-acknowledgement handshake.

Stream sockets: the client writes "\\n"-terminated lines, then shuts down its write side; we
answer one JSON line, ``{"accepted": N, "rejected": M}``, once every accepted line is committed,
and close. Datagram sockets: each datagram is one line, with no acknowledgement.

The socket file appears only when it accepts connections: we bind and listen under a temporary
name, set its mode and group, then link it in at the final path. Only a stale socket (one no
process answers) is replaced; anything else at the path is kept and the bind fails.
"""

from __future__ import annotations

import errno
import json
import os
import socket as stdsocket
import stat
from collections import deque
from pathlib import Path

import structlog
import trio

from spoold.committer import Committer, Ticket
from spoold.config import Destination, group_id
from spoold.framing import LineBuffer
from spoold.spool import make_private_dirs

logger = structlog.get_logger()

# Bytes read from a connection at a time.
READ_SIZE = 64 * 1024
# Listen backlog of each stream socket.
BACKLOG = 512
# Connections served at once per destination; more wait in the kernel's backlog.
MAX_CONNECTIONS = 1024
# Longest wait to deliver the acknowledgement to a client that does not read it.
ANSWER_TIMEOUT = 10.0
# Bytes of unfinished lines all connections of a destination may hold; past it, a connection
# holding more than PARTIAL_FAIR_SHARE gives its unfinished line up (rejected, "memory limit").
MAX_PARTIAL_BYTES = 64 * 1024 * 1024
PARTIAL_FAIR_SHARE = 256 * 1024
# At shutdown, how long a connection may wait for a full spool to take its last lines.
STOP_SUBMIT_WAIT = 5.0
# Largest datagram accepted (the kernel's limit for AF_UNIX is about this by default).
MAX_DATAGRAM = 256 * 1024


class IngestStats:
    def __init__(self) -> None:
        self.connections = 0
        self.lines_in = 0
        self.bytes_in = 0
        self.rejected: dict[str, int] = {}

    def reject(self, reason: str, n: int) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n


def bind_socket(dest: Destination) -> stdsocket.socket:
    """A listening (or, for datagrams, bound) Unix socket at dest.socket, created atomically."""
    kind = stdsocket.SOCK_DGRAM if dest.socket_type == "datagram" else stdsocket.SOCK_STREAM
    return bind_unix(Path(dest.socket), kind, dest.socket_mode, dest.socket_group,
                     key=f'destination "{dest.name}": socket')


def bind_unix(path: Path, kind: int, mode: int, group: str | None = None,
              key: str = "socket") -> stdsocket.socket:
    """Bind under a temporary name, set mode and group, listen, then link it in at ``path``:
    the path never names a socket that does not accept yet. Whatever is at ``path`` is kept
    unless ``lstat`` shows a socket that no live process answers (stream or datagram): a
    regular file, a folder or a live daemon's socket is an OSError naming ``key``."""
    _make_socket_dirs(path.parent, group)
    _remove_stale(path, key)
    sock = stdsocket.socket(stdsocket.AF_UNIX, kind)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        sock.bind(str(tmp))
        os.chmod(tmp, mode)
        if group:
            os.chown(tmp, -1, group_id(group))
        if kind == stdsocket.SOCK_STREAM:
            sock.listen(BACKLOG)
        _link_no_replace(tmp, path, key)
    except BaseException:
        sock.close()
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return sock


def _make_socket_dirs(folder: Path, group: str | None) -> None:
    # Missing folders are made 0750 whatever the umask: writers may pass through (by the
    # socket's group, when one is set) but never unlink or replace a socket.
    for made in make_private_dirs(folder):
        if group:
            os.chown(made, -1, group_id(group))


def _remove_stale(path: Path, key: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{key}: {path} exists and is not a socket; it was left as it is "
                                    "(move it away or choose another path)")
    if _is_live(path):
        raise OSError(errno.EADDRINUSE, f"{key}: {path}: another process is listening on this socket")
    path.unlink(missing_ok=True)


def _link_no_replace(tmp: Path, path: Path, key: str) -> None:
    # link() never replaces what appeared at the path since it was checked (rename would).
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise OSError(errno.EEXIST, f"{key}: {path} appeared while the socket was being created; "
                                    "it was left as it is") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    if os.path.lexists(path):  # a file system without hard links: rename, checked once more
        raise OSError(errno.EEXIST, f"{key}: {path} appeared while the socket was being created; "
                                    "it was left as it is")
    os.rename(tmp, path)


def _is_live(path: Path) -> bool:
    """A process answers at the socket ``path``, whichever its type. A socket we may not
    connect to, or whose listener's backlog is full, counts as live."""
    for kind in (stdsocket.SOCK_STREAM, stdsocket.SOCK_DGRAM):
        probe = stdsocket.socket(stdsocket.AF_UNIX, kind)
        try:
            probe.setblocking(False)
            probe.connect(str(path))
            return True
        except (BlockingIOError, InterruptedError, PermissionError):
            return True
        except OSError as exc:
            if exc.errno == errno.EPROTOTYPE:
                continue  # the other type of socket: ask it that way
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            return True
        finally:
            probe.close()
    return False


class Ingest:
    """Serves one destination's socket."""

    def __init__(self, dest: Destination, committer: Committer) -> None:
        self.dest = dest
        self.committer = committer
        self.stats = IngestStats()
        self.log = logger.bind(dest=dest.name)
        self._readers: set[trio.CancelScope] = set()
        self._finishing: set[trio.CancelScope] = set()
        self._held: dict[LineBuffer, int] = {}  # bytes of unfinished lines, per connection
        self.partial_bytes = 0
        self._stop_deadline = float("inf")
        self._accepting = trio.CancelScope()

    def stop_reading(self) -> None:
        """Shutdown: accept no more, stop reading; what was read is still made durable, unless
        that waits on a full spool for longer than STOP_SUBMIT_WAIT (the client then gets no
        answer, so it knows to send again)."""
        self._accepting.cancel()
        for scope in self._readers:
            scope.cancel()
        self._stop_deadline = trio.current_time() + STOP_SUBMIT_WAIT
        for scope in self._finishing:
            scope.deadline = min(scope.deadline, self._stop_deadline)

    async def serve(
        self, tsock: trio.socket.SocketType, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until ``stop_reading()``; returns once every connection has been answered. The
        socket stays open: it belongs to the daemon, which may hand it to a reloaded Ingest."""
        if tsock.type == stdsocket.SOCK_DGRAM:
            task_status.started()
            with self._accepting:
                await self._serve_datagrams(tsock)
            return
        listener = trio.SocketListener(tsock)
        limit = trio.Semaphore(MAX_CONNECTIONS)
        async with trio.open_nursery() as nursery:
            task_status.started()
            with self._accepting:
                while True:
                    await limit.acquire()
                    try:
                        stream = await listener.accept()
                    except BaseException:
                        limit.release()
                        raise
                    nursery.start_soon(self._connection, stream, limit)

    async def _serve_datagrams(self, sock: trio.socket.SocketType) -> None:
        # One datagram is one line; a trailing newline is stripped. No acknowledgement is
        # possible, so lines are submitted in small groups for the committer to batch.
        max_line = self.dest.max_line_bytes
        while True:
            data = await sock.recv(MAX_DATAGRAM)
            if data.endswith(b"\n"):
                data = data[:-1]
            if not data:
                continue
            lines = [line for line in data.split(b"\n") if line]
            good = [line for line in lines if len(line) <= max_line]
            if len(good) < len(lines):
                self._oversized([len(line) for line in lines if len(line) > max_line])
            if good:
                nbytes = sum(len(line) + 1 for line in good)
                self.stats.lines_in += len(good)
                self.stats.bytes_in += nbytes
                ticket = await self.committer.submit(self.dest.name, good, nbytes)
                if ticket.done.is_set() and ticket.rejected:  # spool full under "reject"
                    self.stats.reject(ticket.reason, ticket.rejected)

    def _oversized(self, sizes: list[int]) -> None:
        self.stats.reject("line too long", len(sizes))
        for size in sizes:
            self.log.warning("line_rejected_too_long", size=size, max_line_bytes=self.dest.max_line_bytes)

    async def _connection(self, stream: trio.SocketStream, limit: trio.Semaphore) -> None:
        self.stats.connections += 1
        buf = LineBuffer(self.dest.max_line_bytes)
        tickets: deque[Ticket] = deque()
        accepted = rejected = 0
        reasons: dict[str, int] = {}
        eof = False
        scope = trio.CancelScope()
        self._readers.add(scope)
        try:
            with scope:
                while True:
                    try:
                        data = await stream.receive_some(READ_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break  # reset by the client: keep what arrived complete
                    if not data:
                        eof = True
                        break
                    lines = buf.feed(data)
                    self._hold(buf)
                    await self._submit(lines, buf, tickets)
                    while tickets and tickets[0].done.is_set():
                        accepted, rejected = self._tally(tickets.popleft(), accepted, rejected, reasons)
            # Shielded: lines already read are made durable even during shutdown (with a
            # deadline then, since a full spool under when_full = "block" may never free up).
            finishing = trio.CancelScope(shield=True, deadline=self._stop_deadline)
            self._finishing.add(finishing)
            try:
                with finishing:
                    if eof:
                        await self._submit(buf.close(), buf, tickets)
                    else:
                        await self._submit([], buf, tickets)
                    while tickets:
                        ticket = tickets.popleft()
                        await ticket.done.wait()
                        accepted, rejected = self._tally(ticket, accepted, rejected, reasons)
            finally:
                self._finishing.discard(finishing)
            if eof and not finishing.cancelled_caught:
                answer: dict[str, object] = {"accepted": accepted, "rejected": rejected}
                if reasons:
                    answer["reasons"] = reasons
                await self._answer(stream, answer)
        finally:
            self.partial_bytes -= self._held.pop(buf, 0)
            self._readers.discard(scope)
            limit.release()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _hold(self, buf: LineBuffer) -> None:
        # Unfinished lines of all connections share one budget: past it, a connection holding a
        # big unfinished line gives it up (rejected and counted once it ends), so that many
        # slow clients cannot make the daemon hold connections x max_line_bytes.
        held = self._held.get(buf, 0)
        now = buf.buffered
        self.partial_bytes += now - held
        if self.partial_bytes > MAX_PARTIAL_BYTES and now > PARTIAL_FAIR_SHARE:
            self.partial_bytes -= buf.discard_partial()
            self.log.warning("partial_line_dropped", held=now, budget=MAX_PARTIAL_BYTES)
            now = 0
        self._held[buf] = now

    async def _submit(self, lines: list[bytes], buf: LineBuffer, tickets: deque[Ticket]) -> None:
        oversized = buf.take_oversized()
        if oversized:
            self._oversized(oversized)
            tickets.append(_rejected_ticket(len(oversized), "line too long"))
        discarded = buf.take_discarded()
        if discarded:
            tickets.append(_rejected_ticket(len(discarded), "memory limit"))
        if lines:
            nbytes = sum(map(len, lines)) + len(lines)
            self.stats.lines_in += len(lines)
            self.stats.bytes_in += nbytes
            tickets.append(await self.committer.submit(self.dest.name, lines, nbytes))

    def _tally(self, ticket: Ticket, accepted: int, rejected: int, reasons: dict[str, int]) -> tuple[int, int]:
        if ticket.rejected:
            reasons[ticket.reason] = reasons.get(ticket.reason, 0) + ticket.rejected
            if ticket.reason != "line too long":  # counted when found
                self.stats.reject(ticket.reason, ticket.rejected)
        return accepted + ticket.accepted, rejected + ticket.rejected

    async def _answer(self, stream: trio.SocketStream, answer: dict[str, object]) -> None:
        try:
            with trio.move_on_after(ANSWER_TIMEOUT):
                await stream.send_all(json.dumps(answer).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client closed without waiting: it loses nothing it sent completely


def _rejected_ticket(n: int, reason: str) -> Ticket:
    ticket = Ticket([], 0)
    ticket.rejected = n
    ticket.reason = reason
    ticket.done.set()
    return ticket


