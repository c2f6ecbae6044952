"""Writing a file, or a folder of files, so that readers see the old one or the whole new one,
never half of it (nor a mix of old and new files)."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Collection
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


def write_directory_atomically(path: Path, write: Callable[[Path], object], replaces: Collection[str] = ()) -> Path:
    """Run ``write(tmp_dir)`` on a new folder beside ``path``, then put it in ``path``'s place whole.

    An existing folder ``path`` is replaced: its entries named in ``replaces`` go with it, any
    other entry (a README, the user's own files) is moved into the new folder first. The old
    folder is renamed aside, the new one renamed into place, then the old one deleted, so a reader
    sees the old folder, for an instant none, or the new one: never new files beside old ones.
    On any failure (Ctrl-C included) ``path`` is left as it was, not even created, and nothing
    is left beside it. A link to a folder stays a link; the folder it points to is replaced.
    """
    final = Path(path).resolve()  # "." or a link: rename the real folder, not its name
    missing = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, aside = name_beside(final, ".tmp"), name_beside(final, ".old")
    moved: list[str] = []
    try:
        inside = os.getcwd() == str(final)  # then the process must follow the folder (see below)
    except OSError:  # the working folder is gone already
        inside = False
    try:
        tmp.mkdir()  # not mkdtemp, which makes the folder private (0700)
        write(tmp)
        if final.exists():
            shutil.copymode(final, tmp)
            keep = set(replaces) | set(os.listdir(tmp))
            for entry in final.iterdir():
                if entry.name not in keep:
                    moved.append(entry.name)  # before the rename: an interrupt in between must undo it too
                    os.rename(entry, tmp / entry.name)
            os.rename(final, aside)  # a rename cannot replace a non-empty folder: move it away first
        os.rename(tmp, final)
    except BaseException:
        _undo(final, tmp, aside, moved, missing)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if inside:  # the process stood in the old folder, now deleted: move it to the new one
        os.chdir(final)
    return Path(path)


def _undo(final: Path, tmp: Path, aside: Path, moved: list[str], missing: list[Path]) -> None:
    """Put ``final`` back as it was after a failed ``write_directory_atomically``."""
    try:
        if os.path.lexists(aside) and not os.path.lexists(final):
            os.rename(aside, final)
        for name in moved:
            if os.path.lexists(tmp / name) and not os.path.lexists(final / name):
                os.rename(tmp / name, final / name)
    except OSError as exc:  # renames within one folder should not fail; say where the files are
        log.error("could not restore %s after a failed write (%s); its files are in %s and %s", final, exc, aside, tmp)
        return
    shutil.rmtree(tmp, ignore_errors=True)
    for folder in missing:  # innermost first: the parents this call created
        try:
            folder.rmdir()
        except OSError:
            break
