"""`LoraConfig`: what an adapter is, and its PEFT-compatible JSON form.

Field names are lorakit's (``alpha``, ``dropout``, ``init``); :meth:`LoraConfig.to_dict` and
:meth:`LoraConfig.from_dict` translate to and from the keys of PEFT's ``adapter_config.json``
(``lora_alpha``, ``lora_dropout``, ``init_lora_weights``...), so files move freely between lorakit,
PEFT, vLLM and LoRAX.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .init_names import INIT_CHOICES, INIT_TO_PEFT, init_from_peft, valid_init

ALL_LINEAR = "all-linear"
BIASES = ("none", "all", "lora_only")
ADAPTER_DTYPES = ("auto", "float32", "bfloat16", "float16")

# PEFT config keys whose non-default value changes the adapter's maths in a way lorakit does not
# implement yet: loading such a file must fail loudly rather than give wrong outputs.
_UNSUPPORTED_PEFT_OPTIONS = {
    "layer_replication": None,
    "lora_bias": False,
    "use_qalora": False,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
}


# The LoRA family's members by name (``LoraConfig.variant``): `Variant` objects (layers/variant.py),
# each registered by its own file in lorakit/variants/ when the package is imported.
VARIANTS: dict[str, Any] = {}


def register_variant(variant: Any) -> Any:
    """Make ``variant`` (a `lorakit.layers.variant.Variant`) selectable as ``LoraConfig(variant=...)``."""
    VARIANTS[variant.name] = variant
    return variant


def variant_names() -> list[str]:
    return sorted(VARIANTS)


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter: ``h = W0 x + s * B A dropout(x)``.

    Args:
        r: rank of the update (``A`` is r × d_in, ``B`` is d_out × r).
        alpha: scaling numerator; ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability applied to the adapter's input, in [0, 1).
        target_modules: which modules to adapt. A list of names matches a module whose full name
            equals an entry or ends with ``"." + entry`` (``["q_proj", "v_proj"]``); a string is a
            regular expression that must match the full module name; ``"all-linear"`` selects
            every linear layer except the model's output head.
        exclude_modules: modules to skip, same forms as ``target_modules``.
        target_parameters: parameters to adapt directly, by full name (``"<module>.<parameter>"``)
            or a suffix of it (``["experts.gate_up_proj", "experts.down_proj"]``): for weights that are
            no layer of their own, above all mixture-of-experts stacks (E, d_out, d_in), where each
            expert gets its own rank-r update (``layers/parameter.py``). PEFT's option of that
            name, with its limits: no dropout, no DoRA or other variant, and (as in PEFT)
            ``exclude_modules`` / ``layers_to_transform`` do not apply to it. ``target_modules``
            may then be None.
        bias: ``"none"`` (biases stay frozen), ``"all"`` (every bias in the model is trained and
            saved) or ``"lora_only"`` (biases of adapted layers are trained and saved).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        variant: the member of the LoRA family: ``"lora"`` (plain), ``"dora"``, ``"lora-fa"``,
            ``"dylora"``, ``"vera"`` or ``"adalora"`` (each one file in ``lorakit/variants/``).
            The boolean fields below select the same (``use_dora=True`` is ``variant="dora"``),
            so older code and PEFT's files keep working; after validation they agree with
            ``variant``. One adapter has one variant.
        use_dora: weight-decomposed LoRA (Liu et al. 2024): each output unit of ``W0 + s B A`` is
            rescaled to a trained magnitude ``m``; see ``docs/variants.md``.
        lora_fa: LoRA-FA (Zhang et al. 2023): A stays frozen at its init and only B trains, halving
            the trainable parameters and the optimizer state. The saved file is a plain LoRA adapter.
        dylora: DyLoRA (Valipour et al. 2023): the trainer samples a rank b <= r each step and trains
            the first b ranks, so ``lorakit.truncate(model, b)`` works afterwards without retraining.
        adalora: AdaLoRA (Zhang et al. 2023): the update is ``s * B diag(E) A`` with trained singular
            values E; the trainer prunes the least important ranks to a budget (see
            ``variants/adalora.py``). Saved as a plain LoRA adapter with per-module ranks.
        use_vera: VeRA (Kopiczko et al. 2024): one frozen random pair (A, B) shared by all layers,
            drawn from ``projection_prng_key``; each layer trains only the vectors d (r,) and b (d_out,)
            with d starting at ``d_initial`` and b at 0. ``alpha`` is unused. ``save_projection``
            also writes the shared pair into the file (PEFT's default). Linear layers only.
        init: ``"default"`` (Kaiming-uniform A, zero B), ``"gaussian"`` (A ~ N(0, 1/r), zero B),
            ``"pissa"`` (principal singular vectors and values of W0 in A, B; residual kept in
            W0), ``"pissa_niter_<N>"`` (the same from a randomized SVD with N power iterations:
            seconds instead of minutes on large models) or ``"olora"`` (QR-based orthonormal
            init; residual kept in W0).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier).
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``alpha``; keys are module
            names, name suffixes or regular expressions (first matching key wins).
        layers_to_transform: only adapt modules inside these layer indices.
        layers_pattern: name of the layer list used with ``layers_to_transform`` (e.g. ``"layers"``
            or ``"h"``); by default the common names are tried.
        fan_in_fan_out: the base stores weights as (d_in, d_out) (GPT-2's ``Conv1D``). Detected
            automatically per layer; recorded here for PEFT.
        adapter_dtype: dtype of A and B (and DoRA's m). ``"auto"`` = the base weight's dtype (fp32
            base → fp32, bf16 base → bf16), except that fp16 bases (what ``dtype="auto"`` loads on
            GPUs without native bf16, e.g. T4, V100) get fp32 adapters, as in PEFT: AdamW's small
            updates to fp16 parameters underflow without loss scaling.
        seed: seeds the random init of every layer (each module gets its own stream derived from
            the seed and its name, so the result does not depend on injection order). ``None``
            uses torch's global generator.
        base_model_name_or_path, task_type: recorded in the saved file for other tools.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    bias: str = "none"
    use_rslora: bool = False
    variant: str = "lora"
    use_dora: bool = False
    lora_fa: bool = False
    dylora: bool = False
    use_vera: bool = False
    adalora: bool = False
    projection_prng_key: int = 0
    save_projection: bool = True
    d_initial: float = 0.1
    init: str = "default"
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    adapter_dtype: str = "auto"
    seed: int | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.target_parameters is not None:
            self._check_target_parameters()
        if self.target_modules is None and not self.target_parameters:
            raise ConfigError(
                "target_modules is required: give module names (e.g. ['q_proj', 'v_proj']), "
                "a regular expression, or 'all-linear' (or parameters in target_parameters)"
            )
        if self.target_modules is not None:
            self.target_modules = _names_or_regex("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if self.bias not in BIASES:
            raise ConfigError(f"bias must be one of {BIASES}, got {self.bias!r}")
        if not valid_init(self.init):
            raise ConfigError(f"init must be {INIT_CHOICES}, got {self.init!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if not self.modules_to_save:
            self.modules_to_save = None
        else:
            self.modules_to_save = list(_names_or_regex("modules_to_save", list(self.modules_to_save)))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for key, value in self.rank_pattern.items():
            _check_pattern_key("rank_pattern", key)
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_pattern_key("alpha_pattern", key)
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            if not all(isinstance(i, int) and i >= 0 for i in self.layers_to_transform):
                raise ConfigError(
                    f"layers_to_transform must be non-negative layer indices, got {self.layers_to_transform!r}"
                )
            self.layers_to_transform = list(self.layers_to_transform)
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = [self.layers_pattern]
        variant = self._resolve_variant()
        if variant.own_init and self.init != "default":
            raise ConfigError(
                f"variant {variant.label} draws its own initial factors; it cannot be combined with init={self.init!r}"
            )
        if self.target_parameters and not variant.parameter_targets:
            raise ConfigError(
                f"target_parameters cannot be combined with variant {variant.label}: a parameter is "
                "adapted as a whole, without a variant's extra terms (as in PEFT); put those "
                "modules in a separate adapter"
            )
        variant.check_config(self)

    def _resolve_variant(self) -> Any:
        """Settle ``variant`` from itself and the legacy boolean fields, then set those to agree."""
        flagged = [v.name for v in VARIANTS.values() if v.legacy_flag and getattr(self, v.legacy_flag)]
        if len(flagged) > 1 or (flagged and self.variant not in ("lora", flagged[0])):
            chosen = ", ".join(VARIANTS[n].label for n in sorted(set(flagged) | ({self.variant} - {"lora"})))
            raise ConfigError(
                f"an adapter has one variant, got {chosen}; choose one (variant=...), or put the "
                "others in adapters of their own"
            )
        if flagged:
            self.variant = flagged[0]
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {variant_names()}, got {self.variant!r}")
        for other in VARIANTS.values():
            if other.legacy_flag:
                setattr(self, other.legacy_flag, other.name == self.variant)
        return VARIANTS[self.variant]

    @property
    def variant_object(self) -> Any:
        """The `Variant` (layers/variant.py) this config names."""
        return VARIANTS[self.variant]

    def _check_target_parameters(self) -> None:
        names = self.target_parameters
        if (
            isinstance(names, str)
            or not isinstance(names, (list, tuple, set))
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise ConfigError(
                f"target_parameters must be a list of parameter names or suffixes such as "
                f"'experts.gate_up_proj', got {names!r}"
            )
        self.target_parameters = sorted(names) if isinstance(names, set) else list(names)
        if not self.target_parameters:
            self.target_parameters = None
            return
        clash = [
            k
            for k, v in {
                "dropout > 0": self.dropout > 0,
                f"init={self.init!r}": self.init not in ("default", "gaussian"),
            }.items()
            if v
        ]
        if clash:
            raise ConfigError(
                f"target_parameters cannot be combined with {clash}: a parameter is adapted as a whole, "
                "without an input to drop out or a variant's extra terms (as in PEFT); put those "
                "modules in a separate adapter"
            )

    # --- per-module values -------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """The rank of the adapter on ``module_name`` (``rank_pattern`` wins over ``r``)."""
        key = pattern_key(self.rank_pattern, module_name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name: str) -> float:
        """The alpha of the adapter on ``module_name`` (``alpha_pattern`` wins over ``alpha``)."""
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, module_name: str) -> float:
        """``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) for ``module_name``."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # --- PEFT JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT's ``adapter_config.json`` keys (plus nothing PEFT would reject)."""
        data = {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "target_parameters": self.target_parameters,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": False,  # DoRA says True (variants/dora.py)
            "init_lora_weights": INIT_TO_PEFT.get(self.init, self.init),
            "modules_to_save": self.modules_to_save,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "fan_in_fan_out": self.fan_in_fan_out,
        }
        return self.variant_object.peft_config(self, data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Read a PEFT ``adapter_config.json`` dict (LORA or VERA; or lorakit's own field names)."""
        data = dict(data)
        peft_type = str(data.pop("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            readers = [v for v in VARIANTS.values() if v.peft_type == peft_type]
            if not readers:
                known = sorted({v.peft_type for v in VARIANTS.values()})
                raise ConfigError(f"adapter has peft_type {peft_type!r}; lorakit reads {known} adapters")
            data = readers[0].read_peft_config(data)
        for key, default in _UNSUPPORTED_PEFT_OPTIONS.items():
            if data.get(key, default) not in (default, None, False, [], {}):
                raise ConfigError(f"adapter uses {key}={data[key]!r}, which lorakit does not support yet")
        renames = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}
        for old, new in renames.items():
            if old in data:
                data[new] = data.pop(old)
        if "init" in data:
            data["init"] = init_from_peft(data["init"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> "LoraConfig":
        """A copy with some fields changed (validated again)."""
        values = asdict(self)
        # ``variant`` says which variant this is; the older flags follow it, so they are dropped
        # here and only a flag named in ``changes`` selects (True) or leaves (False) a variant.
        flags = {v.legacy_flag: v.name for v in VARIANTS.values() if v.legacy_flag}
        for flag, name in flags.items():
            del values[flag]
            if flag in changes and "variant" not in changes:
                if changes[flag]:
                    values["variant"] = name
                elif values["variant"] == name:
                    values["variant"] = "lora"
        values.update({k: v for k, v in changes.items() if k not in flags or "variant" in changes})
        return LoraConfig(**values)


def pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The first key of ``patterns`` matching ``module_name``: exact name, suffix, or regex.

    A key matches when it equals the full name, or when the full name matches
    ``(.*\\.)?<key>$`` (so ``"v_proj"`` matches ``model.layers.0.self_attn.v_proj`` and
    ``"layers.0.*v_proj"`` works as a regular expression).
    """
    if module_name in patterns:
        return module_name
    for key in patterns:
        if re.fullmatch(rf"(.*\.)?(?:{key})", module_name):
            return key
    return None


def _check_rank(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def _check_alpha(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ConfigError(f"{what} must be a positive number, got {value!r}")


def _check_pattern_key(what: str, key: Any) -> None:
    if not isinstance(key, str):
        raise ConfigError(f"{what} keys must be module names or regular expressions, got {key!r}")
    try:
        re.compile(key)
    except re.error as exc:
        raise ConfigError(f"{what} key {key!r} is not a valid regular expression: {exc}") from None


def _names_or_regex(what: str, value: Any) -> list[str] | str:
    """Validate a target-like field: a non-empty list of names or a compilable regex string."""
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"{what} is an empty string; give module names, a regex, or 'all-linear'")
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as exc:
                raise ConfigError(f"{what} {value!r} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, (list, tuple, set)):
        names = sorted(value) if isinstance(value, set) else list(value)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"{what} must be a non-empty list of module names, got {value!r}")
        return names
    raise ConfigError(f"{what} must be a list of module names or a regex string, got {type(value).__name__}")
