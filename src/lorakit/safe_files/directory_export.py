"""Publishing a tree of files (a merged model, its tokenizer) as a new folder, or into an empty
one, whole or not at all: an interrupted export leaves no half model, and no old files mix with
the new ones."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import ConfigError
from .atomic import discard, fsync_tree, shielded
from .journal import fsync_folder


def require_new_directory(out: Path) -> None:
    """Refuse an ``out`` (the CLI's ``--out``, as the message says) that holds files: mixing a new
    export with an old one's files (say a single model.safetensors beside a new sharded index)
    gives a folder transformers may load wrongly."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder: choose a new folder, or remove it first")


def save_directory(out: Path, write) -> Path:
    """Run ``write(tmp_dir)`` and rename the folder to ``out`` (absent or empty): an interrupted
    export leaves no half model, and no old files mix with the new ones."""
    require_new_directory(out)
    if out.exists():
        return fill_empty_directory(out, write)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its folder is private (0700), and this one becomes the export, which is meant
    # to be shared; mkdir gives what the umask allows, as for any new folder.
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    os.mkdir(tmp)  # FileExistsError on a clash of random names: someone else's folder, left alone
    try:
        write(tmp)
        share_like_new_files(tmp)
        fsync_tree(tmp)  # the files on disk before the rename that publishes them
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
        fsync_folder(out.parent)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fill_empty_directory(out: Path, write) -> Path:
    """``save_directory`` for an existing empty ``out``, which is filled in place rather than
    replaced: it may be a mount point (a container volume) or sit in a folder this user cannot
    write. ``write`` fills a hidden folder inside it, whose entries are then moved up; on any
    failure (Ctrl-C included, even a second one) ``out`` is emptied again.

    Not ``atomic.replace_files_in_folder``: that one writes files whose names it knows
    beforehand, one by one, beside their final names, and keeps earlier files as backups; an
    export is a tree whose names only ``save_pretrained`` knows (shards, tokenizer files, maybe
    folders), written into a folder that is empty, so there is nothing to back up."""
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out))
    moved: list[Path] = []
    try:
        write(tmp)
        share_like_new_files(tmp)
        fsync_tree(tmp)
        for entry in sorted(tmp.iterdir()):
            moved.append(out / entry.name)  # before the rename: an interrupt in between must undo it too
            os.rename(entry, out / entry.name)
        tmp.rmdir()
        fsync_folder(out)
        return out
    except BaseException:
        shielded(lambda: _empty_again(moved, tmp))
        raise


def share_like_new_files(root: Path) -> None:
    """Give every file under ``root`` the permission bits of a new file (0666 less the umask: 0644
    with the usual 022). safetensors writes each file privately (0600) and renames it into place,
    so an exported model.safetensors would be the one file of the export others cannot read."""
    probe = root / f".mode.{secrets.token_hex(6)}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # what the umask leaves of 0666, as for any new file
    finally:
        os.close(fd)
        os.unlink(probe)
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def _empty_again(moved: list[Path], tmp: Path) -> None:
    """Remove what a failed ``fill_empty_directory`` put in its folder; each entry is dropped once
    removed, so a run cut short by Ctrl-C is finished by the next."""
    while moved:
        discard(moved[-1])
        moved.pop()
    shutil.rmtree(tmp, ignore_errors=True)
