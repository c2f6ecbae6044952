"""``report.md``: the sweep's verdict, tables and pictures, in one markdown file beside them."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from ..memory import human_bytes
from ..safe_files.atomic import write_text_atomically
from .config import SweepConfig
from .results import Point, ResultsTable

FRACTIONS = {
    "exact_match",
    "accuracy",
    "macro_f1",
    "token_accuracy",
    "entity_f1",
    "entity_precision",
    "entity_recall",
    "rewards/accuracies",
}
PLOT_TITLES = {
    "metric_vs_rank": "Metric vs rank",
    "time_vs_rank": "Time vs rank",
    "metric_vs_params": "Metric vs trainable parameters",
    "loss_curves": "Training loss of every run",
}


def fmt(value, column: str = "") -> str:
    """A cell: fractions as percentages, bytes human-readable, counts with separators."""
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)):
        return str(value)
    if column in FRACTIONS:
        return f"{100 * value:.1f}%"
    if column.endswith("_bytes"):
        return human_bytes(value)
    if column.endswith("params"):
        return f"{int(value):,}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def mean_spread(point: Point, column: str) -> str:
    mean, spread = point.stat(column)
    if mean is None:
        return "–"
    if spread is None:
        return fmt(mean, column)
    if column in FRACTIONS:
        return f"{100 * mean:.1f} ± {100 * spread:.1f}%"
    return f"{fmt(mean, column)} ± {fmt(spread, column)}"


def verdict_text(table: ResultsTable, seeds: int) -> list[str]:
    """The winner, its margin over the runner-up, and whether the margin is within the noise."""
    v, metric = table.verdict(), table.metric
    if v.best is None:
        return [f"No run finished with a {metric}: nothing to compare (see the failed runs below)."]
    lines = [f"**Best: {v.best.label}** ({v.best.method_title}) — {metric} {mean_spread(v.best, metric)}."]
    if v.runner_up is None:
        lines.append("It is the only point with a result, so there is nothing to compare it with.")
        return lines
    shown = f"{100 * v.margin:.1f} points" if metric in FRACTIONS else fmt(v.margin, metric)
    lines.append(f"Runner-up: {v.runner_up.label} — {metric} {mean_spread(v.runner_up, metric)}; margin {shown}.")
    if v.margin == 0:
        lines.append(
            f"The two tie on {metric}; the lower eval loss decides the order "
            f"({mean_spread(v.best, 'eval_loss')} against {mean_spread(v.runner_up, 'eval_loss')})."
        )
    if v.noise is None:
        lines.append(
            "Noise: not measured — each point ran with one seed, so the margin could be the seed's doing. "
            "Run with `--seeds 3` to get mean ± spread."
        )
    else:
        noise = f"{100 * v.noise:.1f} points" if metric in FRACTIONS else fmt(v.noise, metric)
        n = min(len(v.best.ok), len(v.runner_up.ok))
        if v.within_noise:
            lines.append(
                f"Noise: the seeds' spread (sample standard deviation, up to {noise} over {n}+ seeds) is as large as "
                "the margin: **the two are not distinguishable** with this many seeds."
            )
        else:
            lines.append(f"Noise: the seeds' spread is at most {noise} (over {n}+ seeds), below the margin.")
    n_eval = v.best.first("n_eval")
    if metric == "exact_match" and n_eval:
        lines.append(f"Exact match counts whole answers of {n_eval} examples: one answer is {100 / n_eval:.1f} points.")
    return lines


def write_report(table: ResultsTable, config: SweepConfig, folder: Path, plots: dict[str, Path], command: str) -> Path:
    metric = table.metric
    points = table.points()
    seeds = config.seeds
    out = [f"# {config.title}", ""]
    if config.notes:
        out += [config.notes.strip(), ""]
    n_ok = sum(r.get("status") == "ok" for r in table)
    out += [
        f"{len(table)} runs ({n_ok} finished) of {len(points)} points × {seeds} seed(s); ranked by **{metric}** "
        f"({config.direction}). Folder: `{folder}`.",
        "",
        "Base options: " + ", ".join(f"`{k}={v}`" for k, v in config.base.items()) + "."
        if config.base
        else "Base options: the defaults.",
        "",
    ]
    if config.changed:
        out += [
            f"Changed from the sweep file on the command line (the notes above describe the file): "
            f"{', '.join(f'`{c}`' for c in config.changed)}.",
            "",
        ]
    for i, grid in enumerate(config.grids):
        axes = "; ".join(f"{k} ∈ {{{', '.join(map(str, vs))}}}" for k, vs in grid.items())
        out.append(f"Grid{f' {i + 1}' if len(config.grids) > 1 else ''}: {axes}.")
    if config.search:
        spaces = "; ".join(f"{k}: {s.to_dict()}" for k, s in config.search.items())
        out.append(f"Search (Optuna TPE, seed {config.search_seed}, {config.trials} trials): {spaces}.")
    out += ["", "## Verdict", "", *verdict_text(table, seeds), ""]
    out += ["## Points (mean ± spread over seeds)", "", *_points_table(table, points), ""]
    if plots:
        out += ["## Plots", ""]
        for name, path in plots.items():
            out += [f"### {PLOT_TITLES.get(name, name)}", "", f"![{PLOT_TITLES.get(name, name)}]({path.name})", ""]
    out += ["## Every run", "", *_runs_table(table), ""]
    failed = [r for r in table if r.get("status") == "failed"]
    if failed:
        out += ["## Failed runs", ""]
        out += [f"- `{r['run']}`: {r.get('error')} (traceback: `runs/{r['run']}/sweep_error.txt`)" for r in failed]
        out.append("")
    labels = {r.get("peak_memory_label") for r in table if r.get("peak_memory_label")}
    out += [
        "## How the numbers were taken",
        "",
        "- wall s: the whole run — loading the model, training, the final evaluation.",
        "- tokens/s: training tokens per second over the training steps (the loop's own rate).",
        "- train loss: mean of the last 5 logged training steps; eval loss and the metric: the final evaluation.",
        "- saved: the size of what the method writes (LoRA's adapter, the full model, BitFit's biases); "
        "the frozen model saves nothing.",
        *(f"- peak memory: {label}." for label in sorted(labels)),
        "- ± is the sample standard deviation over seeds; with one seed there is none.",
        "",
        "## Reproduce",
        "",
        f"    {command}",
        "",
        _environment(),
        "",
    ]
    path = Path(folder) / "report.md"
    write_text_atomically(path, "\n".join(out))
    return path


def _points_table(table: ResultsTable, points: list[Point]) -> list[str]:
    metric = table.metric
    head = [
        "point",
        "method",
        "trainable params",
        "saved",
        metric,
        "eval loss",
        "train loss",
        "wall s",
        "tokens/s",
        "peak memory",
        "runs ok",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = [
            p.label,
            p.method_title,
            fmt(p.first("trainable_params"), "trainable_params"),
            fmt(p.first("saved_bytes"), "saved_bytes"),
            mean_spread(p, metric),
            mean_spread(p, "eval_loss"),
            mean_spread(p, "train_loss"),
            mean_spread(p, "wall_s"),
            mean_spread(p, "tokens_per_s"),
            mean_spread(p, "peak_memory_bytes"),
            f"{len([r for r in p.rows if r.get('status') == 'ok'])}/{len(p.rows)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _runs_table(table: ResultsTable) -> list[str]:
    metric = table.metric
    columns = [
        "run",
        "seed",
        "status",
        metric,
        "eval_loss",
        "train_loss",
        "steps",
        "wall_s",
        "tokens_per_s",
        "peak_memory_bytes",
        "saved_bytes",
    ]
    lines = ["| " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        lines.append("| " + " | ".join(fmt(row.get(c), c) for c in columns) + " |")
    return lines


def _environment() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        __version__ = version("lorakit")  # the installed distribution's (the package itself stands above this room)
    except PackageNotFoundError:
        __version__ = "unknown"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return (
        f"Made {datetime.date.today().isoformat()} with lorakit {__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, on {device} ({platform.machine()})."
    )
