"""The daemon's HTTP transport: HTTP/1.1 over trio streams, behind httpx's transport API.

spoold makes one kind of call: a POST of a body it already holds, whose reply it reads in full,
to one or two origins, over and over. httpcore's pool does much more for every request (a lock,
a readability poll of every idle connection, request and response models, a trace hook per
step, an async iterator per body) and cost about a fifth of the daemon's CPU at full speed. This
transport keeps only what spoold needs:

- a keep-alive pool per origin (scheme, host, port), used last-in first-out so the fewest
  connections stay warm; at most ``max_connections`` open in all (requests beyond wait for one,
  within the pool timeout), an idle one closed after KEEPALIVE_EXPIRY;
- a request's head and body leave in one send when the body is at most COALESCE_BYTES (on a
  keep-alive connection every send costs a system call and wakes the peer; over TLS it also
  seals a record), a bigger body in a send of its own rather than copied to join it;
- TLS through trio.SSLStream with httpx's default context (certificates verified);
- httpx's timeouts (connect, read per receive, write, pool) and httpx's exception types;
- the reply read in full, at most MAX_REPLY_BYTES;

The HTTP/1.1 codec is written here rather than taken from h11 (which httpcore uses, and which
this transport used): for a client that sends one request at a time and reads the reply in full,
h11's event objects, state machine and header validation at every step cost ~250 µs of Python
per request, a third of the request path. The head of a request is joined from headers checked
by h11's own grammar; a reply is framed as RFC 9112 says, and the tests read every reply of a
table, and generated ones in generated pieces, both ways, here and with h11, with equal results.

A server may close a keep-alive connection while it is idle. Before reusing one, the transport
checks its socket: readable means the server closed it (or sent something unasked), and the
connection is dropped for the next one or a new one; nothing of the request was sent on it. If
the server closes in the instant between that check and the request, the request fails with an
httpx error and the flusher retries it as after any network error (it is never resent here: part
of it may have reached the server).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from math import inf

import httpx
import trio

# A request's head and a body up to this size go out in one send (the copy to join a bigger
# body would cost more than the send it saves).
COALESCE_BYTES = 256 * 1024
MAX_CONNECTIONS = 64
KEEPALIVE_EXPIRY = 5.0
READ_SIZE = 64 * 1024
# Longer than any PutRecords/PutRecordBatch reply (500 results of ~100 bytes): a reply over
# this is a broken server, and is not kept in memory.
MAX_REPLY_BYTES = 8 * 1024 * 1024
# Longest reply head (status line and headers), or chunk header or trailer section.
MAX_HEAD_BYTES = 64 * 1024

Origin = tuple[bytes, bytes, int]
Timeouts = Mapping[str, float | None]

# RFC 9112's grammar, as h11 spells it.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_TARGET = re.compile(rb"[^\x00\s]+")
_BLANK_LINE = re.compile(rb"\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: (?:[ \t]|[^\x00\s])*)?")
_HEADER_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*")
_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*")


class ReplyError(Exception):
    """The server broke HTTP/1.1 (the I/O shell raises it as httpx.RemoteProtocolError)."""


class Reply:
    """A reply read in full: what spoold uses of it, with the names httpx.Response gives them."""

    __slots__ = ("status_code", "headers", "content", "__weakref__")

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], content: bytes) -> None:
        self.status_code, self.headers, self.content = status_code, headers, content


def request_head(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The head of an HTTP/1.1 request, each name and value checked as h11 checks them (no
    line breaks or NULs: a header can never end the head early)."""
    if not _TARGET.fullmatch(target):
        raise httpx.LocalProtocolError(f"illegal request target {target!r}")
    out = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise httpx.LocalProtocolError(f"illegal header {name!r}")
        out += (name, b": ", value, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def head_of(request: httpx.Request, length: int) -> bytes:
    """The head of ``request`` with a body of ``length`` bytes. The body is sent whole, so
    Content-Length frames it, whatever httpx chose."""
    headers = [(name, value) for name, value in request.headers.raw
               if name.lower() not in (b"content-length", b"transfer-encoding")]
    headers.append((b"Content-Length", b"%d" % length))
    return request_head(request.method.encode(), request.url.raw_path, headers)


def request_bytes(head: bytes, body: bytes) -> list[bytes]:
    """What to send: one buffer (head and body) or, for a body over COALESCE_BYTES, both apart."""
    if len(body) <= COALESCE_BYTES:
        return [head + body]
    return [head, body]


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE, _DONE = range(7)


class ReplyReader:
    """One HTTP/1.1 reply from the bytes received, pure. Framed as RFC 9112 says (and h11
    reads it): Content-Length, chunked, or until the server closes; 1xx replies skipped; 204
    and 304 empty. Limits: MAX_HEAD_BYTES per head, ``max_body`` bytes of body.

    """

    __slots__ = ("_buf", "_pos", "_state", "_left", "_parts", "_size", "_max", "_status", "_headers",
                 "keep_alive", "received")

    def __init__(self, max_body: int = MAX_REPLY_BYTES) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._state = _HEAD
        self._left = 0
        self._parts: list[bytes] = []
        self._size = 0
        self._max = max_body
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False  # the connection may carry another request once this is read
        self.received = False

    @property
    def leftover(self) -> bool:
        """Bytes after the reply (the start of a reply to nothing: the connection is unusable)."""
        return self._pos < len(self._buf)

    def feed(self, data: bytes) -> Reply | None:
        """Take ``data`` received; the reply once it is complete, else None."""
        self.received = True
        self._buf += data
        while True:
            state = self._state
            if state == _HEAD:
                if not self._head():
                    return None
            elif state == _LENGTH:
                if len(self._buf) - self._pos < self._left:
                    return None
                self._take(self._left)
                self._state = _DONE
            elif state == _CHUNK_SIZE:
                end = self._buf.find(b"\r\n", self._pos)
                if end < 0:
                    self._check_pending()
                    return None
                match = _CHUNK_HEADER.fullmatch(self._buf, self._pos, end)
                if match is None:
                    raise ReplyError("illegal chunk header")
                self._pos = end + 2
                self._left = int(match[1], 16)
                self._state = _CHUNK_DATA if self._left else _TRAILER
            elif state == _CHUNK_DATA:
                if len(self._buf) - self._pos < self._left + 2:
                    return None
                self._take(self._left)
                if self._buf[self._pos:self._pos + 2] != b"\r\n":
                    raise ReplyError("malformed chunk footer")
                self._pos += 2
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                if self._buf.startswith(b"\r\n", self._pos) or self._buf.startswith(b"\n", self._pos):
                    self._pos += 2 if self._buf[self._pos] == 13 else 1
                else:
                    match = _BLANK_LINE.search(self._buf, self._pos)
                    if match is None:
                        self._check_pending()
                        return None
                    _framing(_headers(_lines(self._buf, self._pos, match.start())))  # checked, not kept
                    self._pos = match.end()
                self._state = _DONE
            elif state == _UNTIL_CLOSE:
                self._left = len(self._buf) - self._pos
                self._take(self._left)
                return None
            else:
                return Reply(self._status, self._headers, b"".join(self._parts))

    def end(self) -> Reply:
        """The server closed the connection: the reply, when its body ran until the close."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            return Reply(self._status, self._headers, b"".join(self._parts))
        if not self.received:
            raise ReplyError("Server disconnected without sending a response.")
        raise ReplyError("Server disconnected in the middle of a reply.")

    def _take(self, n: int) -> None:
        self._size += n
        if self._size > self._max:
            raise ReplyError(f"reply over {self._max} bytes")
        with memoryview(self._buf) as view:
            self._parts.append(view[self._pos:self._pos + n].tobytes())
        self._pos += n

    def _check_pending(self) -> None:
        if len(self._buf) - self._pos > MAX_HEAD_BYTES:
            raise ReplyError(f"reply head over {MAX_HEAD_BYTES} bytes")

    def _head(self) -> bool:
        match = _BLANK_LINE.search(self._buf, self._pos)
        if match is None:
            self._check_pending()
            return False
        lines = _lines(self._buf, self._pos, match.start())
        self._pos = match.end()
        status_line = _STATUS_LINE.fullmatch(lines[0])
        if status_line is None:
            raise ReplyError(f"illegal status line {lines[0][:100]!r}")
        version, status = status_line[1], int(status_line[2])
        if status < 100:
            raise ReplyError(f"illegal status {status}")
        headers = _headers(lines[1:])
        length, chunked, close = _framing(headers)
        if status < 200:
            if status == 101:
                raise ReplyError("the server switched protocols")
            return True  # informational: the reply follows
        self._status, self._headers = status, headers
        self.keep_alive = version >= b"1.1" and not close
        if status in (204, 304):
            self._state = _DONE
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            if length > self._max:
                raise ReplyError(f"reply over {self._max} bytes")
            self._left, self._state = length, _LENGTH
        else:
            self._state, self.keep_alive = _UNTIL_CLOSE, False
        return True


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool, bool]:
    """(Content-Length, chunked, Connection: close) of a head, checked as h11 checks them."""
    length: bytes | None = None
    chunked = close = False
    for name, value in headers:
        name = name.lower()
        if name == b"content-length":
            values = {v.strip() for v in value.split(b",")}
            found = values.pop()
            if values or not found.isdigit() or len(found) > 20 or (length is not None and found != length):
                raise ReplyError("bad Content-Length")
            length = found
        elif name == b"transfer-encoding":
            if chunked or value.lower() != b"chunked":
                raise ReplyError("only one Transfer-Encoding, chunked, is supported")
            chunked = True
        elif name == b"connection":
            close = close or b"close" in (v.strip() for v in value.lower().split(b","))
    return (None if length is None else int(length)), chunked, close


def _lines(buf: bytearray, start: int, end: int) -> list[bytes]:
    # The lines before a blank line at ``end``, each ended by CRLF or (as h11 also takes) LF.
    data = bytes(buf[start:end])
    return (data[:-1] if data.endswith(b"\r") else data).replace(b"\r\n", b"\n").split(b"\n")


def _headers(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    unfolded: list[bytes] = []
    for line in lines:
        if line.startswith((b" ", b"\t")):  # obsolete line folding, joined as h11 joins it
            if not unfolded:
                raise ReplyError("continuation line at start of headers")
            unfolded[-1] += b" " + line.lstrip(b" \t")
        else:
            unfolded.append(line)
    headers = []
    for line in unfolded:
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise ReplyError(f"illegal header line {line[:100]!r}")
        headers.append((match[1], match[2]))
    return headers


class _Connection:
    __slots__ = ("stream", "socket", "idle_since")

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.socket = sock
        self.idle_since = 0.0

    def reusable(self, now: float) -> bool:
        # Readable while idle: the server closed it (or broke the protocol); either way it
        # cannot carry a request.
        return now - self.idle_since <= KEEPALIVE_EXPIRY and not self.socket.is_readable()


class Transport(httpx.AsyncBaseTransport):
    """An httpx transport (HTTP/1.1, keep-alive, TLS verified) that reads each reply in full."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._max = max_connections
        self._requests = trio.Semaphore(max_connections)  # requests in flight
        self._open = 0  # connections open, idle or not: at most max_connections
        self._closed = False

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:  # built on first use: loading the CA bundle takes ~20 ms
            self._ssl_context = httpx.create_ssl_context(trust_env=False)
        return self._ssl_context

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
        reply = await self._send(request.url, head_of(request, len(body)), body,
                                 request.extensions.get("timeout") or {}, request)
        return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content,
                              extensions={"http_version": b"HTTP/1.1"})

    async def _send(self, url: httpx.URL, head: bytes, body: bytes, timeouts: Timeouts,
                    request: httpx.Request | None) -> Reply:
        if self._closed:
            raise httpx.ConnectError("the transport is closed", request=request)
        origin = (url.raw_scheme, url.raw_host, url.port or (443 if url.raw_scheme == b"https" else 80))
        try:
            self._requests.acquire_nowait()
        except trio.WouldBlock:
            with _timeout(request, timeouts.get("pool"), httpx.PoolTimeout, httpx.PoolTimeout):
                await self._requests.acquire()
        try:
            conn = await self._acquire(request, origin, timeouts.get("connect"))
            reader = ReplyReader(MAX_REPLY_BYTES)
            try:
                reply = await self._exchange(conn, request_bytes(head, body), reader, timeouts, request)
            except BaseException:
                self._discard(conn)
                raise
            # Bytes after the reply would be read as the next reply's start.
            if reader.keep_alive and not reader.leftover and not self._closed:
                conn.idle_since = trio.current_time()
                self._idle.setdefault(origin, []).append(conn)
            else:  # Connection: close, a reply that ended the connection, or bytes after it
                self._discard(conn)
        finally:
            self._requests.release()
        return reply

    async def _exchange(self, conn: _Connection, pieces: list[bytes], reader: ReplyReader, timeouts: Timeouts,
                        request: httpx.Request | None) -> Reply:
        """Send ``pieces``, read the reply: one cancel scope, its deadline moved per step."""
        write, read = timeouts.get("write"), timeouts.get("read")
        writing = True
        scope = trio.CancelScope(deadline=inf if write is None else trio.current_time() + write)
        try:
            with scope:
                for piece in pieces:
                    await conn.stream.send_all(piece)
                writing = False
                while True:
                    if read is not None:
                        scope.deadline = trio.current_time() + read
                    data = await conn.stream.receive_some(READ_SIZE)
                    reply = reader.feed(data) if data else reader.end()
                    if reply is not None:
                        return reply
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
            error = httpx.WriteError if writing else httpx.ReadError
            raise error(str(exc) or type(exc).__name__, request=request) from exc
        except ReplyError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        timeout = httpx.WriteTimeout if writing else httpx.ReadTimeout
        raise timeout(f"{timeout.__name__}: no progress in {write if writing else read} s", request=request)

    async def _acquire(self, request: httpx.Request | None, origin: Origin, timeout: float | None) -> _Connection:
        """An idle connection to ``origin`` still usable, else a new one (closing the longest
        idle one of another origin first when max_connections are open)."""
        idle = self._idle.get(origin)
        if idle:
            now = trio.current_time()
            while idle:
                conn = idle.pop()
                if conn.reusable(now):
                    return conn
                self._discard(conn)
        if self._open >= self._max:
            # This request holds one of max_connections request slots and no connection, so
            # fewer than max_connections connections are busy: one is idle.
            oldest = min((conns for conns in self._idle.values() if conns), key=lambda conns: conns[0].idle_since)
            self._discard(oldest.pop(0))
        self._open += 1
        try:
            return await self._connect(request, origin, timeout)
        except BaseException:
            self._open -= 1
            raise

    async def _connect(self, request: httpx.Request | None, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme.decode(errors='replace')!r}",
                                            request=request)
        with _timeout(request, timeout, httpx.ConnectTimeout, httpx.ConnectError):
            tcp = await trio.open_tcp_stream(host.decode("ascii"), port)
            stream: trio.abc.Stream = tcp
            if scheme == b"https":
                stream = trio.SSLStream(tcp, self.ssl_context, server_hostname=host.decode("ascii"),
                                        https_compatible=True)
                try:
                    await stream.do_handshake()
                except BaseException:
                    tcp.socket.close()
                    raise
        return _Connection(stream, tcp.socket)

    def _discard(self, conn: _Connection) -> None:
        # The socket is closed at once, with no checkpoint: this also runs when the request
        # was cancelled. No TLS close_notify: HTTP/1.1 bodies are delimited without it.
        self._open -= 1
        conn.socket.close()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                self._discard(conn)


@contextmanager
def _timeout(request: httpx.Request | None, seconds: float | None, on_timeout: type[httpx.TimeoutException],
             on_error: type[httpx.TransportError]) -> Iterator[trio.CancelScope]:
    """A deadline ``seconds`` away (none for None), and trio/OS errors as httpx's."""
    scope = trio.CancelScope(deadline=inf if seconds is None else trio.current_time() + seconds)
    try:
        with scope:
            yield scope
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
        raise on_error(str(exc) or type(exc).__name__, request=request) from exc
    if scope.cancelled_caught:
        raise on_timeout(f"{on_timeout.__name__}: no progress in {seconds} s", request=request)
