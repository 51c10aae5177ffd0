"""What a test reads of another process from /proc: CPU time and resident memory."""

from __future__ import annotations

import os
import threading
from pathlib import Path

# Seconds between two RSS samples: short enough to catch a peak that lasts one batch.
RSS_SAMPLE_INTERVAL = 0.02


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat (fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process now (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class PeakRSS:
    """The highest RSS of a process, sampled on a thread between start() and stop().

    VmHWM would be simpler but counts the whole life of the process; this counts one span."""

    def __init__(self, pid: int, interval: float = RSS_SAMPLE_INTERVAL) -> None:
        self.pid = pid
        self.interval = interval
        self.before = self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name=f"rss-{pid}", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except FileNotFoundError:  # the process is gone: its peak is what was seen
                return

    def start(self) -> PeakRSS:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
