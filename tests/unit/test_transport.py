"""The transport: what it sends for a request (pure), and over real loopback sockets (TLS too)
that requests and replies pass unchanged, connections are kept alive, bounded and dropped when
the server closes them, and failures map to httpx's exceptions."""

from __future__ import annotations

import gc
import socket
import ssl
import tempfile
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio

from spoold import transport as transport_module
from spoold.errors import RetryableSendError
from spoold.sender import post
from spoold.transport import COALESCE_BYTES, Transport, request_bytes, request_head


def _head(body: bytes) -> bytes:
    return request_head(b"POST", b"/", [(b"Host", b"127.0.0.1:9"), (b"X-Amz-Target", b"T"),
                                        (b"Content-Length", b"%d" % len(body))])


def test_head_and_body_leave_in_one_send() -> None:
    pieces = request_bytes(_head(b"body"), b"body")
    assert len(pieces) == 1 and pieces[0].startswith(b"POST / HTTP/1.1\r\n")
    assert pieces[0].endswith(b"\r\n\r\nbody") and b"Content-Length: 4" in pieces[0]


def test_a_body_over_the_limit_is_not_copied_to_join_it() -> None:
    big = b"x" * (COALESCE_BYTES + 1)
    pieces = request_bytes(_head(big), big)
    assert len(pieces) == 2 and pieces[0].endswith(b"\r\n\r\n") and pieces[1] is big


async def _serve_once(listener: trio.SocketListener, seen: list[bytes], reply: bytes) -> None:
    stream = await listener.accept()
    async with stream:
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 4:
            data += await stream.receive_some(65536)
        seen.append(data)
        await stream.send_all(reply)


async def test_a_request_round_trips_over_loopback() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: list[bytes] = []
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-Test: 1\r\n\r\n{\"a\":1}"
    with trio.fail_after(10):
        async with listeners[0], trio.open_nursery() as nursery, Transport() as transport:
            nursery.start_soon(_serve_once, listeners[0], seen, reply)
            request = httpx.Request("POST", f"http://127.0.0.1:{port}/", headers={"X-Amz-Target": "T"}, content=b"body")
            response = await transport.handle_async_request(request)
            assert (response.status_code, response.content, response.headers["x-test"]) == (200, b'{"a":1}', "1")
    head, body = seen[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST / HTTP/1.1\r\n") and b"X-Amz-Target: T" in head and body == b"body"


async def test_a_posted_reply_dies_without_the_cycle_collector() -> None:
    # A request body and its reply must not wait for the cycle collector (about 150 KiB a
    # request at full speed): nothing of a posted request may be left in a reference cycle.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    gc.collect()
    gc.disable()
    try:
        with trio.fail_after(10):
            async with listeners[0], trio.open_nursery() as nursery, Transport() as transport:
                nursery.start_soon(_serve_once, listeners[0], [], reply)
                response = await post(transport, f"http://127.0.0.1:{port}/", {}, b"x" * 100_000, 5.0)
                assert response.content == b"{}"
                ref = weakref.ref(response)
                del response
                assert ref() is None
    finally:
        gc.enable()


async def test_a_refused_connection_is_httpx_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        async with Transport() as transport:
            with pytest.raises(httpx.ConnectError):
                await transport.handle_async_request(httpx.Request("POST", f"http://127.0.0.1:{port}/", content=b""))


class Server:
    """A loopback HTTP/1.1 server (h11) answering each request with ``reply``; what it does
    besides is each test's: close after each reply, drop requests, hold replies until released."""

    def __init__(self, *, reply_headers: list[tuple[str, str]] | None = None, close_after_reply: bool = False,
                 drop: bool = False, hold: bool = False, body: bytes = b"{}", junk: bytes = b"",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.reply_headers = reply_headers or []
        self.close_after_reply, self.drop, self.hold, self.body = close_after_reply, drop, hold, body
        self.junk = junk  # sent after each reply, as if it were the start of another
        self.ssl_context = ssl_context
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.closed = 0  # connections that ended (either side)
        self.requests: list[bytes] = []
        self.release = trio.Event()
        self.changed = trio.Event()
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        if self.ssl_context is not None:
            listeners = [trio.SSLListener(listeners[0], self.ssl_context, https_compatible=True)]
        async with listeners[0], trio.open_nursery() as nursery:
            task_status.started()
            while True:
                nursery.start_soon(self._connection, await listeners[0].accept())

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, condition: Any) -> None:
        while not condition():
            await self.changed.wait()

    async def _connection(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self._changed()
        conn = h11.Connection(h11.SERVER)
        try:
            async with stream:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                    elif isinstance(event, h11.Data):
                        self.requests[-1] += event.data
                    elif isinstance(event, h11.Request):
                        self.requests.append(b"")
                    elif isinstance(event, h11.EndOfMessage):
                        self._changed()
                        if self.drop:
                            return
                        if self.hold:
                            await self.release.wait()
                        headers = [("Content-Length", str(len(self.body))), *self.reply_headers]
                        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers))
                                              + conn.send(h11.Data(data=self.body)) + conn.send(h11.EndOfMessage())
                                              + self.junk)
                        if self.close_after_reply or conn.our_state is h11.MUST_CLOSE:
                            return
                        conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.open -= 1
            self.closed += 1
            self._changed()


@asynccontextmanager
async def serving(transport: Transport | None = None, **options: Any) -> AsyncIterator[tuple[Server, Transport, str]]:
    server = Server(**options)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, (transport or Transport()) as client:
            await nursery.start(server.run)
            scheme = "https" if server.ssl_context is not None else "http"
            yield server, client, f"{scheme}://{'localhost' if scheme == 'https' else '127.0.0.1'}:{server.port}/"
            nursery.cancel_scope.cancel()


async def _post(transport: Transport, url: str, body: bytes = b"body", **timeouts: float) -> httpx.Response:
    extensions = {"timeout": httpx.Timeout(5.0, **timeouts).as_dict()}  # type: ignore[arg-type]
    return await transport.handle_async_request(httpx.Request("POST", url, content=body, extensions=extensions))


async def test_requests_share_one_kept_alive_connection() -> None:
    async with serving() as (server, transport, url):
        for n in range(3):
            assert (await _post(transport, url, b"body%d" % n)).content == b"{}"
        assert server.connections == 1 and server.requests == [b"body0", b"body1", b"body2"]


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async with serving(close_after_reply=True) as (server, transport, url):
        await _post(transport, url)
        await server.wait_for(lambda: server.closed == 1)  # its FIN is on our socket by now
        assert (await _post(transport, url, b"second")).status_code == 200
        assert server.connections == 2 and server.requests == [b"body", b"second"]


async def test_connection_close_in_a_reply_ends_the_connection() -> None:
    async with serving(reply_headers=[("Connection", "close")]) as (server, transport, url):
        await _post(transport, url)
        await server.wait_for(lambda: server.closed == 1)
        await _post(transport, url)
        assert server.connections == 2


async def test_bytes_after_a_reply_end_the_connection() -> None:
    async with serving(junk=b"HTTP/1.1 200 OK\r\n") as (server, transport, url):
        for _ in range(2):
            assert (await _post(transport, url)).content == b"{}"
        assert server.connections == 2


async def test_a_request_the_server_drops_fails_and_is_not_resent() -> None:
    async with serving(drop=True) as (server, transport, url):
        with pytest.raises(httpx.RemoteProtocolError):
            await _post(transport, url)
        with pytest.raises(RetryableSendError) as caught:
            await post(transport, url, {}, b"again", 5.0)
        assert caught.value.code == "ConnectionError"
        assert server.requests == [b"body", b"again"] and server.connections == 2


async def test_connections_are_bounded_and_waiting_requests_reuse_them() -> None:
    async with serving(Transport(max_connections=2), hold=True) as (server, transport, url):
        results: list[int] = []

        async def one(n: int) -> None:
            results.append((await _post(transport, url, b"%d" % n)).status_code)

        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(one, n)
            await server.wait_for(lambda: len(server.requests) == 2)
            server.release.set()
        assert results == [200] * 5 and server.connections == 2 and server.most_open == 2


async def test_the_bound_counts_idle_connections_of_other_origins() -> None:
    transport = Transport(max_connections=1)
    async with serving(transport) as (first, _, url1), serving(transport) as (second, _, url2):
        await _post(transport, url1)
        await _post(transport, url2)  # the idle connection to the first server is closed for it
        await first.wait_for(lambda: first.closed == 1)
        assert (first.open, second.open) == (0, 1)


async def test_a_reply_that_never_comes_is_a_read_timeout() -> None:
    async with serving(hold=True) as (server, transport, url):
        with pytest.raises(httpx.ReadTimeout):
            await _post(transport, url, read=0.2)
        server.release.set()


async def test_a_reply_over_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "MAX_REPLY_BYTES", 10)
    async with serving(body=b"x" * 11) as (_, transport, url):
        with pytest.raises(httpx.RemoteProtocolError):
            await _post(transport, url)


def _self_signed() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only the server's certificate) for localhost."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "cert.pem").write_bytes(cert_pem)
        Path(tmp, "key.pem").write_bytes(key_pem)
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(Path(tmp, "cert.pem"), Path(tmp, "key.pem"))
    client = httpx.create_ssl_context(trust_env=False)
    client.load_verify_locations(cadata=cert_pem.decode())
    return server, client


async def test_tls_round_trips_and_keeps_the_connection_alive() -> None:
    server_context, client_context = _self_signed()
    async with serving(Transport(ssl_context=client_context), ssl_context=server_context) as (server, transport, url):
        for _ in range(2):
            assert (await _post(transport, url, b"x" * 100_000)).content == b"{}"
        assert server.connections == 1 and server.requests == [b"x" * 100_000] * 2


async def test_a_certificate_not_trusted_is_a_connect_error() -> None:
    server_context, _ = _self_signed()
    async with serving(ssl_context=server_context) as (server, transport, url):
        with pytest.raises(httpx.ConnectError):
            await _post(transport, url)
