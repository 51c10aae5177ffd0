"""Shared fixtures: the real daemon as a subprocess, real sockets, real servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Re-exported: some tests import the helpers from here.
from tests.tools.client import DEADLINE, send_lines, wait_until  # noqa: F401
from tests.tools.daemon import TEST_KEYS, Daemon, destination_toml
from tests.tools.notify import ENV_VARS, notify_socket, socket_dir


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
        # Neither this machine's AWS setup nor, when the suite runs under systemd, its notify socket.
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ENV_VARS}
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


@pytest.fixture
def sockdir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a shorter directory when tmp_path is too long for a socket address."""
    with socket_dir(tmp_path) as path:
        yield path


@pytest.fixture
def receiver(sockdir: Path) -> Iterator[socket.socket]:
    """A notify socket bound as systemd binds /run/systemd/notify."""
    with notify_socket(sockdir / "notify") as sock:
        yield sock
