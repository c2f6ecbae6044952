"""Command-line flags generated from `TrainConfig`'s fields, so flags and config keys never drift.

``--max-steps 30`` sets ``max_steps``; booleans get ``--packing`` / ``--no-packing``; list options
take comma-separated values and dict options a JSON object (``--rank-pattern '{"q_proj": 4}'``);
flags left unset fall through to the YAML file (``--config``) and then to the dataclass defaults.
The LoRA flags are `LoraConfig`'s fields (through `TrainConfig`), so a new adapter option is a flag.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields
from typing import Any

from ..config import VARIANTS, variant_names
from ..training.config import LORA_OPTIONS, VARIANT_OPTIONS, TrainConfig

HELP = {
    "data": "training data: JSONL (prompt/completion, chat messages, text, alpaca or ShareGPT), CSV, Parquet, "
    "a datasets folder (save_to_disk) or a dataset name in the local Hugging Face cache (never downloaded)",
    "data_split": "split of a DatasetDict in --data (default: train)",
    "valid_split": "split of a DatasetDict in --valid-data (default: validation, else test)",
    "data_columns": "record fields from the data's columns, e.g. prompt=question,completion=answer",
    "task": "what is learned: causal-lm (next-token fine-tuning) | classify (sequence classification of "
    "{text, label} or {text, text_pair, label} lines) | token-classify (a tag per word of {tokens, tags} lines) "
    "| reward (a reward model on {prompt, chosen, rejected} preference pairs) | dpo (direct preference "
    "optimisation of the causal LM on the same pairs)",
    "labels": "classify / token-classify: the labels (tags) in index order, comma-separated (default: from the "
    "training data, integer labels as their own index; saved with the run)",
    "center_rewards": "reward: weight of mean((r_chosen + r_rejected)^2) in the loss, which centres the rewards "
    "on zero (TRL's center_rewards_coefficient; 0.01 is usual; default: none)",
    "beta": "dpo: how far the policy may move from the reference; rewards are beta x log-ratio",
    "dpo_loss": "dpo: sigmoid (DPO) | ipo (IPO, length-averaged as TRL) | hinge (SLiC)",
    "label_smoothing": "dpo with the sigmoid loss: the assumed share of flipped preference labels, in [0, 0.5) "
    "(conservative DPO)",
    "ref_adapter": "dpo: a frozen adapter directory (e.g. an SFT run's adapter) as the reference; the trained "
    "adapter then works on top of it (default: the base model, adapters off)",
    "precompute_ref": "dpo: compute the reference's log-probabilities once before training instead of in every "
    "step (one forward less per step)",
    "method": "what trains: lora (the LoRA adapter, any --variant) | full (every weight) | bitfit (biases only) | "
    "bitfit-added (zero biases added to the target modules, for bias-free models) | frozen (evaluate the base only) | "
    "houlsby (bottleneck adapters) | prompt-tuning | prefix-tuning | ia3 (these three run by PEFT)",
    "method_options": "the method's own options as JSON, e.g. '{\"num_virtual_tokens\": 20}' (prompt-tuning, "
    "prefix-tuning), '{\"bottleneck\": 64}' (houlsby)",
    "model": "base model: built-in alias, local directory, .gguf file or hub id (offline: must be cached)",
    "r": "rank of the update",
    "alpha": "scaling numerator: s = alpha / r (alpha / sqrt(r) with --use-rslora)",
    "dropout": "dropout on the adapter's input, in [0, 1)",
    "use_rslora": "rank-stabilised scaling alpha / sqrt(r)",
    "variant": "the LoRA-family member: {variants}",
    "exclude_modules": "modules to leave out: comma-separated names or a regex",
    "bias": "none | all (every bias trains) | lora_only (biases of adapted layers train)",
    "modules_to_save": "comma-separated modules trained in full and saved with the adapter (e.g. lm_head)",
    "rank_pattern": "per-module ranks as JSON, e.g. '{\"q_proj\": 4}' (names, suffixes or regexes)",
    "alpha_pattern": "per-module alphas as JSON, e.g. '{\"q_proj\": 8}'",
    "layers_to_transform": "comma-separated layer indices: adapt only modules in these layers",
    "layers_pattern": "name of the layer list for --layers-to-transform (e.g. layers, h)",
    "adapter_dtype": "dtype of the adapter weights: auto (the base's; fp32 on fp16 bases) | float32 | bfloat16 "
    "| float16",
    "projection_prng_key": "VeRA: seed of the shared random projection pair",
    "save_projection": "VeRA: write the shared projection pair into the adapter file",
    "d_initial": "VeRA: initial value of the scaling vector d",
    "valid_data": "validation data, in any form --data takes (else --valid-ratio of the training data)",
    "valid_ratio": "fraction of the training data held out for validation",
    "output_dir": "where the adapter, metrics.jsonl, loss.png and checkpoints go",
    "target_modules": "comma-separated module names, a regex, all-linear, or none (parameters only)",
    "target_parameters": "comma-separated parameters adapted directly, one update per expert for mixture-of-experts "
    "stacks, e.g. experts.gate_up_proj,experts.down_proj (no dropout or variant with these)",
    "loraplus_ratio": "LoRA+: learning rate of B = lr x this ratio (paper default 16)",
    "eval_every": "evaluate every N steps (0: only at the end)",
    "save_every": "checkpoint every N steps (0: only on Ctrl-C)",
    "keep_checkpoints": "keep only the newest N checkpoints (0: keep all)",
    "resume": "continue from the latest checkpoint in output_dir",
    "early_stopping_patience": "stop when the eval loss has not improved for N evaluations (needs --eval-every "
    "and validation data; 0: never)",
    "save_best": "write the adapter of the evaluation with the best eval loss to output_dir/adapter (needs "
    "--eval-every and validation data); result.json records its step",
    "report_to": "experiment trackers, comma-separated: tensorboard | wandb | mlflow | none (files under "
    "output_dir/tracking; pip install 'lorakit[track]')",
    "overwrite": "replace the run already in output_dir (its adapter, metrics, plot and checkpoints)",
    "mixed_precision": "no | bf16 | fp16 (GPU)",
    "dtype": "model weights dtype: auto | float32 | bfloat16 | float16",
    "init": "default | gaussian | pissa | pissa_niter_<N> (PiSSA by a randomized SVD: fast on large models) | olora",
    "optimizer": "adamw (torch) | adamw8bit | paged_adamw | paged_adamw8bit (bitsandbytes: 8-bit states, paged "
    "to the host under GPU memory pressure; the paged ones run unpaged off a CUDA GPU; pip install 'lorakit[qlora]')",
    "quantize": "QLoRA: load the base quantized by bitsandbytes: nf4 | fp4 | int8 | none "
    "(pip install 'lorakit[qlora]')",
    "double_quant": "with --quantize nf4/fp4: quantize the block scales too (saves ~0.4 bits per weight)",
    "compute_dtype": "with --quantize: the dtype the quantized layers compute in: auto (fp32 on the CPU, bf16 on a "
    "GPU) | bf16 | fp16 | fp32",
    "memory_report": "log the memory by category (quantized base, rest of the base, adapters, gradients, optimizer "
    "state) and the measured peak; written to output_dir/memory.json",
    "compile": "torch.compile the training step (inductor). The first batch compiles, and the first of another "
    "shape once more (on a CPU minutes each for a 30-layer model, and a C++ compiler is needed)",
}
SKIP = {"extra"}
# Each variant's own options describe themselves (Variant.option_help).
VARIANT_HELP = {
    key: VARIANTS[name].option_help.get(field, "")
    for name, keys in VARIANT_OPTIONS.items()
    for field, key in keys.items()
}
# How --help groups the flags; a field in no group is listed under "other options".
GROUPS = {
    "data and model": (
        "data",
        "valid_data",
        "valid_ratio",
        "data_split",
        "valid_split",
        "data_columns",
        "model",
        "output_dir",
        "overwrite",
    ),
    "task": (
        "task",
        "labels",
        "center_rewards",
        "beta",
        "dpo_loss",
        "label_smoothing",
        "ref_adapter",
        "precompute_ref",
    ),
    "method (what trains)": ("method", "method_options"),
    "LoRA adapter (LoraConfig)": LORA_OPTIONS,
    **{
        f"{VARIANTS[name].title} options (--variant {name})": tuple(keys.values())
        for name, keys in VARIANT_OPTIONS.items()
    },
    "optimisation": (
        "lr",
        "epochs",
        "max_steps",
        "batch_size",
        "grad_accum",
        "warmup_steps",
        "schedule",
        "weight_decay",
        "max_grad_norm",
        "loraplus_ratio",
        "optimizer",
        "seed",
    ),
    "data preparation": ("max_length", "packing"),
    "evaluation and checkpoints": (
        "eval_every",
        "eval_max_examples",
        "max_new_tokens",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "early_stopping_patience",
        "save_best",
        "report_to",
        "resume",
    ),
    "hardware and speed": ("device", "dtype", "mixed_precision", "gradient_checkpointing", "fast_path", "compile"),
    "QLoRA and memory": ("quantize", "double_quant", "compute_dtype", "memory_report"),
}
# Second spellings. ``--rank``: torchrun's parser rejects ``--r`` anywhere on its command line as an
# ambiguous prefix of its own flags (--rdzv-*, --role, ...), even after the script's name.
ALIASES = {"r": ("--rank",)}


def _type_of(default: Any, annotation: str):
    """The argparse type of a field: its annotation first (``alpha: float = 32`` takes 0.5)."""
    if isinstance(default, bool):
        return None
    if "list[" in annotation or "dict[" in annotation:  # split or JSON-read by TrainConfig
        return str
    if isinstance(default, float) or "float" in annotation:
        return float
    if isinstance(default, int) or ("int" in annotation and "str" not in annotation):
        return int
    return str


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, in GROUPS; every default is None so that only given flags override."""
    by_name = {f.name: f for f in fields(TrainConfig) if f.name not in SKIP}
    grouped = {name for names in GROUPS.values() for name in names}
    sections = [*GROUPS.items(), ("other options", tuple(n for n in by_name if n not in grouped))]
    for title, names in sections:
        if any(name in by_name for name in names):
            group = parser.add_argument_group(title)
            for name in names:
                if name in by_name:
                    _add_flag(group, by_name[name])


def _add_flag(group: argparse._ArgumentGroup, f: Field) -> None:
    """The flag of TrainConfig field ``f``, with its help text and default."""
    flags = ("--" + f.name.replace("_", "-"), *ALIASES.get(f.name, ()))
    default = f.default if f.default is not MISSING else None
    helptext = HELP.get(f.name, VARIANT_HELP.get(f.name, "")).replace("{variants}", " | ".join(variant_names()))
    helptext += f" (default: {default})" if default not in (None, "") else ""
    if isinstance(default, bool):
        group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
    else:
        metavar = "JSON" if "dict[" in str(f.type) else None
        group.add_argument(
            *flags, dest=f.name, type=_type_of(default, str(f.type)), default=None, metavar=metavar, help=helptext
        )


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in SKIP and hasattr(args, f.name)}
