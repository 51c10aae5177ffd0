"""The daemon's messages to systemd (sd_notify), read as systemd reads them."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from typing import Any

from tests.tools.client import DEADLINE, wait_until
from tests.tools.notify import receive


def test_refused_reload_shows_in_status_until_a_good_reload(
    receiver: socket.socket, make_daemon: Callable[..., Any], fake_aws: Any
) -> None:
    """What `systemctl status` shows: a refused SIGHUP puts the reason in STATUS= with its READY=1,
    the heartbeat's STATUS= keeps it, and the next good reload clears it."""
    receiver.settimeout(DEADLINE)
    daemon = make_daemon({"endpoint_url": fake_aws.url},
                         env={"NOTIFY_SOCKET": receiver.getsockname(), "WATCHDOG_USEC": "400000"})
    daemon.start(wait=False)

    def next_message(pred: Callable[[str], bool]) -> str:
        while True:
            data, pid = receive(receiver)
            if pid == daemon.proc.pid and pred(text := data.decode()):
                return text

    ready = next_message(lambda m: "READY=1" in m)
    assert "reload refused" not in ready
    good = daemon.config.read_text()
    daemon.config.write_text(good + "\nbogus_key = 1\n")
    daemon.proc.send_signal(signal.SIGHUP)
    next_message(lambda m: "RELOADING=1" in m)
    refused = next_message(lambda m: "READY=1" in m)
    status = [s for s in refused.split("\n") if s.startswith("STATUS=")]
    assert len(status) == 1 and status[0].startswith("STATUS=reload refused: ") and "bogus_key" in status[0], refused
    # The heartbeat (every 0.2 s with this watchdog) must not wipe it.
    beat = next_message(lambda m: "WATCHDOG=1" in m and "READY=1" not in m)
    assert "STATUS=reload refused: " in beat and "bogus_key" in beat, beat

    daemon.config.write_text(good)
    daemon.proc.send_signal(signal.SIGHUP)
    next_message(lambda m: "RELOADING=1" in m)
    cleared = next_message(lambda m: "READY=1" in m)
    assert "STATUS=" in cleared and "reload refused" not in cleared, cleared
    beat = next_message(lambda m: "WATCHDOG=1" in m)
    assert "reload refused" not in beat
    wait_until(lambda: any(e.get("event") == "reloaded" for e in daemon.log_events()), what="the good reload")
    assert daemon.stop() == 0
