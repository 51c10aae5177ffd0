"""The daemon's HTTP transport: httpcore's connection pool behind httpx's transport API, with
one change of behaviour: a request's head and body leave in one write.

httpcore writes the request line and headers, then each body chunk, then an empty end of
message, each with its own ``send``. On a keep-alive connection every ``send`` costs a system
call, and over loopback or TLS much more (the peer is woken, a TLS record is sealed): sending a
500-record PutRecords head on its own cost about as much CPU as sending its 70 KB body. Writes
are therefore held until the stream is read (the request is complete by then) or until
COALESCE_BYTES are held, and go out together. This uses httpcore's documented network-backend
extension point; nothing of httpcore or httpx is patched.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpcore
import httpx

# Writes held for one send: a request head and a body up to this size go out together; a bigger
# body is sent as it comes (the copy to join it would cost more than the send it saves).
COALESCE_BYTES = 256 * 1024
MAX_CONNECTIONS = 64
KEEPALIVE_EXPIRY = 5.0

# httpcore's exceptions -> httpx's, most specific first (the classes httpx itself maps them to).
_EXCEPTIONS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.ProxyError, httpx.ProxyError),
)
_HTTPCORE_ERRORS = tuple(core for core, _ in _EXCEPTIONS)


class _CoalescingStream(httpcore.AsyncNetworkStream):
    """A network stream whose writes are held until a read, a TLS upgrade or COALESCE_BYTES."""

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        self._held: list[bytes] = []
        self._held_bytes = 0

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._held_bytes + len(buffer) > COALESCE_BYTES:
            await self._flush(timeout)
            if len(buffer) > COALESCE_BYTES:
                await self._stream.write(buffer, timeout)
                return
        self._held.append(buffer)
        self._held_bytes += len(buffer)

    async def _flush(self, timeout: float | None) -> None:
        if not self._held:
            return
        held, self._held, self._held_bytes = self._held, [], 0
        await self._stream.write(held[0] if len(held) == 1 else b"".join(held), timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await self._flush(timeout)
        return await self._stream.read(max_bytes, timeout)

    async def aclose(self) -> None:
        self._held, self._held_bytes = [], 0
        await self._stream.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        await self._flush(timeout)
        return _CoalescingStream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _CoalescingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self._backend = httpcore.TrioBackend()  # spoold runs on trio only

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        return _CoalescingStream(await self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        return _CoalescingStream(await self._backend.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class Transport(httpx.AsyncBaseTransport):
    """An httpx transport (HTTP/1.1, keep-alive, TLS verified) that reads each reply in full."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=KEEPALIVE_EXPIRY,
            network_backend=_CoalescingBackend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,  # type: ignore[arg-type]  # httpx's request streams are async iterables
            extensions=request.extensions,
        )
        try:
            response = await self._pool.handle_async_request(core)
            try:
                content = await response.aread()
            finally:
                await response.aclose()
        except _HTTPCORE_ERRORS as exc:
            kind = next(ours for theirs, ours in _EXCEPTIONS if isinstance(exc, theirs))
            raise kind(str(exc) or type(exc).__name__, request=request) from exc
        return httpx.Response(response.status, headers=response.headers, content=content,
                              extensions=response.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()
