"""Writing a file so that readers see the old one or the whole new one, never half of it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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
