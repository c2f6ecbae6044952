"""AdaLoRA (Zhang et al. 2023): adapters in SVD form whose ranks are pruned to a budget.

    ΔW = s · P diag(E) Q      P = lora_B (d_out × r), E = lora_E (r,), Q = lora_A (r × d_in)

Training keeps, for every parameter, an exponential moving average of its sensitivity
``I = |w · ∂L/∂w|`` (β1) and of that estimate's uncertainty ``U = |I − Ī|`` (β2). The score of rank
i of a layer is ``s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` with ``s = Ī · Ū``. Every ``delta_t``
steps the lowest-scoring ranks across *all* layers get E_i = 0, so that the number left equals the
budget: the initial total (r per layer) for ``tinit`` steps, then a cubic decrease to
``target_r`` per layer on average, reached ``tfinal`` steps before the end. The regulariser
``‖QQᵀ − I‖_F + ‖PᵀP − I‖_F`` (mean over matrices, weight ``orth_reg_weight``) keeps P and Q near
orthogonal so that E behaves like singular values. Ranks are budgeted globally: layers that
matter keep more.

The result saves as a plain LoRA adapter whose per-module ranks are the ranks left (see
``io/save.py``), so it loads anywhere.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import register_variant
from ..errors import ConfigError
from ..layers.variant import Variant
from ..safe_files.atomic import write_text_atomically
from ..state import lora_layers
from ..targets import exact_pattern
from .hooks import TrainingHooks

log = logging.getLogger("lorakit.variants.adalora")
SLOT = "lora_E"


@dataclass
class AdaLoraSchedule:
    """The budget schedule and importance smoothing (names as in the paper and PEFT)."""

    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.delta_t, bool) or not isinstance(self.delta_t, int) or self.delta_t <= 0:
            raise ConfigError(f"adalora_delta_t must be a positive integer, got {self.delta_t!r}")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"adalora_{name} must be an integer >= 0, got {value!r}")


class AdaLora(Variant):
    """LoRA plus a singular-value vector E (``lora_E[name]``, (r,)) that scales A's rows."""

    name = "adalora"
    title = "AdaLoRA"
    legacy_flag = "adalora"
    layer_kinds = ("LoraLinear", "LoraQuantizedLinear")
    parameter_targets = False
    own_init = True
    hot_swappable = False
    nested_ranks = False  # pruning zeroes E anywhere: no prefix of the ranks is an adapter
    slots = (SLOT,)

    def own_factors(self, layer: Any, r: int, generator: torch.Generator | None):
        """P and Q small and random (the paper's code); E = 0 then makes the update 0."""
        shape_a, shape_b = layer.adapter_shapes(r)
        A, B = torch.empty(shape_a), torch.empty(shape_b)
        nn.init.normal_(A, std=0.02, generator=generator)
        nn.init.normal_(B, std=0.02, generator=generator)
        return A, B

    def attach(self, layer: Any, name: str, planned_layer: Any, trainable: bool) -> None:
        A = layer.lora_A[name]
        layer.slot(SLOT)[name] = nn.Parameter(
            torch.zeros(A.shape[0], dtype=A.dtype, device=A.device), requires_grad=trainable
        )

    def live_factors(self, layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        A, B, s = super().live_factors(layer, name)
        E = layer.__dict__["_modules"][SLOT][name]
        return A * E[: A.shape[0], None], B, s  # P diag(E) Q: gradients reach E, P and Q

    def fused_factors(self, layer: Any, name: str):
        return (*self.live_factors(layer, name), None)

    def saved_factors(self, layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        return plain_factors(layer, name)

    def saved_config(self, config: Any, ranks: dict[str, int], paths: list[str]) -> Any:
        # Scaling is folded into A', so each module gets alpha = its rank (sqrt with rsLoRA): s' = 1.
        return config.replace(
            rank_pattern=exact_pattern(ranks, paths),
            alpha_pattern=exact_pattern({p: (k**0.5 if config.use_rslora else k) for p, k in ranks.items()}, paths),
        )

    training_options = AdaLoraSchedule
    option_prefix = "adalora_"
    option_keys = {"orth_reg_weight": "adalora_orth_reg"}  # the key older training configs have
    option_help = {
        "target_r": "AdaLoRA: average rank per module left at the end (r is the initial rank)",
        "tinit": "AdaLoRA: steps at the full budget before pruning starts",
        "tfinal": "AdaLoRA: steps at the final budget at the end of training",
        "delta_t": "AdaLoRA: steps between two rank reallocations",
        "beta1": "AdaLoRA: smoothing of the importance estimate",
        "beta2": "AdaLoRA: smoothing of the importance's uncertainty",
        "orth_reg_weight": "AdaLoRA: weight of the orthogonality regulariser on A and B",
    }

    def check_training_options(self, options: AdaLoraSchedule, config: Any) -> None:
        if not (isinstance(options.target_r, int) and 0 < options.target_r <= config.r):
            raise ConfigError(f"adalora_target_r must be between 1 and r={config.r}, got {options.target_r!r}")

    def trainer(self, model: nn.Module, name: str, run, total_steps: int) -> TrainingHooks:
        return AdaLoraTraining(model, name, run.variant_options(self.name), total_steps)


def budget(step: int, total_steps: int, initial: int, target: int, schedule: AdaLoraSchedule) -> int:
    """Total ranks allowed after ``step`` (0-based): initial, cubic decrease, then target."""
    if step < schedule.tinit:
        return initial
    if step >= total_steps - schedule.tfinal:
        return target
    span = max(1, total_steps - schedule.tfinal - schedule.tinit)
    progress = (step - schedule.tinit) / span
    return int(target + (initial - target) * (1 - progress) ** 3)


def adalora_layers(model: nn.Module, name: str) -> list[tuple[str, Any]]:
    """(path, layer) of every layer where ``name`` is an AdaLoRA adapter."""
    return [
        (path, layer)
        for path, layer in lora_layers(model)
        if name in layer.lora_A and isinstance(layer.variants[name], AdaLora)
    ]


def orthogonal_penalty(model: nn.Module, name: str) -> torch.Tensor:
    """Mean over the adapter's P and Q of ``‖QQᵀ − I‖_F`` and ``‖PᵀP − I‖_F``."""
    terms = []
    for _, layer in adalora_layers(model, name):
        Q, P = layer.lora_A[name], layer.lora_B[name]
        eye = torch.eye(Q.shape[0], device=Q.device, dtype=Q.dtype)
        terms += [torch.linalg.matrix_norm(Q @ Q.T - eye), torch.linalg.matrix_norm(P.T @ P - eye)]
    return torch.stack(terms).mean()


class RankAllocator:
    """Tracks importance of every rank of adapter ``name`` and masks the least important ones."""

    def __init__(self, model: nn.Module, name: str, schedule: AdaLoraSchedule, total_steps: int) -> None:
        self.name, self.schedule, self.total_steps = name, schedule, total_steps
        self.layers = adalora_layers(model, name)
        self.initial = sum(layer.rank(name) for _, layer in self.layers)
        self.target = min(self.initial, schedule.target_r * len(self.layers))
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.unc: dict[tuple[str, str], torch.Tensor] = {}

    def _params(self, layer) -> dict[str, torch.Tensor]:
        return {"Q": layer.lora_A[self.name], "P": layer.lora_B[self.name], "E": layer.lora_E[self.name]}

    @torch.no_grad()
    def update_importance(self) -> None:
        """Fold this step's sensitivities into the moving averages (call after backward)."""
        b1, b2 = self.schedule.beta1, self.schedule.beta2
        for path, layer in self.layers:
            for kind, param in self._params(layer).items():
                if param.grad is None:
                    continue
                sensitivity = (param * param.grad).abs().float()
                key = (path, kind)
                if key not in self.ipt:
                    self.ipt[key], self.unc[key] = torch.zeros_like(sensitivity), torch.zeros_like(sensitivity)
                self.ipt[key].mul_(b1).add_(sensitivity, alpha=1 - b1)
                self.unc[key].mul_(b2).add_((sensitivity - self.ipt[key]).abs(), alpha=1 - b2)

    def _scores(self, path: str, layer) -> torch.Tensor:
        score = {k: self.ipt[(path, k)] * self.unc[(path, k)] for k in ("Q", "P", "E") if (path, k) in self.ipt}
        r = layer.rank(self.name)
        zero = torch.zeros(r, device=layer.lora_E[self.name].device)
        return (
            score.get("E", zero)
            + (score["Q"].mean(dim=1) if "Q" in score else zero)
            + (score["P"].mean(dim=0) if "P" in score else zero)
        )

    @torch.no_grad()
    def mask(self, step: int) -> int:
        """At pruning steps, zero the E of the lowest-scoring ranks beyond the budget; returns
        the budget in force."""
        allowed = budget(step, self.total_steps, self.initial, self.target, self.schedule)
        # The optimizer moves a zeroed E_i again at the next step, so pruning only every delta_t
        # steps would let pruned ranks regrow before the end: in the final phase (and at the last
        # step) prune every step, so the adapter ends at its budget whatever delta_t is.
        due = step % self.schedule.delta_t == 0 or step >= self.total_steps - max(1, self.schedule.tfinal)
        if step < self.schedule.tinit or not due or not self.ipt or allowed >= self.initial:
            return allowed
        scores = [self._scores(path, layer) for path, layer in self.layers]
        threshold = torch.kthvalue(torch.cat(scores).cpu(), self.initial - allowed).values
        for (_, layer), score in zip(self.layers, scores):
            layer.lora_E[self.name].masked_fill_(score.to(layer.lora_E[self.name].device) <= threshold, 0.0)
        return allowed

    def state_dict(self) -> dict:
        return {"ipt": self.ipt, "unc": self.unc}

    def load_state_dict(self, state: dict) -> None:
        self.ipt, self.unc = state["ipt"], state["unc"]


def current_ranks(model: nn.Module, name: str) -> dict[str, int]:
    """Module path -> ranks left (non-zero singular values) of AdaLoRA adapter ``name``."""
    return {path: int(torch.count_nonzero(layer.lora_E[name])) for path, layer in adalora_layers(model, name)}


def plain_factors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A', B', k): the kept ranks as a plain LoRA pair with the scaling folded into A'.

    ``s · P diag(E) Q`` restricted to E ≠ 0 equals ``B' A'`` exactly; a layer with no rank left
    becomes a rank-1 zero update (PEFT needs r ≥ 1)."""
    E = layer.lora_E[name].detach()
    kept = E != 0
    A = layer.lora_A[name].detach()[kept] * (E[kept] * layer.scaling[name])[:, None]
    B = layer.lora_B[name].detach()[:, kept]
    if A.shape[0] == 0:
        A, B = torch.zeros_like(layer.lora_A[name][:1]), torch.zeros_like(layer.lora_B[name][:, :1])
    return A, B, A.shape[0]


class AdaLoraTraining(TrainingHooks):
    """The rank allocator and the orthogonality term around each step; the ranks left are
    written to ``adalora_ranks_<name>.json`` at the end."""

    checkpoint_key = "adalora"

    def __init__(self, model: nn.Module, name: str, schedule: AdaLoraSchedule, total_steps: int) -> None:
        super().__init__(name)
        self.model, self.schedule = model, schedule
        self.allocator = RankAllocator(model, name, schedule, total_steps)

    def loss_term(self) -> torch.Tensor:
        return self.schedule.orth_reg_weight * orthogonal_penalty(self.model, self.name)

    def after_backward(self) -> None:
        self.allocator.update_importance()

    def after_step(self, step: int) -> None:
        self.allocator.mask(step)

    def state_dict(self) -> dict:
        return self.allocator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.allocator.load_state_dict(state)

    def finish(self, out_dir: Path, write: bool) -> str:
        ranks = current_ranks(self.model, self.name)
        log.info(
            "AdaLoRA %r: %d ranks left over %d modules (budget %d)",
            self.name,
            sum(ranks.values()),
            len(ranks),
            self.allocator.target,
        )
        path = out_dir / f"adalora_ranks_{self.name}.json"
        if write:
            write_text_atomically(path, json.dumps(ranks, indent=2) + "\n")
        return (
            f"AdaLoRA: {sum(ranks.values())} ranks left over {len(ranks)} modules "
            f"(min {min(ranks.values())}, max {max(ranks.values())}); per module: {path}"
        )


register_variant(AdaLora())
