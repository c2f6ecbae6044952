"""The converted-model cache: ``$LORAKIT_CACHE`` (default ``~/.cache/lorakit``) / models / <key>.

Converting a GGUF file takes ~30 s on 2 cores; the converted safetensors load in under a second.
Entries are written into a temporary directory beside their final place and renamed into it, so
an interrupted conversion never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def model_cache_dir(key: str) -> Path:
    return cache_root() / "models" / key


def gguf_cache_key(path: Path) -> str:
    """A key for a GGUF file that changes when the file does (name, size, mtime)."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"gguf-{path.stem}-{digest}"


def is_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``final``; on failure nothing is left."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        if final.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
