"""The on-disk record of a swap of files in a folder, and how to finish or undo one a killed
process left half done.

`replace_files_in_folder` (atomic.py) swaps files under hidden names that carry one token T
per save:

1. each new file is written as ``.<name>.T.tmp`` and flushed to disk;
2. the journal ``.lorakit.T.journal`` (the names, in order) is written and flushed, folder too;
3. each earlier file is moved to ``.<name>.T.old``, the last-placed one (the config) first;
4. the new files are renamed into place, the config last: that rename commits the save;
5. the backups are deleted, then the journal.

What is on disk tells how far a swap got: the journal exists from step 2 to the end, and a
temporary file until it is renamed into place. A save whose last file has no temporary file
left committed: it is finished (its backups deleted). Any other is undone: each file it placed
goes back to its temporary name, each backup back to its own name, then the journal and the
temporary files go. Every step leaves a state from which these rules reach the same end, so an
undo cut short (a second kill, a second Ctrl-C) is finished by the next run.

Backups without a journal are left by lorakit versions before it, which cannot tell whether
their save finished: a backup whose file is missing is restored (the newest, if several), one
whose file exists is deleted (the file in place wins). Temporary files without a journal are
from a save that had not begun to move files: they are deleted.

safetensors writes each file under a name of its own first (``.tmp`` and six characters) and
renames it onto ours, so a kill during that write leaves such a file. Nothing names its owner,
so one goes only when it has not changed for ``STALE_WRITE_S``: a write still running (lorakit's
holds the lock; another program's might not) keeps changing it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .folder_lock import FolderLock

# The logger of adapter saves and loads, which these messages are mostly about.
log = logging.getLogger("lorakit.io")

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<token>[0-9a-f]{12})\.(?P<kind>tmp|old)")
_JOURNAL = re.compile(r"\.lorakit\.(?P<token>[0-9a-f]{12})\.journal")
_WRITER_TEMP = re.compile(r"\.tmp[0-9A-Za-z]{6}")  # safetensors' (Rust tempfile's) name before its rename
STALE_WRITE_S = 3600


def temp_path(folder: Path, name: str, token: str) -> Path:
    return folder / f".{name}.{token}.tmp"


def backup_path(folder: Path, name: str, token: str) -> Path:
    return folder / f".{name}.{token}.old"


def journal_path(folder: Path, token: str) -> Path:
    return folder / f".lorakit.{token}.journal"


def new_token(folder: Path, names: Collection[str]) -> str:
    """A token none of whose hidden names exist in ``folder``: what a swap's undo removes is its own."""
    while True:
        token = secrets.token_hex(6)
        paths = [journal_path(folder, token), *(p(folder, n, token) for n in names for p in (temp_path, backup_path))]
        if not any(os.path.lexists(p) for p in paths):
            return token


def write_journal(folder: Path, token: str, files: Sequence[str], removes: Sequence[str]) -> None:
    """Step 2: the swap's names, on disk before any file is moved."""
    fd = os.open(journal_path(folder, token), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.write(fd, json.dumps({"files": list(files), "removes": list(removes)}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_folder(folder)


def roll_back(folder: Path, token: str, files: Sequence[str], removes: Sequence[str]) -> None:
    """Undo a swap that has not committed, or whose commit is to be taken back (see the module's
    docstring). Before its journal exists nothing was moved: only its temporary files go."""
    journal = journal_path(folder, token)
    if os.path.lexists(journal):
        for name in reversed(files):
            tmp = temp_path(folder, name, token)
            if not os.path.lexists(tmp) and os.path.lexists(folder / name):
                os.rename(folder / name, tmp)  # placed by this swap: out again, so the backup can return
        for name in [*files, *removes]:
            backup = backup_path(folder, name, token)
            if os.path.lexists(backup) and not os.path.lexists(folder / name):
                os.rename(backup, folder / name)
        fsync_folder(folder)
        _remove(journal)  # only now: the rules above must not run again once temporary files go
    for name in files:
        _remove(temp_path(folder, name, token))


def roll_forward(folder: Path, token: str, files: Sequence[str], removes: Sequence[str]) -> None:
    """Finish a committed swap: its backups go, then its journal."""
    for name in [*removes, *reversed(files)]:
        _remove(backup_path(folder, name, token))
    _remove(journal_path(folder, token))


def fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable. Windows cannot open a folder and some file systems
    do not fsync one: there a rename is as durable as the system makes it, and that is that."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EISDIR, errno.EINVAL):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def has_leftovers(folder: Path, names: Collection[str]) -> bool:
    """Whether ``folder`` holds a journal, or a temporary file or backup of one of ``names``."""
    entries = _entries(folder)
    return any(
        _JOURNAL.fullmatch(entry) or ((m := _LEFTOVER.fullmatch(entry)) and m["name"] in names) for entry in entries
    ) or bool(_stale_writer_temps(folder, entries))


def _stale_writer_temps(folder: Path, entries: list[str]) -> list[Path]:
    """safetensors' temporary files among ``folder``'s ``entries`` unchanged for ``STALE_WRITE_S``
    (see the module docstring)."""
    now, stale = time.time(), []
    for entry in entries:
        if _WRITER_TEMP.fullmatch(entry):
            try:
                if now - os.lstat(folder / entry).st_mtime > STALE_WRITE_S:
                    stale.append(folder / entry)
            except FileNotFoundError:
                pass
    return stale


def recover_folder(folder: Path, names: Collection[str]) -> list[str]:
    """Finish or undo the swaps killed processes left in ``folder``; what was done, also logged.

    Only under the folder's exclusive lock: a running save's files look the same as a dead one's.
    ``names`` are the files whose journal-less leftovers may be handled (an adapter's)."""
    done = []
    for entry in _entries(folder):
        if match := _JOURNAL.fullmatch(entry):
            done.append(_finish_journal(folder, match["token"]))
    leftovers: dict[str, list[tuple[str, Path]]] = {}
    for entry in _entries(folder):
        match = _LEFTOVER.fullmatch(entry)
        if match and match["name"] in names and not os.path.lexists(journal_path(folder, match["token"])):
            leftovers.setdefault(match["name"], []).append((match["kind"], folder / entry))
    for name, found in leftovers.items():
        backups = sorted((p for kind, p in found if kind == "old"), key=lambda p: os.lstat(p).st_mtime)
        if backups and not os.path.lexists(folder / name):
            os.rename(backups.pop(), folder / name)  # the newest backup: the last save known to be whole
            done.append(f"restored {name} from a backup")
        for path in [*backups, *(p for kind, p in found if kind == "tmp")]:
            _remove(path)
            done.append(f"removed {path.name}")
    for path in _stale_writer_temps(folder, _entries(folder)):
        _remove(path)
        done.append(f"removed {path.name} (a killed write's temporary file)")
    if done:
        fsync_folder(folder)
        log.warning("%s: recovered from an interrupted save: %s", folder, "; ".join(done))
    return done


@contextmanager
def reading_folder(folder: Path, names: Collection[str]) -> Iterator[None]:
    """Hold ``folder``'s shared lock while reading it, so no save changes files between two reads;
    leftovers of a killed save are recovered first (under the exclusive lock, for a moment)."""
    lock = FolderLock(folder)
    try:
        locked = lock.acquire(exclusive=False)
        if has_leftovers(folder, names):
            lock.release()
            if locked and lock.acquire(exclusive=True):
                try:
                    recover_folder(folder, names)
                except OSError as exc:  # a folder this user may only read: read what is there
                    log.warning("%s: cannot recover from an interrupted save (%s)", folder, exc)
            else:
                log.warning(
                    "%s holds files of an interrupted (or running) save; without a lock they are left as they are",
                    folder,
                )
        yield
    finally:
        lock.release()


def _finish_journal(folder: Path, token: str) -> str:
    journal = journal_path(folder, token)
    try:
        plan = json.loads(journal.read_text())
        files, removes = plan["files"], plan["removes"]
        if not all(isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..") for n in [*files, *removes]):
            raise ValueError("not file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # Cut off while being written: nothing was moved yet, its temporary files go by the rules without one.
        _remove(journal)
        return f"removed an unreadable journal {journal.name} ({exc})"
    if files and not os.path.lexists(temp_path(folder, files[-1], token)):
        roll_forward(folder, token, files, removes)
        return f"finished a save of {', '.join(files)} (deleted the earlier files)"
    roll_back(folder, token, files, removes)
    return f"undid an unfinished save of {', '.join(files)} (the earlier files are back)"


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
