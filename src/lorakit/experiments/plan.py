"""The runs of a sweep: grid points times seeds, each with a stable name (its folder)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from .presets import preset_name

# Short forms of option names in run names (the value alone says enough for these).
VALUE_ONLY = {"target_modules", "method", "variant", "task", "model"}


@dataclass(frozen=True)
class RunSpec:
    """One run: the point's option values (as the config wrote them: preset names, not regexes),
    its seed, and its name, which is also its folder under ``<sweep>/runs/``."""

    point: tuple[tuple[str, Any], ...]
    seed: int
    name: str
    group: str  # the point's name without the seed: runs of one group differ only in seed

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.point)


def grid_points(grids: list[dict[str, list]]) -> list[dict[str, Any]]:
    """Every combination of each grid's axes (the first axis varies slowest), grids joined in
    order, duplicates dropped; one empty point when there is no grid."""
    points: list[dict[str, Any]] = []
    seen: set[str] = set()
    for grid in grids or [{}]:
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            point: dict[str, Any] = {}
            for key, value in zip(keys, combo):
                names = [name.strip() for name in key.split(",")]  # "r,alpha": linked options
                point.update(zip(names, value) if len(names) > 1 else [(key, value)])
            key = repr(sorted(point.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                points.append(point)
    return points


def point_label(point: dict[str, Any]) -> str:
    """A point for people: ``r=16 qv``; the base alone is ``base``."""
    parts = []
    for key, value in point.items():
        shown = _short(value)
        parts.append(shown if key in VALUE_ONLY else f"{key}={shown}")
    return " ".join(parts) or "base"


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return preset_name(value)


def slug(text: str, limit: int = 60) -> str:
    """A folder-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9.=+_-]+", "_", text).strip("_")[:limit] or "base"


def grid_runs(points: list[dict[str, Any]], seeds: list[int]) -> list[RunSpec]:
    """The runs of a grid sweep, point by point, each point's seeds together."""
    runs = []
    for i, point in enumerate(points):
        group = f"{i:03d}-{slug(point_label(point))}"
        for seed in seeds:
            runs.append(RunSpec(tuple(point.items()), seed, f"{group}-s{seed}", group))
    return runs


def trial_runs(prefix: str, number: int, point: dict[str, Any], seeds: list[int]) -> list[RunSpec]:
    """The runs of one search trial (``point``: the grid point's values and the trial's draws)."""
    group = f"{prefix}trial-{number:04d}"
    return [RunSpec(tuple(point.items()), seed, f"{group}-s{seed}", group) for seed in seeds]
