"""Experiments with one command (`lorakit sweep CONFIG.yaml`, `lorakit.sweep(...)`): rank ablations,
target-module choice, LoRA against other methods, hyperparameter search — run, measured, tabled,
plotted and reported.

This package sits above `lorakit.training`: it plans runs, calls `lorakit.train` for each and reads
what the runs wrote; nothing below imports it. One concept per file: config.py (the sweep file),
presets.py (target-module presets), plan.py (grid points, seeds, run names), runner.py (one run:
claimed, trained, measured, recorded), measure.py (peak memory, sizes), search.py (Optuna),
driver.py (plan, run, gather: `sweep`), workers.py / worker.py (a worker process per device),
folder.py (the sweep folder), results.py (the table), plots.py, report.py, example_data.py and
examples/ (the built-in example sweeps).

Named ``experiments``, not ``sweep``: ``lorakit.sweep`` is the function, and a subpackage of that
name would replace it as the package's attribute once imported.
"""

from .config import SweepConfig
from .driver import example_names, load_config, sweep
from .results import ResultsTable

__all__ = ["ResultsTable", "SweepConfig", "example_names", "load_config", "sweep"]
