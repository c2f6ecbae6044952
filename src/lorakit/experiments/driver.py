"""`lorakit.sweep(...)` and `lorakit sweep CONFIG.yaml`: plan, run (here, or in one worker per device),
then gather the table, the plots and the report."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from .config import SweepConfig
from .folder import CONFIG_FILE, open_folder
from .plan import RunSpec, grid_points, grid_runs
from .results import ResultsTable
from .runner import RESULT_FILE, read_result, run_one

log = logging.getLogger("lorakit.experiments")


def example_names() -> list[str]:
    """The built-in example sweeps (``lorakit sweep NAME``)."""
    folder = resources.files("lorakit.experiments") / "examples"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def example_path(name: str) -> Path:
    return Path(str(resources.files("lorakit.experiments") / "examples" / f"{name}.yaml"))


def load_config(
    source: str | Path | dict | SweepConfig, overrides: list[str] | dict | None = None, **changes
) -> SweepConfig:
    """A sweep config from a file, a built-in example's name, a mapping or a SweepConfig;
    ``overrides`` (``["max_steps=6", "example_data.n_test=16"]`` or a mapping) change base options
    (or example_data's) first; ``changes`` (seeds, trials, storage, output_dir) then win."""
    if isinstance(source, SweepConfig):
        source = {**source.to_dict(), **({"output_dir": source.output_dir} if source.output_dir else {})}
    if isinstance(source, dict):
        data, where = dict(source), "<mapping>"
    else:
        from ..training.config import read_config_file

        path = Path(source)
        if not path.exists() and str(source) in example_names():
            path = example_path(str(source))
        elif not path.exists():
            raise ConfigError(
                f"sweep config {source} not found; built-in examples: {', '.join(example_names())} "
                "(lorakit sweep NAME runs one)"
            )
        data, where = read_config_file(path), str(path)
    if overrides:
        data = _with_overrides(data, overrides)
    config = SweepConfig.from_mapping(data, source=where, **changes)
    if overrides:
        config.changed = [
            f"{k}={v}" for k, v in (overrides.items() if isinstance(overrides, dict) else map(_split, overrides))
        ]
    return config


def _with_overrides(data: dict, overrides: list[str] | dict) -> dict:
    import yaml

    pairs = overrides.items() if isinstance(overrides, dict) else [_split(item) for item in overrides]
    data = {**data, "base": dict(data.get("base") or {})}
    for key, value in pairs:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if key.startswith("example_data."):
            data["example_data"] = {**(data.get("example_data") or {}), key.split(".", 1)[1]: value}
        else:
            data["base"][key.removeprefix("base.")] = value
    return data


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"--set takes KEY=VALUE (a base training option), got {item!r}")
    key, value = item.split("=", 1)
    return key.strip().replace("-", "_"), value


def default_folder(config: SweepConfig) -> Path:
    from .plan import slug

    return Path("runs") / "sweeps" / slug(Path(config.source).stem if config.source != "<mapping>" else config.title)


def planned_runs(config: SweepConfig) -> list[RunSpec]:
    """The grid's runs (a search's come from its trials, as they are drawn)."""
    seeds = [config.base.get("seed", 0) + k for k in range(config.seeds)]
    return grid_runs(grid_points(config.grids), seeds)


def work(
    config: SweepConfig,
    folder: Path,
    device: str | None = None,
    progress: bool = True,
    on_row: Callable[[dict], None] = lambda row: None,
) -> None:
    """Run every run of the sweep that is not finished and not held by another process."""
    if config.example_data:
        from .example_data import write_example_data

        write_example_data(config.example_data, folder)
    if config.search:
        from .search import run_search

        run_search(config, folder, device, progress, on_row)
        return
    for spec in planned_runs(config):
        row = run_one(config, folder, spec, device, progress)
        if row is not None:
            on_row(row)


def sweep(
    config: str | Path | dict | SweepConfig,
    *,
    out: str | Path | None = None,
    search: int | None = None,
    seeds: int | None = None,
    devices: str | list[str] | None = None,
    storage: str | None = None,
    overrides: list[str] | dict | None = None,
    progress: bool = True,
    command: str | None = None,
) -> ResultsTable:
    """Run a sweep and return its results table (also written as results.csv/json, plots and
    report.md in the sweep folder).

    ``config``: a YAML/JSON file, a built-in example's name (`example_names`), a mapping or a
    `SweepConfig`. ``out``: the sweep folder (default ``runs/sweeps/<config name>``); starting the
    same sweep there again continues it, another sweep there is refused. ``search``: Optuna trials
    (the config's ``search:`` spaces); ``seeds``: repeats of each point; ``devices``: one worker
    process per device (``"0,1"``, ``"cpu,cpu"``); ``storage``: the Optuna database URL to share a
    search between machines; ``overrides``: base options, ``{"max_steps": 6}`` or ``["max_steps=6"]``.
    """
    from .workers import parse_devices

    device_list = parse_devices(devices)
    changes = {"trials": search, "seeds": seeds, "storage": storage, "output_dir": str(out) if out else None}
    cfg = load_config(config, overrides, **changes)
    folder = Path(cfg.output_dir) if cfg.output_dir else default_folder(cfg)
    if open_folder(cfg, folder):
        log.info("continuing the sweep in %s (finished runs are skipped)", folder)
    _write_current(cfg, folder)  # seeds and trials may have grown; workers read this file
    total = len(planned_runs(cfg)) if not cfg.search else cfg.trials * cfg.seeds * len(grid_points(cfg.grids))
    bar = _bar(total, progress, folder)
    seen: set[str] = set()

    def on_row(row: dict) -> None:
        if row["run"] in seen:
            return
        seen.add(row["run"])
        bar.update(1)
        bar.write(_row_line(row, cfg.metric))

    try:
        if len(device_list) > 1:
            _run_workers(cfg, folder, device_list, on_row)
        else:
            work(cfg, folder, device_list[0] if device_list else None, progress, on_row)
    finally:
        bar.close()
    return finish(cfg, folder, command or _python_command(config, folder, search, seeds, devices, storage, overrides))


def finish(config: SweepConfig, folder: Path, command: str) -> ResultsTable:
    """Gather every run's row from the folder; write results.csv/json, the plots and report.md."""
    from .plots import draw_all
    from .report import write_report

    table = collect(config, folder)
    table.write(folder)
    plots = draw_all(table, folder)
    write_report(table, config, folder, plots, command)
    return table


def collect(config: SweepConfig, folder: Path) -> ResultsTable:
    """The rows on disk: the grid's runs in plan order, or every trial's runs."""
    runs = Path(folder) / "runs"
    if config.search:
        names = sorted(p.parent.name for p in runs.glob(f"*/{RESULT_FILE}"))
    else:
        names = [spec.name for spec in planned_runs(config)]
    rows = [row for name in names if (row := read_result(runs / name)) is not None]
    return ResultsTable(rows, config.metric, config.direction, config.axes, folder, config.linked)


def _write_current(config: SweepConfig, folder: Path) -> None:
    import yaml

    from ..safe_files.atomic import write_text_atomically

    write_text_atomically(folder / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))


def _run_workers(config: SweepConfig, folder: Path, devices: list[str], on_row) -> None:
    """Start one worker per device; follow their results on disk until all have exited."""
    from .workers import start_workers

    verbose = logging.getLogger("lorakit").getEffectiveLevel() <= logging.INFO
    workers = start_workers(folder, devices, verbose)
    try:
        while True:
            running = [w for w in workers if w[1].poll() is None]
            for row in collect(config, folder):
                if row.get("status") in ("ok", "failed"):
                    on_row(row)
            if not running:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        for _, process in workers:  # our own children; each saves its run's checkpoint on SIGINT
            process.wait()
        raise
    failed = [(d, p.returncode) for d, p in workers if p.returncode]
    for device, code in failed:
        log.warning(
            "the worker on device %s exited with status %s; its unfinished run resumes on the next start", device, code
        )


def _bar(total: int, progress: bool, folder: Path):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=f"sweep {folder.name}",
        unit="run",
        disable=not progress,
        dynamic_ncols=True,
        position=0,
        leave=True,
        file=sys.stderr,
    )


def _row_line(row: dict, metric: str) -> str:
    from .report import fmt

    if row.get("status") != "ok":
        return f"  {row['run']}: failed — {row.get('error')}"
    measured = f"{metric} {fmt(row.get(metric), metric)}"
    if metric != "eval_loss":
        measured += f", eval loss {fmt(row.get('eval_loss'))}"
    return f"  {row['run']}: {measured}, {fmt(row.get('wall_s'))} s"


def _python_command(config, folder, search, seeds, devices, storage, overrides) -> str:
    source = config if isinstance(config, (str, Path)) else "CONFIG.yaml"
    parts = ["lorakit", "sweep", str(source), "--out", str(folder)]
    for flag, value in (("--search", search), ("--seeds", seeds), ("--devices", devices), ("--storage", storage)):
        if value is not None:
            parts += [
                flag,
                value if isinstance(value, str) else ",".join(value) if isinstance(value, list) else str(value),
            ]
    if isinstance(overrides, dict):
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    for item in overrides or []:
        parts += ["--set", item]
    return shlex.join(parts)
