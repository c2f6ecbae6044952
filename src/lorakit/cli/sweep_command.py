"""`lorakit sweep CONFIG.yaml`: run an experiment (grid and/or Optuna search) and report it."""

from __future__ import annotations

import argparse
import shlex
import sys


def add_sweep_parser(sub) -> None:
    cmd = sub.add_parser(
        "sweep",
        help="run an experiment: a grid and/or search over training options, with a table, plots and a report",
        description="Run every point of a sweep file (a base training config plus grid: axes and/or search: "
        "spaces), measure each run, and write results.csv/json, plots and report.md in the sweep folder. "
        "Running the same command again continues the sweep.",
    )
    cmd.add_argument("config", nargs="?", help="sweep file (YAML/JSON), or a built-in example's name (--list-examples)")
    cmd.add_argument("--out", default=None, help="the sweep folder (default: runs/sweeps/<config name>)")
    cmd.add_argument("--search", type=int, default=None, metavar="N", help="Optuna trials over the file's search:")
    cmd.add_argument("--seeds", type=int, default=None, metavar="K", help="repeat each point with K seeds")
    cmd.add_argument(
        "--devices",
        default=None,
        help="one worker process per device: GPU numbers (0,1,2) or cpu,cpu (default: one process, --device of "
        "the config)",
    )
    cmd.add_argument(
        "--storage", default=None, metavar="URL", help="Optuna storage shared by machines (default: SQLite in --out)"
    )
    cmd.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a base training option (repeatable), e.g. --set max_steps=6; example_data.n_test=16 too",
    )
    cmd.add_argument("--no-progress", action="store_true", help="no progress bars (a line per finished run stays)")
    cmd.add_argument("--list-examples", action="store_true", help="list the built-in example sweeps and exit")


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..experiments import example_names, sweep
    from ..memory import human_bytes

    if args.list_examples:
        for name in example_names():
            print(name)
        return 0
    if args.config is None:
        from ..errors import ConfigError

        raise ConfigError(f"lorakit sweep needs a sweep file or a built-in example ({', '.join(example_names())})")
    table = sweep(
        args.config,
        out=args.out,
        search=args.search,
        seeds=args.seeds,
        devices=args.devices,
        storage=args.storage,
        overrides=args.overrides,
        progress=not args.no_progress,
        command=shlex.join(["lorakit", *sys.argv[1:]]) if sys.argv[1:2] == ["sweep"] else None,
    )
    folder = table.folder
    ok = sum(r.get("status") == "ok" for r in table)
    print(f"\n{len(table)} runs, {ok} finished, {len(table) - ok} failed")
    verdict = table.verdict()
    if verdict.best is not None:
        from ..experiments.report import mean_spread

        print(
            f"best: {verdict.best.label} ({verdict.best.method_title}): {table.metric} "
            f"{mean_spread(verdict.best, table.metric)}"
        )
        peak = verdict.best.first("peak_memory_bytes")
        if peak:
            print(f"      peak memory {human_bytes(peak)}, {verdict.best.first('trainable_params'):,} trainable params")
    print(f"table:  {folder / 'results.csv'}")
    print(f"report: {folder / 'report.md'}")
    return 0 if ok else 1
