"""An adapter written for vLLM or SGLang: plain LoRA factors that those engines compute exactly as
lorakit does, or a one-line refusal before anything is written.

vLLM and SGLang read PEFT's LoRA layout but compute less than PEFT: one scaling per adapter
(``lora_alpha / r`` from the config; what they do with rsLoRA and the per-module patterns is in
``engine_rules.py``), no DoRA, no VeRA, no trained biases. Every adapter lorakit can load is a
model change ``ΔW`` per module, so the export writes that change as factors with the scaling
folded into B:

    ΔW = B' A',   B' = s B (d_out, r), A' (r, d_in),   config: lora_alpha = r, no patterns

(each module's scale is then 1 whatever the engine does with rsLoRA, patterns or ranks). Per
source:

- LoRA, rsLoRA, rank/alpha patterns, AdaLoRA (E folded into A), DyLoRA, LoRA-FA: ``s B A`` exactly.
- VeRA, ``b ⊙ B_s (d ⊙ (A_s x))``: exactly ``B' = b ⊙ B_s``, ``A' = d ⊙ A_s`` (the shared pair
  sliced to the layer): rank r, the VeRA rank.
- PiSSA/OLoRA (an adapter whose init moved ``s B0 A0`` out of W0): against the original W0 the
  change is ``s (B A - B0 A0) = [sB, -sB0] [A; A0]``, exact at rank 2r.
- DoRA, ``m/‖W0 + sBA‖ (W0 + sBA) - W0``: not low-rank, so refused, or with ``refactor_dora``
  re-factored to the adapter's rank by truncated SVD of that dense change, each module's relative
  error ``‖ΔW - ΔW_r‖_F / ‖ΔW‖_F`` reported.

The factors are computed in float64 and written in the adapter's own dtype. The result is checked
against the engine's rules (``engine_rules.check_adapter_data``) before the folder is written,
atomically, into a new or empty ``out`` (``safe_files.directory_export``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..arithmetic.factor import WORK_DTYPE, LowRank, best_rank_k
from ..arithmetic.updates import dense_only, dense_update, low_rank_update
from ..errors import ConfigError
from ..io.layout import CONFIG_NAME, PREFIX, WEIGHTS_NAME, task_type_of
from ..layers import LoraEmbedding, LoraLayer, LoraLinear
from ..safe_files.directory_export import require_new_directory, save_directory
from ..state import adapter_configs, lora_layers, require_adapters, saved_modules
from .engine_rules import ENGINES, check_adapter_data, engine_title, model_architecture


@dataclass
class ModuleExport:
    """One module of an exported adapter: its rank, how it was obtained and the relative error
    of the written update against the adapter's (0 for the exact conversions)."""

    path: str
    rank: int
    how: str
    error: float = 0.0


@dataclass
class EngineExport:
    """An adapter as the engine's files: ``tensors`` (PEFT keys), ``config`` (adapter_config.json)."""

    engine: str
    source: str
    tensors: dict[str, torch.Tensor]
    config: dict
    modules: list[ModuleExport] = field(default_factory=list)

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules)

    @property
    def max_error(self) -> float:
        return max(m.error for m in self.modules)

    def to_dict(self) -> dict:
        return {
            "engine": self.engine,
            "source": self.source,
            "max_rank": self.max_rank,
            "max_relative_error": self.max_error,
            "modules": [vars(m) for m in self.modules],
        }

    def table(self) -> str:
        hows = sorted({m.how for m in self.modules})
        lines = [
            f"{engine_title(self.engine)} adapter from {self.source!r}: {len(self.modules)} modules, max rank "
            f"{self.max_rank}, {', '.join(hows)}"
        ]
        inexact = [m for m in self.modules if m.error > 0]
        if inexact:
            lines.append(
                f"re-factored modules: {len(inexact)}; relative error max {self.max_error:.3e}, mean "
                f"{sum(m.error for m in inexact) / len(inexact):.3e}"
            )
            for m in sorted(inexact, key=lambda m: -m.error)[:5]:
                lines.append(f"  {m.path}: rank {m.rank}, relative error {m.error:.3e}")
        return "\n".join(lines)


@torch.no_grad()
def module_factors(layer: LoraLayer, name: str, refactor_dora: bool, path: str = "") -> tuple[LowRank, str, float]:
    """(factors of the change adapter ``name`` makes to the original W0, in float64 with the
    scaling in B; how; relative error) for the layer at ``path``. B (d_out, r), A (r, d_in)."""
    variant = layer.variants[name]
    moved = layer.init_factors.get(name)  # PiSSA/OLoRA: s B0 A0 was taken out of W0
    if not dense_only(layer, name):
        update = low_rank_update(layer, name)
        how = "lora" if variant.name == "lora" else f"{variant.name}->lora"
        if moved is not None:
            A0, B0 = moved
            s = layer.scaling[name]
            update = LowRank(
                torch.cat([update.B, -s * B0.to(WORK_DTYPE).flatten(1)], dim=1),
                torch.cat([update.A, A0.to(WORK_DTYPE).flatten(1)], dim=0),
            )
            how = f"{variant.name}+moved-base->lora"
        return update, how, 0.0
    if not refactor_dora:
        raise ConfigError(
            f"{variant.title} adapter {name!r} ({path}): vLLM and SGLang refuse {variant.title}; pass "
            "--refactor-dora to write the best plain-LoRA approximation at its rank (the error is reported), or "
            "serve it with `lorakit serve`"
        )
    change = dense_update(layer, name)  # m/||W0 + sBA|| (W0 + sBA) - W0 against this layer's W0
    if moved is not None:
        A0, B0 = moved
        change = change - layer.scaling[name] * (B0.to(WORK_DTYPE).flatten(1) @ A0.to(WORK_DTYPE).flatten(1))
    update, error = best_rank_k(change, variant.rank(layer, name))  # the truncated SVD, from the Gram matrix
    return update, f"{variant.name}->lora (svd)", error


def convert(model: nn.Module, name: str, *, engine: str = "vllm", refactor_dora: bool = False) -> EngineExport:
    """Adapter ``name`` of ``model`` as the files ``engine`` ("vllm" or "sglang") reads: plain LoRA
    factors with each module's scaling folded into B (module docstring). Raises ConfigError for
    what the engine cannot compute (DoRA without ``refactor_dora``, trained biases, conv targets,
    modules_to_save beyond the engine's)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}: choose one of {sorted(ENGINES)}")
    require_adapters(model, [name])
    config = adapter_configs(model)[name]
    title = engine_title(engine)
    if config.bias != "none":
        raise ConfigError(
            f"adapter {name!r} trains biases (bias={config.bias!r}); {title} loads no adapter biases: merge it into "
            "the base (`lorakit export --format safetensors`) or serve it with `lorakit serve`"
        )
    if config.target_parameters:
        raise ConfigError(
            f"adapter {name!r} adapts parameters ({config.target_parameters}), which {title} cannot load; serve it "
            "with `lorakit serve`"
        )
    tensors: dict[str, torch.Tensor] = {}
    modules: list[ModuleExport] = []
    for path, layer in lora_layers(model):
        if name not in layer.lora_A:
            continue
        if not isinstance(layer, (LoraLinear, LoraEmbedding)) or getattr(layer, "fan_in_fan_out", False):
            kind = "a transformers Conv1D" if isinstance(layer, LoraLinear) else type(layer).__name__
            raise ConfigError(
                f"adapter {name!r} adapts {path} ({kind}); {title} serves LoRA on linear and embedding layers "
                "only: exclude it (exclude_modules) or serve the adapter with `lorakit serve`"
            )
        update, how, error = module_factors(layer, name, refactor_dora, path)
        dtype = layer.lora_A[name].dtype if layer.lora_A[name].is_floating_point() else torch.float32
        # (lora_embedding_A/B for embeddings: A (r, num_embeddings), B (dim, r), as the factor layout)
        tensors[f"{PREFIX}{path}.{layer.peft_keys['lora_A']}"] = update.A.to(dtype).contiguous().cpu()
        tensors[f"{PREFIX}{path}.{layer.peft_keys['lora_B']}"] = update.B.to(dtype).contiguous().cpu()
        modules.append(ModuleExport(path, update.rank, how, error))
    for path, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[name].state_dict().items():
                tensors[f"{PREFIX}{path}.{key}"] = value.detach().contiguous().cpu().clone()
    if not modules:
        raise ConfigError(f"adapter {name!r} has no LoRA module to export")
    ranks = {m.path: m.rank for m in modules}
    r = max(ranks.values())
    if engine == "sglang":
        _pad_to_rank(tensors, r)  # SGLang takes one rank per adapter: zero rows/columns change nothing
        ranks = dict.fromkeys(ranks, r)
    data = {
        "peft_type": "LORA",
        "task_type": config.task_type or task_type_of(model),
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": r,
        "lora_alpha": r,  # scaling alpha/r = 1: every module's scale is already in its B
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        # Module names, as both engines match them (the weights say which layers are adapted).
        "target_modules": sorted({m.path.rsplit(".", 1)[-1] for m in modules}),
        "modules_to_save": config.modules_to_save,
    }
    differing = {path: rank for path, rank in ranks.items() if rank != r}
    if differing:
        # Only for PEFT's loader (shapes per module); alpha = rank keeps its scaling 1 too.
        data["rank_pattern"] = {f"^{re.escape(p)}$": k for p, k in differing.items()}
        data["alpha_pattern"] = {f"^{re.escape(p)}$": k for p, k in differing.items()}
    return EngineExport(engine, name, tensors, data, modules)


def _pad_to_rank(tensors: dict[str, torch.Tensor], r: int) -> None:
    """Every A (k, d_in) to (r, d_in) and B (d_out, k) to (d_out, r) with zeros, in place."""
    for key, t in tensors.items():
        if key.endswith(("lora_A.weight", "lora_embedding_A")) and t.shape[0] < r:
            tensors[key] = torch.cat([t, t.new_zeros(r - t.shape[0], t.shape[1])], dim=0)
        elif key.endswith(("lora_B.weight", "lora_embedding_B")) and t.shape[1] < r:
            tensors[key] = torch.cat([t, t.new_zeros(t.shape[0], r - t.shape[1])], dim=1)


def export_adapter(
    model: nn.Module,
    name: str,
    out: str | Path,
    *,
    engine: str = "vllm",
    max_lora_rank: int | None = None,
    refactor_dora: bool = False,
) -> EngineExport:
    """Write adapter ``name`` of ``model`` into the new or empty folder ``out`` as ``engine`` reads
    it (``convert``), after checking the result against the engine's rules: ``max_lora_rank``
    (the server's ``--max-lora-rank``), the modules the engine adapts for this architecture.
    Nothing is written when a check fails."""
    out = Path(out)
    require_new_directory(out)
    export = convert(model, name, engine=engine, refactor_dora=refactor_dora)
    shapes = {key: tuple(t.shape) for key, t in export.tensors.items()}
    check_adapter_data(
        export.config,
        shapes,
        source=f"the export of {name!r}",
        engine=engine,
        max_lora_rank=max_lora_rank,
        architecture=model_architecture(model),
    )
    payload = json.dumps(export.config, indent=2, sort_keys=True) + "\n"

    def write(folder: Path) -> None:
        save_file(export.tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(payload)

    save_directory(out, write)
    return export
