"""A sweep's pictures (PNG, matplotlib's Agg backend): each is drawn only where the sweep has its data.

- ``metric_vs_rank.png``: the metric against LoRA's rank r (log2 axis), a line per combination of
  the other axes, error bars = the spread over seeds; other methods as dashed horizontal lines.
- ``time_vs_rank.png``: wall time per run and training tokens/s against r.
- ``metric_vs_params.png``: the metric against trainable parameters (log axis), one point per
  point of the sweep, coloured by method; a method that trains nothing is a dashed line.
- ``loss_curves.png``: every run's training loss per step (from its metrics.jsonl), overlaid.
"""

from __future__ import annotations

import json
from pathlib import Path

from .results import Point, ResultsTable


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def draw_all(table: ResultsTable, folder: Path) -> dict[str, Path]:
    """Every picture that applies, written into ``folder``: {name: path}."""
    drawn = {}
    for name, draw in (
        ("metric_vs_rank", metric_vs_rank),
        ("time_vs_rank", time_vs_rank),
        ("metric_vs_params", metric_vs_params),
        ("loss_curves", loss_curves),
    ):
        path = Path(folder) / f"{name}.png"
        if draw(table, path):
            drawn[name] = path
    return drawn


def _rank_lines(table: ResultsTable) -> dict[str, list[Point]]:
    """LoRA points by the values of the axes other than r; {} unless some line has two ranks."""
    lines: dict[str, list[Point]] = {}
    with_r = {"r", "method"}.union(*(set(names) for names in table.linked if "r" in names))  # alpha of "r,alpha"
    for p in table.points():
        if p.method != "lora" or not p.ok or not isinstance(p.first("r"), int):
            continue
        others = " ".join(f"{v}" for k, v in p.values.items() if k not in with_r)
        lines.setdefault(others or "LoRA", []).append(p)
    lines = {k: sorted(v, key=lambda p: p.first("r")) for k, v in lines.items()}
    return lines if any(len({p.first("r") for p in v}) > 1 for v in lines.values()) else {}


def _baselines(table: ResultsTable) -> list[Point]:
    return [p for p in table.points() if p.method != "lora" and p.ok]


def metric_vs_rank(table: ResultsTable, path: Path) -> bool:
    lines = _rank_lines(table)
    if not lines:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ranks = sorted({p.first("r") for line in lines.values() for p in line})
    for name, points in lines.items():
        means = [p.stat(table.metric) for p in points]
        ax.errorbar(
            [p.first("r") for p in points],
            [m for m, _ in means],
            yerr=[s or 0 for _, s in means],
            marker="o",
            capsize=3,
            label=name,
        )
    for i, p in enumerate(_baselines(table)):
        ax.axhline(p.stat(table.metric)[0], linestyle="--", color=f"C{(i + len(lines)) % 10}", label=p.label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel(table.metric)
    ax.set_title(f"{table.metric} vs rank")
    return _finish(fig, ax, path, plt)


def time_vs_rank(table: ResultsTable, path: Path) -> bool:
    lines = _rank_lines(table)
    if not lines:
        return False
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    ranks = sorted({p.first("r") for line in lines.values() for p in line})
    for name, points in lines.items():
        x = [p.first("r") for p in points]
        for ax, column in ((left, "wall_s"), (right, "tokens_per_s")):
            stats = [p.stat(column) for p in points]
            ax.errorbar(x, [m for m, _ in stats], yerr=[s or 0 for _, s in stats], marker="o", capsize=3, label=name)
    for ax, label in ((left, "wall time per run (s)"), (right, "training tokens / s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.set_title("time vs rank (load + train + evaluate)")
    right.set_title("training throughput vs rank")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def metric_vs_params(table: ResultsTable, path: Path) -> bool:
    points = [p for p in table.points() if p.ok]
    trained = [p for p in points if (p.first("trainable_params") or 0) > 0]
    if not trained:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    methods = list(dict.fromkeys(p.method_title for p in points))
    for p in trained:
        mean, spread = p.stat(table.metric)
        color = f"C{methods.index(p.method_title) % 10}"
        ax.errorbar(p.first("trainable_params"), mean, yerr=spread or 0, fmt="o", color=color, capsize=3)
        ax.annotate(p.label, (p.first("trainable_params"), mean), fontsize=7, xytext=(4, 3), textcoords="offset points")
    for title in dict.fromkeys(p.method_title for p in trained):  # one legend entry per method drawn
        ax.plot([], [], "o", color=f"C{methods.index(title) % 10}", label=title)
    for p in points:
        if not p.first("trainable_params"):
            ax.axhline(p.stat(table.metric)[0], linestyle="--", color="gray", label=f"{p.label} (nothing trained)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(table.metric)
    ax.set_title(f"{table.metric} vs trainable parameters")
    return _finish(fig, ax, path, plt)


def loss_curves(table: ResultsTable, path: Path) -> bool:
    curves = []
    for i, p in enumerate(table.points()):
        for row in p.rows:
            # the run's folder under the sweep's (which may have moved since), else where it ran
            run_dir = table.folder / "runs" / row["run"] if table.folder else Path(row.get("output_dir") or "")
            metrics = run_dir / "metrics.jsonl"
            if row.get("status") != "ok" or not metrics.is_file():
                continue
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            steps = [(r["step"], r["loss"]) for r in records if "loss" in r]
            if steps:
                curves.append((i, p.label, row.get("seed"), steps))
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    labelled = set()
    for i, label, seed, steps in curves:
        ax.plot(*zip(*steps), color=f"C{i % 10}", alpha=0.85, label=None if i in labelled else label)
        labelled.add(i)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss of every run")
    return _finish(fig, ax, path, plt, legend=len(labelled) <= 14)


def _finish(fig, ax, path: Path, plt, legend: bool = True) -> bool:
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
