"""Writing a file, or a set of files in one folder, so that readers see the old version or the
whole new one, never half a file (nor a config beside another save's weights), even after a
crash or a power cut."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from .folder_lock import FolderLock
from .journal import (
    backup_path,
    fsync_folder,
    new_token,
    recover_folder,
    roll_back,
    roll_forward,
    temp_path,
    write_journal,
)

# The logger of adapter saves and loads, which these messages are mostly about.
log = logging.getLogger("lorakit.io")


def write_atomically(path: Path, write: Callable[[str], object], suffix: str = ".tmp") -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path`` and rename it onto ``path``; on any
    failure the temporary file is removed and ``path`` is left as it was. The new file keeps the
    permissions of the one it replaces (see ``write_new_file``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"
    while os.path.lexists(tmp):  # someone else's file of that name: never ours to remove
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"
    try:
        write_new_file(tmp, write, previous=path)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    """``path.write_text(text)`` (UTF-8) through ``write_atomically``: a crash or a full disk leaves
    the previous file, never a truncated one."""
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, and the folders themselves, to disk: a tree written by
    someone else's writer (``save_pretrained``) before it is renamed into place, so that the
    rename cannot survive a power cut that its files' contents do not."""
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_file(os.path.join(folder, name))
        fsync_folder(Path(folder))


def write_new_file(tmp: Path, write: Callable[[str], object], previous: Path) -> None:
    """Create ``tmp`` (it must not exist), run ``write(tmp)`` and flush the result to disk, so that
    once renamed onto ``previous`` it cannot turn out empty after a power cut.

    The permission bits are those of ``previous`` if it exists (followed if it is a link), else the
    umask's, as for a plain write: not the 0600 of mkstemp, nor of writers that write a private
    file of their own and rename it onto ``tmp`` (safetensors does), since adapters are meant to be
    shared. On a failure ``tmp`` is left for the caller, who chose its name, to remove."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.stat(previous).st_mode)
    except OSError:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # what the umask left of 0666
    finally:
        os.close(fd)
    write(str(tmp))
    os.chmod(tmp, mode)
    fsync_file(tmp)  # opened anew: ``write`` may have put another file in tmp's place


def fsync_file(path: Path | str) -> None:
    """Flush ``path``'s contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # Windows flushes only through a handle that may write: not flushed there
        if exc.errno not in (errno.EBADF, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def replace_files_in_folder(
    folder: Path, files: Mapping[str, Callable[[str], object]], removes: Collection[str] = ()
) -> Path:
    """Write ``files`` (name -> ``write(tmp)``) into ``folder``, created if missing, replacing
    earlier files of those names; files named in ``removes`` go too, any other file stays.

    Everything happens inside ``folder``, which is never renamed or replaced: it may be a mount
    point, the working directory of other processes, or sit in a folder this user cannot write.
    Under the folder's exclusive lock (``FolderLock``), each file is written under a hidden
    temporary name beside its final one and flushed to disk; then the earlier files are moved to
    hidden backup names, last-named first, the new ones renamed into place in the order given,
    and the backups deleted (journal.py has the steps and what is on disk after each). A reader
    under the shared lock sees the earlier files or all the new ones; one without it finds the
    last-named file (an adapter's config) only with the others of the same save beside it, and for
    an instant none of them.

    On any failure before the last file is in place (Ctrl-C included) ``folder`` is left as it
    was, and not created. Once it is, the save stands: a Ctrl-C while the backups are deleted is
    logged, not raised. After a kill or a power cut the next save into ``folder``, or load from it,
    finishes or undoes the swap. A file of these names that was a symbolic link is replaced by a
    regular file (the link's target is left alone); its permission bits carry over, not its owner.
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]  # innermost first
    lock = FolderLock(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if lock.acquire(exclusive=True, make_folder=True):
            recover_folder(folder, [*files, *removes])  # needs the lock: a live save's files look the same
        _swap(folder, files, list(removes))
    except BaseException:
        shielded(lambda: (lock.release(), _remove_created(created)))
        raise
    shielded(lock.release)
    return folder


def _swap(folder: Path, files: Mapping[str, Callable[[str], object]], removes: list[str]) -> None:
    names = list(files)
    token = new_token(folder, [*names, *removes])
    try:
        for name, write in files.items():
            write_new_file(temp_path(folder, name, token), write, previous=folder / name)
        write_journal(folder, token, names, removes)
        for name in [*reversed(names), *removes]:  # the last-placed file (the config) leaves first
            if os.path.lexists(folder / name):
                os.rename(folder / name, backup_path(folder, name, token))
        for name in names[:-1]:
            os.replace(temp_path(folder, name, token), folder / name)
        fsync_folder(folder)  # the renames above reach the disk before the commit below
        if names:
            os.replace(temp_path(folder, names[-1], token), folder / names[-1])
    except BaseException:
        try:
            shielded(lambda: roll_back(folder, token, names, removes))
        except OSError as exc:  # renames within one folder should not fail; the journal says what is where
            log.error(
                "could not restore %s after a failed write (%s); the next save into it or load from it will",
                folder,
                exc,
            )
        raise

    def finish() -> None:
        fsync_folder(folder)  # the commit is on disk before the earlier files are deleted
        try:
            roll_forward(folder, token, names, removes)
        except OSError as exc:  # the save is complete: a backup left behind is no reason to fail it
            log.warning("could not delete the earlier files in %s (%s); the next save or load will", folder, exc)

    if shielded(finish):
        log.warning("Ctrl-C ignored: it came once the new files were in place in %s, and the save is complete", folder)


def shielded(step: Callable[[], object], attempts: int = 3) -> bool:
    """Run ``step``, which can be run again from where it stopped, to its end even through Ctrl-C
    (up to ``attempts`` times); whether it was interrupted."""
    interrupted = False
    for _ in range(attempts):
        try:
            step()
            return interrupted
        except KeyboardInterrupt:
            interrupted = True
    return interrupted


def _remove_created(created: list[Path]) -> None:
    """Remove the folders a failed save created (innermost first), unless others' files arrived."""
    for path in created:
        try:
            path.rmdir()
        except FileNotFoundError:  # removed by an earlier, interrupted run
            continue
        except OSError:  # not empty: someone else's files arrived meanwhile
            break


def discard(path: Path) -> None:
    """Remove the file (or link, or folder) ``path`` if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
