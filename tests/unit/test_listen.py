"""spoold.listen's unlink of a socket file by the identity recorded when it was bound."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from spoold.listen import file_identity, unlink_if_same


def _bound(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


def test_the_file_bound_is_unlinked(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with _bound(path):
        identity = file_identity(path)
        assert identity == (os.lstat(path).st_dev, os.lstat(path).st_ino)
        assert unlink_if_same(path, identity) is True
    assert not path.exists()


def test_a_file_put_at_the_path_since_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with _bound(path):
        identity = file_identity(path)
        keep = tmp_path / "keep"
        path.rename(keep)  # keeps the old inode alive, so the new file cannot reuse its number
        with _bound(path):
            assert file_identity(path) != identity
            assert unlink_if_same(path, identity) is False
            assert path.exists()


def test_nothing_to_unlink(tmp_path: Path) -> None:
    path = tmp_path / "s"
    assert file_identity(path) is None
    assert unlink_if_same(path, None) is False
    with _bound(path):
        assert unlink_if_same(path, None) is False, "no identity recorded: nothing is ours"
        identity = file_identity(path)
        path.unlink()
        assert unlink_if_same(path, identity) is False


def test_a_link_is_judged_by_itself_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "target"
    with _bound(target):
        link = tmp_path / "link"
        link.symlink_to(target)
        assert unlink_if_same(link, file_identity(target)) is False
        assert unlink_if_same(link, file_identity(link)) is True
        assert target.exists() and not link.exists()
