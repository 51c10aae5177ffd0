"""Test clients of the daemon's sockets, for the tests and the benchmarks alike (a script cannot
import a conftest)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Every wait in the end-to-end tests has a deadline; generous, since CI machines are busy.
DEADLINE = 60.0
# Bytes read per recv() of an answer.
RECV_BYTES = 65536
# Seconds between two connects while the listen backlog is full: the daemon is accepting, room
# comes back shortly.
BUSY_RETRY = 0.005


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


def read_answer(s: socket.socket) -> bytes:
    """The daemon's one-line answer, up to its newline; less if the connection ends first."""
    answer = b""
    while not answer.endswith(b"\n"):
        data = s.recv(RECV_BYTES)
        if not data:
            break
        answer += data
    return answer


def send_lines(sock_path: Path | str, payload: bytes, timeout: float = DEADLINE) -> dict[str, Any]:
    """Write ``payload``, half-close, return the daemon's JSON acknowledgement."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock_path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        answer = read_answer(s)
    finally:
        s.close()
    if not answer:
        raise ConnectionError(f"{sock_path}: the daemon closed without an acknowledgement")
    return json.loads(answer)  # type: ignore[no-any-return]


def connect_patiently(path: Path | str, timeout: float = DEADLINE,
                      on_busy: Callable[[], None] | None = None) -> socket.socket:
    """Connect like a patient client: while the daemon's listen backlog is full the kernel
    answers EAGAIN at once (BlockingIOError); try again until ``timeout``, calling ``on_busy``
    each time. Any other OSError is raised at once."""
    end = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:
            s.close()
            if on_busy is not None:
                on_busy()
            if time.monotonic() > end:
                raise
            time.sleep(BUSY_RETRY)
        except BaseException:
            s.close()
            raise
