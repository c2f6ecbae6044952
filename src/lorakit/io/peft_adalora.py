"""PEFT's AdaLoRA adapters (``peft_type: ADALORA``) read as the plain LoRA adapters they compute.

PEFT stores per module ``lora_A`` (r_m, d_in), ``lora_E`` (r_m, 1) and ``lora_B`` (d_out, r_m),
keyed without ``.weight``, with r_m the rank the budget allocator kept (0: the module was pruned
away), and computes

    ΔW = B (E ⊙ A) · lora_alpha / (init_r + 1e-5)

(its ``ranknum`` buffer is init_r and is not saved). That is a LoRA update with A' = E ⊙ A: the
adapter is read as LoRA factors (A' with the scaling folded in, so each module's alpha equals its
rank: s = 1, as lorakit saves its own AdaLoRA adapters), per-module ranks in ``rank_pattern`` and
the pruned modules left out of ``target_modules``. Loading, merging and serving then work as
for any LoRA adapter; training the result is LoRA training (the singular values are no longer
separate).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..config import LoraConfig
from ..errors import AdapterFileError, LorakitError
from ..targets import exact_pattern
from .layout import strip_prefix

# The AdaLoRA-only fields of PEFT's config: the schedule and mask of training, not the adapter.
_ADALORA_FIELDS = (
    "init_r",
    "target_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
    "rank_pattern",
    "r",
)
_FACTOR = re.compile(r"(?P<path>.+)\.(?P<factor>lora_[ABE])(?:\.weight)?")


def is_peft_adalora(data: dict[str, Any]) -> bool:
    return str(data.get("peft_type", "")).upper() == "ADALORA"


def as_lora(
    data: dict[str, Any], weights: dict[str, torch.Tensor], source: str
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoRA config, LoRA tensors keyed as lorakit/PEFT save them) for a PEFT AdaLoRA config dict
    and its weights file's tensors; ``source`` names the directory in errors."""
    init_r, alpha = data.get("init_r"), data.get("lora_alpha")
    if not isinstance(init_r, int) or init_r < 1 or not isinstance(alpha, (int, float)):
        raise AdapterFileError(
            f"{source}: an AdaLoRA config needs init_r (>= 1) and lora_alpha, found "
            f"init_r={init_r!r}, lora_alpha={alpha!r}"
        )
    scaling = alpha / (init_r + 1e-5)  # PEFT divides by its ranknum buffer (init_r) plus 1e-5
    factors: dict[str, dict[str, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        match = _FACTOR.fullmatch(key)
        if match is None:
            tensors[key] = value  # modules_to_save copies, trained biases
            continue
        factors.setdefault(match["path"], {})[match["factor"]] = value
    ranks: dict[str, int] = {}
    for prefixed, found in factors.items():
        missing = [f for f in ("lora_A", "lora_B", "lora_E") if f not in found]
        if missing:
            raise AdapterFileError(f"{source}: module {prefixed!r} has no {missing} in its AdaLoRA weights")
        A, B, E = found["lora_A"], found["lora_B"], found["lora_E"]
        rank = A.shape[0]
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != rank or E.reshape(-1).shape[0] != rank:
            raise AdapterFileError(
                f"{source}: module {prefixed!r} has AdaLoRA factors of shapes A {tuple(A.shape)}, "
                f"E {tuple(E.shape)}, B {tuple(B.shape)}, which do not fit together"
            )
        if rank == 0:
            continue  # pruned to nothing: no adapter on this module
        wide = torch.promote_types(A.dtype, torch.float32)
        folded = (E.reshape(-1, 1).to(wide) * A.to(wide) * scaling).to(A.dtype)
        tensors[f"{prefixed}.lora_A.weight"] = folded
        tensors[f"{prefixed}.lora_B.weight"] = B
        ranks[strip_prefix(prefixed)] = rank
    if not ranks:
        raise AdapterFileError(
            f"{source}: every module of this AdaLoRA adapter was pruned to rank 0; it changes nothing"
        )
    paths = sorted(ranks)
    lora = {k: v for k, v in data.items() if k not in _ADALORA_FIELDS}
    # (AdaLoRA's scaling ignores use_rslora: with the scaling folded in, s must be 1 for every rank.)
    lora.update(
        peft_type="LORA",
        r=init_r,
        lora_alpha=init_r,
        use_rslora=False,
        use_dora=False,
        target_modules="|".join(re.escape(path) for path in paths),  # exactly the unpruned modules
        rank_pattern=exact_pattern(ranks, paths),
        alpha_pattern=exact_pattern(ranks, paths),
    )
    try:
        return LoraConfig.from_dict(lora), tensors
    except (LorakitError, TypeError) as exc:  # a field lorakit cannot take
        raise AdapterFileError(f"{source}: {exc}") from None
