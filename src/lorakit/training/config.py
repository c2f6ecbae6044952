"""`TrainConfig`: one training run, from a YAML/JSON file plus overrides (CLI flags mirror fields)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import INIT_CHOICES, LoraConfig, valid_init, variant_names
from ..errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a run needs. Defaults suit the embedded model on a CPU.

    Steps are optimizer steps (each ``batch_size * grad_accum`` examples). ``max_steps`` wins
    over ``epochs`` when set. Eval/checkpoint intervals are in steps; 0 turns them off.
    """

    data: str | None = None
    model: str = "smollm2-135m"
    valid_data: str | None = None
    valid_ratio: float = 0.0
    output_dir: str = "runs/lorakit"
    # LoRA
    variant: str = "lora"
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: list[str] | str | None = "all-linear"
    target_parameters: list[str] | str | None = None
    init: str = "default"
    use_rslora: bool = False
    # AdaLoRA's budget schedule (variant adalora; r is the initial rank)
    adalora_target_r: int = 8
    adalora_tinit: int = 0
    adalora_tfinal: int = 0
    adalora_delta_t: int = 1
    adalora_beta1: float = 0.85
    adalora_beta2: float = 0.85
    adalora_orth_reg: float = 0.1
    # optimisation
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    loraplus_ratio: float | None = None
    seed: int = 0
    # data
    max_length: int = 512
    packing: bool = False
    # evaluation and checkpoints
    eval_every: int = 0
    eval_max_examples: int | None = None
    max_new_tokens: int = 64
    save_every: int = 0
    keep_checkpoints: int = 0
    log_every: int = 1
    # hardware
    device: str | None = None
    dtype: str = "auto"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # the fused LoRA/DoRA layers (lorakit/kernels); False runs the plain reference formula
    fast_path: bool = True
    # torch.compile the training steps' forward and backward (evaluation stays eager)
    compile: bool = False
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "epochs": self.epochs,
                    "max_length": self.max_length, "max_new_tokens": self.max_new_tokens, "log_every": self.log_every}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps <= 0):
            raise ConfigError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if not (isinstance(self.adalora_delta_t, int) and self.adalora_delta_t > 0):
            raise ConfigError(f"adalora_delta_t must be a positive integer, got {self.adalora_delta_t!r}")
        for name in ("eval_every", "save_every", "keep_checkpoints", "warmup_steps", "adalora_tinit", "adalora_tfinal"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("valid_ratio", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if not 0 <= self.valid_ratio < 1:
            raise ConfigError(f"valid_ratio must be in [0, 1), got {self.valid_ratio!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.loraplus_ratio is not None and not self.loraplus_ratio > 0:
            raise ConfigError(f"loraplus_ratio must be positive (LoRA+ suggests 16), got {self.loraplus_ratio!r}")
        if self.variant not in variant_names():
            raise ConfigError(f"variant must be one of {variant_names()}, got {self.variant!r}")
        if not valid_init(self.init):
            raise ConfigError(f"init must be {INIT_CHOICES}, got {self.init!r}")
        if isinstance(self.target_modules, str) and "," in self.target_modules:
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        if self.target_modules == "none":  # parameters only (target_parameters)
            self.target_modules = None
        if isinstance(self.target_parameters, str):
            self.target_parameters = [t.strip() for t in self.target_parameters.split(",") if t.strip()]
        self.lora_config()  # validates r, alpha, dropout, targets now rather than after loading a model
        if self.variant == "adalora" and not (isinstance(self.adalora_target_r, int) and 0 < self.adalora_target_r <= self.r):
            raise ConfigError(f"adalora_target_r must be between 1 and r={self.r}, got {self.adalora_target_r!r}")

    def adalora_schedule(self):
        from ..variants.adalora import AdaLoraSchedule

        return AdaLoraSchedule(target_r=self.adalora_target_r, tinit=self.adalora_tinit, tfinal=self.adalora_tfinal,
                               delta_t=self.adalora_delta_t, beta1=self.adalora_beta1, beta2=self.adalora_beta2,
                               orth_reg_weight=self.adalora_orth_reg)

    def lora_config(self) -> LoraConfig:
        return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules,
                          target_parameters=self.target_parameters, init=self.init, use_rslora=self.use_rslora,
                          seed=self.seed, variant=self.variant)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_sources(cls, file: str | Path | dict | None = None, **overrides: Any) -> "TrainConfig":
        """Fields from a YAML/JSON file (or a mapping, taken as it is), then ``overrides``, whose
        None values are ignored: they are the CLI flags left unset."""
        if isinstance(file, dict):
            values: dict[str, Any] = dict(file)
        else:
            values = read_config_file(file) if file else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        _read_float_strings(values)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known options: {sorted(known - {'extra'})}")
        return cls(**values)


def _read_float_strings(values: dict[str, Any]) -> None:
    """YAML 1.1 reads ``lr: 2e-4`` (no dot) as a string; a float field takes it as the number meant."""
    float_fields = {f.name for f in fields(TrainConfig) if "float" in str(f.type)}
    for name in float_fields & set(values):
        if isinstance(values[name], str):
            try:
                values[name] = float(values[name])
            except ValueError:
                pass  # left as it is: __post_init__ reports it by name


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different types; both mean "not parseable"
        raise ConfigError(f"cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values")
    return data
