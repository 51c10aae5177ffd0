"""Resolving the config against the host, end to end: what only the host can tell (a group, the
region chain) is checked by `run`, a reload and `check-config`, and never by `status`, which only
needs the file."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.tools.client import send_lines, wait_until

MISSING_GROUP = "spoold-no-such-group"
# (id, how the file changes, the key the refusal names)
HOST_FAULTS = [
    ("group", lambda text: text.replace('name = "d0"', f'name = "d0"\nsocket_group = "{MISSING_GROUP}"'),
     'destination "d0": socket_group'),
    ("region", lambda text: text.replace('region = "us-east-1"\n', ""), 'destination "d0": region: required'),
]


def _spoold(daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoold", *args, "--config", str(daemon.config)],
                          capture_output=True, text=True, timeout=60, env=daemon.env)


@pytest.mark.parametrize(("change", "key"), [c[1:] for c in HOST_FAULTS], ids=[c[0] for c in HOST_FAULTS])
def test_a_reload_refuses_what_the_host_lacks_and_status_still_answers(make_daemon, fake_aws, change, key):
    daemon = make_daemon({"endpoint_url": fake_aws.url}).start()
    path = daemon.sockets()[0]
    text = daemon.config.read_text()
    assert 'region = "us-east-1"\n' in text and 'name = "d0"' in text
    daemon.config.write_text(change(text))

    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any(e.get("event") == "reload_failed" for e in daemon.log_events()), what="reload_failed")
    (failed,) = [e for e in daemon.log_events() if e.get("event") == "reload_failed"]
    assert key in failed["error"] and str(daemon.config) in failed["error"]
    assert send_lines(path, b"still-up\n") == {"accepted": 1, "rejected": 0}
    wait_until(lambda: [r.data for r in fake_aws.all_records()] == [b"still-up"], what="the line delivered")

    checked = _spoold(daemon, "check-config")
    assert checked.returncode == 2 and key in checked.stderr and "Traceback" not in checked.stderr
    status = _spoold(daemon, "status")  # reads only the file and asks the running daemon
    assert status.returncode == 0, status.stderr
    assert "d0" in status.stdout
    assert daemon.stop() == 0
