"""Opening a followed file, on real files: what the glob saw may be replaced by the time it is
opened (by a fifo, say), and the open must neither block nor follow something that is not a
regular file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from spoold import config
from spoold.tail import Tailer

BASE = {"name": "app", "kind": "kinesis", "stream": "s", "region": "us-east-1"}


def _tailer(tmp_path: Path) -> Tailer:
    doc = {"spool": {"path": str(tmp_path / "spool.db")},
           "destination": [{**BASE, "files": [str(tmp_path / "*.log")]}]}
    dest = config.parse(doc, Path("spoold.toml")).destinations[0]
    return Tailer(dest, None, None, None)  # type: ignore[arg-type]  # _open touches none of them


def test_a_fifo_swapped_in_after_the_glob_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "a.log"
    os.mkfifo(fifo)
    st = fifo.stat()
    tailer = _tailer(tmp_path)
    outcome: list[BaseException | object] = []

    def opening() -> None:
        try:
            outcome.append(tailer._open((st.st_dev, st.st_ino), str(fifo), False))
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    t = threading.Thread(target=opening, daemon=True)
    t.start()
    t.join(10.0)
    blocked = t.is_alive()
    if blocked:  # a writer releases the blocked open, so that the thread ends
        fd = os.open(fifo, os.O_WRONLY)
        os.close(fd)
        t.join(10.0)
    assert not blocked, "opening a fifo blocked until a writer came"
    [result] = outcome
    assert isinstance(result, OSError), result
    assert "not a regular file" in str(result)
