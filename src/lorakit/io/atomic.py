"""Writing a file, or a set of files in one folder, so that readers see the old version or the
whole new one, never half a file (nor a config beside another save's weights)."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

log = logging.getLogger("lorakit.io")


def temp_path_beside(path: Path, suffix: str = ".tmp") -> str:
    """A new, empty temporary file in ``path``'s folder (same file system, so a rename is atomic)."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    return tmp


def write_atomically(path: Path, write: Callable[[str], object], suffix: str = ".tmp") -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path`` and rename it onto ``path``; on any
    failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def name_beside(path: Path, suffix: str) -> Path:
    """An unused hidden name in ``path``'s folder (same file system, so a rename is atomic)."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"


def replace_files_in_folder(folder: Path, files: Mapping[str, Callable[[str], object]],
                            removes: Collection[str] = ()) -> Path:
    """Write ``files`` (name -> ``write(tmp)``) into ``folder``, created if missing, replacing
    earlier files of those names; files named in ``removes`` go too, any other file stays.

    Everything happens inside ``folder``, which is never renamed or replaced: it may be a mount
    point, the working directory of other processes, or sit in a folder this user cannot write.
    Each file is written under a hidden temporary name beside its final one; then the earlier
    files are moved to hidden backup names, last-named first, the new ones renamed into place in
    the order given, and the backups deleted. A reader thus finds the last-named file (an
    adapter's config) only with the others of the same save beside it; for an instant it may find
    none of them. On any failure before the last file is in place (Ctrl-C included) ``folder`` is
    left as it was, and not created. Once it is, the save stands: a Ctrl-C while the backups are
    deleted is logged, not raised (a backup it leaves is a hidden ``.<name>.<hex>.old`` file).
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]  # innermost first
    temps: dict[str, Path] = {}
    backups: list[tuple[Path, Path]] = []  # (file, hidden name) of each earlier file moved aside
    placed: list[str] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, write in files.items():
            write(str(_new_file(folder / name, temps)))
        for name in [*reversed(list(files)), *removes]:  # the last-placed file (the config) leaves first
            if os.path.lexists(folder / name):
                backups.append((folder / name, name_beside(folder / name, ".old")))  # before the rename:
                os.rename(*backups[-1])  # an interrupt in between must undo it too
        for name in files:
            placed.append(name)
            os.replace(temps[name], folder / name)
    except BaseException:
        _shielded(lambda: _undo(placed, temps, backups, created, folder))
        raise
    if _shielded(lambda: _delete_backups(backups)):
        log.warning("Ctrl-C ignored: it came once the new files were in place in %s, and the save is complete%s",
                    folder, f" (earlier files left: {[str(b) for _, b in backups]})" if backups else "")
    return folder


def _new_file(path: Path, temps: dict[str, Path]) -> Path:
    """A new empty hidden file beside ``path``, recorded in ``temps`` (mode as the umask gives, as
    a plain write would; mkstemp would make it private)."""
    while True:
        tmp = temps[path.name] = name_beside(path, ".tmp")  # known before it exists: Ctrl-C may come next
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # someone else's file of that name: never ours to remove
            del temps[path.name]


def _shielded(step: Callable[[], None], attempts: int = 3) -> bool:
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


def _undo(placed: list[str], temps: dict[str, Path], backups: list[tuple[Path, Path]], created: list[Path],
          folder: Path) -> None:
    """Put ``folder`` back as it was after a failed ``replace_files_in_folder``. Each entry is
    dropped once handled, so a second run after an interrupt continues where the first stopped."""
    try:
        while placed:
            name = placed[-1]
            if not os.path.lexists(temps[name]):  # it was renamed into place
                _discard(folder / name)
            placed.pop()
        while backups:
            original, backup = backups[-1]
            if os.path.lexists(backup) and not os.path.lexists(original):
                os.rename(backup, original)
            backups.pop()
    except OSError as exc:  # renames within one folder should not fail; say where the files are
        log.error("could not restore %s after a failed write (%s); the earlier files are in %s", folder, exc,
                  [str(b) for _, b in backups])
        return
    for tmp in temps.values():
        _discard(tmp)
    for path in created:
        try:
            path.rmdir()
        except FileNotFoundError:  # removed by an earlier, interrupted run
            continue
        except OSError:  # not empty: someone else's files arrived meanwhile
            break


def _delete_backups(backups: list[tuple[Path, Path]]) -> None:
    while backups:
        try:
            _discard(backups[-1][1])
        except OSError as exc:  # the save is complete: a backup left behind is no reason to fail it
            log.warning("could not delete the backup %s (%s)", backups[-1][1], exc)
        backups.pop()


def _discard(path: Path) -> None:
    """Remove the file (or link, or folder) ``path`` if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
