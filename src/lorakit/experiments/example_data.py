"""Built-in data for the example sweeps, written into the sweep folder (``example_data:``).

- ``demo``: the `lorakit demo` task (booking requests -> JSON; `lorakit.data.demo_task`), whose test
  split shares no values with training; scored by exact match.
- ``demo-classify``: the same requests, labelled by which optional details they give — ``both``
  (a name and a loyalty number), ``name``, ``loyalty`` or ``neither`` — balanced, so chance is 25%.
  Telling a name from the rest of the message needs the language, not a pattern: test names come
  from pools training never saw.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..safe_files.atomic import write_text_atomically

KINDS = {
    "demo": {"n_train": 480, "n_test": 32, "seed": 0},
    "demo-classify": {"n_train": 400, "n_test": 80, "seed": 0},
}
LABELS = ("both", "name", "loyalty", "neither")


def example_paths(spec: dict, folder: Path) -> dict[str, str]:
    """``{"data": ..., "valid_data": ...}`` of the example data in sweep folder ``folder``."""
    where = Path(folder) / "data" / spec["kind"]
    return {"data": str(where / "train.jsonl"), "valid_data": str(where / "test.jsonl")}


def write_example_data(spec: dict, folder: Path) -> dict[str, str]:
    """Write the data once (the same files for the same spec: every worker may call this)."""
    paths = example_paths(spec, folder)
    if all(Path(p).is_file() for p in paths.values()):
        return paths
    if spec["kind"] == "demo":
        from ..data import write_demo_dataset

        write_demo_dataset(
            Path(paths["data"]).parent, n_train=spec["n_train"], n_test=spec["n_test"], seed=spec["seed"]
        )
        return paths
    for split, n in (("train", spec["n_train"]), ("test", spec["n_test"])):
        rows = classify_rows(n, split, spec["seed"])
        key = "data" if split == "train" else "valid_data"
        Path(paths[key]).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(Path(paths[key]), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return paths


def classify_rows(n: int, split: str, seed: int = 0) -> list[dict]:
    """``n`` ``{"text", "label"}`` rows of ``split`` ("train" or "test"), as balanced as ``n`` allows."""
    from ..data.demo_task import make_request

    rng = random.Random(f"lorakit-demo-classify:{seed}:{split}")
    quota = {label: n // len(LABELS) + (i < n % len(LABELS)) for i, label in enumerate(LABELS)}
    rows, seen = [], set()
    while len(rows) < n:
        message, fields = make_request(rng, split)
        label = _label(fields)
        if quota[label] and message not in seen:
            quota[label] -= 1
            seen.add(message)
            rows.append({"text": message, "label": label})
    return rows


def _label(fields: dict) -> str:
    name, loyalty = fields["name"] is not None, fields["loyalty"] is not None
    return "both" if name and loyalty else "name" if name else "loyalty" if loyalty else "neither"
