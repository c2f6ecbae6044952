"""`inspect_adapter`: what an adapter directory holds, read from its files alone (no base model).

For every adapted module the update ΔW = s B A is analysed through its factors: the singular values
come from QR of B and Aᵀ and the SVD of the r×r product (``factor.singular_values``), so a rank-16
adapter on a 4096×4096 layer costs a 16×16 SVD. Reported per module:

    ‖ΔW‖_F = sqrt(Σ σ_j²)
    effective rank  = exp(−Σ p_j log p_j), p_j = σ_j / Σ σ      (entropy-based, Roy & Vetterli 2007)
    r90             = fewest σ_j holding 90% of ‖ΔW‖_F²           (energy rank)

An effective rank far below r means the adapter uses few of its directions (``compress`` would
lose little). DoRA files: the spectra are those of s B A; the magnitudes also rescale each output
unit, which needs the base weight to evaluate. VeRA files: the shared projection must be sliced
to each layer's input size, which only the base model knows: given the model, the adapter is
loaded into it and analysed there; without it, no spectra are computed.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterFileError
from ..inject import delete_adapter
from ..io.layout import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, group_factors
from ..io.load import load_adapter, read_adapter
from ..safe_files.atomic import write_atomically
from ..state import adapter_configs, lora_layers
from .factor import LowRank, energy_rank, entropy_rank, singular_values
from .updates import low_rank_update


@dataclass
class ModuleInfo:
    path: str
    rank: int
    scaling: float
    shape: tuple[int, int | None]  # (d_out, d_in) of the update, conv kernels flattened; VeRA: d_in None
    norm: float | None = None
    singular_values: list[float] | None = None
    effective_rank: float | None = None
    r90: int | None = None
    experts: int = 1  # a parameter target's stack: one rank-r update per expert (see expert_stack_info)


@dataclass
class AdapterInfo:
    path: str
    peft_type: str
    base_model: str | None
    target_modules: list[str] | str | None
    variant: str  # lora | rslora | dora | vera (with rslora/dora combined as "dora+rslora")
    params: int
    file_bytes: int
    modules: list[ModuleInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    target_parameters: list[str] | None = None

    @property
    def ranks(self) -> dict[int, int]:
        """rank -> number of modules with that rank."""
        counts: dict[int, int] = {}
        for module in self.modules:
            counts[module.rank] = counts.get(module.rank, 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict:
        return {**asdict(self), "ranks": self.ranks}

    def table(self) -> str:
        ranks = ", ".join(f"r={r} x{n}" for r, n in self.ranks.items())
        lines = [
            f"adapter     {self.path}",
            f"type        {self.peft_type} ({self.variant})",
            f"base model  {self.base_model or 'unknown'}",
            f"targets     {self.target_modules}"
            + (f" + parameters {self.target_parameters}" if self.target_parameters else ""),
            f"modules     {len(self.modules)} ({ranks})",
            f"parameters  {self.params:,}",
            f"file size   {_size(self.file_bytes)}",
            "",
            "| module | rank | scaling | shape | ‖ΔW‖_F | σ_1 | eff. rank | r90 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in self.modules:
            d_in = "?" if m.shape[1] is None else m.shape[1]
            shape = ("" if m.experts == 1 else f"{m.experts}x") + f"{m.shape[0]}x{d_in}"
            if m.norm is None:
                lines.append(f"| {m.path} | {m.rank} | {m.scaling:g} | {shape} | n/a | n/a | n/a | n/a |")
                continue
            top = m.singular_values[0] if m.singular_values else 0.0
            lines.append(
                f"| {m.path} | {m.rank} | {m.scaling:g} | {shape} | {m.norm:.4g} | "
                f"{top:.4g} | {m.effective_rank:.2f} | {m.r90} |"
            )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path | None:
        """Singular-value spectra (σ_j / σ_1, one line per module) and ‖ΔW‖_F per module, as a PNG;
        None, and no file, when no module has a spectrum (VeRA)."""
        if not any(m.singular_values for m in self.modules):
            return None
        return plot_spectra(self, Path(path))


def inspect_adapter(path: str | os.PathLike, model: nn.Module | None = None) -> AdapterInfo:
    """Read adapter directory ``path`` (lorakit's or PEFT's files) and analyse each module's update.

    ``model``: the base model, which only VeRA adapters need (their shared projection is sliced to
    each layer's input size); the adapter is loaded into it for the analysis and removed again."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {directory} does not exist")
    config, weights = read_adapter(directory)  # one save's files, under the folder's lock
    factors, _ = group_factors(weights)
    kind = config.variant_object
    variant = (
        "+".join(
            ([config.variant] if config.variant != "lora" else [])
            + (["rslora"] if config.use_rslora and kind.file_holds_factors else [])
        )
        or "lora"
    )
    file = directory / WEIGHTS_NAME if (directory / WEIGHTS_NAME).is_file() else directory / LEGACY_WEIGHTS_NAME
    info = AdapterInfo(
        str(directory),
        kind.peft_type,
        config.base_model_name_or_path,
        config.target_modules,
        variant,
        sum(t.numel() for t in weights.values()),
        file.stat().st_size,
        target_parameters=config.target_parameters,
    )
    for module_path, found in factors.items():
        if "lora_A" not in found or "lora_B" not in found:
            raise AdapterFileError(f"{directory}: module {module_path!r} lacks its lora_A or lora_B weights")
    settled = expert_ranks(factors, config)
    # A variant whose files hold no factors (VeRA's vectors) is read by loading it into the model.
    loaded = loaded_updates(model, directory) if not kind.file_holds_factors and model is not None else {}
    for module_path, found in sorted(factors.items(), key=lambda item: _natural(item[0])):
        if module_path in loaded:
            info.modules.append(update_info(module_path, found["lora_A"].shape[0], 1.0, loaded[module_path]))
        else:
            info.modules.append(module_info(module_path, found, config, settled))
    if not kind.file_holds_factors and not loaded:
        info.notes.append(f"{kind.title}: spectra need each layer's input size: give the base model (--model)")
    if kind.inspection_note:
        info.notes.append(kind.inspection_note)
    if any(m.experts > 1 for m in info.modules):
        info.notes.append(
            "expert stacks: ‖ΔW‖_F over all experts; σ_1 and r90 the largest of any expert, eff. rank "
            "their mean; the plotted spectrum is the expert with the largest update"
        )
    if any(m.norm is None and kind.file_holds_factors for m in info.modules):
        info.notes.append(
            "n/a for a parameter target: the config's ranks and the file's shapes do not settle its number of experts"
        )
    return info


def parameter_keys(path: str, config) -> list[str]:
    """The ``<module>.<parameter>`` names ``config.target_parameters`` can mean at file path
    ``path`` (PEFT nests one ``base_layer`` per further parameter of a module); [] for a module
    target. Which one a nesting level holds depends on the module's own parameter order, which only
    the model knows, so the caller takes what they agree on."""
    if not config.target_parameters:
        return []
    module = path
    while module.endswith(".base_layer"):
        module = module[: -len(".base_layer")]
    keys = dict.fromkeys(f"{module}.{t.rsplit('.', 1)[-1]}" for t in config.target_parameters)
    return [k for k in keys if any(k == t or k.endswith("." + t) for t in config.target_parameters)]


def expert_ranks(factors: dict[str, dict[str, torch.Tensor]], config) -> dict[str, tuple[int, float]]:
    """(r, s) of each parameter target in the file where the config and the shapes settle it.

    The nesting levels of one module (``m``, ``m.base_layer``, ...) hold one target parameter
    each, in the module's own order, which the file does not record; but every stack of a module
    has the same number of experts E, and A has E·r rows. The assignments of the config's names to
    levels that give every level a whole, common E are tried; the ranks are settled when all such
    assignments agree on them."""
    by_module: dict[str, list[tuple[str, list[str], int]]] = {}
    for path, found in factors.items():
        keys = parameter_keys(path, config)
        if keys:
            by_module.setdefault(keys[0].rpartition(".")[0], []).append((path, keys, found["lora_A"].shape[0]))
    settled: dict[str, tuple[int, float]] = {}
    for levels in by_module.values():
        options = []
        for chosen in itertools.permutations(levels[0][1], len(levels)):
            ranks = [config.rank_for(key) for key in chosen]
            if (
                all(rows % r == 0 for (_, _, rows), r in zip(levels, ranks))
                and len({rows // r for (_, _, rows), r in zip(levels, ranks)}) == 1
            ):
                options.append(
                    {path: (r, config.scaling_for(key)) for (path, _, _), key, r in zip(levels, chosen, ranks)}
                )
        if options and all(option == options[0] for option in options):
            settled.update(options[0])
    return settled


def expert_stack_info(path: str, A: torch.Tensor, B: torch.Tensor, choice: tuple[int, float] | None) -> ModuleInfo:
    """A parameter target's A (E·r, d_in) and B (d_out, r·E) (see ``layers/parameter.py``)
    analysed expert by expert, with its (r, s) from ``expert_ranks`` (None: not settled)."""
    if choice is None:
        return ModuleInfo(path, A.shape[0], float("nan"), (B.shape[0], A.shape[1]))
    rank, scaling = choice
    experts = A.shape[0] // rank
    A_e = A.reshape(experts, rank, -1)
    B_e = B.reshape(B.shape[0], rank, experts).permute(2, 0, 1)
    spectra = [singular_values(LowRank(B_e[e] * scaling, A_e[e])) for e in range(experts)]
    largest = max(spectra, key=lambda S: float(S.norm()))
    return ModuleInfo(
        path,
        rank,
        scaling,
        (B.shape[0], A.shape[1]),
        float(torch.cat(spectra).norm()),
        [float(s) for s in largest],
        sum(entropy_rank(S) for S in spectra) / experts,
        max(energy_rank(S, 0.9) for S in spectra),
        experts,
    )


def loaded_updates(model: nn.Module, directory: Path) -> dict[str, LowRank]:
    """Each module's update of the adapter in ``directory`` as factors, as the model's layers
    compute them (VeRA: b ⊙ B_s (d ⊙ A_s x), the shared pair sliced to each layer): loaded under a
    fresh name, read, deleted."""
    name = "inspected"
    while name in adapter_configs(model):
        name += "_"
    load_adapter(model, directory, name=name, activate=False)
    try:
        return {path: low_rank_update(layer, name) for path, layer in lora_layers(model) if name in layer.lora_A}
    finally:
        delete_adapter(model, name)


def update_info(path: str, rank: int, scaling: float, update: LowRank) -> ModuleInfo:
    S = singular_values(update)
    return ModuleInfo(
        path,
        rank,
        scaling,
        (update.B.shape[0], update.A.shape[1]),
        float(S.norm()),
        [float(s) for s in S],
        entropy_rank(S),
        energy_rank(S, 0.9),
    )


def module_info(
    path: str, found: dict[str, torch.Tensor], config, settled: dict[str, tuple[int, float]] | None = None
) -> ModuleInfo:
    """One module's figures; ``settled``: the parameter targets' (r, s) (``expert_ranks``)."""
    A, B = found["lora_A"].double(), found["lora_B"].double()
    if not config.variant_object.file_holds_factors:  # VeRA: d (r,), b (d_out,)
        return ModuleInfo(path, A.shape[0], 1.0, (B.shape[0], None))  # d_in: the base layer's, unknown here
    if parameter_keys(path, config):
        return expert_stack_info(path, A, B, (settled or {}).get(path))
    rank = A.shape[0]
    alpha = config.alpha_for(path)
    scaling = alpha / rank**0.5 if config.use_rslora else alpha / rank
    return update_info(path, rank, scaling, LowRank(B.flatten(1) * scaling, A.flatten(1)))


def plot_spectra(info: AdapterInfo, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    analysed = [m for m in info.modules if m.singular_values]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    kinds = sorted({m.path.rsplit(".", 1)[-1] for m in analysed})
    colors = {kind: plt.get_cmap("tab10")(i % 10) for i, kind in enumerate(kinds)}
    for m in analysed:
        top = m.singular_values[0] or 1.0
        left.semilogy(
            range(1, len(m.singular_values) + 1),
            [max(s / top, 1e-12) for s in m.singular_values],
            color=colors[m.path.rsplit(".", 1)[-1]],
            alpha=0.5,
            lw=1,
        )
    for kind in kinds:
        left.plot([], [], color=colors[kind], label=kind)
    left.set_xlabel("index j")
    left.set_ylabel("σ_j / σ_1")
    left.set_title("singular values of s·B·A per module")
    left.grid(alpha=0.3)
    if kinds:
        left.legend(fontsize=7)
    right.bar(
        range(len(analysed)), [m.norm for m in analysed], color=[colors[m.path.rsplit(".", 1)[-1]] for m in analysed]
    )
    right.set_xlabel("module (model order)")
    right.set_ylabel("‖ΔW‖_F")
    right.set_title("update norm per module")
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{Path(info.path).name}: {info.variant}, {len(info.modules)} modules")
    fig.tight_layout()
    try:  # written to a temporary name and renamed, so a reader never sees half a PNG
        return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    finally:
        plt.close(fig)


def _natural(path: str) -> list:
    """Sort key putting layers.2 before layers.10 (the files keep keys in string order)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"
