"""Opening a followed file, on real files: what the glob saw may be replaced by the time it is
opened (by a fifo, say), and the open must neither block nor follow something that is not a
regular file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import trio

from spoold import config
from spoold.tail import Tailer, _gone_from

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


def test_a_file_is_gone_only_while_its_filesystem_is_where_it_was(tmp_path: Path) -> None:
    """A followed file that is not at its path any more is forgotten (its position dropped) only
    when the nearest folder that exists is on the file's device: a folder missing or replaced
    by another filesystem's (not mounted yet) keeps it, to be resumed."""
    logs = tmp_path / "logs"
    (logs / "day").mkdir(parents=True)
    path = logs / "day" / "a.log"
    path.write_bytes(b"x\n")
    st = path.stat()
    key = (st.st_dev, st.st_ino)
    assert not _gone_from(str(path), key)
    other = tmp_path / "b.log"
    other.write_bytes(b"")
    assert _gone_from(str(other), key)  # another file at the path: rotated away
    path.unlink()
    assert _gone_from(str(path), key)  # deleted, its folder still there
    (logs / "day").rmdir()
    assert _gone_from(str(path), key)  # its folder deleted too (a dated folder cleaned up)
    assert _gone_from(str(tmp_path / "no" / "such" / "folder" / "a.log"), key)
    elsewhere = st.st_dev + 1  # a device that is not the one of the file's folder
    assert not _gone_from(str(path), (elsewhere, st.st_ino))  # its filesystem is not mounted here
    assert not _gone_from(str(logs / "a.log"), (elsewhere, st.st_ino))  # an empty mount point
    assert not _gone_from(str(other), (elsewhere, other.stat().st_ino))


def test_unreadable_paths_are_dropped_once_gone_or_unmatched(tmp_path: Path) -> None:
    """A path that could not be opened is remembered (to warn once, not at every scan) only
    while the globs still match it: the set does not grow with every rotated name."""
    tailer = _tailer(tmp_path)
    paths = [tmp_path / f"{n}.log" for n in ("a", "b", "c")]
    for p in paths:
        p.write_bytes(b"x\n")
    opening = tailer._open

    def refusing(key: tuple[int, int], path: str, first: bool) -> object:
        if path != str(paths[2]):  # as for a user other than root in a folder of 0600 logs
            raise PermissionError(13, "Permission denied", path)
        return opening(key, path, first)

    tailer._open = refusing  # type: ignore[method-assign,assignment]
    try:
        trio.run(tailer._scan, None, [])
        assert tailer.unreadable == {str(paths[0]), str(paths[1])}
        paths[0].unlink()
        paths[1].rename(tmp_path / "b.log.gz")  # rotated out of the globs
        trio.run(tailer._scan, None, [])
        assert tailer.unreadable == set()
    finally:
        tailer.files_close()
