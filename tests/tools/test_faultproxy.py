"""tests/tools/faultproxy.py between a plain socket client and a small upstream server that
answers every request with ANSWER: the faults do what the fault suite relies on."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.tools.client import wait_until
from tests.tools.faultproxy import FaultProxy

REQUEST = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
ANSWER = bytes(range(200)) * 4  # 800 bytes, more than reset_after
# Seconds a client waits for bytes that should come at once; also how long a hang is shown to last.
IO_TIMEOUT = 2.0


class _Upstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Answer)
        self.requests: list[bytes] = []


class _Answer(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        got = b""
        while len(got) < len(REQUEST):
            data = self.request.recv(4096)
            if not data:
                return
            got += data
        self.server.requests.append(got)  # type: ignore[attr-defined]
        self.request.sendall(ANSWER)
        while self.request.recv(4096):  # until the proxy closes its side
            pass


@pytest.fixture
def upstream() -> Iterator[_Upstream]:
    server = _Upstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(upstream: _Upstream) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.server_address[1]) as p:
        yield p


def read_answer(s: socket.socket) -> tuple[bytes, OSError | None]:
    """What arrives until the whole ANSWER, the end, or an error (returned, not raised)."""
    got = b""
    try:
        while len(got) < len(ANSWER):
            data = s.recv(4096)
            if not data:
                break
            got += data
    except OSError as exc:
        return got, exc
    return got, None


def exchange(proxy: FaultProxy) -> tuple[bytes, OSError | None]:
    """REQUEST through the proxy on a new connection; what came back, and the error if any."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT) as s:
        s.sendall(REQUEST)
        return read_answer(s)


def test_a_clean_network_forwards_both_ways_and_records_the_connection(proxy, upstream):
    assert exchange(proxy) == (ANSWER, None)
    assert upstream.requests == [REQUEST]
    (conn,) = wait_until(lambda: [c for c in proxy.conns if c.client_done is not None], what="the record")
    assert (conn.fault, conn.bytes_up, conn.bytes_down, conn.reset_sent) == ("none", len(REQUEST), len(ANSWER), False)


def test_reset_forwards_the_request_then_cuts_the_answer(proxy, upstream):
    proxy.set(reset=True, reset_after=40)
    got, error = exchange(proxy)
    assert isinstance(error, ConnectionResetError), error
    assert got == ANSWER[:len(got)] and len(got) <= 40, got
    assert upstream.requests == [REQUEST], "the service got the request: its records are stored"
    (conn,) = proxy.conns
    assert conn.reset_sent and conn.bytes_down <= 40


def test_hang_reads_the_request_and_never_forwards_or_answers(proxy, upstream):
    proxy.set(hang=True)
    got, error = exchange(proxy)
    assert (got, type(error)) == (b"", TimeoutError)
    assert upstream.requests == []
    (conn,) = proxy.conns
    assert conn.fault == "hang" and conn.bytes_up == len(REQUEST) and conn.bytes_down == 0


def test_latency_and_bandwidth_still_deliver_everything(proxy, upstream):
    # Only that the bytes arrive whole: how late is the fault suite's to measure.
    proxy.set(latency=0.05, bandwidth=100_000)
    assert exchange(proxy) == (ANSWER, None)
    assert proxy.conns[-1].fault == "latency=0.05,bandwidth=100000"


def test_refuse_then_accept_again_on_the_same_port(proxy, upstream):
    port = proxy.port
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        exchange(proxy)
    proxy.accept_again()
    assert proxy.port == port
    assert exchange(proxy) == (ANSWER, None)


def test_set_cuts_open_connections(proxy, upstream):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT) as s:
        s.sendall(REQUEST)
        assert read_answer(s) == (ANSWER, None)
        proxy.set()  # a network change: keep-alive connections do not survive it
        got, error = read_answer(s)
        assert (got, type(error)) == (b"", ConnectionResetError)
