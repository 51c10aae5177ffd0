"""The real daemon as a subprocess, with its config, spool and log in one folder."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from tests.tools.client import DEADLINE, wait_until

TEST_KEYS = {"AWS_ACCESS_KEY_ID": "AKIDSPOOLDTEST", "AWS_SECRET_ACCESS_KEY": "spoold-test-secret"}


def spool_query(path: Path, sql: str, *params: Any) -> list[Any]:
    """The rows of one statement on the spool file at ``path``, on a connection of its own."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def spooled_ids(path: Path) -> list[int]:
    """The ids of the rows in the spool file at ``path``."""
    return [r[0] for r in spool_query(path, "SELECT id FROM chunks")]


def integrity(path: Path) -> list[str]:
    """SQLite's integrity_check of the spool file: ["ok"] when it is sound."""
    return [r[0] for r in spool_query(path, "PRAGMA integrity_check")]


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

    def cli(self, *args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
        """`spoold ARGS --config CONFIG` in the daemon's environment: what an operator runs."""
        return subprocess.run([sys.executable, "-m", "spoold", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout, env=self.env,
                              stdin=subprocess.DEVNULL)

    def cli_json(self, *args: str) -> dict[str, Any]:
        """The JSON answer of `spoold ARGS --json`, which must succeed."""
        done = self.cli(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        """`spoold status --json`: the running daemon's answer, or the spool file's without one."""
        return self.cli_json("status")

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
        return int(spool_query(self.tmp / "spool.db", "SELECT count(*) FROM chunks")[0][0])
