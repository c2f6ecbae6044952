"""What a combination or compression did, layer by layer: ranks kept and the error dropped."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    """One adapted module.

    ``rel_error`` is ‖ΔW − ΔW_stored‖_F / ‖ΔW‖_F, where ΔW is the method's exact result (0 when the
    stored adapter is exact, and when the result went into the base weight as is); ``norm`` is
    ‖ΔW‖_F and ``dropped`` = ‖ΔW − ΔW_stored‖_F."""

    path: str
    source_ranks: dict[str, int]
    rank: int  # rank of the stored adapter (0 when merged into the base)
    norm: float
    rel_error: float

    @property
    def dropped(self) -> float:
        return self.rel_error * self.norm


@dataclass
class CombineReport:
    """Returned by ``lorakit.combine`` and ``lorakit.compress``."""

    name: str | None  # the new adapter (None when merged into the base)
    method: str
    sources: list[str]
    weights: list[float]
    exact: bool  # every layer stored without approximation
    into_base: bool
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((layer.rel_error for layer in self.layers), default=0.0)

    @property
    def total_error(self) -> float:
        """sqrt(Σ dropped²) / sqrt(Σ norm²) over all layers: the whole adapter's relative error."""
        total = sum(layer.norm**2 for layer in self.layers)
        return math.sqrt(sum(layer.dropped**2 for layer in self.layers) / total) if total > 0 else 0.0

    @property
    def ranks(self) -> dict[str, int]:
        """Rank of each stored layer (module path -> rank)."""
        return {layer.path: layer.rank for layer in self.layers}

    def to_dict(self) -> dict:
        return {**asdict(self), "max_error": self.max_error, "total_error": self.total_error}

    def table(self) -> str:
        """A markdown table, one row per layer, and a summary line."""
        where = "merged into the base weights" if self.into_base else f"adapter {self.name!r}"
        lines = [
            f"{self.method} of {', '.join(self.sources)} (weights {', '.join(f'{w:g}' for w in self.weights)})"
            f" -> {where}",
            "",
            "| module | source ranks | rank | ‖ΔW‖_F | rel. error |",
            "|---|---|---|---|---|",
        ]
        for layer in self.layers:
            ranks = " + ".join(str(r) for r in layer.source_ranks.values())
            lines.append(f"| {layer.path} | {ranks} | {layer.rank or '-'} | {layer.norm:.4g} | {layer.rel_error:.3e} |")
        exactness = "exact" if self.exact else f"max relative error {self.max_error:.3e}"
        lines += ["", f"{len(self.layers)} modules; {exactness}; whole-adapter relative error {self.total_error:.3e}"]
        return "\n".join(lines)
