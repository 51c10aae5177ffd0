"""Unix socket listeners and the durable-acknowledgement handshake.

Stream sockets: the client writes "\\n"-terminated lines, then shuts down its write side; we
answer one JSON line, ``{"accepted": N, "rejected": M}``, once every accepted line is committed,
and close. Datagram sockets: each datagram is one line, with no acknowledgement.

What writers can take is bounded per destination: MAX_CONNECTIONS slots, and MAX_HELD_BYTES
of lines read and not yet handed to the committer. When every slot is taken, a new connection from a user (peer UID) already
holding USER_SHARE of them is refused, and otherwise the longest-idle connection is closed to make
room (those of a user holding more than its share first). A refused or closed writer gets an
answer with an ``"error"`` saying why; its complete lines were made durable as they came.

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
import struct
from collections import deque
from pathlib import Path

import structlog
import trio

from spoold.committer import Committer, RateLimitedLog, Ticket
from spoold.config import Destination
from spoold.framing import LineBuffer, split_datagram
from spoold.host import group_id
from spoold.listen import Acceptor
from spoold.spool import make_private_dirs

logger = structlog.get_logger()

# Bytes read from a connection at a time.
READ_SIZE = 64 * 1024
# Listen backlog of each stream socket.
BACKLOG = 512
# Connections served at once per destination.
MAX_CONNECTIONS = 1024
# While every slot is taken, a user (peer UID) holding this many connections is refused more.
# While slots are free a user may hold more: one service with many writers is not held back.
USER_SHARE = MAX_CONNECTIONS // 2
# While every slot is taken, a connection that sent nothing for this long may be closed to make
# room, the longest-idle first; a quiet stream (``tail -F | spoold send``) keeps its slot otherwise.
EVICT_MIN_IDLE = 1.0
# Longest wait for a closed connection to give its slot back before looking again.
SLOT_RECHECK = 1.0
# Longest wait to deliver the acknowledgement to a client that does not read it.
ANSWER_TIMEOUT = 10.0
# Longest wait to tell a refused or closed writer why (the answer fits an empty socket buffer).
REFUSE_TIMEOUT = 1.0
# Bytes of lines read from a destination's connections and not yet taken by the committer
# (unfinished lines, and complete ones waiting for room in the commit queue): past it, the
# largest unfinished lines are given up (rejected, "memory limit") until the rest fits. A
# connection with complete lines waiting reads no more, so this can be passed by at most one
# read (READ_SIZE) per connection, and only while no unfinished line is left to give up.
MAX_HELD_BYTES = 64 * 1024 * 1024
# At shutdown, how long a connection may wait for a full spool to take its last lines.
STOP_SUBMIT_WAIT = 5.0

# Why the daemon refused or closed a connection (IngestStats.closed, and the writer's "error").
REFUSED_USER_SHARE = "refused: this user holds its share of connection slots"
CLOSED_IDLE = "closed: idle while connection slots ran short"
CLOSED_USER_SHARE = "closed: this user holds more than its share of connection slots"
# Rejection reasons of unfinished lines.
MEMORY_LIMIT = "memory limit"
CONNECTION_CLOSED = "connection closed"
# SO_PEERCRED's struct ucred: pid, uid, gid.
_UCRED = struct.Struct("iII")
# Answers never block the loop, and a client gone is an EPIPE error, never a signal.
_SEND_FLAGS = stdsocket.MSG_DONTWAIT | stdsocket.MSG_NOSIGNAL


class IngestStats:
    def __init__(self) -> None:
        self.connections = 0
        self.lines_in = 0
        self.bytes_in = 0
        self.rejected: dict[str, int] = {}  # lines, by reason
        self.closed: dict[str, int] = {}  # connections refused or closed by the daemon, by reason

    def reject(self, reason: str, n: int) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n

    def close(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1


class Conn:
    """One served connection, as the slot table sees it."""

    __slots__ = ("uid", "buf", "held", "last_active", "reading", "sock", "closing")

    def __init__(self, uid: int, buf: LineBuffer, now: float, sock: stdsocket.socket | None = None) -> None:
        self.uid = uid
        self.buf = buf
        self.held = 0  # bytes of its lines counted in the budget (see MAX_HELD_BYTES)
        self.last_active = now  # when it last sent something
        self.reading = False  # waiting for the client (not for the spool, not answering)
        self.sock = sock
        self.closing = ""  # why the daemon is closing it, once it is


class Slots:
    """Who holds one destination's connection slots, and whom to close when they run short.
    No I/O and no clock: time is passed in."""

    def __init__(self, size: int = MAX_CONNECTIONS, share: int = USER_SHARE,
                 min_idle: float = EVICT_MIN_IDLE) -> None:
        self.size = size
        self.share = share
        self.min_idle = min_idle
        self.conns: set[Conn] = set()
        self.users: dict[int, int] = {}
        self.closing = 0  # connections told to close that still hold their slot

    def add(self, conn: Conn) -> None:
        self.conns.add(conn)
        self.users[conn.uid] = self.users.get(conn.uid, 0) + 1

    def remove(self, conn: Conn) -> None:
        self.conns.remove(conn)
        left = self.users[conn.uid] - 1
        if left:
            self.users[conn.uid] = left
        else:
            del self.users[conn.uid]
        if conn.closing:
            self.closing -= 1

    def full(self) -> bool:
        return len(self.conns) >= self.size

    def at_share(self, uid: int) -> bool:
        return self.users.get(uid, 0) >= self.share

    def victim(self, now: float) -> tuple[Conn | None, str, float]:
        """The connection to close for room and why; else None and when to look again (when the
        longest-idle reader has been idle long enough; inf when no connection is reading)."""
        best: Conn | None = None
        best_key: tuple[bool, float] = (True, float("inf"))
        for conn in self.conns:
            if not conn.reading or conn.closing:
                continue
            key = (self.users[conn.uid] <= self.share, conn.last_active)
            if key < best_key:
                best, best_key = conn, key
        if best is None:
            return None, "", float("inf")
        if not best_key[0]:
            return best, CLOSED_USER_SHARE, now
        if now < best.last_active + self.min_idle:
            return None, "", best.last_active + self.min_idle
        return best, CLOSED_IDLE, now

    def mark_closing(self, conn: Conn, reason: str) -> None:
        conn.closing = reason
        self.closing += 1

    def largest_unfinished(self) -> Conn:
        return max(self.conns, key=lambda c: c.buf.buffered)


def bind_socket(dest: Destination) -> stdsocket.socket:
    """A listening (or, for datagrams, bound) Unix socket at dest.socket, created atomically."""
    sock = dest.socket
    assert sock is not None
    kind = stdsocket.SOCK_DGRAM if sock.type == "datagram" else stdsocket.SOCK_STREAM
    return bind_unix(sock.path, kind, sock.mode, sock.group, key=f'destination "{dest.name}": socket')


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
        self.slots = Slots()
        self.held_bytes = 0
        self._slot_freed = trio.Event()
        # Waits of connections for room in the spool: cancelled at shutdown while reading,
        # given the shutdown's deadline once finishing.
        self._waiting: set[trio.CancelScope] = set()
        self._finishing: set[trio.CancelScope] = set()
        self._stopping = False
        self._stop_deadline = float("inf")
        self._accepting = trio.CancelScope()
        self._ratelimited_log = RateLimitedLog()

    def stop_reading(self) -> None:
        """Shutdown: accept no more, stop reading; what was read is still made durable, unless
        that waits on a full spool for longer than STOP_SUBMIT_WAIT (the client then gets no
        answer, so it knows to send again)."""
        self._accepting.cancel()
        self._stopping = True
        for conn in self.slots.conns:
            _shut_read(conn.sock)
        for scope in self._waiting:
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
        # Connections are served with plain sockets and trio's wait_readable/wait_writable: a
        # writer of a few lines is answered without trio's socket and stream layers, each of
        # whose calls costs a scheduler round (see docs/design.md, "Ingest").
        listener = stdsocket.socket(fileno=tsock.fileno())
        try:
            acceptor = Acceptor(listener, f"destination {self.dest.name}")
            async with trio.open_nursery() as nursery:
                task_status.started()
                with self._accepting:
                    while True:
                        sock = await acceptor.accept_socket()
                        try:
                            uid = _peer_uid(sock)
                            room = not self.slots.full() or await self._make_room(uid)
                        except BaseException:
                            sock.close()
                            raise
                        if room:
                            nursery.start_soon(self._connection, sock, self.open(uid, sock))
                        else:
                            await self._refuse(sock, uid)
        finally:
            listener.detach()  # the daemon's socket: not ours to close

    def open(self, uid: int, sock: stdsocket.socket | None = None) -> Conn:
        """Give a new connection of ``uid`` a slot (``_make_room`` made sure there is one)."""
        conn = Conn(uid, LineBuffer(self.dest.limits.max_line_bytes), trio.current_time(), sock)
        self.slots.add(conn)
        return conn

    def close_for_room(self, conn: Conn, reason: str) -> None:
        """Stop reading ``conn``: its complete lines are made durable and it is told why. Shutting
        down its read side wakes a wait for the client with an end of input (the client's next
        write fails, as it would once the connection is closed)."""
        self.slots.mark_closing(conn, reason)
        _shut_read(conn.sock)

    async def _make_room(self, uid: int) -> bool:
        """Wait for a free slot, closing idle connections for it; False: refuse this one."""
        slots = self.slots
        while slots.full():
            if slots.at_share(uid):
                return False
            wake_at = trio.current_time() + SLOT_RECHECK
            if not slots.closing:
                victim, reason, when = slots.victim(trio.current_time())
                if victim is not None:
                    self.close_for_room(victim, reason)
                    self.stats.close(reason)
                    self._ratelimited("connection_closed_for_room", 1, reason=reason, uid=victim.uid,
                                      idle=round(trio.current_time() - victim.last_active, 1))
                else:
                    wake_at = min(wake_at, when)
            with trio.move_on_at(wake_at):
                await self._slot_freed.wait()
        return True

    async def _refuse(self, sock: stdsocket.socket, uid: int) -> None:
        self.stats.close(REFUSED_USER_SHARE)
        self._ratelimited("connection_refused", 1, reason=REFUSED_USER_SHARE, uid=uid,
                          user_share=self.slots.share)
        try:
            await _answer(sock, _encode({"error": REFUSED_USER_SHARE}), REFUSE_TIMEOUT)
        finally:
            sock.close()

    async def _serve_datagrams(self, sock: trio.socket.SocketType) -> None:
        # One datagram is one line; a trailing newline is stripped. No acknowledgement is
        # possible, so lines are submitted in small groups for the committer to batch. The
        # buffer holds a longest line and its newline: a longer datagram comes back truncated
        # (MSG_TRUNC) and is rejected whole, never stored cut.
        max_line = self.dest.limits.max_line_bytes
        buf = bytearray(max_line + 1)
        view = memoryview(buf)
        while True:
            n, _, flags, _ = await sock.recvmsg_into([buf])
            if flags & stdsocket.MSG_TRUNC:
                self.stats.reject("line too long", 1)
                self._ratelimited("datagram_rejected_too_long", 1, size_over=len(buf), max_line_bytes=max_line)
                continue
            good, oversized = split_datagram(bytes(view[:n]), max_line)
            if oversized:
                self._oversized(oversized)
            if good:
                nbytes = sum(len(line) + 1 for line in good)
                self.stats.lines_in += len(good)
                self.stats.bytes_in += nbytes
                ticket = await self.committer.submit(self.dest.name, good, nbytes)
                if ticket.done.is_set() and ticket.rejected:  # spool full under "reject"
                    self.stats.reject(ticket.reason, ticket.rejected)

    def _ratelimited(self, event: str, n: int, **fields: object) -> None:
        # At most one warning per event and period, with the count (its "lines" field) of
        # what it summarises: one client must not be able to flood the log.
        self._ratelimited_log(event, n, dest=self.dest.name, **fields)

    def _oversized(self, sizes: list[int]) -> None:
        self.stats.reject("line too long", len(sizes))
        self._ratelimited("line_rejected_too_long", len(sizes), size=max(sizes),
                          max_line_bytes=self.dest.limits.max_line_bytes)

    async def _connection(self, sock: stdsocket.socket, conn: Conn) -> None:
        """Serve one writer. No cancel scope on the common path: closing for room and shutdown
        stop its reads by shutting its read side down (see close_for_room), and a wait for room
        in the spool, the only other wait while reading, has its own scope."""
        self.stats.connections += 1
        buf = conn.buf
        tickets: deque[Ticket] = deque()
        accepted = rejected = 0
        reasons: dict[str, int] = {}
        eof = False
        try:
            # Reads that found data right away since the last wait: a client sending without a
            # pause gives the other tasks a turn between its reads, as a trio read would.
            ready = 0
            while True:
                try:
                    data = sock.recv(READ_SIZE, stdsocket.MSG_DONTWAIT)
                except BlockingIOError:
                    ready = 0
                    conn.reading = True
                    try:
                        await trio.lowlevel.wait_readable(sock)
                    finally:
                        conn.reading = False
                    continue
                except OSError:
                    break  # reset by the client: keep what arrived complete
                if not data:
                    # Else the end is our own: closed for room, or shutting down.
                    eof = not conn.closing and not self._stopping
                    break
                if ready:
                    await trio.lowlevel.checkpoint()
                ready += 1
                conn.last_active = trio.current_time()
                lines = buf.feed(data)
                # Not kept while waiting for the client: a read buffer per idle connection
                # would hold connections x READ_SIZE outside the budget.
                del data
                if not await self._submit(lines, conn, tickets):
                    break  # shutting down while waiting for room: these lines are not acked
                del lines
                while tickets and tickets[0].done.is_set():
                    accepted, rejected = self._tally(tickets.popleft(), accepted, rejected, reasons)
                if conn.closing:  # closed for room while this data was on its way
                    break
            if conn.closing and buf.abandon():
                self.stats.reject(CONNECTION_CLOSED, 1)
                tickets.append(_rejected_ticket(1, CONNECTION_CLOSED))
            # Lines already read are made durable even during shutdown, with a deadline then
            # (a full spool under when_full = "block" may never free up): see _submit.
            finished = await self._submit(buf.close() if eof else [], conn, tickets, finishing=True)
            while tickets:
                ticket = tickets.popleft()
                await ticket.done.wait()  # a commit always answers it, even when it fails
                accepted, rejected = self._tally(ticket, accepted, rejected, reasons)
            if conn.closing and finished:
                answer: dict[str, object] = {"error": conn.closing, "accepted": accepted, "rejected": rejected}
                if reasons:
                    answer["reasons"] = reasons
                await _answer(sock, _encode(answer), REFUSE_TIMEOUT)
            elif eof and finished:
                # What json.dumps makes of {"accepted": a, "rejected": r}, the common answer.
                payload = (b'{"accepted": %d, "rejected": %d}\n' % (accepted, rejected) if not reasons else
                           _encode({"accepted": accepted, "rejected": rejected, "reasons": reasons}))
                await _answer(sock, payload, ANSWER_TIMEOUT)
        finally:
            self.held_bytes -= conn.held
            conn.held = 0
            self.slots.remove(conn)
            self._slot_freed.set()
            self._slot_freed = trio.Event()
            sock.close()  # no task waits on it: no notify_closing needed

    def _hold(self, conn: Conn, waiting: int = 0) -> None:
        # One hard budget for what all connections hold: past it, the largest unfinished lines
        # are given up (rejected once they end, counted now), so that many slow clients cannot
        # make the daemon hold connections x max_line_bytes.
        now = conn.buf.buffered + waiting
        self.held_bytes += now - conn.held
        conn.held = now
        while self.held_bytes > MAX_HELD_BYTES:
            victim = self.slots.largest_unfinished()
            freed = victim.buf.discard_partial()
            if not freed:
                break  # only complete lines waiting for the committer: they go on their own
            self.held_bytes -= freed
            victim.held -= freed
            self.stats.reject(MEMORY_LIMIT, 1)
            self._ratelimited("partial_line_dropped", 1, held=freed, budget=MAX_HELD_BYTES)

    async def _submit(self, lines: list[bytes], conn: Conn, tickets: deque[Ticket],
                      finishing: bool = False) -> bool:
        """Hand lines to the committer, their ticket to ``tickets``. False: a wait for room was
        cut short by shutdown (cancelled while reading; past its deadline once ``finishing``,
        though shielded from any other cancellation), and the lines were not taken."""
        buf = conn.buf
        oversized = buf.take_oversized()
        if oversized:
            self._oversized(oversized)
            tickets.append(_rejected_ticket(len(oversized), "line too long"))
        discarded = buf.take_discarded()
        if discarded:
            tickets.append(_rejected_ticket(len(discarded), MEMORY_LIMIT))
        if not lines:
            self._hold(conn)
            return True
        nbytes = sum(map(len, lines)) + len(lines)
        self.stats.lines_in += len(lines)
        self.stats.bytes_in += nbytes
        ticket = self.committer.submit_nowait(self.dest.name, lines, nbytes)
        if ticket is None:
            self._hold(conn, nbytes)  # complete lines waiting for the committer count too
            scope = trio.CancelScope(shield=finishing, deadline=self._stop_deadline if finishing else float("inf"))
            waits = self._finishing if finishing else self._waiting
            if self._stopping and not finishing:
                scope.cancel()
            waits.add(scope)
            try:
                with scope:
                    ticket = await self.committer.submit(self.dest.name, lines, nbytes)
            finally:
                waits.discard(scope)
                self._hold(conn)
            if ticket is None:
                return False
        else:
            self._hold(conn)
        tickets.append(ticket)
        return True

    def _tally(self, ticket: Ticket, accepted: int, rejected: int, reasons: dict[str, int]) -> tuple[int, int]:
        if ticket.rejected:
            reasons[ticket.reason] = reasons.get(ticket.reason, 0) + ticket.rejected
            if ticket.reason not in COUNTED_WHEN_FOUND:
                self.stats.reject(ticket.reason, ticket.rejected)
        return accepted + ticket.accepted, rejected + ticket.rejected


# Rejections counted in IngestStats as they happen, not again when their ticket is tallied.
COUNTED_WHEN_FOUND = frozenset({"line too long", MEMORY_LIMIT, CONNECTION_CLOSED})


def _peer_uid(sock: stdsocket.socket) -> int:
    """The connecting process's user (SO_PEERCRED); -1 when the kernel does not say."""
    try:
        creds = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return -1
    return int(_UCRED.unpack(creds)[1])


def _encode(answer: dict[str, object]) -> bytes:
    return json.dumps(answer).encode() + b"\n"


async def _answer(sock: stdsocket.socket, payload: bytes, timeout: float) -> None:
    """Send the answer line: at once into the socket's buffer, as a small one usually goes."""
    try:
        sent = sock.send(payload, _SEND_FLAGS)
        if sent == len(payload):
            return
        payload = payload[sent:]
    except BlockingIOError:
        pass
    except OSError:
        return  # the client closed without waiting: it loses nothing it sent completely
    with trio.move_on_after(timeout):
        while payload:
            await trio.lowlevel.wait_writable(sock)
            try:
                payload = payload[sock.send(payload, _SEND_FLAGS):]
            except BlockingIOError:
                continue
            except OSError:
                return


def _shut_read(sock: stdsocket.socket | None) -> None:
    """End a connection's input: its reader, waiting or not, gets an end of input next."""
    if sock is not None:
        try:
            sock.shutdown(stdsocket.SHUT_RD)
        except OSError:
            pass  # already gone: its reader sees that on its own


def _rejected_ticket(n: int, reason: str) -> Ticket:
    ticket = Ticket([], 0)
    ticket.rejected = n
    ticket.reason = reason
    ticket.done.set()
    return ticket


