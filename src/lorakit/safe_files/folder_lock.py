"""`FolderLock`: one writer, or any number of readers, in an adapter folder at a time.

A save replaces several files, a load reads several: without a lock, two saves into one folder
can leave one's config beside the other's weights, and a load can read a config from one save
and weights from the next. The lock is ``flock`` on a hidden file, ``.lorakit.lock``, in the
folder; ``flock`` belongs to an open file, so it also excludes threads of one process, and the
kernel drops it when its process dies, however it dies.

The lock file exists only while the lock is held or awaited: whoever releases the lock last
removes it, so a folder at rest holds the adapter's files alone (what lists, copies or uploads
the folder never sees it). Removing a lock file needs care: another process may have opened it
and be waiting, and once its name is gone a third could create a new file of that name, and
both would think they hold the lock. So the file is removed only by the holder of its exclusive
lock, and whoever gets the lock checks that the name still leads to the file it locked, or
starts over with the file now there.

Where there is no lock to take, the lock is skipped, with a warning once per reason: no
``fcntl`` (Windows), a file system without ``flock`` (some NFS and FUSE mounts), or a reader
that may not create the file in a folder it can only read. Saves are then no longer excluded
from each other or from loads, and leftovers of a killed save are not recovered (recovery needs
to know that no save is running).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# The logger of adapter saves and loads, which these messages are mostly about.
log = logging.getLogger("lorakit.io")

LOCK_NAME = ".lorakit.lock"
# flock errors that mean "this file system does not lock", not "something is wrong".
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.EBADF}
_warned: set[str] = set()


class FolderLock:
    """The exclusive (one writer) or shared (readers) lock of ``folder``; ``acquire`` waits for it.

    Not reentrant: a thread that holds a folder's lock and asks for it again waits forever."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, exclusive: bool, make_folder: bool = False) -> bool:
        """Wait for the lock; whether it is held (False where there is no lock to take, see the
        module's docstring). ``make_folder``: recreate the folder if it vanishes meanwhile (a
        failed save of another process may remove a folder it created)."""
        if fcntl is None:
            _warn_once(
                "no fcntl",
                "folders cannot be locked on this platform (no fcntl): saves into one folder "
                "are not kept apart, and leftovers of an interrupted save are not recovered",
            )
            return False
        while True:
            fd = self._open(make_folder)
            if fd is None:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                if _same_file(fd, self.path):
                    self._fd = fd
                    return True
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _UNSUPPORTED:
                    raise
                _warn_once(
                    f"flock {exc.errno}",
                    f"cannot lock {self.path.parent} ({exc}): saves into such folders "
                    "are not kept apart, and leftovers of an interrupted save are not recovered",
                )
                return False
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder removed the file while we waited: lock the one there now

    def release(self) -> None:
        """Give the lock up, removing the lock file if nobody else holds or awaits it. Can be run
        again after an interrupt, to finish."""
        if self._fd is None:
            return
        try:  # exclusive already for a writer; a reader gets it only if no one else holds the lock
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        except OSError:  # others hold it (they remove it), or this reader may not remove it
            pass
        os.close(self._fd)
        self._fd = None

    def _open(self, make_folder: bool) -> int | None:
        """The lock file, opened (created if missing); None if it can be neither created nor read."""
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:
                if not make_folder:
                    return None  # the folder is gone: reading it fails on its own, with a clear message
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError:  # read-only (EACCES, EROFS), full (ENOSPC, EDQUOT): a load must still work
                break
        try:  # a folder this user may only read: lock an existing file (flock needs no write access)
            return os.open(self.path, os.O_RDONLY)
        except OSError:
            log.debug("no lock in %s: this user can neither create nor open %s", self.path.parent, LOCK_NAME)
            return None


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the open file ``fd`` (an open file's inode is never reused)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _warn_once(reason: str, message: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning(message)
