"""The control protocol's pure parts, the one snapshot builder, and the listener's accept loop
(cap, refusal, fd exhaustion) with in-memory streams."""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest
import trio
import trio.testing

from spoold import control, status
from spoold.control import DeadLetters, Metrics, RequestError, Status, parse_request


@pytest.mark.parametrize("line, want", [
    (b'{"command": "status"}\n', Status()),
    (b'{"command": "status"}', Status()),
    (b'{"command": "metrics"}\n', Metrics()),
    (b'{"command": "dead-letters", "action": "list"}\n', DeadLetters("list", None, 100)),
    (b'{"command": "dead-letters", "action": "purge", "dest": "app", "limit": 5}\n', DeadLetters("purge", "app", 5)),
    (b'{"command": "dead-letters", "action": "replay", "dest": null}\n', DeadLetters("replay")),
])
def test_valid_requests(line: bytes, want: control.Request) -> None:
    assert parse_request(line) == want
    assert parse_request(control.encode_request(want)) == want


@pytest.mark.parametrize("line, error", [
    (b"status\n", "JSON object"),
    (b"dead-letters list abc\n", "JSON object"),
    (b"\xff\xfe\n", "JSON object"),
    (b"[1, 2]\n", "JSON object"),
    (b"{\n", "JSON object"),
    (b"[" * 100_000, "JSON object"),
    (b'{"command": "reboot"}', "command must be"),
    (b'{"command": 1}', "command must be"),
    (b"{}", "command must be"),
    (b'{"command": "status", "action": "list"}', "unknown field(s) for status: action"),
    (b'{"command": "dead-letters"}', "needs an action"),
    (b'{"command": "dead-letters", "action": "drop"}', "action must be"),
    (b'{"command": "dead-letters", "action": 1}', "action must be"),
    (b'{"command": "dead-letters", "action": "list", "limit": "abc"}', "limit must be"),
    (b'{"command": "dead-letters", "action": "list", "limit": 0}', "limit must be"),
    (b'{"command": "dead-letters", "action": "list", "limit": 1001}', "limit must be"),
    (b'{"command": "dead-letters", "action": "list", "limit": true}', "limit must be"),
    (b'{"command": "dead-letters", "action": "list", "limit": 1.0}', "limit must be"),
    (b'{"command": "dead-letters", "action": "list", "dest": 5}', "dest must be"),
    (b'{"command": "dead-letters", "action": "list", "dest": "../x"}', "dest must be"),
    (b'{"command": "dead-letters", "action": "list", "dest": ""}', "dest must be"),
    (b'{"command": "dead-letters", "action": "list", "bogus": 1}', "unknown field(s) for dead-letters: bogus"),
])
def test_invalid_requests(line: bytes, error: str) -> None:
    with pytest.raises(RequestError, match=None) as exc:
        parse_request(line)
    assert error in str(exc.value)


@pytest.mark.parametrize("head, code", [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    (b"GET /metrics?name=x HTTP/1.0\r\n\r\n", 200),
    (b"HEAD /metrics HTTP/1.1\r\n\r\n", 200),
    (b"GET / HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET /metrics HTTP/2\r\n\r\n", 400),
    (b"\x00\xff garbage", 400),
    (b"", 400),
])
def test_http_heads(head: bytes, code: int) -> None:
    assert control.parse_http_head(head)[0] == code


def test_offline_and_live_snapshots_share_their_shape() -> None:
    held = {"app": (3, 30), "gone": (1, 10)}
    summary = {"app": (100.0, 2), "gone": (None, 0), "dead-only": (None, 4)}
    offline = status.build_snapshot(now=110.0, path="/s.db", page_size=4096, held=held, summary=summary)
    assert offline == {
        "running": False,
        "spool": {"path": "/s.db", "bytes": 40, "page_size": 4096},
        "destinations": {
            "app": {"spooled_lines": 3, "spooled_bytes": 30, "oldest_age": 10.0, "dead_letters": 2},
            "dead-only": {"spooled_lines": 0, "spooled_bytes": 0, "oldest_age": None, "dead_letters": 4},
            "gone": {"spooled_lines": 1, "spooled_bytes": 10, "oldest_age": None, "dead_letters": 0},
        },
    }
    live = status.Live(version="1", pid=7, uptime=5.04, spool={"bytes": 41, "max_bytes": 100},
                       dropped={"app": 1}, expired={}, configured={"app": {"kind": "kinesis", "lines_in": 9},
                                                                   "new": {"kind": "firehose"}},
                       listeners={"control": {"refused": 2}})
    snap = status.build_snapshot(now=110.0, path="/s.db", page_size=4096, held=held, summary=summary, live=live)
    assert snap["running"] is True and snap["pid"] == 7 and snap["uptime"] == 5.0
    assert snap["spool"] == {"path": "/s.db", "bytes": 41, "page_size": 4096, "max_bytes": 100}
    for name, d in offline["destinations"].items():  # every offline field, with the same value
        assert {k: snap["destinations"][name][k] for k in d} == d
    assert snap["destinations"]["app"] == {**offline["destinations"]["app"], "dropped": 1, "expired": 0,
                                           "configured": True, "kind": "kinesis", "lines_in": 9}
    assert snap["destinations"]["gone"]["configured"] is False
    assert snap["destinations"]["new"]["spooled_lines"] == 0 and snap["destinations"]["new"]["configured"]
    text = status.render_prometheus(snap)
    assert 'spoold_listener_refused_total{listener="control"} 2' in text
    assert "daemon not running" in status.render_table(offline)
    assert "daemon not running" not in status.render_table(snap)


# -- the accept loop ----------------------------------------------------------------------


class FakeListener:
    """Hands out in-memory streams; fails the first ``failures`` accepts with ``errno_``."""

    def __init__(self, failures: int = 0, errno_: int = errno.EMFILE) -> None:
        self.failures = failures
        self.errno = errno_
        self.calls = 0
        send, self.incoming = trio.open_memory_channel[Any](100)
        self.send = send

    async def accept(self) -> Any:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise OSError(self.errno, "out of fds")
        return await self.incoming.receive()

    def connect(self) -> Any:
        client, server = trio.testing.memory_stream_pair()
        self.send.send_nowait(server)
        return client


async def _reply_of(client: Any) -> bytes:
    await client.send_all(b'{"command": "status"}\n')
    data = b""
    while chunk := await client.receive_some(65536):
        data += chunk
    return data


async def test_control_server_answers_and_caps_connections(autojump_clock: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(control, "MAX_CONTROL_CONNECTIONS", 2)
    release = trio.Event()

    async def snapshot() -> dict[str, Any]:
        await release.wait()
        return {"running": True}

    async def dead(request: DeadLetters) -> dict[str, Any]:
        return {"purged": 0}

    ctl = control.ControlServer(snapshot, dead, lambda snap: "")
    listener = FakeListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(ctl.server.serve, listener)
        held = [listener.connect() for _ in range(2)]
        for c in held:
            await c.send_all(b'{"command": "status"}\n')
        await trio.testing.wait_all_tasks_blocked()
        refused = listener.connect()
        assert json.loads(await _reply_of(refused)) == {"error": "busy: too many control connections, try again"}
        assert ctl.server.stats() == {"accepted": 2, "refused": 1, "bad_requests": 0, "timeouts": 0,
                                      "open": 2, "max": 2}
        release.set()
        for c in held:
            data = b""
            while chunk := await c.receive_some(65536):
                data += chunk
            assert json.loads(data) == {"running": True}
            await c.aclose()  # the server lingers until the client's EOF
        await trio.testing.wait_all_tasks_blocked()
        assert ctl.server.active == 0
        # An idle client is answered with an error at the request deadline and closed.
        idle = listener.connect()
        with trio.fail_after(control.REQUEST_TIMEOUT + 5):
            data = b""
            while chunk := await idle.receive_some(65536):
                data += chunk
        assert "no complete request" in json.loads(data)["error"]
        assert ctl.server.counts["timeouts"] == 1
        nursery.cancel_scope.cancel()


async def _read_all(client: Any) -> bytes:
    data = b""
    while chunk := await client.receive_some(65536):
        data += chunk
    return data


async def test_metrics_slots_held_without_a_request_make_room_for_a_scraper(autojump_clock: Any,
                                                                           monkeypatch: Any) -> None:
    monkeypatch.setattr(control, "MAX_METRICS_CONNECTIONS", 3)

    async def snapshot() -> dict[str, Any]:
        return {"running": True}

    async def scrape() -> bytes:
        scraper = listener.connect()
        await scraper.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = await _read_all(scraper)
        await scraper.aclose()
        await trio.testing.wait_all_tasks_blocked()
        return reply

    metrics = control.MetricsServer(snapshot, lambda snap: "spoold_up 1\n")
    listener = FakeListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(metrics.server.serve, listener)
        idle = [listener.connect() for _ in range(3)]  # every slot, none sending a request
        await trio.testing.wait_all_tasks_blocked()
        assert metrics.server.stats()["open"] == 3
        with trio.fail_after(1):  # long before REQUEST_TIMEOUT: no slot came free by itself
            reply = await scrape()
            assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"spoold_up 1\n"), reply
            assert await idle[0].receive_some(1) == b"", "the longest-waiting connection made room"
            idle.append(listener.connect())  # every slot taken again
            await trio.testing.wait_all_tasks_blocked()
            assert (await scrape()).startswith(b"HTTP/1.1 200 ")
            assert await idle[1].receive_some(1) == b"", "then the next longest-waiting"
        assert metrics.server.stats() == {"accepted": 6, "refused": 0, "bad_requests": 0, "timeouts": 2,
                                          "open": 2, "max": 3}
        # The others keep their slots until their own deadline.
        with trio.fail_after(control.REQUEST_TIMEOUT + 1):
            assert [await _read_all(c) for c in idle[2:]] == [b"", b""]
        await trio.testing.wait_all_tasks_blocked()
        assert metrics.server.stats()["timeouts"] == 4 and metrics.server.active == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("errno_", [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS])
async def test_accept_waits_out_resource_exhaustion(autojump_clock: Any, errno_: int) -> None:
    async def snapshot() -> dict[str, Any]:
        return {"running": True}

    ctl = control.ControlServer(snapshot, lambda r: snapshot(), lambda snap: "")
    listener = FakeListener(failures=50, errno_=errno_)
    async with trio.open_nursery() as nursery:
        await nursery.start(ctl.server.serve, listener)
        client = listener.connect()
        start = trio.current_time()
        assert json.loads(await _reply_of(client)) == {"running": True}
        # Backed off between failures (no spinning), then served.
        assert listener.failures == 0 and listener.calls in (51, 52)  # 52: waiting for the next
        assert trio.current_time() - start >= 50 * 0.1 - 1e-9
        nursery.cancel_scope.cancel()


async def test_accept_raises_other_errors() -> None:
    async def snapshot() -> dict[str, Any]:
        return {}

    ctl = control.ControlServer(snapshot, lambda r: snapshot(), lambda snap: "")
    got: list[int | None] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(ctl.server.serve, FakeListener(failures=1, errno_=errno.EBADF))
    except* OSError as group:
        got = [e.errno for e in _leaves(group)]
    assert got == [errno.EBADF]


def _leaves(group: BaseExceptionGroup[Any]) -> list[Any]:
    out: list[Any] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


async def test_read_until_finds_an_early_end_in_a_big_chunk() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"x" * 100 + b"\n" + b"y" * 7000)
    assert await control._read_until(server, b"\n", control.MAX_REQUEST) == b"x" * 100 + b"\n"
    client2, server2 = trio.testing.memory_stream_pair()
    await client2.send_all(b"z" * control.MAX_REQUEST)
    with pytest.raises(control.TooLong):
        await control._read_until(server2, b"\n", control.MAX_REQUEST)
