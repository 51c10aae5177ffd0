"""The transport's coalescing stream (a recording fake beneath it) and, over a real loopback
socket, that a request and its reply pass through httpcore unchanged and failures map to httpx's."""

from __future__ import annotations

import gc
import socket
import weakref
from typing import Any

import httpcore
import httpx
import pytest
import trio

from spoold.sender import post
from spoold.transport import COALESCE_BYTES, Transport, _CoalescingStream


class Recording(httpcore.AsyncNetworkStream):
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.writes.append(bytes(buffer))

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return b"reply"

    async def aclose(self) -> None:
        self.closed = True

    async def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return Recording()

    def get_extra_info(self, info: str) -> Any:
        return f"info:{info}"


async def test_head_and_body_leave_in_one_write_when_the_reply_is_read() -> None:
    inner = Recording()
    stream = _CoalescingStream(inner)
    await stream.write(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n")
    await stream.write(b"body")
    await stream.write(b"")  # h11's end of message for a Content-Length body
    assert inner.writes == []
    assert await stream.read(100) == b"reply"
    assert inner.writes == [b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"]
    assert stream.get_extra_info("is_readable") == "info:is_readable"


async def test_a_body_over_the_limit_is_not_copied_to_join_it() -> None:
    inner = Recording()
    stream = _CoalescingStream(inner)
    big = b"x" * (COALESCE_BYTES + 1)
    await stream.write(b"head")
    await stream.write(big)
    assert inner.writes == [b"head", big]  # the head first, alone; the body as given
    await stream.write(b"a" * (COALESCE_BYTES // 2))
    await stream.write(b"b" * (COALESCE_BYTES // 2 + 1))  # together over the limit: the first goes
    assert inner.writes[2:] == [b"a" * (COALESCE_BYTES // 2)]
    await stream.read(10)
    assert inner.writes[3:] == [b"b" * (COALESCE_BYTES // 2 + 1)]


async def test_held_writes_go_before_a_tls_upgrade_and_close_drops_them() -> None:
    inner = Recording()
    stream = _CoalescingStream(inner)
    await stream.write(b"CONNECT")
    tls = await stream.start_tls(None)  # type: ignore[arg-type]
    assert inner.writes == [b"CONNECT"] and isinstance(tls, _CoalescingStream)
    await stream.write(b"never sent")
    await stream.aclose()
    assert inner.closed and inner.writes == [b"CONNECT"]


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
