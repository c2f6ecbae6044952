"""Test helper: was every file of a folder flushed to disk before the rename that published it?"""

import os
from pathlib import Path


def watch_publishing(monkeypatch) -> list[bool]:
    """Record fsyncs, and for each later ``os.replace`` / ``os.rename``: whether every file under its
    source had been fsync'd. Returns the list those answers are appended to, one per rename."""
    synced, published = set(), []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def publish(real):
        def move(src, dst):
            published.append(all(os.path.realpath(p) in synced for p in _files_under(Path(src))))
            return real(src, dst)

        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", publish(real_replace))
    monkeypatch.setattr(os, "rename", publish(real_rename))
    return published


def _files_under(path: Path) -> list[str]:
    return [str(path)] if path.is_file() else [str(p) for p in path.rglob("*") if p.is_file()]
