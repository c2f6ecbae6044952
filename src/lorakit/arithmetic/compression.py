"""`compress`: shrink an adapter's rank by a truncated SVD of its update.

Per module, ΔW = s B A is factorised as U S Vᵀ from QR of B and Aᵀ (an r×r SVD, see
``factor.py``) and the best rank-k approximation B' = U_k √S_k, A' = √S_k V_kᵀ (scaling 1) is kept,
k = min(rank, r). The error dropped, ‖ΔW − B'A'‖_F / ‖ΔW‖_F, is reported per module. VeRA and
AdaLoRA adapters become plain LoRA adapters. A DoRA adapter cannot be truncated in place (its
magnitude was trained against the norm of the full update); with ``new_name`` its effective dense
update m/‖W0 + ΔW‖·(W0 + ΔW) − W0 is approximated by a plain rank-k LoRA adapter instead.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ConfigError
from ..state import adapter_configs, lora_layers
from ..targets import low_rank_config
from .build import LayerResult, check_sources, combine
from .factor import svd_of_factors, truncated
from .report import CombineReport, LayerReport
from .updates import adapter_factors, dense_only, low_rank_update

log = logging.getLogger("lorakit.combine")


def compress(model: nn.Module, name: str, rank: int, *, new_name: str | None = None) -> CombineReport:
    """Reduce adapter ``name`` to at most ``rank`` per module, in place (or as ``new_name``).

    The adapter keeps its place among the active adapters, each factor's trainability (a LoRA-FA
    adapter's A stays frozen) and its dropout; its config becomes plain LoRA with per-module ranks
    (``rank_pattern``) and scaling 1 (still ``lora_fa`` if it was). Returns the report of
    relative errors; raises a lorakit error (and changes nothing) for a bad rank, an unknown or
    merged adapter, or a DoRA adapter.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    check_sources(model, [name], combining=new_name is not None)
    if new_name is not None:
        return combine(model, [name], [1.0], "svd", new_name, rank=rank)
    if any(dense_only(layer, name) for _, layer in lora_layers(model)):
        raise ConfigError(
            f"adapter {name!r} is a DoRA adapter, whose magnitudes were trained against the full "
            "update, so it cannot be truncated in place; pass new_name=... to get a plain LoRA adapter "
            "approximating its effective update, or merge it into the base (lorakit export)"
        )
    results = []
    for path, layer in lora_layers(model):
        if name in layer.lora_A:
            U, S, Vh = svd_of_factors(low_rank_update(layer, name))
            stored, error = truncated(U, S, Vh, min(rank, layer.rank(name)))
            report = LayerReport(path, {name: layer.rank(name)}, stored.rank, float(S.norm()), error)
            results.append(LayerResult(path, layer, report, stored))
    old = adapter_configs(model)[name]
    kept = old.variant if old.variant_object.kept_by_compression else "lora"  # LoRA-FA stays LoRA-FA
    config = low_rank_config({r.path: r.stored.rank for r in results}, old, dropout=old.dropout, variant=kept)
    for result in results:  # nothing below can fail on user input
        replace_factors(result, name)
    adapter_configs(model)[name] = config
    report = CombineReport(
        name,
        "compress",
        [name],
        [1.0],
        exact=all(r.report.rel_error == 0 for r in results),
        into_base=False,
        layers=[r.report for r in results],
    )
    log.info("compressed %r to rank <= %d: whole-adapter relative error %.3e", name, rank, report.total_error)
    return report


@torch.no_grad()
def replace_factors(result: LayerResult, name: str) -> None:
    """Swap adapter ``name``'s factors on one layer, keeping its active state, dropout, trainability."""
    layer = result.layer
    active = list(layer.active_adapters)
    # Per factor: LoRA-FA trains B only, and its A must stay frozen after compression too.
    train_A, train_B = layer.lora_A[name].requires_grad, layer.lora_B[name].requires_grad
    dropout = getattr(layer.lora_dropout[name], "p", 0.0)
    A, B = adapter_factors(layer, result.stored, layer.lora_B[name].dtype)
    layer.remove_adapter(name)
    layer.add_adapter(name, A, B, 1.0, dropout, trainable=train_B)
    layer.lora_A[name].requires_grad_(train_A)
    layer.active_adapters = active
