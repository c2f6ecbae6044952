"""VeRA's shared frozen projections (Kopiczko et al. 2024).

    h = W0 x + b ⊙ (B_shared (d ⊙ (A_shared x)))      d: (r,)  b: (d_out,)  trained

One random pair A_shared (r × max d_in), B_shared (max d_out × r) serves every adapted layer of an
adapter (each layer slices what it needs), so an adapter stores only the scaling vectors d and b
per layer — and the seed the pair is drawn from. The draw matches PEFT's (Kaiming-uniform with
gain √2, from a CPU generator seeded with ``projection_prng_key``: A first, then B), so adapters
saved without their projections still load in both libraries.

On a layer, VeRA keeps its two trained vectors in LoRA's slots (``lora_A[name]`` holds d,
``lora_B[name]`` holds b), so adding, freezing, counting and deleting need no second code path;
``vera_projection[name]`` is the shared frozen pair, a child of every layer of the adapter with
non-persistent buffers: ``model.to()`` moves it once and the state dict does not repeat it.
Files use PEFT's VERA format (``vera_lambda_d`` / ``vera_lambda_b``, the pair as
``base_model.vera_A`` / ``vera_B`` when ``save_projection``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import register_variant
from ..errors import AdapterFileError, ConfigError, TargetError
from ..layers.variant import Variant

SLOT = "vera_projection"
# The shared pair in files, stored once (PEFT's save_projection=True): file key -> buffer name.
PROJECTION_KEYS = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjection(nn.Module):
    """The frozen pair shared by all layers of one VeRA adapter.

    Registered as a child of every layer that uses it (so ``model.to(...)`` moves it once), with
    non-persistent buffers (so it is not repeated in the model's state dict).
    """

    def __init__(self, r: int, max_in: int, max_out: int, prng_key: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(prng_key)
        self.register_buffer("vera_A", kaiming_uniform((r, max_in), generator), persistent=False)
        self.register_buffer("vera_B", kaiming_uniform((max_out, r), generator), persistent=False)

    def sliced(self, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:, :d_in], B[:d_out]) for a layer of that shape."""
        return self.vera_A[:, :d_in], self.vera_B[:d_out]


class Vera(Variant):
    name = "vera"
    title = "VeRA"
    legacy_flag = "use_vera"
    peft_type = "VERA"
    layer_kinds = ("LoraLinear",)
    quantized_base = (
        "lorakit's VeRA shares one projection across dense linear layers only; use LoRA or DoRA on a quantized model"
    )
    parameter_targets = False
    own_init = True
    draws_factors = False
    hot_swappable = False
    nested_ranks = False  # its rank belongs to the pair shared by every layer
    slots = (SLOT,)
    file_suffixes = {".vera_lambda_d": "lora_A", ".vera_lambda_b": "lora_B"}
    model_keys = tuple(PROJECTION_KEYS)
    file_holds_factors = False

    # --- configuration -----------------------------------------------------------------------
    def check_config(self, config: Any) -> None:
        clash = [
            k for k, v in {"rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern}.items() if v
        ]
        if clash:
            raise ConfigError(
                f"variant 'vera' cannot be combined with {clash}: VeRA shares one random pair of one "
                "rank across all layers and trains only its scaling vectors"
            )
        if isinstance(config.projection_prng_key, bool) or not isinstance(config.projection_prng_key, int):
            raise ConfigError(f"projection_prng_key must be an integer, got {config.projection_prng_key!r}")
        if isinstance(config.d_initial, bool) or not isinstance(config.d_initial, (int, float)):
            raise ConfigError(f"d_initial must be a number, got {config.d_initial!r}")

    def peft_config(self, config: Any, data: dict[str, Any]) -> dict[str, Any]:
        """PEFT's VeraConfig keys."""
        return {
            "peft_type": "VERA",
            "task_type": config.task_type,
            "base_model_name_or_path": config.base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": config.r,
            "target_modules": config.target_modules,
            "projection_prng_key": config.projection_prng_key,
            "save_projection": config.save_projection,
            "vera_dropout": config.dropout,
            "d_initial": config.d_initial,
            "fan_in_fan_out": config.fan_in_fan_out,
            "bias": config.bias,
            "modules_to_save": config.modules_to_save,
            "init_weights": True,
            "layers_to_transform": config.layers_to_transform,
            "layers_pattern": config.layers_pattern,
        }

    def read_peft_config(self, data: dict[str, Any]) -> dict[str, Any]:
        data["use_vera"] = True
        data["dropout"] = data.pop("vera_dropout", 0.0)
        data.pop("init_weights", None)
        return data

    # --- injection ---------------------------------------------------------------------------
    def plan_adapter(self, planned: Any, config: Any) -> None:
        """One shared projection sized for the largest layer; d = d_initial, b = 0 per layer."""
        wrong = [p.path for p in planned.layers if self.refusal(p.layer)]
        if wrong:
            raise TargetError(f"VeRA adapts linear layers only; exclude {wrong[:5]} (exclude_modules)")
        first = planned.layers[0].layer.base_weight
        projection = VeraProjection(
            config.r,
            max(p.layer.in_dim for p in planned.layers),
            max(p.layer.out_dim for p in planned.layers),
            config.projection_prng_key,
        )
        projection.to(first.device)
        for p in planned.layers:
            dtype = p.A.dtype
            device = p.layer.base_weight.device
            p.A = torch.full((config.r,), float(config.d_initial), dtype=dtype, device=device)
            p.B = torch.zeros(p.layer.out_dim, dtype=dtype, device=device)
            p.scaling = 1.0
            p.extras["projection"] = projection

    def attach(self, layer: Any, name: str, planned_layer: Any, trainable: bool) -> None:
        layer.slot(SLOT, nn.ModuleDict)[name] = planned_layer.extras["projection"]

    def pair(self, layer: Any, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared (A, B) sliced to the layer: (r, d_in), (d_out, r), in ``dtype``."""
        A, B = layer.__dict__["_modules"][SLOT][name].sliced(layer.in_dim, layer.out_dim)
        return A.to(dtype), B.to(dtype)

    # --- forward -----------------------------------------------------------------------------
    def lora_output(self, layer: Any, x: torch.Tensor, name: str) -> torch.Tensor:
        d, b = layer.lora_A[name], layer.lora_B[name]
        A, B = self.pair(layer, name, d.dtype)
        return b * F.linear(d * F.linear(x, A), B)

    def factors(self, layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(d ⊙ A_s, b ⊙ B_s, 1)`` of shapes (r, d_in), (d_out, r), float32 or wider."""
        d, b, _ = layer.accumulated(layer.lora_A[name], layer.lora_B[name], 1.0)
        A, B = self.pair(layer, name, d.dtype)
        return d[:, None] * A, b[:, None] * B, 1.0

    def fused_factors(self, layer: Any, name: str):
        return None  # the fused kernels compute LoRA's B A x, not VeRA's scaled shared pair

    # --- files -------------------------------------------------------------------------------
    def file_key(self, layer: Any, slot: str) -> str:
        return {"lora_A": "vera_lambda_d", "lora_B": "vera_lambda_b"}[slot]

    def model_tensors(self, layers: list[Any], name: str, config: Any) -> dict[str, torch.Tensor]:
        if not config.save_projection:
            return {}
        projection = layers[0].__dict__["_modules"][SLOT][name]
        return {key: getattr(projection, attr) for key, attr in PROJECTION_KEYS.items()}

    def read_model_tensors(self, planned: Any, found: dict[str, torch.Tensor]) -> None:
        """Take the shared pair from the file when it is there (else the seeded draw stands)."""
        projection = planned.layers[0].extras["projection"]
        for key, value in found.items():
            mine = getattr(projection, PROJECTION_KEYS[key])
            if tuple(value.shape) != tuple(mine.shape):
                raise AdapterFileError(
                    f"{PROJECTION_KEYS[key]} has shape {tuple(value.shape)} in the file but this "
                    f"model's targets need {tuple(mine.shape)}"
                )
            mine.copy_(value.to(mine.dtype))


register_variant(Vera())
