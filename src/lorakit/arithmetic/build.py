"""`combine`: a new adapter (or a base-weight change) from a weighted combination of adapters.

Everything is computed on the updates ΔW_i = s_i B_i A_i of each adapted module, never on A and B
separately: PEFT's non-SVD combinations sum the A's and the B's, so (Σ B_i)(Σ A_i) carries cross
terms B_i A_j and is not Σ ΔW_i. Per module:

- ``linear`` / ``cat`` / ``svd``: λ Σ w_i ΔW_i is stored exactly as the concatenated-rank adapter
  [c_1 B_1 … c_n B_n]·[A_1; …; A_n] (c_i = λ w_i s_i, divided by Σ w if ``normalize``); ``svd``
  then truncates it to ``rank`` (default: the largest source rank) and reports the error.
- ``ties`` / ``dare_*`` / ``magnitude_prune`` / ``slerp`` (and any combination with a DoRA
  source, whose effect is not low-rank): the dense result is re-factorised by SVD to ``rank``
  (default: the sum of the source ranks, capped by min(d_out, d_in)), error reported — or, with
  ``into_base``, added to the base weight as is.

Checks run before the model is touched; the new adapter is attached with the same two-phase
injection as ``add_adapter``, and ``into_base`` computes every new weight before it writes any, so
a failed call leaves the model as it was.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ADAPTER_DTYPES, LoraConfig
from ..errors import AdapterNameError, AdapterStateError, ConfigError
from ..initialization import module_generator
from ..inject import check_new_name, commit, plan
from ..layers import LoraLayer
from ..layers.parameter import LoraParameter
from ..state import adapter_configs, lora_layers, merged_adapters, require_adapters
from ..targets import exact_targets, low_rank_config
from . import methods
from .factor import LowRank, best_rank_k, concatenated, singular_values, svd_of_factors, truncated
from .options import MergeOptions, parse_options
from .report import CombineReport, LayerReport
from .updates import adapter_factors, dense_only, dense_update, low_rank_update, to_weight_layout

log = logging.getLogger("lorakit.combine")


@dataclass
class LayerResult:
    path: str
    layer: LoraLayer
    report: LayerReport
    stored: LowRank | None = None  # factors of the new adapter
    dense: torch.Tensor | None = None  # or the exact dense result, for into_base

    def delta(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.stored.dense()


def combine(
    model: nn.Module,
    sources: Sequence[str],
    weights: Sequence[float] | None = None,
    method: str = "linear",
    name: str = "combined",
    *,
    into_base: bool = False,
    activate: bool = True,
    **options: Any,
) -> CombineReport:
    """Combine the adapters ``sources`` (names in ``model``) into a new adapter ``name``.

    Args:
        weights: one per source (default all 1); negative weights subtract (task negation).
        method: ``linear`` (alias ``task_arithmetic``), ``cat``, ``svd``, ``ties``, ``dare_linear``,
            ``dare_ties``, ``magnitude_prune`` or ``slerp`` — formulas in ``docs/arithmetic.md``.
        into_base: add the result to the base weights (accumulated in float32) instead of
            creating an adapter: no rank, no approximation (``svd`` merges its rank-k truncation).
            The sources stay in the model, still active if they were. Every new weight is
            computed before the first is written, and held in CPU memory until then (one copy
            of the adapted weights there; an accelerator holds one extra layer at a time).
        activate: make the new adapter the only active one (as ``add_adapter`` does).
        options: ``rank`` (SVD target rank), ``lambda_`` (or ``lambda``; final scale λ), ``normalize``
            (divide by the sum of the weights that contribute); for the sparsifying methods
            ``density`` (fraction kept, one value or one per source) and ``rescale`` (True/"l1",
            "l2", "linf", "density" or False); ``consensus`` ("sum"/"total" or "count") for the TIES
            ones; ``seed`` for DARE; ``t`` in [0, 1] for slerp (no weights).

    Returns a :class:`CombineReport` with each module's ranks and relative error
    ‖ΔW − ΔW_stored‖_F / ‖ΔW‖_F. Raises a lorakit error before changing anything when a name is
    unknown or taken, an option is invalid, an adapter is merged, or a source cannot be combined.
    """
    from tqdm.auto import tqdm

    sources = [sources] if isinstance(sources, str) else list(sources)
    opts = parse_options(method, len(sources), None if weights is None else list(weights), options)
    check_sources(model, sources)
    if not into_base:
        check_new_name(model, name)
    chosen = [(path, layer) for path, layer in lora_layers(model) if any(s in layer.lora_A for s in sources)]
    results: list[LayerResult] = []
    # The dense methods take a full SVD per module (up to seconds on big layers): show progress
    # (disable=None: only when stderr is a terminal).
    bar = tqdm(
        chosen,
        desc=f"combine ({opts.spec.name})",
        unit="module",
        leave=False,
        disable=True if opts.spec.low_rank else None,
    )
    new_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(W0) -> (W0, W0 + ΔW)
    for path, layer in bar:
        result = combine_layer(path, layer, sources, opts, keep=not into_base)
        if into_base:  # hold the new weight, not the dense update (which is float64)
            weight = layer.base_weight
            current = new_weights.get(id(weight), (weight, weight))[1]  # a tied weight adds up both
            # Held on the CPU: a GPU close to full keeps room for the merge.
            new_weights[id(weight)] = (weight, plus(current, to_weight_layout(layer, result.delta())).cpu())
            result.stored = result.dense = None
        results.append(result)
    if into_base:
        assign_all(list(new_weights.values()))
    report = CombineReport(
        None if into_base else name,
        opts.spec.name,
        sources,
        list(opts.weights),
        exact=all(r.report.rel_error == 0 for r in results),
        into_base=into_base,
        layers=[r.report for r in results],
    )
    if not into_base:
        install(model, name, results, adapter_configs(model)[sources[0]], activate)
    log.info(
        "combined %s with %s into %s: %d modules, max relative error %.3e",
        sources,
        opts.spec.name,
        "the base weights" if into_base else repr(name),
        len(results),
        report.max_error,
    )
    return report


def plus(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W0 + ΔW as a new tensor on W0's device: what merging writes (``LoraLayer.weight_plus``)."""
    return LoraLayer.weight_plus(weight, delta)


@torch.no_grad()
def assign_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each new value into its weight, in place (tied weights and other holders see it).

    If anything (Ctrl-C included) stops the loop midway, the weights written so far are put
    back. Each old value is moved into the spent new value's buffer (which may be on another
    device), so this holds one extra layer at a time beside the new values."""
    done: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight, its old value)
    try:
        for weight, new in pairs:
            old = weight.detach().clone()
            done.append((weight, old))
            weight.copy_(new)
            new.copy_(old)
            done[-1] = (weight, new)  # frees ``old``
    except BaseException:
        for weight, old in reversed(done):
            weight.copy_(old)
        raise


def check_sources(model: nn.Module, sources: list[str], combining: bool = True) -> None:
    """Raise a lorakit error if these adapters cannot be combined (nothing is changed).

    ``combining=False`` (compress in place) lets an adapter keep its modules_to_save copies."""
    if not sources or not all(isinstance(s, str) for s in sources):
        raise AdapterNameError(f"give the adapters to combine as a non-empty list of names, got {sources!r}")
    twice = [s for s, n in Counter(sources).items() if n > 1]
    if twice:
        raise ConfigError(f"adapter(s) {twice} appear more than once; give each source once with its total weight")
    require_adapters(model, sources)
    merged = merged_adapters(model)
    if merged:
        raise AdapterStateError(
            f"adapter(s) {merged} are merged into the base weights, which combining reads; "
            "call lorakit.unmerge(model) first"
        )
    configs = adapter_configs(model)
    for source in sources:
        if combining and configs[source].modules_to_save:
            raise ConfigError(
                f"adapter {source!r} also trains full copies of {configs[source].modules_to_save} "
                "(modules_to_save), which are not low-rank updates and cannot be combined; "
                "combine adapters without modules_to_save, or export this one alone"
            )
        if any(source in layer.lora_A and isinstance(layer, LoraParameter) for _, layer in lora_layers(model)):
            raise ConfigError(
                f"adapter {source!r} adapts parameters (target_parameters), one update per expert, "
                "which combining and compressing do not handle yet; export it alone (lorakit export) "
                "or combine adapters without target_parameters"
            )
        if any(source in layer.init_factors for _, layer in lora_layers(model)):
            raise ConfigError(
                f"adapter {source!r} was initialised with {configs[source].init}, which moved part of "
                "the base weight into it; save it and load it back (the file holds its update against "
                "the original base), then combine the loaded copy"
            )
        if combining and configs[source].bias != "none":
            log.warning(
                "adapter %r trains biases (bias=%r); they live in the base model and are not combined",
                source,
                configs[source].bias,
            )


@torch.no_grad()
def combine_layer(
    path: str, layer: LoraLayer, sources: list[str], opts: MergeOptions, keep: bool = True
) -> LayerResult:
    """The combined update of one module, stored as factors (``keep``) or as the exact result.

    Sources without an adapter on this module count as a zero update (they still take part in
    ``normalize``'s divisor, as a model equal to the base would in mergekit)."""
    present = [i for i, s in enumerate(sources) if s in layer.lora_A]
    source_ranks = {sources[i]: layer.rank(sources[i]) for i in present}
    spec = opts.spec
    if spec.low_rank and not any(dense_only(layer, sources[i]) for i in present):
        total = sum(opts.weights)
        divisor = total if opts.normalize and abs(total) >= 1e-8 else 1.0
        exact = concatenated(
            [low_rank_update(layer, sources[i]) for i in present],
            [opts.weights[i] * opts.lambda_ / divisor for i in present],
        )
        if spec.name != "svd":
            norm = float(singular_values(exact).norm())
            return LayerResult(
                path, layer, LayerReport(path, source_ranks, exact.rank if keep else 0, norm, 0.0), exact
            )
        U, S, Vh = svd_of_factors(exact)
        stored, error = truncated(U, S, Vh, opts.rank or max(source_ranks.values()))
        return LayerResult(
            path, layer, LayerReport(path, source_ranks, stored.rank if keep else 0, float(S.norm()), error), stored
        )
    mixed = dense_result(path, layer, sources, opts)
    norm = float(mixed.norm())
    if not keep:
        return LayerResult(path, layer, LayerReport(path, source_ranks, 0, norm, 0.0), dense=mixed)
    default_rank = (max if spec.name == "svd" else sum)(source_ranks.values())
    stored, error = best_rank_k(mixed, opts.rank or default_rank)
    return LayerResult(path, layer, LayerReport(path, source_ranks, stored.rank, norm, error), stored)


def dense_result(path: str, layer: LoraLayer, sources: list[str], opts: MergeOptions) -> torch.Tensor:
    """The method applied to the dense updates of one module (float64, factor layout)."""
    found = [dense_update(layer, s) if s in layer.lora_A else None for s in sources]
    first = next(d for d in found if d is not None)
    deltas = [torch.zeros_like(first) if d is None else d for d in found]
    if opts.spec.name == "slerp":
        return methods.slerp(opts.t, deltas[0], deltas[1])
    if opts.spec.sparsify == "magnitude":
        deltas = [methods.trim_magnitude(d, p, opts.rescale) for d, p in zip(deltas, opts.density)]
    elif opts.spec.sparsify == "random":
        # One stream per (seed, module, source): the masks do not depend on module order.
        deltas = [
            methods.drop_random(d, p, opts.rescale, module_generator(opts.seed, f"{path}#{i}"))
            for i, (d, p) in enumerate(zip(deltas, opts.density))
        ]
    weights = torch.tensor(opts.weights, dtype=first.dtype, device=first.device)
    return methods.generalized(
        torch.stack(deltas),
        weights,
        consensus=opts.consensus if opts.spec.elect_sign else None,
        normalize=opts.normalize,
        lambda_=opts.lambda_,
    )


def install(model: nn.Module, name: str, results: list[LayerResult], template: LoraConfig, activate: bool) -> None:
    """Attach the combined factors as adapter ``name`` (plan, then commit: all or nothing)."""
    first = results[0]
    dtype = str(first.layer.lora_B[next(iter(first.report.source_ranks))].dtype).replace("torch.", "")
    config = low_rank_config(
        {r.path: r.stored.rank for r in results},
        template,
        target_modules=exact_targets(model, [r.path for r in results]),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=None,
        bias="none",
        seed=None,
        adapter_dtype=dtype if dtype in ADAPTER_DTYPES else "auto",
    )
    planned = plan(model, config, name, draw_factors=False)
    stored = {r.path: r.stored for r in results}
    for p in planned.layers:
        p.A, p.B = adapter_factors(p.layer, stored[p.path], p.A.dtype)
    commit(model, planned, trainable=False, activate=activate)
