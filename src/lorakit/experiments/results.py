"""The results table of a sweep: one row per run, and per point (its seeds together) mean ± spread.

Written as ``results.csv`` (one row per run, the columns below) and ``results.json`` (the rows, the
per-point summary and the verdict). Columns:

    run, group, label          the run's folder name, its point's name, the point for people
    <axis>..., seed            the point's option values (presets by name) and the run's seed
    method, r, alpha, target_modules, variant, lr, max_steps, task   the options in effect
    method_title, by_peft      how reports name the method; whether PEFT ran it
    status, error, resumed     ok | failed (and the error's first line); whether it resumed a half run
    steps                      optimizer steps trained
    trainable_params, total_params, trainable_pct
    saved_bytes                the size of what the method saved (adapter, model, trained tensors)
    peak_memory_bytes, peak_memory_label   see lorakit.experiments.measure
    wall_s                     the whole run: loading, training, evaluation (seconds)
    tokens_per_s               training tokens per second (the loop's rate over its last logged step)
    train_loss                 mean training loss of the last 5 logged steps
    eval_loss, perplexity, exact_match, n_eval, accuracy, macro_f1, ...   the final evaluation
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..safe_files.atomic import write_text_atomically

FIRST = ["run", "group", "label"]
LAST = ["status", "error", "resumed", "output_dir", "device", "peak_memory_label"]


@dataclass
class Point:
    """One point of the sweep over its seeds."""

    group: str
    label: str
    rows: list[dict]
    metric: str
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.rows if r.get("status") == "ok" and _number(r.get(self.metric)) is not None]

    @property
    def method(self) -> str:
        return self.rows[0].get("method", "")

    @property
    def method_title(self) -> str:
        return self.rows[0].get("method_title", self.method)

    def stat(self, column: str) -> tuple[float | None, float | None]:
        """(mean, sample standard deviation) of ``column`` over the point's finished runs; the
        spread is None with fewer than two runs."""
        values = [v for r in self.rows if r.get("status") == "ok" and (v := _number(r.get(column))) is not None]
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    def first(self, column: str) -> Any:
        return self.rows[0].get(column)


@dataclass
class Verdict:
    """The best point, the runner-up, the margin between them and the noise the seeds show."""

    best: Point | None
    runner_up: Point | None
    margin: float | None
    noise: float | None  # the larger seed spread of the two (None: one seed, no estimate)
    within_noise: bool | None


class ResultsTable(Sequence):
    """A sweep's runs as rows (dicts), in plan order; ``points()`` groups them by point,
    ``verdict()`` names the winner. What `lorakit.sweep` returns."""

    def __init__(
        self,
        rows: list[dict],
        metric: str,
        direction: str,
        axes: list[str],
        folder: Path | None = None,
        linked: list[list[str]] | None = None,
    ):
        self.rows, self.metric, self.direction, self.axes, self.folder = rows, metric, direction, axes, folder
        self.linked = linked or []  # options that vary together ("r,alpha"): one axis of the plots

    def __getitem__(self, index):
        return self.rows[index]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        verdict = self.verdict()
        best = f", best {verdict.best.label!r}" if verdict.best else ""
        return f"<ResultsTable: {len(self.rows)} runs, metric {self.metric}{best}>"

    @property
    def columns(self) -> list[str]:
        seen = dict.fromkeys(FIRST + self.axes + ["seed"])
        for row in self.rows:
            seen.update(dict.fromkeys(k for k in row if k not in LAST))
        return [*seen, *(c for c in LAST if any(c in r for r in self.rows))]

    def points(self) -> list[Point]:
        groups: dict[str, list[dict]] = {}
        for row in self.rows:
            groups.setdefault(row["group"], []).append(row)
        return [
            Point(g, rows[0]["label"], rows, self.metric, {a: rows[0].get(a) for a in self.axes if a in rows[0]})
            for g, rows in groups.items()
        ]

    def ranked(self) -> list[Point]:
        """Points with a measured metric, best first."""
        scored = [p for p in self.points() if p.ok]
        sign = -1 if self.direction == "maximize" else 1

        def key(p: Point) -> tuple[float, float]:
            # Ties on the metric (exact match moves in whole answers) go to the lower eval loss.
            loss = p.stat("eval_loss")[0]
            return sign * p.stat(self.metric)[0], loss if loss is not None else math.inf

        return sorted(scored, key=key)

    def verdict(self) -> Verdict:
        ranked = self.ranked()
        if not ranked:
            return Verdict(None, None, None, None, None)
        best = ranked[0]
        if len(ranked) == 1:
            return Verdict(best, None, None, best.stat(self.metric)[1], None)
        runner_up = ranked[1]
        margin = abs(best.stat(self.metric)[0] - runner_up.stat(self.metric)[0])
        spreads = [s for s in (best.stat(self.metric)[1], runner_up.stat(self.metric)[1]) if s is not None]
        noise = max(spreads) if spreads else None
        return Verdict(best, runner_up, margin, noise, None if noise is None else margin <= noise)

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
        return out.getvalue()

    def summary(self) -> list[dict]:
        """Per point: the metric's and the costs' mean and spread over its seeds."""
        out = []
        for p in self.points():
            entry = {"group": p.group, "label": p.label, "method": p.method, **p.values, "runs": len(p.rows)}
            entry["ok"] = len(p.ok)
            for column in (self.metric, "eval_loss", "train_loss", "wall_s", "tokens_per_s", "peak_memory_bytes"):
                entry[f"{column}_mean"], entry[f"{column}_std"] = p.stat(column)
            entry["trainable_params"] = p.first("trainable_params")
            out.append(entry)
        return out

    def write(self, folder: Path) -> tuple[Path, Path]:
        """results.csv and results.json in ``folder``."""
        folder = Path(folder)
        write_text_atomically(folder / "results.csv", self.to_csv())
        verdict = self.verdict()
        data = {
            "metric": self.metric,
            "direction": self.direction,
            "axes": self.axes,
            "runs": self.rows,
            "points": self.summary(),
            "verdict": {
                "best": verdict.best.label if verdict.best else None,
                "runner_up": verdict.runner_up.label if verdict.runner_up else None,
                "margin": verdict.margin,
                "noise": verdict.noise,
                "within_noise": verdict.within_noise,
            },
        }
        write_text_atomically(folder / "results.json", json.dumps(data, indent=2, default=str) + "\n")
        return folder / "results.csv", folder / "results.json"

    def to_pandas(self):
        """The rows as a pandas DataFrame (pandas must be installed)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.columns)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _csv_value(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value
