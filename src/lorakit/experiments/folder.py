"""The sweep folder: made once, recognised on the next start, never taken over by another sweep.

    <sweep>/sweep.yaml     the sweep as given (normalised); sweep.json: its identity and fingerprint
    <sweep>/data/          built-in example data (example_data:)
    <sweep>/runs/<run>/    each run's training outputs, and sweep_result.json once it is measured
    <sweep>/optuna.db      the search's study (default storage)
    <sweep>/results.csv, results.json, report.md, *.png

Starting a sweep in its own folder again continues it (finished runs are skipped). A folder holding
another sweep (other base, axes, search or metric) is refused, saying what differs and what to do;
seeds and trials may grow, as they only add runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..safe_files.atomic import write_text_atomically
from .config import SweepConfig

IDENTITY_FILE = "sweep.json"
CONFIG_FILE = "sweep.yaml"


def open_folder(config: SweepConfig, folder: Path) -> bool:
    """Make ``folder`` this sweep's, or check that it already is; True when it already was."""
    import yaml

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"sweep folder {folder} is a file: choose another --out")
    identity_file = folder / IDENTITY_FILE
    if identity_file.is_file():
        earlier = json.loads(identity_file.read_text())
        if earlier.get("fingerprint") != config.fingerprint():
            differs = ", ".join(_differences(earlier.get("identity", {}), config.identity())) or "its settings"
            raise ConfigError(
                f"sweep folder {folder} holds another sweep (it differs in {differs}): continue that one with its "
                f"own config ({folder / CONFIG_FILE}), or give this one another folder (--out DIR)"
            )
        return True
    if folder.is_dir() and any(folder.iterdir()):
        shown = ", ".join(sorted(p.name for p in folder.iterdir())[:3])
        raise ConfigError(
            f"{folder} is not a sweep folder (it holds {shown}): choose a new or empty folder (--out DIR)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    identity = {"fingerprint": config.fingerprint(), "identity": config.identity()}
    write_text_atomically(identity_file, json.dumps(identity, indent=2, default=str) + "\n")
    return False


def _differences(earlier: dict, now: dict) -> list[str]:
    """The keys (``base.lr``, ``grid``) whose values differ between two identities."""
    out = []
    for key in sorted(set(earlier) | set(now)):
        a, b = earlier.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key == "base":
            out += [
                f"base.{k}"
                for k in sorted(set(a) | set(b))
                if json.dumps(a.get(k), default=str) != json.dumps(b.get(k), default=str)
            ]
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(key)
    return out
