"""Hyperparameter search with Optuna: each trial draws the ``search:`` options and runs them with
every seed; its value is the metric's mean over those seeds.

The study lives in ``storage`` (a database URL; by default a SQLite file in the sweep folder), so
several processes (``--devices``) and machines (``--storage postgresql://...``, or a SQLite file on
a shared disk) work on one study: each asks it for the next trial and reports back. Trials stop at
``trials`` in all, counted over every process (those running included; a few more may finish when
processes start trials at the same moment). The sampler is TPE seeded with ``search_seed`` (plus the
grid point's index and the trial's number): the same seed and the same trial history suggest the
same points, whether the search runs in one go, is continued later, or is shared by workers.

A trial whose process died is found by Optuna's heartbeat (a minute without one, on a database
storage) and retried with the same draws; the retry takes over the dead trial's run folders, so a
half run resumes from its checkpoint. A failed run fails its trial (recorded; the search goes on).
With a grid beside the search, each grid point has its own study (``<fingerprint>-<point>``).
"""

from __future__ import annotations

import logging
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

from .config import SweepConfig
from .plan import grid_points, trial_runs
from .runner import run_one

log = logging.getLogger("lorakit.experiments")
HEARTBEAT_S, GRACE_S = 60, 180


class TrialFailed(RuntimeError):
    """A run of the trial failed (its error is in the run's folder)."""


def storage_url(config: SweepConfig, folder: Path) -> str:
    return config.storage or f"sqlite:///{(Path(folder) / 'optuna.db').resolve()}"


def _storage(url: str):
    import optuna

    if url.split(":", 1)[0].split("+", 1)[0] not in ("sqlite", "postgresql", "mysql"):
        return url  # another storage Optuna understands, taken as it is
    try:  # Optuna >= 4.9's name; the older one is deprecated there
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        retry = {"heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=2)}
    except ImportError:
        from optuna.storages import RetryFailedTrialCallback

        retry = {"failed_trial_callback": RetryFailedTrialCallback(max_retry=2)}
    return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **retry)


def run_search(
    config: SweepConfig,
    folder: Path,
    device: str | None,
    progress: bool,
    on_row: Callable[[dict], None],
) -> None:
    """Work on the sweep's studies until each has ``config.trials`` trials (see the module docstring)."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep reports each run itself
    # Heartbeats and retries are marked experimental; they are what lets a dead trial resume.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = _storage(storage_url(config, folder))
    points = grid_points(config.grids)
    seeds = [config.base.get("seed", 0) + k for k in range(config.seeds)]
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    for index, point in enumerate(points):
        study = optuna.create_study(
            study_name=f"{config.fingerprint()}-{index}",
            storage=storage,
            sampler=optuna.samplers.TPESampler(seed=config.search_seed),  # reseeded per trial below
            direction=config.direction,
            load_if_exists=True,
        )
        prefix = f"p{index:03d}-" if len(points) > 1 else ""

        def objective(trial, point=point, prefix=prefix, study=study, index=index) -> float:
            # A retry of a dead trial takes over the first of its line's run folders, and resumes them.
            frozen = study.get_trials(deepcopy=False)[trial.number]
            history = frozen.system_attrs.get("retry_history", [])  # what the retry callback records
            number = history[0] if history else trial.number
            # Draws seeded by the trial's number: a search continued later, in another process, or
            # beside other workers draws what one uninterrupted process would have (TPE's model is
            # the study's history, the same for all), never an earlier trial's points again.
            seed = (config.search_seed * 1009 + index) * 100_003 + trial.number
            study.sampler = optuna.samplers.TPESampler(seed=seed)
            draws = {name: space.suggest(trial) for name, space in config.search.items()}
            values = []
            for spec in trial_runs(prefix, number, {**point, **draws}, seeds):
                row = run_one(config, folder, spec, device, progress, trial=number)
                if row is None:
                    raise TrialFailed(f"run {spec.name} is held by another process")
                on_row(row)
                if row.get("status") != "ok" or row.get(config.metric) is None:
                    raise TrialFailed(f"run {spec.name}: {row.get('error') or f'no {config.metric}'}")
                values.append(float(row[config.metric]))
            trial.set_user_attr("runs", [f"{prefix}trial-{number:04d}-s{s}" for s in seeds])
            return statistics.fmean(values)

        left = config.trials - len(study.get_trials(deepcopy=False, states=counted))
        if left > 0:
            study.optimize(
                objective,
                n_trials=left,
                callbacks=[MaxTrialsCallback(config.trials, states=counted)],
                catch=(Exception,),  # a failed trial is recorded as FAIL; the search goes on
            )
