"""The converted-model cache: ``$LORAKIT_CACHE`` (default ``~/.cache/lorakit``) / models / <key>.

Converting a GGUF file is slow; the converted safetensors then load many times faster
(docs/benchmarks.md). An entry is built in a temporary directory beside its final place and
renamed into place only when complete (a rename within one file system is atomic), so an
interrupted conversion never leaves a half-written entry that later loads would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..safe_files.atomic import fsync_tree

log = logging.getLogger("lorakit.models.cache")

# Written last into every entry. Its presence is what marks an entry complete, and its "format"
# lets a later lorakit rebuild entries whose conversion it has changed.
MARKER = "lorakit_model.json"
CACHE_FORMAT = 1
# Temporary build directories older than this are leftovers of killed processes (a conversion
# takes well under a minute), so they are deleted instead of piling up half a gigabyte each.
STALE_TMP_SECONDS = 3600


def cache_root() -> Path:
    """``$LORAKIT_CACHE`` when set, else ``~/.cache/lorakit``."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def model_cache_dir(key: str) -> Path:
    """Where the converted model called ``key`` lives (whether or not it exists yet)."""
    return cache_root() / "models" / key


def gguf_cache_key(path: Path) -> str:
    """A key for a GGUF file that changes when the file does (absolute path, size, mtime)."""
    stat = path.stat()
    ident = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"gguf-{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def is_complete(directory: Path, **expected: Any) -> bool:
    """True when ``directory`` is a finished cache entry of the current format whose marker
    holds every ``expected`` value (e.g. the pinned requirement an alias was built from)."""
    try:
        meta = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or any(meta.get(key) != value for key, value in expected.items()):
        return False
    return meta.get("format") == CACHE_FORMAT and (directory / "config.json").is_file()


def write_marker(directory: Path, **meta: Any) -> None:
    """Mark ``directory`` complete; call it after everything else has been written."""
    (directory / MARKER).write_text(json.dumps({"format": CACHE_FORMAT, **meta}, indent=2) + "\n")


def _tmp_name(final: Path) -> str:
    return f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"


def _remove_stale_tmps(final: Path) -> None:
    now = time.time()
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                log.info("removing leftover temporary directory %s", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # another process removed it first
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _relax_permissions(directory: Path) -> None:
    # Some writers (safetensors) create their files private (0600); give every file of the entry
    # the permissions the user's umask asks for, so a shared cache is readable by all its users.
    mode = 0o666 & ~_umask()
    for file in directory.rglob("*"):
        if file.is_file():
            file.chmod(mode)


def build_atomically(final: Path, build: Callable[[Path], None], **expected: Any) -> Path:
    """Run ``build(tmp_dir)``, then move ``tmp_dir`` to ``final``; on any failure nothing is left.

    ``build`` must write the complete entry, marker included (see :func:`write_marker`). If another
    process finished the same entry meanwhile, its copy is kept and ours is discarded. An existing
    but incomplete or outdated ``final`` (see ``expected`` in :func:`is_complete`) is replaced.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmps(final)
    tmp = final.parent / _tmp_name(final)
    tmp.mkdir()  # not mkdtemp: that one is private (0700), and a cache may be shared
    try:
        build(tmp)
        _relax_permissions(tmp)
        fsync_tree(tmp)  # a power cut must not leave a complete-looking entry of empty files
        if final.exists() and not is_complete(final, **expected):
            # Outdated or foreign content: move it aside first, since a rename cannot replace a
            # non-empty directory.
            old = final.parent / _tmp_name(final)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_complete(final, **expected):
                raise
            # Lost a race with another process that built the same entry: keep theirs.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
