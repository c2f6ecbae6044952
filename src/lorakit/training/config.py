"""`TrainConfig`: one training run, from a YAML/JSON file plus overrides (CLI flags mirror fields)."""

from __future__ import annotations

import json
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

from .. import variants  # noqa: F401  (registers every variant, whose training options are fields here)
from ..config import VARIANTS, LoraConfig, variant_names
from ..errors import ConfigError
from ..init_names import INIT_CHOICES, valid_init

SCHEDULES = ("cosine", "linear", "constant")
# QLoRA: the base's quantization (bitsandbytes) and the dtype its layers compute in ("auto": fp32 on
# the CPU, bf16 on a GPU).
QUANTIZE = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
MIXED_PRECISION = ("no", "bf16", "fp16")
# Experiment trackers (accelerate's) a run can report to, and the package each needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}

# LoraConfig fields that are no training option: the older variant booleans (``variant`` says the
# same), what the loaded model decides (fan_in_fan_out, base_model_name_or_path, task_type), and
# ``seed``, which the run has for itself and passes on.
NOT_OPTIONS = (
    *(v.legacy_flag for v in VARIANTS.values() if v.legacy_flag),
    "fan_in_fan_out",
    "base_model_name_or_path",
    "task_type",
    "seed",
)
# A run needs targets, where the library has no default: train every linear layer unless told.
# "none" (parameters only) is a string for the command line; lora_config() passes it as None.
TRAINING_DEFAULTS = {"target_modules": "all-linear"}
# Each variant's training options (Variant.training_options: AdaLoRA's schedule) by variant name:
# {field of its options dataclass: training option name}.
VARIANT_OPTIONS = {v.name: v.training_option_keys() for v in VARIANTS.values() if v.training_options is not None}


def _option(source: Field, default: Any = MISSING) -> tuple[str, Any, Field]:
    """A copy of dataclass field ``source`` (type and default) for make_dataclass."""
    if default is not MISSING:
        return source.name, source.type, field(default=default)
    if source.default_factory is not MISSING:
        return source.name, source.type, field(default_factory=source.default_factory)
    return source.name, source.type, field(default=source.default)


# Generated from the dataclasses themselves, so that a field added to LoraConfig or to the schedule
# is a YAML key and a flag without anyone copying it. Keyword-only: TrainConfig's own fields keep
# their positions.
LORA_OPTIONS = tuple(f.name for f in fields(LoraConfig) if f.name not in NOT_OPTIONS)
_LoraOptions = make_dataclass(
    "_LoraOptions",
    [_option(f, TRAINING_DEFAULTS.get(f.name, MISSING)) for f in fields(LoraConfig) if f.name in LORA_OPTIONS],
    kw_only=True,
)
_VariantOptions = make_dataclass(
    "_VariantOptions",
    [
        (VARIANT_OPTIONS[name][f.name], *_option(f)[1:])
        for name in VARIANT_OPTIONS
        for f in fields(VARIANTS[name].training_options)
    ],
    kw_only=True,
)


@dataclass
class TrainConfig(_VariantOptions, _LoraOptions):
    """Everything a run needs. Defaults suit the embedded model on a CPU.

    Steps are optimizer steps (each ``batch_size * grad_accum`` examples). ``max_steps`` wins
    over ``epochs`` when set. Eval/checkpoint intervals are in steps; 0 turns them off.

    The adapter's options are `LoraConfig`'s own fields (all but ``NOT_OPTIONS``), with its
    defaults but ``target_modules="all-linear"``; AdaLoRA's are `AdaLoraSchedule`'s, prefixed
    ``adalora_`` (used with ``variant="adalora"``, where ``r`` is the initial rank). List options
    also take comma-separated strings, dict options a JSON object in a string (the command line).
    """

    data: str | None = None
    model: str = "smollm2-135m"
    # what is learned: causal-lm (next-token fine-tuning) | classify (sequence classification) |
    # token-classify (a tag per word) | reward (a reward model on preference pairs) | dpo (preference
    # optimisation of the causal LM)
    task: str = "causal-lm"
    # classify / token-classify: the labels (tags) in index order (comma-separated); unset: taken from
    # the training data
    labels: list[str] | None = None
    # what trains: lora (this adapter, any variant) | full | bitfit | bitfit-added | frozen | houlsby |
    # prompt-tuning | prefix-tuning | ia3 (the last three run by PEFT); see lorakit.methods
    method: str = "lora"
    # the method's own options, e.g. {"num_virtual_tokens": 20} (prompt tuning), {"bottleneck": 64} (houlsby)
    method_options: dict[str, Any] | None = None
    # reward: TRL's center_rewards_coefficient, the weight of mean((r_chosen + r_rejected)^2)
    center_rewards: float | None = None
    # dpo: how far the policy may move from the reference (beta), the loss, and label smoothing (sigmoid)
    beta: float = 0.1
    dpo_loss: str = "sigmoid"
    label_smoothing: float = 0.0
    # dpo: a frozen adapter as the reference (the policy: it plus the trained adapter); unset: the base
    ref_adapter: str | None = None
    # dpo: the reference's log-probabilities computed once before training, not in every step
    precompute_ref: bool = False
    valid_data: str | None = None
    valid_ratio: float = 0.0
    output_dir: str = "runs/lorakit"
    # Hugging Face datasets (a save_to_disk folder or a cached name as data / valid_data): the split of
    # a DatasetDict (None: train; for valid_data: validation, else test), and record field=column
    # pairs, e.g. "prompt=question,completion=answer" (any source)
    data_split: str | None = None
    valid_split: str | None = None
    data_columns: str | None = None
    # LoRA: LoraConfig's fields and AdaLoRA's schedule, from the bases generated above
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
    # adamw (torch) | adamw8bit | paged_adamw | paged_adamw8bit (bitsandbytes)
    optimizer: str = "adamw"
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
    # stop when the eval loss has not improved for this many evaluations (0: never)
    early_stopping_patience: int = 0
    # the adapter written to output_dir/adapter is the one with the best eval loss
    save_best: bool = False
    # experiment trackers, comma-separated: tensorboard, wandb, mlflow or none
    report_to: str = "none"
    # hardware
    device: str | None = None
    dtype: str = "auto"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # QLoRA: load the base quantized (nf4 | fp4 | int8 through bitsandbytes; None: as dtype says)
    quantize: str | None = None
    double_quant: bool = True
    compute_dtype: str = "auto"
    # write the memory by category (memory_report) and the measured peak to memory.json and the log
    memory_report: bool = False
    # the fused LoRA/DoRA layers (lorakit/kernels); False runs the plain reference formula
    fast_path: bool = True
    # torch.compile the training steps' forward and backward (evaluation stays eager)
    compile: bool = False
    resume: bool = False
    # replace the run already in output_dir (its adapter, metrics, plot and checkpoints)
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "epochs": self.epochs,
            "max_length": self.max_length,
            "max_new_tokens": self.max_new_tokens,
            "log_every": self.log_every,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps <= 0):
            raise ConfigError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        for name in ("eval_every", "save_every", "keep_checkpoints", "warmup_steps", "early_stopping_patience"):
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
        if self.resume and self.overwrite:
            raise ConfigError(
                "resume continues the run in output_dir and overwrite replaces it: choose one (--resume or --overwrite)"
            )
        self.data_columns = _columns_option(self.data_columns)
        self._check_task()
        self._check_method()
        if (self.early_stopping_patience or self.save_best) and not self.eval_every:
            what = "early_stopping_patience" if self.early_stopping_patience else "save_best"
            raise ConfigError(
                f"{what} compares evaluations during training: set eval_every (--eval-every N) "
                "and validation data (--valid-data or --valid-ratio)"
            )
        self.report_to = _trackers_option(self.report_to)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        self._check_quantization()
        if self.loraplus_ratio is not None and not self.loraplus_ratio > 0:
            raise ConfigError(f"loraplus_ratio must be positive (LoRA+ suggests 16), got {self.loraplus_ratio!r}")
        if self.variant not in variant_names():
            raise ConfigError(f"variant must be one of {variant_names()}, got {self.variant!r}")
        if not valid_init(self.init):
            raise ConfigError(f"init must be {INIT_CHOICES}, got {self.init!r}")
        for name in LORA_OPTIONS:
            setattr(self, name, _from_string(name, _LORA_TYPES[name], getattr(self, name)))
        if self.target_modules == "none":  # parameters only (target_parameters)
            self.target_modules = None
        lora = self.lora_config()  # validates r, alpha, dropout, targets now rather than after loading a model
        for name in VARIANT_OPTIONS:
            options = self.variant_options(name)  # each options dataclass validates itself
            if name == self.variant:
                VARIANTS[name].check_training_options(options, lora)

    def _check_task(self) -> None:
        from ..tasks import TASKS, task_names
        from ..tasks.options import check_preference_options

        if self.task not in task_names():
            raise ConfigError(f"task must be one of {' | '.join(task_names())}, got {self.task!r}")
        if isinstance(self.labels, str):  # the command line's comma-separated list
            self.labels = [item.strip() for item in self.labels.split(",") if item.strip()]
        if self.labels is not None:
            if not isinstance(self.labels, (list, tuple)) or not self.labels:
                raise ConfigError(f"labels must be a non-empty list of label names, got {self.labels!r}")
            self.labels = [str(label) for label in self.labels]
            if not TASKS[self.task].uses_labels:
                raise ConfigError(
                    f"labels name a classifier's classes; they do not apply to task={self.task}: drop --labels"
                )
        check_preference_options(self)

    def _check_method(self) -> None:
        from ..methods import check_method

        if isinstance(self.method_options, str):  # the command line's JSON object
            try:
                self.method_options = json.loads(self.method_options) if self.method_options.strip() else None
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"method_options must be a JSON object such as '{{\"num_virtual_tokens\": 20}}', got "
                    f"{self.method_options!r} ({exc.msg} at {_position(exc)})"
                ) from None
        if not isinstance(self.method, str):
            raise ConfigError(f"method must be a string, got {self.method!r}")
        check_method(self.method, self.method_options)
        if self.task == "dpo" and self.method != "lora":
            raise ConfigError(
                f"task dpo measures the policy against its reference, the model with the adapter off (or "
                f"--ref-adapter), so it trains a LoRA adapter: method {self.method} does not apply (use method lora)"
            )

    def _check_quantization(self) -> None:
        from .optim import OPTIMIZERS

        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {' | '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if isinstance(self.quantize, str) and self.quantize.lower() in ("none", ""):
            self.quantize = None  # the command line's way to say "not quantized" over a config file
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be {' | '.join(QUANTIZE)} or none, got {self.quantize!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be {' | '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.compute_dtype != "auto" and self.quantize is None:
            raise ConfigError(
                f"compute_dtype={self.compute_dtype} is the dtype a quantized base computes in: add "
                "--quantize nf4 (or fp4, int8), or set the model's dtype with --dtype"
            )

    def quantize_kwargs(self) -> dict[str, Any]:
        """What ``load_model`` is given for this run's quantization (nothing when not quantized)."""
        if self.quantize is None:
            return {}
        return {
            "quantize": self.quantize,
            "double_quant": self.double_quant,
            "compute_dtype": None if self.compute_dtype == "auto" else self.compute_dtype,
        }

    def data_column_map(self) -> dict[str, str]:
        """``data_columns`` as ``{record field: the data's column}``."""
        from ..data.readers import parse_columns

        return parse_columns(self.data_columns)

    def variant_options(self, name: str) -> Any:
        """Variant ``name``'s training options (its ``training_options`` dataclass) from this run's
        fields, e.g. AdaLoRA's budget schedule from the ``adalora_*`` options."""
        return VARIANTS[name].training_options(**{f: getattr(self, key) for f, key in VARIANT_OPTIONS[name].items()})

    def trackers(self) -> list[str]:
        """The experiment trackers ``report_to`` names (none: an empty list)."""
        return [name for name in self.report_to.split(",") if name != "none"]

    def lora_config(self) -> LoraConfig:
        """The adapter this run trains: every LoRA option, and the run's seed."""
        return LoraConfig(**{name: getattr(self, name) for name in LORA_OPTIONS}, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        """The options by name, in the order a run's ``train_config.yaml`` lists them."""
        values = asdict(self)
        # asdict lists the generated bases' fields (the adapter's) first; the file starts as it did.
        first = ("data", "model", "valid_data", "valid_ratio", "output_dir")
        return {**{name: values[name] for name in first}, **values}

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


_LORA_TYPES = {f.name: str(f.type) for f in fields(LoraConfig)}


def _position(exc: json.JSONDecodeError) -> str:
    """Where a JSON error is, counted as editors count: column 1 is the first character."""
    return f"column {exc.colno}" if exc.lineno == 1 else f"line {exc.lineno} column {exc.colno}"


def _from_string(name: str, annotation: str, value: Any) -> Any:
    """The value of list or dict option ``name`` given as a string: comma-separated items, or a
    JSON object. A string stays one where the option also takes one (a regex in target_modules)."""
    kinds = {kind.strip() for kind in annotation.split("|")}
    if any(kind.startswith("dict[") for kind in kinds):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{name} must be a JSON object such as '{{\"q_proj\": 4}}', got {value!r} "
                    f"({exc.msg} at {_position(exc)})"
                ) from None
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"{name} must be a mapping of module names to values (a JSON object on the command line), got {value!r}"
            )
        return value
    if not isinstance(value, str) or not any(kind.startswith("list[") for kind in kinds):
        return value
    if "str" in kinds and "," not in value:
        return value
    items = [item.strip() for item in value.split(",") if item.strip()]
    if "list[int]" in kinds:
        try:
            return [int(item) for item in items]
        except ValueError:
            raise ConfigError(f"{name} must be comma-separated integers such as 0,1,2, got {value!r}") from None
    return items


def _trackers_option(value: Any) -> str:
    """``report_to`` as one comma-separated string of known trackers (a YAML list is taken too)."""
    names = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [str(name).strip().lower() for name in names if str(name).strip()] or ["none"]
    unknown = [name for name in names if name not in (*TRACKERS, "none")]
    if unknown:
        raise ConfigError(f"report_to must be {' | '.join((*TRACKERS, 'none'))} (comma-separated), got {value!r}")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"report_to: none reports nowhere and cannot be combined with trackers, got {value!r}")
    return ",".join(dict.fromkeys(names))


def _read_float_strings(values: dict[str, Any]) -> None:
    """YAML 1.1 reads ``lr: 2e-4`` (no dot) as a string; a float field takes it as the number meant."""
    float_fields = {f.name for f in fields(TrainConfig) if "float" in str(f.type) and "dict" not in str(f.type)}
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


def _columns_option(value: Any) -> str | None:
    """``data_columns`` (a ``field=column,...`` string, or a mapping from a YAML file) checked and
    written as the string the command line takes, which is what train_config.yaml records."""
    from ..data.readers import parse_columns
    from ..errors import DataError

    if value is None or value == "":
        return None
    if not isinstance(value, (str, dict)):
        raise ConfigError(f"data_columns must be 'field=column,...' or a mapping, got {value!r}")
    try:
        columns = parse_columns(value)
    except DataError as e:
        raise ConfigError(str(e)) from None
    return ",".join(f"{field}={column}" for field, column in columns.items()) or None
