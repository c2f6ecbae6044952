"""The combination methods lorakit offers, their parameters, and the validation of a request.

Defaults follow mergekit's registry (``normalize`` on for TIES, ``rescale`` on for DARE) so a
recipe written for mergekit means the same here. See ``docs/arithmetic.md`` for the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .methods import CONSENSUS, RESCALES


@dataclass(frozen=True)
class MethodSpec:
    """How one method computes: which sparsifier, whether signs are elected, its defaults."""

    name: str
    summary: str
    sparsify: str | None = None  # "magnitude" (TIES trim) | "random" (DARE drop) | None
    elect_sign: bool = False  # TIES's sign election and disjoint mean
    normalize: bool = False  # default of the `normalize` option
    rescale: bool = False  # default of the `rescale` option
    low_rank: bool = False  # the result is the exact weighted sum of low-rank updates


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("linear", "task arithmetic λ Σ w_i ΔW_i, exact (ranks concatenate)", low_rank=True),
        MethodSpec("cat", "same update as linear (PEFT's name for the concatenation)", low_rank=True),
        MethodSpec("svd", "linear, re-factorised by SVD to `rank`", low_rank=True),
        MethodSpec(
            "ties", "trim to density by magnitude, elect sign, disjoint mean", "magnitude", True, normalize=True
        ),
        MethodSpec("dare_linear", "random drop to density with rescale, weighted sum", "random", rescale=True),
        MethodSpec("dare_ties", "random drop with rescale, elect sign, disjoint sum", "random", True, rescale=True),
        MethodSpec("magnitude_prune", "trim to density by magnitude, weighted sum", "magnitude"),
        MethodSpec("slerp", "spherical interpolation of two updates at t, per tensor"),
    )
}
# Accepted spellings of the methods and of the majority-sign rule (PEFT's and mergekit's names).
ALIASES = {"task_arithmetic": "linear", "dare": "dare_linear"}
CONSENSUS_ALIASES = {"total": "sum", "frequency": "count"}

COMMON_OPTIONS = {"rank", "lambda_", "normalize"}


@dataclass(frozen=True)
class MergeOptions:
    """A validated request: one entry per source in ``weights`` and ``density``."""

    spec: MethodSpec
    weights: tuple[float, ...]
    density: tuple[float, ...]
    normalize: bool
    rescale: str | None
    lambda_: float
    consensus: str
    seed: int
    t: float
    rank: int | None


def allowed_options(spec: MethodSpec) -> set[str]:
    names = set(COMMON_OPTIONS)
    if spec.sparsify:
        names |= {"density", "rescale"}
    if spec.elect_sign:
        names.add("consensus")
    if spec.sparsify == "random":
        names.add("seed")
    if spec.name == "slerp":
        names = {"t", "rank"}
    return names


def parse_options(method: str, n_sources: int, weights: Any, options: dict[str, Any]) -> MergeOptions:
    """Check every parameter of a combination request; raise ConfigError saying what to fix."""
    if not isinstance(method, str) or ALIASES.get(method, method) not in METHODS:
        raise ConfigError(f"unknown combination method {method!r}; choose one of {', '.join([*METHODS, *ALIASES])}")
    spec = METHODS[ALIASES.get(method, method)]
    options = dict(options)
    if "lambda" in options:  # `lambda` is a Python keyword: accept it through **{"lambda": x} too
        options["lambda_"] = options.pop("lambda")
    unknown = sorted(set(options) - allowed_options(spec))
    if unknown:
        raise ConfigError(
            f"method {spec.name!r} does not take {unknown}; its options are {sorted(allowed_options(spec))}"
        )
    if spec.name == "slerp":
        if n_sources != 2:
            raise ConfigError(f"slerp interpolates exactly two adapters, got {n_sources}")
        if weights is not None:
            raise ConfigError("slerp takes t=... (the position between the two adapters), not weights")
        weights = (1.0, 1.0)
    elif weights is None:
        weights = [1.0] * n_sources
    weights = _numbers("weights", weights, n_sources)
    density = _numbers("density", options.get("density", 1.0), n_sources)
    bad = [d for d in density if not 0 < d <= 1]
    if bad:
        raise ConfigError(f"density must be in (0, 1] (the fraction of entries kept), got {bad[0]!r}")
    rescale = options.get("rescale", spec.rescale)
    if rescale is True:
        rescale = "l1"  # mergekit's rescale: match the L1 norm of what was dropped
    if rescale not in (False, None, *RESCALES):
        raise ConfigError(f"rescale must be true/false or one of {RESCALES}, got {rescale!r}")
    consensus = CONSENSUS_ALIASES.get(options.get("consensus", "sum"), options.get("consensus", "sum"))
    if consensus not in CONSENSUS:
        raise ConfigError(f"consensus must be 'sum' (alias 'total') or 'count' (alias 'frequency'), got {consensus!r}")
    t = _number("t", options.get("t", 0.5))
    if not 0 <= t <= 1:
        raise ConfigError(f"slerp's t must be in [0, 1] (0: first adapter, 1: second), got {t!r}")
    rank = options.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    normalize = options.get("normalize", spec.normalize)
    if not isinstance(normalize, bool):
        raise ConfigError(f"normalize must be true or false, got {normalize!r}")
    return MergeOptions(
        spec,
        weights,
        density,
        normalize,
        rescale or None,
        _number("lambda", options.get("lambda_", 1.0)),
        consensus,
        seed,
        t,
        rank,
    )


def _number(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _numbers(what: str, value: Any, n: int) -> tuple[float, ...]:
    """One number per source: a list of n numbers, or one number used for all."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ConfigError(f"{what} needs one number per source adapter ({n}), got {value!r}")
    return tuple(_number(what, v) for v in value)
