"""The daemon's HTTP transport: HTTP/1.1 with h11 over trio streams, behind httpx's transport API.

spoold makes one kind of call: a POST of a body it already holds, whose reply it reads in full,
to one or two origins, over and over. httpcore's pool does much more for every request (a lock,
a readability poll of every idle connection, request and response models, a trace hook per
step, an async iterator per body) and cost about a fifth of the daemon's CPU at full speed. This
transport keeps only what spoold needs, on h11 (the same HTTP/1.1 state machine httpcore uses):

- a keep-alive pool per origin (scheme, host, port), used last-in first-out so the fewest
  connections stay warm; at most ``max_connections`` open in all (requests beyond wait for one,
  within the pool timeout), an idle one closed after KEEPALIVE_EXPIRY;
- a request's head and body leave in one send when the body is at most COALESCE_BYTES (on a
  keep-alive connection every send costs a system call and wakes the peer; over TLS it also
  seals a record), a bigger body in a send of its own rather than copied to join it;
- TLS through trio.SSLStream with httpx's default context (certificates verified);
- httpx's timeouts (connect, read per receive, write, pool) and httpx's exception types;
- the reply read in full, at most MAX_REPLY_BYTES.

A server may close a keep-alive connection while it is idle. Before reusing one, the transport
checks its socket: readable means the server closed it (or sent something unasked), and the
connection is dropped for the next one or a new one; nothing of the request was sent on it. If
the server closes in the instant between that check and the request, the request fails with an
httpx error and the flusher retries it as after any network error (it is never resent here: part
of it may have reached the server).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from math import inf

import h11
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

Origin = tuple[bytes, bytes, int]


class _Connection:
    __slots__ = ("stream", "socket", "h11", "idle_since")

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.socket = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def reusable(self, now: float) -> bool:
        # Readable while idle: the server closed it (or broke the protocol); either way it
        # cannot carry a request.
        return now - self.idle_since <= KEEPALIVE_EXPIRY and not self.socket.is_readable()


def request_bytes(conn: h11.Connection, request: httpx.Request, body: bytes) -> list[bytes]:
    """What to send for ``request``: one buffer (head and body) or, for a body over
    COALESCE_BYTES, the head and the body's pieces apart."""
    url = request.url
    head = conn.send(h11.Request(method=request.method, target=url.raw_path, headers=request.headers.raw))
    pieces = [head]
    if body:
        pieces += conn.send_with_data_passthrough(h11.Data(data=body)) or []
    tail = conn.send(h11.EndOfMessage())
    if tail:
        pieces.append(tail)
    if len(body) <= COALESCE_BYTES:
        return [b"".join(pieces)]
    return pieces


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
        if self._closed:
            raise httpx.ConnectError("the transport is closed", request=request)
        timeouts = request.extensions.get("timeout") or {}
        url = request.url
        origin = (url.raw_scheme, url.raw_host, url.port or (443 if url.raw_scheme == b"https" else 80))
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
        try:
            self._requests.acquire_nowait()
        except trio.WouldBlock:
            with _timeout(request, timeouts.get("pool"), httpx.PoolTimeout, httpx.PoolTimeout):
                await self._requests.acquire()
        try:
            conn = await self._acquire(request, origin, timeouts.get("connect"))
            try:
                pieces = request_bytes(conn.h11, request, body)
                with _timeout(request, timeouts.get("write"), httpx.WriteTimeout, httpx.WriteError):
                    for piece in pieces:
                        await conn.stream.send_all(piece)
                status, headers, content = await self._read(request, conn, timeouts.get("read"))
            except BaseException:
                self._discard(conn)
                raise
            h = conn.h11
            # Bytes after the reply (h11 holds them) would be read as the next reply's start.
            if h.our_state is h11.DONE and h.their_state is h11.DONE and not h.trailing_data[0] and not self._closed:
                h.start_next_cycle()
                conn.idle_since = trio.current_time()
                self._idle.setdefault(origin, []).append(conn)
            else:  # Connection: close, a reply that ended the connection, or bytes after it
                self._discard(conn)
        finally:
            self._requests.release()
        return httpx.Response(status, headers=headers, content=content, extensions={"http_version": b"HTTP/1.1"})

    async def _acquire(self, request: httpx.Request, origin: Origin, timeout: float | None) -> _Connection:
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

    async def _connect(self, request: httpx.Request, origin: Origin, timeout: float | None) -> _Connection:
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

    async def _read(self, request: httpx.Request, conn: _Connection,
                    timeout: float | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        status, headers, chunks, size = 0, [], [], 0
        with _timeout(request, timeout, httpx.ReadTimeout, httpx.ReadError) as scope:
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    if timeout is not None:
                        scope.deadline = trio.current_time() + timeout
                    data = await conn.stream.receive_some(READ_SIZE)
                    if not data and conn.h11.their_state is h11.SEND_RESPONSE:
                        raise httpx.RemoteProtocolError("Server disconnected without sending a response.",
                                                        request=request)
                    conn.h11.receive_data(data)
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_REPLY_BYTES:
                        raise httpx.RemoteProtocolError(f"reply over {MAX_REPLY_BYTES} bytes", request=request)
                    chunks.append(event.data)
                elif isinstance(event, h11.Response):
                    status, headers = event.status_code, event.headers.raw_items()
                elif isinstance(event, h11.EndOfMessage):
                    return status, headers, b"".join(chunks)  # h11's data are bytearrays
                elif event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    raise httpx.RemoteProtocolError("Server disconnected in the middle of a reply.", request=request)
                # InformationalResponse (1xx): the final reply follows

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
def _timeout(request: httpx.Request, seconds: float | None, on_timeout: type[httpx.TimeoutException],
             on_error: type[httpx.TransportError]) -> Iterator[trio.CancelScope]:
    """A deadline ``seconds`` away (none for None), and trio/OS/h11 errors as httpx's."""
    scope = trio.CancelScope(deadline=inf if seconds is None else trio.current_time() + seconds)
    try:
        with scope:
            yield scope
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
        raise on_error(str(exc) or type(exc).__name__, request=request) from exc
    except h11.RemoteProtocolError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except h11.LocalProtocolError as exc:
        raise httpx.LocalProtocolError(str(exc), request=request) from exc
    if scope.cancelled_caught:
        raise on_timeout(f"{on_timeout.__name__}: no progress in {seconds} s", request=request)
