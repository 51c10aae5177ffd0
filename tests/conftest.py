"""Shared fixtures: the real daemon as a subprocess, real sockets, real servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TEST_KEYS = {"AWS_ACCESS_KEY_ID": "AKIDSPOOLDTEST", "AWS_SECRET_ACCESS_KEY": "spoold-test-secret"}
# Every wait in the end-to-end tests has a deadline; generous, since CI machines are busy.
DEADLINE = 60.0


def wait_until(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def send_lines(sock_path: Path | str, payload: bytes, timeout: float = DEADLINE) -> dict[str, Any]:
    """Write ``payload``, half-close, return the daemon's JSON acknowledgement."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock_path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n"):
            data = s.recv(65536)
            if not data:
                break
            answer += data
    finally:
        s.close()
    assert answer, "the daemon closed without an acknowledgement"
    return json.loads(answer)  # type: ignore[no-any-return]


def destination_toml(**keys: Any) -> str:
    out = ["[[destination]]"]
    for key, value in keys.items():
        out.append(f"{key} = {json.dumps(value)}")
    return "\n".join(out) + "\n"


class Daemon:
    """One `spoold run` subprocess with its config, spool and stderr log in tmp_path."""

    def __init__(self, tmp: Path, config_text: str, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.config = tmp / "spoold.toml"
        self.config.write_text(config_text)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / "daemon.log"
        self.runs = 0

    def sockets(self) -> list[Path]:
        import tomllib

        doc = tomllib.loads(self.config.read_text())
        return [Path(d["socket"]) for d in doc["destination"]]

    def start(self, wait: bool = True) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None
        self.runs += 1
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spoold", "run", "--config", str(self.config)],
            env=self.env, stdout=log, stderr=log,
        )
        log.close()
        if wait:
            wait_until(lambda: all(p.exists() for p in self.sockets()) or self.proc.poll() is not None,  # type: ignore[union-attr]
                       what="the daemon's sockets")
            assert self.proc.poll() is None, f"daemon exited:\n{self.log()}"
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop within {timeout}s:\n{self.log()[-3000:]}") from None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def spool_rows(self) -> int:
        import sqlite3

        conn = sqlite3.connect(self.tmp / "spool.db")
        try:
            return int(conn.execute("SELECT count(*) FROM chunks").fetchone()[0])
        finally:
            conn.close()


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Build a Daemon for one or more destinations; stopped (SIGKILL if need be) at the end."""
    made: list[Daemon] = []

    def factory(*destinations: dict[str, Any], spool: dict[str, Any] | None = None,
                extra: str = "", env: dict[str, str] | None = None) -> Daemon:
        spool_keys = {"path": str(tmp_path / "spool.db"), **(spool or {})}
        text = "[spool]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in spool_keys.items())
        text += '\n[log]\nformat = "json"\nlevel = "info"\n' + extra + "\n"
        for n, dest in enumerate(destinations):
            keys = {"name": f"d{n}", "kind": "kinesis", "socket": str(tmp_path / f"d{n}.sock"),
                    "stream": "test-stream", "region": "us-east-1", "linger": "20ms", **dest}
            text += "\n" + destination_toml(**keys)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        full_env.update(TEST_KEYS)
        full_env["AWS_CONFIG_FILE"] = full_env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-aws-files")
        full_env.update(env or {})
        d = Daemon(tmp_path, text, full_env)
        made.append(d)
        return d

    yield factory
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def moto_server() -> Iterator[Any]:
    from spoold.testing import MotoServer

    with MotoServer() as srv:
        yield srv


def _fake_aws(seed: int) -> Iterator[Any]:
    from tests.tools.fakeaws import FakeAWS

    srv = FakeAWS(access_key=TEST_KEYS["AWS_ACCESS_KEY_ID"], secret_key=TEST_KEYS["AWS_SECRET_ACCESS_KEY"],
                  verify=True, store=True, seed=seed)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def fake_aws() -> Iterator[Any]:
    """The loopback fault-injecting endpoint, verifying signatures with the test keys."""
    yield from _fake_aws(7)


@pytest.fixture
def second_aws() -> Iterator[Any]:
    """A second, independent endpoint (a healthy destination beside a failing one)."""
    yield from _fake_aws(8)
