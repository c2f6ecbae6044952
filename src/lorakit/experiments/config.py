"""`SweepConfig`: one sweep file — a base training config, grid axes and/or a search space.

    title: Rank ablation on the demo task
    base:                       # any `lorakit train` option, shared by every run
      model: smollm2-135m
      max_steps: 24
      lr: 2e-3
    grid:                       # axes: every combination is a run (a list of mappings: their union)
      r: [2, 4, 8, 16, 32, 64]
      target_modules: [qv, all-linear]      # presets: lorakit.experiments.presets
      "r,alpha": [[8, 16], [16, 32]]        # options that vary together: one axis
    search:                     # Optuna (--search N trials); a space per option
      lr: {low: 1e-4, high: 1e-2, log: true}
      r: {choices: [4, 8, 16]}
    seeds: 1                    # each point repeated with seeds base.seed, base.seed + 1, ... (--seeds K)
    metric: exact_match         # what ranks runs (default: exact_match for causal-lm, accuracy for classify)

Everything is checked before a run starts, and an error names the key: an unknown sweep key or
training option, an empty axis, a value that fails the option's own validation, a bad preset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .presets import resolve_targets

TOP_KEYS = {
    "title": "the report's title",
    "notes": "text the report shows under its title",
    "base": "training options every run shares (any `lorakit train` option)",
    "grid": "axes: option -> list of values; a list of such mappings joins their grids",
    "search": "Optuna search: option -> {low, high, log, step} or {choices: [...]}",
    "trials": "search trials in all (--search N)",
    "search_seed": "the search sampler's seed (the same seed and history suggest the same points)",
    "seeds": "repeats of each point, seeds base.seed, base.seed+1, ... (--seeds K)",
    "metric": "what ranks the runs: exact_match, accuracy, macro_f1, token_accuracy, eval_loss, train_loss, ...",
    "direction": "maximize or minimize the metric (default: from the metric's name)",
    "storage": "Optuna storage URL shared by processes and machines (default: sqlite in the sweep folder)",
    "output_dir": "the sweep folder (--out)",
    "keep_weights": "false: delete each run's saved weights and checkpoints once it is measured",
    "example_data": "built-in data written into the sweep folder: {kind: demo | demo-classify, n_train, n_test}",
}
# What the sweep decides for each run: never the config's.
MANAGED = {
    "output_dir": "each run's folder is the sweep's (set the sweep folder with output_dir: at the top or --out)",
    "resume": "the sweep resumes half runs by itself",
    "overwrite": "the sweep never overwrites a finished run; a different sweep needs another folder",
}
# The metrics lorakit's tasks report (lorakit.tasks), and which way is better.
METRICS = {
    "exact_match": "maximize",
    "accuracy": "maximize",  # classify; reward: how often the chosen answer scores higher
    "macro_f1": "maximize",
    "token_accuracy": "maximize",
    "entity_f1": "maximize",
    "entity_precision": "maximize",
    "entity_recall": "maximize",
    "margin": "maximize",
    "rewards/accuracies": "maximize",  # dpo, in TRL's names
    "rewards/margins": "maximize",
    "eval_loss": "minimize",
    "perplexity": "minimize",
    "train_loss": "minimize",
}
DEFAULT_METRIC = {
    "causal-lm": "exact_match",
    "classify": "accuracy",
    "token-classify": "token_accuracy",
    "reward": "accuracy",
    "dpo": "rewards/accuracies",
}
SPACE_KEYS = {"choices", "low", "high", "log", "step"}


@dataclass
class SearchSpace:
    """One searched option: ``choices`` (categorical) or a range ``low``..``high`` (ints when both
    are ints; ``log``: sampled on a log scale; ``step``: a grid inside the range)."""

    name: str
    choices: list | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def suggest(self, trial) -> Any:
        """The value an Optuna trial draws for this option."""
        if self.choices is not None:
            # Optuna's categorical choices must be plain values; lists and mappings go by their index.
            plain = all(isinstance(c, (str, int, float, bool)) or c is None for c in self.choices)
            if plain:
                return trial.suggest_categorical(self.name, self.choices)
            return self.choices[trial.suggest_categorical(self.name, list(range(len(self.choices))))]
        if self.integer:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def edge_values(self) -> list:
        """Values that stand for the space in validation: every choice, or both ends."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def to_dict(self) -> dict:
        if self.choices is not None:
            return {"choices": self.choices}
        out = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass
class SweepConfig:
    """A parsed, checked sweep file; see the module docstring."""

    base: dict[str, Any]
    grids: list[dict[str, list]] = field(default_factory=list)
    search: dict[str, SearchSpace] = field(default_factory=dict)
    trials: int = 0
    search_seed: int = 0
    seeds: int = 1
    metric: str = "exact_match"
    direction: str = "maximize"
    storage: str | None = None
    output_dir: str | None = None
    keep_weights: bool = True
    example_data: dict | None = None
    title: str = ""
    notes: str = ""
    source: str = ""
    changed: list[str] = field(default_factory=list)  # what the command line changed (--set): the report says

    @property
    def linked(self) -> list[list[str]]:
        """Options that vary together (a grid key such as ``"r,alpha"``)."""
        return [[n.strip() for n in key.split(",")] for grid in self.grids for key in grid if "," in key]

    @classmethod
    def from_file(cls, path: str | Path, **changes: Any) -> "SweepConfig":
        from ..training.config import read_config_file

        return cls.from_mapping(read_config_file(path), source=str(path), **changes)

    @classmethod
    def from_mapping(cls, data: dict, source: str = "<mapping>", **changes: Any) -> "SweepConfig":
        """Parse and check ``data``; ``changes`` (``seeds``, ``trials``, ``storage``, ``output_dir``:
        the command line's flags, None = unset) win over the file."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a sweep config is a mapping (base:, grid:, search:, ...)")
        unknown = sorted(set(data) - set(TOP_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown sweep key(s) {unknown}: training options go under base:, axes under grid:, search spaces "
                f"under search:; sweep keys: {', '.join(TOP_KEYS)}"
            )
        data = {**data, **{k: v for k, v in changes.items() if v is not None}}
        base = data.get("base") or {}
        if not isinstance(base, dict):
            raise ConfigError(f"base must be a mapping of training options, got {base!r}")
        config = cls(
            base=dict(base),
            trials=_int(data, "trials", 0, minimum=0),
            search_seed=_int(data, "search_seed", 0, minimum=0),
            seeds=_int(data, "seeds", 1, minimum=1),
            storage=_str(data, "storage"),
            output_dir=_str(data, "output_dir"),
            keep_weights=_bool(data, "keep_weights", True),
            title=_str(data, "title") or (Path(source).stem if source != "<mapping>" else "sweep"),
            notes=_str(data, "notes") or "",
            source=source,
        )
        config.example_data = _example_data(data.get("example_data"), config.base)
        config._check_base()
        config.grids = config._parse_grid(data.get("grid"))
        config.search = config._parse_search(data.get("search"))
        if config.search and not config.trials:
            raise ConfigError("search: set the number of trials (trials: N in the file, or --search N)")
        if config.trials and not config.search:
            raise ConfigError("trials (--search N) needs a search: section saying which options to search and how")
        config._set_metric(data.get("metric"), data.get("direction"))
        return config

    # -- checks ---------------------------------------------------------------------------------

    def _check_base(self) -> None:
        from ..training.config import TrainConfig

        known = {f for f in TrainConfig.__dataclass_fields__ if f != "extra"}
        for key in self.base:
            if key in MANAGED:
                raise ConfigError(f"base.{key}: {MANAGED[key]}")
            if key not in known:
                raise ConfigError(f"base.{key}: unknown training option; known options: {sorted(known)}")
        if "target_modules" in self.base:
            resolve_targets(self.base["target_modules"], "base.target_modules")
        try:
            self.train_config({})
        except ConfigError as exc:
            raise ConfigError(f"base: {exc}") from None

    def _parse_grid(self, grid: Any) -> list[dict[str, list]]:
        if grid is None:
            return []
        grids = grid if isinstance(grid, list) else [grid]
        if not grids:
            raise ConfigError("grid is empty: give axes (option: [values, ...]) or leave grid out")
        parsed = []
        for i, one in enumerate(grids):
            where = "grid" if not isinstance(grid, list) else f"grid[{i}]"
            if not isinstance(one, dict) or not one:
                raise ConfigError(f"{where} must be a non-empty mapping of option: [values, ...], got {one!r}")
            for key, values in one.items():
                names = [name.strip() for name in str(key).split(",")]  # "r,alpha": options that vary together
                for name in names:
                    self._check_axis_key(f"{where}.{key}", name)
                if not isinstance(values, list):
                    raise ConfigError(
                        f"{where}.{key} must be a list of values, got {values!r} (one value goes in base:)"
                    )
                if not values:
                    raise ConfigError(f"{where}.{key} is empty: give at least one value")
                for j, value in enumerate(values):
                    if len(names) == 1:
                        self._check_value(f"{where}.{key}[{j}]", key, value)
                    elif not isinstance(value, list) or len(value) != len(names):
                        raise ConfigError(
                            f"{where}.{key}[{j}] must be a list of {len(names)} values ({key} vary together), "
                            f"got {value!r}"
                        )
                    else:
                        for name, part in zip(names, value):
                            self._check_value(f"{where}.{key}[{j}]", name, part)
            parsed.append({key: list(values) for key, values in one.items()})
        from .plan import grid_points

        for point in grid_points(parsed):  # combinations can fail where single values pass (variant + option)
            try:
                self.train_config(point)
            except ConfigError as exc:
                shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
                raise ConfigError(f"grid point ({shown}): {exc}") from None
        return parsed

    def _parse_search(self, search: Any) -> dict[str, SearchSpace]:
        if search is None:
            return {}
        if not isinstance(search, dict) or not search:
            raise ConfigError(f"search must be a non-empty mapping of option: space, got {search!r}")
        axes = {key for grid in self.grids for key in grid}
        spaces = {}
        for key, spec in search.items():
            where = f"search.{key}"
            self._check_axis_key(where, key)
            if key in axes:
                raise ConfigError(f"{where}: {key} is a grid axis too; search it or grid it, not both")
            spaces[key] = _space(where, key, spec)
            for value in spaces[key].edge_values():
                self._check_value(where, key, value)
        return spaces

    def _check_axis_key(self, where: str, key: str) -> None:
        from ..training.config import TrainConfig

        if key == "seed":
            raise ConfigError(f"{where}: seeds are repeated with seeds: K (or --seeds K), not as an axis")
        if key in MANAGED:
            raise ConfigError(f"{where}: {MANAGED[key]}")
        if key not in TrainConfig.__dataclass_fields__ or key == "extra":
            raise ConfigError(f"{where}: unknown training option {key!r}")

    def _check_value(self, where: str, key: str, value: Any) -> None:
        try:
            self.train_config({key: value})
        except ConfigError as exc:
            raise ConfigError(f"{where} = {value!r}: {exc}") from None

    def _set_metric(self, metric: Any, direction: Any) -> None:
        task = self.base.get("task", "causal-lm")
        self.metric = metric if metric is not None else DEFAULT_METRIC.get(task, "eval_loss")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"metric must be the name of a result column such as exact_match, got {metric!r}")
        if direction is None:
            if self.metric not in METRICS:
                raise ConfigError(
                    f"metric {self.metric!r} is not one lorakit knows the direction of ({', '.join(METRICS)}): "
                    "set direction: maximize or minimize"
                )
            direction = METRICS[self.metric]
        if direction not in ("maximize", "minimize"):
            raise ConfigError(f"direction must be maximize or minimize, got {direction!r}")
        self.direction = direction
        has_valid = self.example_data or self.base.get("valid_data") or self.base.get("valid_ratio")
        if self.metric != "train_loss" and not has_valid:
            raise ConfigError(
                f"metric {self.metric} is measured on validation data: set base.valid_data or base.valid_ratio "
                "(or rank by metric: train_loss)"
            )

    # -- use ------------------------------------------------------------------------------------

    def train_options(self, point: dict[str, Any], folder: Path | None = None) -> dict[str, Any]:
        """The training options of one run: base, then the point's values, presets resolved."""
        values = {**self.base, **point}
        if "target_modules" in values:
            values["target_modules"] = resolve_targets(values["target_modules"])
        if self.example_data and folder is not None:
            from .example_data import example_paths

            values.update(example_paths(self.example_data, folder))
        return values

    def train_config(self, point: dict[str, Any]):
        """The TrainConfig of ``point`` over base (validation only: data paths may not exist yet)."""
        from ..training.config import TrainConfig

        values = self.train_options(point)
        if self.example_data:
            values.setdefault("data", "example.jsonl")
            values.setdefault("valid_data", "example-valid.jsonl")
        return TrainConfig.from_sources(values)

    @property
    def axes(self) -> list[str]:
        """The options that vary between runs, in the order the file names them."""
        names = [name.strip() for grid in self.grids for key in grid for name in key.split(",")] + list(self.search)
        return list(dict.fromkeys(names))

    def identity(self) -> dict[str, Any]:
        """What makes two sweeps the same sweep (seeds and trials may grow: they add runs)."""
        return {
            "base": self.base,
            "grid": self.grids,
            "search": {k: v.to_dict() for k, v in self.search.items()},
            "search_seed": self.search_seed,
            "metric": self.metric,
            "direction": self.direction,
            "example_data": self.example_data,
        }

    def fingerprint(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The sweep as a file would say it (written into the sweep folder as sweep.yaml)."""
        out: dict[str, Any] = {"title": self.title}
        if self.notes:
            out["notes"] = self.notes
        out["base"] = self.base
        if self.example_data:
            out["example_data"] = self.example_data
        if self.grids:
            out["grid"] = self.grids[0] if len(self.grids) == 1 else self.grids
        if self.search:
            out.update(search={k: v.to_dict() for k, v in self.search.items()}, trials=self.trials)
            out["search_seed"] = self.search_seed
        out.update(seeds=self.seeds, metric=self.metric, direction=self.direction, keep_weights=self.keep_weights)
        if self.storage:
            out["storage"] = self.storage
        return out


def _space(where: str, key: str, spec: Any) -> SearchSpace:
    if isinstance(spec, list):  # a bare list: choices
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be {{low: .., high: ..}} or {{choices: [...]}}, got {spec!r}")
    unknown = sorted(set(spec) - SPACE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a space takes {sorted(SPACE_KEYS)}")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise ConfigError(f"{where}: choices stand alone (no low/high/log/step beside them)")
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"{where}.choices must be a non-empty list, got {spec['choices']!r}")
        return SearchSpace(key, choices=list(spec["choices"]))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: give low and high (a range) or choices")
    low, high = (_number(f"{where}.{end}", spec[end]) for end in ("low", "high"))
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(f"{where}.step", step)
        if step <= 0 or log:
            raise ConfigError(f"{where}.step must be positive, and a log-scale range takes no step")
    return SearchSpace(key, low=low, high=high, log=log, step=step)


def _number(where: str, value: Any) -> int | float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    return value


def _int(data: dict, key: str, default: int, minimum: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _str(data: dict, key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _bool(data: dict, key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _example_data(spec: Any, base: dict) -> dict | None:
    from .example_data import KINDS

    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise ConfigError(f"example_data.kind must be one of {', '.join(KINDS)}, got {spec!r}")
    unknown = sorted(set(spec) - {"kind", "n_train", "n_test", "seed"})
    if unknown:
        raise ConfigError(f"example_data: unknown key(s) {unknown}; it takes kind, n_train, n_test, seed")
    for key in ("n_train", "n_test"):
        value = spec.get(key, KINDS[spec["kind"]][key])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"example_data.{key} must be a positive integer, got {value!r}")
    taken = [key for key in ("data", "valid_data", "valid_ratio") if key in base]
    if taken:
        raise ConfigError(f"base.{taken[0]}: example_data writes the data itself; leave {', '.join(taken)} out")
    return {"kind": spec["kind"], **{k: spec.get(k, KINDS[spec["kind"]][k]) for k in ("n_train", "n_test", "seed")}}
