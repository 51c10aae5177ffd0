"""The control socket and the /metrics port: the protocol, the servers, and the client that
`spoold status` and `spoold dead-letters` use.

Control protocol: JSON lines on the Unix socket ``[control] socket`` (mode 0600). The client
sends one request object on one line; the daemon answers one reply object on one line and closes.

    {"command": "status"}                                   -> the status snapshot
    {"command": "metrics"}                                  -> {"metrics": "<Prometheus text>"}
    {"command": "dead-letters", "action": "list", "dest": "app", "limit": 100}
                                                            -> {"dead_letters": [...]}
    {"command": "dead-letters", "action": "replay"}         -> {"replayed": N}
    {"command": "dead-letters", "action": "purge", "dest": null}  -> {"purged": N}

Every field is checked (unknown keys too); anything else is answered ``{"error": "..."}``. A
request must arrive within REQUEST_TIMEOUT and fit in MAX_REQUEST bytes.

Both servers accept through :class:`spoold.listen.Acceptor` (which waits out fd exhaustion) and
hold at most a fixed number of connections. When all are taken, the one that has waited longest
without sending its request is closed to make room (counted with the timeouts): whoever can
connect to the metrics port could otherwise hold every slot by reconnecting each REQUEST_TIMEOUT,
while a scraper sends its request at once. When every connection has sent its request, one more
gets a one-line refusal and is closed at once (status ``listeners``, metrics
``spoold_listener_refused_total``). No input on either socket can raise out of a connection
handler.

Parsing and formatting are pure functions (:func:`parse_request`, :func:`parse_http_head`);
:class:`Server` does the I/O around them.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from spoold.errors import SpooldError, SpoolLocked
from spoold.listen import Acceptor

logger = structlog.get_logger()

# Bytes a request may take, newline included; longer ones are answered with an error.
MAX_REQUEST = 8192
# Seconds a client has to send its whole request once connected.
REQUEST_TIMEOUT = 5.0
# Seconds a client has to read the reply (a big dead-letter list takes a while on a slow reader).
REPLY_TIMEOUT = 30.0
# Connections each server holds at once; the next ones are refused and closed at once. Each
# costs an fd and a task for up to REQUEST_TIMEOUT + the time to answer.
MAX_CONTROL_CONNECTIONS = 32
MAX_METRICS_CONNECTIONS = 64
# Seconds spent telling a refused client why before closing (its buffer is empty: never blocks).
REFUSE_TIMEOUT = 0.5
# After a reply, unread input is read and discarded for up to this long and this many bytes,
# so that the close does not reset the connection before the client has read the reply.
LINGER_TIMEOUT = 1.0
LINGER_MAX_BYTES = 256 * 1024
# At most one log line per server per this many seconds about refused or bad requests.
LOG_EVERY = 10.0
# The most dead letters one `list` returns (each may be a line of up to max_line_bytes).
MAX_LIST_LIMIT = 1000
# How long the CLI waits for the daemon's answer by default.
CLIENT_TIMEOUT = 30.0

COMMANDS = ("status", "metrics", "dead-letters")
DEAD_LETTER_ACTIONS = ("list", "replay", "purge")
_DEST_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


class RequestError(ValueError):
    """A request that is not valid; the message is the reply's "error"."""


@dataclass(frozen=True)
class Status:
    pass


@dataclass(frozen=True)
class Metrics:
    pass


@dataclass(frozen=True)
class DeadLetters:
    action: str
    dest: str | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        if self.action not in DEAD_LETTER_ACTIONS:
            raise RequestError(f"action must be one of {', '.join(DEAD_LETTER_ACTIONS)}")
        if self.dest is not None and (not isinstance(self.dest, str) or not _DEST_NAME.fullmatch(self.dest)):
            raise RequestError("dest must be a destination name ([A-Za-z0-9_.-]+) or null")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 1 <= self.limit <= MAX_LIST_LIMIT:
            raise RequestError(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")


Request = Status | Metrics | DeadLetters


def parse_request(data: bytes) -> Request:
    """One request line (with or without its newline) -> a Request; RequestError if invalid."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError('a request is one JSON object on one line, such as {"command": "status"}') from None
    if not isinstance(doc, dict):
        raise RequestError('a request is one JSON object on one line, such as {"command": "status"}')
    command = doc.get("command")
    if command not in COMMANDS:
        raise RequestError(f"command must be one of {', '.join(COMMANDS)}")
    allowed = {"command"} | ({"action", "dest", "limit"} if command == "dead-letters" else set())
    unknown = sorted(str(k)[:40] for k in doc if k not in allowed)
    if unknown:
        raise RequestError(f"unknown field(s) for {command}: {', '.join(unknown)}")
    if command == "status":
        return Status()
    if command == "metrics":
        return Metrics()
    if "action" not in doc:
        raise RequestError("dead-letters needs an action")
    return DeadLetters(doc["action"], doc.get("dest"), doc.get("limit", 100))


def encode_request(request: Request) -> bytes:
    if isinstance(request, Status):
        doc: dict[str, Any] = {"command": "status"}
    elif isinstance(request, Metrics):
        doc = {"command": "metrics"}
    else:
        doc = {"command": "dead-letters", "action": request.action, "dest": request.dest, "limit": request.limit}
    return json.dumps(doc).encode() + b"\n"


def encode_reply(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"


def parse_http_head(head: bytes) -> tuple[int, str]:
    """The status code to answer a request head with (200 for GET /metrics) and a reason."""
    line, _, _ = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return 400, "bad request"
    method, target = parts[0], parts[1]
    if target.split(b"?", 1)[0] != b"/metrics":
        return 404, "not found: try /metrics"
    if method not in (b"GET", b"HEAD"):
        return 405, "method not allowed: use GET"
    return 200, "ok"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def http_response(code: int, body: bytes, ctype: str = "text/plain; charset=utf-8", head_only: bool = False) -> bytes:
    return (f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + (b"" if head_only else body)


# -- servers ------------------------------------------------------------------------------


class TooLong(Exception):
    pass


async def _read_until(stream: trio.SocketStream, end: bytes, limit: int) -> bytes:
    """Bytes up to and including ``end`` (or up to EOF); TooLong past ``limit``."""
    data = bytearray()
    searched = 0  # ``end`` is not in data[:searched]: each byte is looked at about once
    while True:
        at = data.find(end, max(0, searched - len(end) + 1))
        if at >= 0:
            return bytes(data[: at + len(end)])
        searched = len(data)
        if len(data) >= limit:
            raise TooLong
        chunk = await stream.receive_some(limit - len(data))
        if not chunk:
            return bytes(data)
        data += chunk


class Server:
    """One listening surface: an accept loop with a connection cap, and a handler per
    connection that turns the request into a reply and never raises."""

    def __init__(self, what: str, max_connections: int, busy_reply: bytes,
                 handle: Callable[[trio.SocketStream], Awaitable[bytes | None]]) -> None:
        self.what = what
        self.max_connections = max_connections
        self.busy_reply = busy_reply
        self._handle = handle
        self.active = 0
        self.counts = {"accepted": 0, "refused": 0, "bad_requests": 0, "timeouts": 0}
        self._next_log = 0.0
        # Connections still waiting for their request, oldest first (dicts keep insertion order).
        self._waiting: dict[trio.SocketStream, None] = {}
        # Closed by the accept loop to make room: their slot is already given back.
        self._closed_for_room: set[trio.SocketStream] = set()

    def stats(self) -> dict[str, int]:
        return {**self.counts, "open": self.active, "max": self.max_connections}

    def note(self, event: str, **fields: Any) -> None:
        """Rate-limited: a flood of bad clients must not flood the log."""
        now = trio.current_time()
        if now >= self._next_log:
            self._next_log = now + LOG_EVERY
            logger.warning(event, listener=self.what, **fields, **self.counts)

    async def serve(self, listener: trio.SocketListener, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        acceptor = Acceptor(listener, self.what)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await acceptor.accept()
                if self.active >= self.max_connections and self._waiting:
                    await self._close_longest_waiting()
                if self.active >= self.max_connections:
                    self.counts["refused"] += 1
                    self.note("listener_busy", max_connections=self.max_connections)
                    with trio.move_on_after(REFUSE_TIMEOUT):
                        try:
                            await stream.send_all(self.busy_reply)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                    await stream.aclose()
                    continue
                self.counts["accepted"] += 1
                self.active += 1
                nursery.start_soon(self._connection, stream)

    async def _close_longest_waiting(self) -> None:
        oldest = next(iter(self._waiting))
        del self._waiting[oldest]
        self._closed_for_room.add(oldest)
        self.active -= 1
        self.counts["timeouts"] += 1
        self.note("listener_idle_closed", max_connections=self.max_connections)
        await oldest.aclose()  # its handler's read ends with ClosedResourceError

    async def read_request(self, stream: trio.SocketStream, end: bytes) -> bytes:
        """The request, up to ``end``: TooSlowError after REQUEST_TIMEOUT, TooLong past
        MAX_REQUEST. Meanwhile the connection may be closed to make room for a new one."""
        self._waiting[stream] = None
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                return await _read_until(stream, end, MAX_REQUEST)
        finally:
            self._waiting.pop(stream, None)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            reply = await self._handle(stream)
            if reply:
                with trio.move_on_after(REPLY_TIMEOUT):
                    await stream.send_all(reply)
                    await stream.send_eof()
                # Closing with unread input resets the connection, which may destroy the reply
                # before the client reads it: read and discard what it still sends, briefly.
                with trio.move_on_after(LINGER_TIMEOUT):
                    drained = 0
                    while drained < LINGER_MAX_BYTES and (chunk := await stream.receive_some(65536)):
                        drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if stream in self._closed_for_room:
                self._closed_for_room.discard(stream)
            else:
                self.active -= 1
            await stream.aclose()


class ControlServer:
    """The control socket's request handling, around the daemon's status and dead letters."""

    def __init__(self, snapshot: Callable[[], Awaitable[dict[str, Any]]],
                 dead_letters: Callable[[DeadLetters], Awaitable[dict[str, Any]]],
                 metrics_text: Callable[[dict[str, Any]], str]) -> None:
        self._snapshot = snapshot
        self._dead_letters = dead_letters
        self._metrics_text = metrics_text
        self.server = Server("control", MAX_CONTROL_CONNECTIONS,
                             encode_reply({"error": "busy: too many control connections, try again"}), self._handle)

    async def _handle(self, stream: trio.SocketStream) -> bytes | None:
        try:
            data = await self.server.read_request(stream, b"\n")
        except trio.TooSlowError:
            self.server.counts["timeouts"] += 1
            return encode_reply({"error": f"no complete request within {REQUEST_TIMEOUT:g} s"})
        except TooLong:
            self.server.counts["bad_requests"] += 1
            self.server.note("control_bad_request", error="too long")
            return encode_reply({"error": f"request longer than {MAX_REQUEST} bytes"})
        if not data.strip():
            return None  # connect-and-close
        try:
            request = parse_request(data)
        except RequestError as exc:
            self.server.counts["bad_requests"] += 1
            self.server.note("control_bad_request", error=str(exc))
            return encode_reply({"error": str(exc)})
        return encode_reply(await self.answer(request))

    async def answer(self, request: Request) -> dict[str, Any]:
        try:
            if isinstance(request, Status):
                return await self._snapshot()
            if isinstance(request, Metrics):
                return {"metrics": self._metrics_text(await self._snapshot())}
            return await self._dead_letters(request)
        except SpooldError as exc:
            return {"error": str(exc)}
        except Exception as exc:  # a bug here must cost one reply, never the daemon
            logger.exception("control_request_failed", request=repr(request))
            return {"error": f"internal error: {exc.__class__.__name__}: {exc}"}


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1, one request per connection."""

    def __init__(self, snapshot: Callable[[], Awaitable[dict[str, Any]]],
                 metrics_text: Callable[[dict[str, Any]], str]) -> None:
        self._snapshot = snapshot
        self._metrics_text = metrics_text
        self.server = Server("metrics", MAX_METRICS_CONNECTIONS,
                             http_response(503, b"too many connections\n"), self._handle)

    async def _handle(self, stream: trio.SocketStream) -> bytes | None:
        try:
            head = await self.server.read_request(stream, b"\r\n\r\n")
        except trio.TooSlowError:
            self.server.counts["timeouts"] += 1
            return None
        except TooLong:
            self.server.counts["bad_requests"] += 1
            return http_response(431, b"request head too long\n")
        if not head:
            return None
        code, reason = parse_http_head(head)
        if code != 200:
            self.server.counts["bad_requests"] += 1
            return http_response(code, reason.encode() + b"\n")
        try:
            body = self._metrics_text(await self._snapshot()).encode()
        except Exception as exc:
            logger.exception("metrics_request_failed")
            return http_response(503, f"{exc.__class__.__name__}: {exc}\n".encode())
        return http_response(200, body, "text/plain; version=0.0.4; charset=utf-8", head_only=head.startswith(b"HEAD "))


# -- the client ---------------------------------------------------------------------------


class NoAnswer(Exception):
    """The daemon did not answer; ``listening`` tells whether anything accepted the connection."""

    def __init__(self, message: str, listening: bool) -> None:
        super().__init__(message)
        self.listening = listening


def ask(path: Path | str, request: Request, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """One request over the control socket; NoAnswer when no reply object came back."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise NoAnswer(f"nothing listens on {path} ({exc.strerror or exc})", False) from None
        end = time.monotonic() + timeout
        try:
            sock.sendall(encode_request(request))
            data = bytearray()
            while not data.endswith(b"\n"):
                sock.settimeout(max(0.001, end - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise NoAnswer(f"no answer on {path} within {timeout:g} s", True) from None
        except OSError as exc:
            raise NoAnswer(f"the connection to {path} failed ({exc.strerror or exc})", True) from None
        try:
            reply = json.loads(data)
        except ValueError:
            raise NoAnswer(f"no valid answer on {path} (got {len(data)} bytes)", True) from None
        if not isinstance(reply, dict):
            raise NoAnswer(f"no valid answer on {path}", True)
        return reply
    finally:
        sock.close()


def _process_state(pid: int | None) -> str:
    """" (stopped)" when the process is stopped (SIGSTOP, a debugger), for error messages."""
    if pid is None:
        return ""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return " (stopped)" if state in (b"T", b"t") else ""


def query(cfg: Any, request: Request, offline: Callable[[], dict[str, Any]], timeout: float) -> dict[str, Any]:
    """The answer to ``request``: from the running daemon, or, when no daemon holds the spool,
    from ``offline()`` run under the spool's lock (so it is the only writer). A daemon that holds
    the spool but does not answer is an error naming its pid, never a reason to work offline.
    Raises SpooldError with a message for the operator."""
    from spoold.spool import SpoolLock

    spool = Path(cfg.spool.path)
    lock = SpoolLock(spool)
    if not spool.exists() and not lock.path.exists():
        raise SpooldError(f"no spool at {spool} (no daemon has run with this config)")
    try:
        lock.acquire()
    except SpoolLocked as held:
        try:
            return ask(cfg.control_socket, request, timeout)
        except NoAnswer as exc:
            who = f"spoold (pid {held.pid}{_process_state(held.pid)})" if held.pid else "another process"
            raise SpooldError(f"{who} holds the spool {cfg.spool.path} but gave no answer: {exc}; "
                              "the spool is not opened behind its back") from None
    except SpooldError as cannot:
        # The lock file is not ours to open (another user's daemon): only the daemon can answer.
        try:
            return ask(cfg.control_socket, request, timeout)
        except NoAnswer as exc:
            raise SpooldError(f"{cannot}; and the daemon gave no answer: {exc}") from None
    try:
        return offline()
    finally:
        lock.release()


EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _reply_or_report(command: str, cfg: Any, request: Request, offline: Callable[[], dict[str, Any]],
                     timeout: float) -> dict[str, Any] | None:
    """The reply to ``request``; None once a failure is printed as `spoold COMMAND: why`."""
    try:
        reply = query(cfg, request, offline, timeout)
    except SpooldError as exc:
        print(f"spoold {command}: {exc}", file=sys.stderr)
        return None
    if "error" in reply:
        print(f"spoold {command}: {reply['error']}", file=sys.stderr)
        return None
    return reply


def status_command(cfg: Any, as_json: bool, timeout: float = CLIENT_TIMEOUT) -> int:
    """`spoold status`: the running daemon's snapshot, or the spool file's when none runs."""
    from spoold.spool import offline_status
    from spoold.status import render_table

    snap = _reply_or_report("status", cfg, Status(), lambda: offline_status(Path(cfg.spool.path)), timeout)
    if snap is None:
        return EXIT_FAILED
    print(json.dumps(snap, indent=2, sort_keys=True) if as_json else render_table(snap), end="\n" if as_json else "")
    return EXIT_OK


def dead_letters_command(cfg: Any, action: str, dest: str | None, limit: int, as_json: bool,
                         timeout: float = CLIENT_TIMEOUT) -> int:
    """`spoold dead-letters list|replay|purge`: through the running daemon, or on the spool
    file under its lock when none runs."""
    try:
        request = DeadLetters(action, dest, limit)
    except RequestError as exc:
        print(f"spoold dead-letters: {exc}", file=sys.stderr)
        return EXIT_USAGE
    reply = _reply_or_report("dead-letters", cfg, request,
                             lambda: _dead_letters_offline(Path(cfg.spool.path), cfg.spool, request), timeout)
    if reply is None:
        return EXIT_FAILED
    if as_json or action != "list":
        print(json.dumps(reply, indent=2))
        return EXIT_OK
    rows = reply.get("dead_letters")
    if not isinstance(rows, list):
        print("spoold dead-letters: the daemon's answer has no dead_letters list", file=sys.stderr)
        return EXIT_FAILED
    for r in rows:
        preview = r["data"][:60] + ("..." if len(r["data"]) > 60 else "")
        print(f"{r['id']:>8}  {r['dest']:<16} {r['size']:>8}B  {r['error'][:60]:<60}  {preview}")
    print(f"{len(rows)} dead letter(s) shown" + (f" (limit {limit})" if len(rows) >= limit else ""))
    return EXIT_OK


def _dead_letters_offline(path: Path, spool_cfg: Any, request: DeadLetters) -> dict[str, Any]:
    from spoold.spool import Spool, dead_letter_json

    if not path.exists():
        raise SpooldError(f"no spool at {path}")
    spool = Spool(path, spool_cfg.synchronous, spool_cfg.page_size)
    try:
        spool.open_writer()
        if request.action == "list":
            rows = spool.dead_letters(request.dest, request.limit)
            return {"dead_letters": [dead_letter_json(r) for r in rows]}
        if request.action == "replay":
            made = spool.replay_dead_letters(request.dest, time.time())
            return {"replayed": sum(len(m[2]) for m in made)}
        return {"purged": spool.purge_dead_letters(request.dest)}
    finally:
        spool.close()
