"""No input on the control socket or the /metrics port takes the real daemon down.

Seeded and bounded: a few hundred requests of each kind (random bytes, random words and JSON
from the command vocabulary, huge requests without a newline, connect-and-close, slow writers),
after which the daemon must still be running, answer status, and acknowledge lines.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import resource
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold import control
from tests.tools.client import DEADLINE, send_lines, wait_until

SEED = 1414
# Requests per kind; each is one short connection.
ROUNDS = 300
# Writers that dribble a request a byte at a time, alongside the fuzzing.
SLOW_WRITERS = 6
# Idle TCP connections held on the metrics port.
IDLE_CONNECTIONS = 2000
# The daemon's own fd limit in the idle-connections test: below IDLE_CONNECTIONS, so an
# uncapped metrics port would run it out of fds.
DAEMON_NOFILE = 1024

CONTROL_WORDS = ["status", "metrics", "dead-letters", "list", "replay", "purge", "abc", "-1", "0", "100",
                 "d0", "nope", "\x00", "{", "}", '"command"', "null", "1e999", "\u2603"]
FIELD_VALUES: list[Any] = [None, True, False, 0, -1, 1, 100, 1000, 1001, 10**30, 1.5, "abc", "", "d0", "../d0",
                           "x" * 300, [], {}, ["status"], {"command": "status"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exchange(connect: Any, payload: bytes, half_close: bool = True, timeout: float = DEADLINE) -> bytes:
    """Send ``payload``, optionally half-close, read until the daemon closes. Errors from a
    daemon that closed early (it may refuse before reading everything) count as its answer."""
    s = connect()
    s.settimeout(timeout)
    data = b""
    try:
        # ENOTCONN from shutdown(): the daemon already closed (a refusal, an over-long request).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, NotConnectedError):
            if payload:
                s.sendall(payload)
            if half_close:
                _shutdown_write(s)
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                data += chunk
    finally:
        s.close()
    return data


class NotConnectedError(OSError):
    pass


def _shutdown_write(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise NotConnectedError(*exc.args) from exc
        raise


def _unix(path: Path) -> Any:
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(DEADLINE)
        s.connect(str(path))
        return s
    return connect


def _tcp(port: int) -> Any:
    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    return connect


def _random_json(rng: random.Random) -> bytes:
    doc: dict[str, Any] = {}
    for key in rng.sample(["command", "action", "dest", "limit", "extra", ""], rng.randint(0, 5)):
        doc[key] = rng.choice(FIELD_VALUES + CONTROL_WORDS)
    if rng.random() < 0.5:
        doc["command"] = rng.choice(["status", "metrics", "dead-letters"])
    if doc.get("command") == "dead-letters" and rng.random() < 0.5:
        doc["action"] = rng.choice(["list", "replay", "purge"])
    text = json.dumps(doc)
    if rng.random() < 0.2:
        text = text[: rng.randint(0, len(text))]  # cut short
    return text.encode() + b"\n"


def _control_payload(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["bytes", "words", "json", "json", "huge", "close"])
    if kind == "bytes":
        return kind, rng.randbytes(rng.randint(1, 3000)) + rng.choice([b"", b"\n"])
    if kind == "words":
        return kind, " ".join(rng.choices(CONTROL_WORDS, k=rng.randint(1, 6))).encode() + b"\n"
    if kind == "json":
        return kind, _random_json(rng)
    if kind == "huge":
        return kind, rng.choice([b"x", b"{", b"\xff", b" "]) * rng.randint(control.MAX_REQUEST, 200_000)
    return kind, b""


def _slow_writer(connect: Any, payload: bytes, cut: list[bool]) -> None:
    """One byte every 0.2 s, for longer than the daemon's request deadline: the daemon must cut
    it off (answer and close) rather than wait for the rest."""
    try:
        s = connect()
    except OSError:
        cut.append(False)
        return
    try:
        for b in payload:
            s.sendall(bytes([b]))
            time.sleep(0.2)
        s.settimeout(1.0)
        with contextlib.suppress(TimeoutError):
            while s.recv(65536):
                pass
            cut.append(True)  # the daemon closed it
            return
        cut.append(False)
    except OSError:
        cut.append(True)
    finally:
        s.close()


@contextlib.contextmanager
def _slow_writers(connect: Any, payload: bytes) -> Iterator[list[bool]]:
    """SLOW_WRITERS threads dribbling ``payload``; yields the list of "was cut off" outcomes,
    complete once the block exits."""
    assert len(payload) * 0.2 > control.REQUEST_TIMEOUT * 1.5
    cut: list[bool] = []
    threads = [threading.Thread(target=_slow_writer, args=(connect, payload, cut), daemon=True)
               for _ in range(SLOW_WRITERS)]
    for t in threads:
        t.start()
    try:
        yield cut
    finally:
        for t in threads:
            t.join(timeout=DEADLINE)


def _status(daemon: Any) -> dict[str, Any]:
    reply = control.ask(daemon.tmp / "control.sock", control.Status(), timeout=DEADLINE)
    assert reply.get("running") is True, reply
    return reply


def test_control_socket_survives_fuzzing(make_daemon, fake_aws):
    daemon = make_daemon({"endpoint_url": fake_aws.url}).start()
    path = daemon.tmp / "control.sock"
    wait_until(path.exists, what="the control socket")
    rng = random.Random(SEED)
    kinds: dict[str, int] = {}
    errors = 0
    # First a plain-text request that is not JSON at all: it must cost one error reply, not the daemon.
    reply = _exchange(_unix(path), b"dead-letters list abc\n")
    assert "error" in json.loads(reply)
    with _slow_writers(_unix(path), b'{"command": "status", "dest": "' + b"x" * 60) as cut:
        for i in range(ROUNDS):
            kind, payload = _control_payload(rng)
            kinds[kind] = kinds.get(kind, 0) + 1
            answer = _exchange(_unix(path), payload)
            if kind == "close":
                assert answer == b""
            elif answer:
                assert answer.endswith(b"\n") and answer.count(b"\n") == 1, answer[:200]
                doc = json.loads(answer)
                assert isinstance(doc, dict)
                errors += "error" in doc
            if i % 50 == 49:
                assert daemon.proc.poll() is None, daemon.log()[-3000:]
                _status(daemon)
                assert send_lines(daemon.sockets()[0], b"during-fuzz-%d\n" % i) == {"accepted": 1, "rejected": 0}
    assert cut == [True] * SLOW_WRITERS
    assert kinds.keys() == {"bytes", "words", "json", "huge", "close"}, kinds
    assert errors > ROUNDS // 3
    assert daemon.proc.poll() is None, daemon.log()[-3000:]
    counts = _status(daemon)["listeners"]["control"]
    assert counts["bad_requests"] >= errors and counts["open"] >= 1  # this status request is open
    assert send_lines(daemon.sockets()[0], b"after-fuzz\n") == {"accepted": 1, "rejected": 0}
    wait_until(lambda: b"after-fuzz" in {r.data for r in fake_aws.all_records()}, what="the line after fuzzing")
    assert daemon.stop() == 0
    assert not [e for e in daemon.log_events() if e.get("event") == "control_request_failed"]


def _metrics_payload(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["bytes", "http", "http", "huge", "close"])
    if kind == "bytes":
        return kind, rng.randbytes(rng.randint(1, 3000)) + rng.choice([b"", b"\r\n\r\n"])
    if kind == "http":
        method = rng.choice([b"GET", b"HEAD", b"POST", b"BREW", b"", b"get"])
        target = rng.choice([b"/metrics", b"/", b"/metrics?x=1", b"/metrics/../", b"*", b"/" + b"m" * 9000, b""])
        version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"", b"SPDY"])
        headers = b"".join(rng.choices([b"Host: x\r\n", b"X: " + b"y" * 500 + b"\r\n", b"\r\n", b":\r\n"],
                                       k=rng.randint(0, 4)))
        return kind, b" ".join(p for p in (method, target, version) if rng.random() < 0.95) + b"\r\n" + headers + \
            rng.choice([b"\r\n", b""])
    if kind == "huge":
        return kind, rng.choice([b"G", b"\n", b"\xff"]) * rng.randint(control.MAX_REQUEST, 200_000)
    return kind, b""


def test_metrics_port_survives_fuzzing(make_daemon, fake_aws):
    port = _free_port()
    daemon = make_daemon({"endpoint_url": fake_aws.url}, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n').start()
    url = f"http://127.0.0.1:{port}/metrics"
    wait_until(lambda: _get(url)[0] == 200, what="the metrics port")
    rng = random.Random(SEED + 1)
    kinds: dict[str, int] = {}
    codes: dict[int, int] = {}
    with _slow_writers(_tcp(port), b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"s" * 60) as cut:
        for i in range(ROUNDS):
            kind, payload = _metrics_payload(rng)
            kinds[kind] = kinds.get(kind, 0) + 1
            answer = _exchange(_tcp(port), payload)
            if answer:
                assert answer.startswith(b"HTTP/1.1 "), answer[:200]
                code = int(answer.split(b" ", 2)[1])
                codes[code] = codes.get(code, 0) + 1
                head, _, body = answer.partition(b"\r\n\r\n")
                length = int(next(h for h in head.split(b"\r\n") if h.startswith(b"Content-Length: ")).split()[1])
                assert len(body) == (0 if payload.startswith(b"HEAD ") and code == 200 else length)
            else:
                assert kind in ("close", "bytes", "http"), kind  # no request at all, or only a partial one
            if i % 50 == 49:
                assert daemon.proc.poll() is None, daemon.log()[-3000:]
                assert _get(url)[0] == 200
                assert send_lines(daemon.sockets()[0], b"during-fuzz-%d\n" % i) == {"accepted": 1, "rejected": 0}
    assert cut == [True] * SLOW_WRITERS
    assert kinds.keys() == {"bytes", "http", "huge", "close"}, kinds
    assert codes.keys() >= {200, 400, 404, 431}, codes
    assert daemon.proc.poll() is None, daemon.log()[-3000:]
    status, body = _get(url)
    assert status == 200 and 'spoold_listener_bad_requests_total{listener="metrics"}' in body
    assert send_lines(daemon.sockets()[0], b"after-fuzz\n") == {"accepted": 1, "rejected": 0}
    assert daemon.stop() == 0
    assert not [e for e in daemon.log_events() if e.get("event") == "metrics_request_failed"]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, ""
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


@contextlib.contextmanager
def _nofile(soft: int) -> Iterator[None]:
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def test_daemon_stays_up_with_2000_idle_metrics_connections(make_daemon, fake_aws):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE_CONNECTIONS + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}: cannot hold {IDLE_CONNECTIONS} connections")
    port = _free_port()
    daemon = make_daemon({"endpoint_url": fake_aws.url}, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    with _nofile(DAEMON_NOFILE):  # the daemon inherits a limit the idle connections would exceed
        daemon.start()
    url = f"http://127.0.0.1:{port}/metrics"
    wait_until(lambda: _get(url)[0] == 200, what="the metrics port")
    held: list[socket.socket] = []
    try:
        with _nofile(max(soft, need) if hard == resource.RLIM_INFINITY else min(max(soft, need), hard)):
            for i in range(IDLE_CONNECTIONS):
                held.append(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE))
                if i % 500 == 499:
                    assert send_lines(daemon.sockets()[0], b"while-idle-%d\n" % i) == {"accepted": 1, "rejected": 0}
            assert daemon.proc.poll() is None, daemon.log()[-3000:]
            assert send_lines(daemon.sockets()[0], b"with-all-idle\n") == {"accepted": 1, "rejected": 0}
            # Each new connection took the slot of the one that had waited longest without a request.
            counts = wait_until(lambda: (c := _status(daemon)["listeners"]["metrics"])["timeouts"]
                                >= IDLE_CONNECTIONS - control.MAX_METRICS_CONNECTIONS and c,
                                what="the idle connections closed for room")
            assert counts["open"] <= control.MAX_METRICS_CONNECTIONS and counts["refused"] == 0, counts
            # So a scraper is served at once, while the last 64 idle connections still hold their slots.
            assert _get(url)[0] == 200
            assert daemon.proc.poll() is None
    finally:
        for s in held:
            s.close()
    wait_until(lambda: b"with-all-idle" in {r.data for r in fake_aws.all_records()}, what="the line")
    assert not any(e.get("event") == "accept_failed_out_of_resources" for e in daemon.log_events())
    assert daemon.stop() == 0
