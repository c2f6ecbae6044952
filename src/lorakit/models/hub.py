"""Hugging Face hub ids: load from the local hub cache, and go online only when that can work.

Loading is tried offline first. Only when the files are not cached, and the hub is reachable,
does transformers get to download: without network, huggingface_hub retries for about a minute
before failing, which is a long wait for an answer that a one-second connection check gives.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("lorakit.models.hub")

_TRUE = {"1", "true", "yes", "on"}
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a download from the hub (``$HF_ENDPOINT``) can possibly work right now."""
    if hub_offline():
        return False
    if any(os.environ.get(var) for var in _PROXY_VARS):
        # Through a proxy the hub's host may not resolve locally; let huggingface_hub try.
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError as exc:
        log.debug("hub not reachable: %s", exc)
        return False


def looks_like_path(name: str) -> bool:
    """True for names that can only mean a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``C:\\x``).

    A hub id is ``name`` or ``owner/name``: a single slash is ambiguous and is tried as a hub id
    when no such directory exists.
    """
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).drive != ""
