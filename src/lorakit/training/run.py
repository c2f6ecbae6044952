"""`lorakit.train(...)`: one whole run — data checked up front, model loaded, adapter trained and saved.

Outputs in ``output_dir``: ``adapter/`` (PEFT layout), ``train_config.yaml`` (the run's full
config), ``metrics.jsonl``, ``loss.png``, ``checkpoints/step-N/``, ``result.json`` and, when the
validation data has references, ``eval_predictions.jsonl``. What trains is the run's ``method``
(`lorakit.methods`: LoRA by default; full fine-tuning writes ``model/``, BitFit and the bottleneck
adapter ``trained/``, the frozen model nothing but its metrics). An ``output_dir`` with files in it
(an earlier run) is refused unless ``resume`` (continue it) or ``overwrite`` (replace it) is set.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..control import adapters, set_adapter, set_fast_path
from ..errors import ConfigError
from ..inject import delete_adapter
from ..methods import make_method
from ..models.device import parse_device, require_device, resolve_device
from ..report import summary, trainable_parameters
from ..safe_files.atomic import write_text_atomically
from ..state import active_adapters
from ..tasks.base import PreparedData
from .config import TrainConfig
from .launch import TRACKING_DIR, make_accelerator, process_device, with_launch_precision
from .loop import evaluate_only, run_loop
from .sharded import check_sharding, make_parameters_whole

log = logging.getLogger("lorakit.training")


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    interrupted: bool
    stats: Any
    final_eval: dict | None
    records: list[dict]
    main_process: bool = True  # False on a DDP run's other processes, which write no files
    notes: list[str] = field(default_factory=list)  # what variants report at the end (AdaLoRA's ranks)
    best_step: int | None = None  # with save_best: the step whose adapter adapter_dir holds
    stopped_early: bool = False
    memory: Any = None  # with memory_report: a MemoryReport (tensors after the first step, measured peak)
    method: str = "lora"
    saved: Path | None = None  # what the method wrote (adapter/, model/, trained/; None: nothing)
    trainable_params: int = 0
    total_params: int = 0


# The split of a DatasetDict given as valid_data without valid_split: the first of these it has.
VALID_SPLITS = ("validation", "test")


def prepare_data(cfg: TrainConfig, tokenizer) -> PreparedData:
    """Read, validate and tokenize the data; raises DataError before any training starts."""
    from ..data import Collator, eval_pairs, read_records, split_records, tokenize_records

    columns = cfg.data_column_map()
    records = read_records(cfg.data, split=cfg.data_split, columns=columns)
    if cfg.valid_data:
        valid_records = read_records(
            cfg.valid_data,
            split=cfg.valid_split,
            columns=columns,
            default_split=VALID_SPLITS,
            split_flag="--valid-split",
        )
        train_records = records
    elif cfg.valid_ratio:
        train_records, valid_records = split_records(records, cfg.valid_ratio, seed=cfg.seed)
    else:
        train_records, valid_records = records, []
    train, stats = tokenize_records(train_records, tokenizer, max_length=cfg.max_length, packing=cfg.packing)
    valid = tokenize_records(valid_records, tokenizer, max_length=cfg.max_length)[0] if valid_records else []
    pairs = eval_pairs(valid_records, tokenizer) if valid_records else []
    return PreparedData(train, valid, pairs, Collator(tokenizer), stats)


def train(
    config: TrainConfig | dict | str | Path | None = None,
    *,
    loaded: tuple | None = None,
    progress: bool = True,
    on_data: Callable[[Any], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune a LoRA adapter as ``config`` says (``task="causal-lm"``, the default, ``"classify"``,
    ``"token-classify"``, ``"reward"`` or ``"dpo"``; see `lorakit.tasks`) (a TrainConfig, a dict, or a YAML/JSON path;
    keyword ``overrides`` such as ``model="smollm2-135m"`` or ``lr=1e-4`` win).

    Pass ``loaded=(model, tokenizer)`` to train an already loaded model instead of loading
    ``config.model``. ``on_data(stats)`` is called with the training data's statistics
    (``stats.summary()`` is one line) as soon as the data is read, before training starts.
    """
    cfg = TrainConfig.from_sources(config.to_dict() if isinstance(config, TrainConfig) else config, **overrides)
    cfg = with_launch_precision(cfg)  # what the run's config file then records
    if not cfg.data:
        raise ConfigError("no training data: set data (--data FILE.jsonl)")
    if loaded is not None and cfg.quantize:
        raise ConfigError(
            f"quantize={cfg.quantize} applies to the model train() loads, and this one was passed in loaded: "
            f"quantize it first (lorakit.quantize(model, {cfg.quantize!r})) and leave quantize unset"
        )
    check_output_dir(cfg)  # before the minutes of loading: an earlier run is never replaced unasked
    if (cfg.early_stopping_patience or cfg.save_best) and not (cfg.valid_data or cfg.valid_ratio):
        what = "early_stopping_patience" if cfg.early_stopping_patience else "save_best"
        raise ConfigError(f"{what} compares evaluations: give validation data (--valid-data or --valid-ratio)")
    method = make_method(cfg.method)
    if not method.trains and not (cfg.valid_data or cfg.valid_ratio):
        raise ConfigError(
            f"method {cfg.method} trains nothing and only evaluates: "
            "give validation data (--valid-data or --valid-ratio)"
        )
    device = parse_device(resolve_device(cfg.device))
    require_device(str(device))  # a clear error before accelerate meets a missing GPU
    model_device = _device_type(loaded[0]) if loaded is not None else device.type
    check_mixed_precision(cfg.mixed_precision, model_device)
    from ..tasks import make_task

    task = make_task(cfg)  # a classifier reads its data here: the label count shapes the model
    accelerator = make_accelerator(cfg)  # writes nothing; under a launch it knows this process's GPU
    check_sharding(cfg, accelerator)
    if loaded is not None:
        model, tokenizer = loaded
    else:
        from ..models import load_model

        # Under a launch one process downloads or converts into the model cache; the others wait for
        # it and then read the cache, instead of all doing the same conversion at once.
        with accelerator.main_process_first():
            model, tokenizer = load_model(
                cfg.model,
                dtype=cfg.dtype,
                device=process_device(device, accelerator),
                gradient_checkpointing=cfg.gradient_checkpointing,
                **cfg.quantize_kwargs(),
                **task.load_kwargs(),
            )
    before = _adapter_state(model)
    try:
        task.prepare_model(model, tokenizer)  # may load adapters (DPO's reference adapter)
        data = task.prepare_data(tokenizer)
    except Exception:
        if loaded is not None:
            _restore_adapter_state(model, before)
        raise
    if data is None:  # the task reads its data as causal-LM training does
        data = prepare_data(cfg, tokenizer)
    log.info("training data: %s", data.stats.summary())
    if on_data is not None and accelerator.is_main_process:  # under DDP: told once
        on_data(data.stats)
    if data.stats.n_truncated:
        log.warning(
            "%d of %d training examples were longer than max_length=%d and were truncated",
            data.stats.n_truncated,
            data.stats.n_records,
            cfg.max_length,
        )
    # The adapter before any file: a target that matches nothing must not leave an output directory.
    prepared = method.snapshot(model)
    try:
        trained = method.prepare(model, task, cfg)  # the model, or the wrapper that trains (PEFT's)
        set_fast_path(model, cfg.fast_path)
        log.info("method %s: %s", cfg.method, summary(trained))
        out_dir = Path(cfg.output_dir)
        accelerator.wait_for_everyone()  # under DDP: every process checked output_dir before one writes
        out_dir.mkdir(parents=True, exist_ok=True)
        if accelerator.is_main_process:  # under DDP every process gets here; one writes
            if cfg.overwrite:
                _remove_earlier_outputs(out_dir)
            _write_config(cfg, out_dir / "train_config.yaml")
        loop = (run_loop if method.trains else evaluate_only)(
            trained,
            tokenizer,
            cfg,
            data.train,
            data.collate,
            out_dir,
            eval_examples=data.valid,
            eval_pairs=data.valid_pairs,
            accelerator=accelerator,
            progress=progress,
            task=task,
        )
    except Exception:
        if loaded is not None:  # the caller's model goes back as it came, without the half-trained adapter
            method.restore(model, prepared)
            _restore_adapter_state(model, before)
        raise
    adapter_dir, saved = out_dir / "adapter", None
    if not loop.interrupted:
        make_parameters_whole(trained)  # FSDP2: every process joins the gathering, the main one then writes
    n_trainable, n_total = trainable_parameters(trained)
    if not loop.interrupted and loop.main_process:  # under DDP one process writes, not all at once
        saved = method.save(trained, out_dir, tokenizer)
        task.save(out_dir)
        final = {k: v for k, v in (loop.last_eval or {}).items() if k != "predictions"}
        predictions = (loop.last_eval or {}).get("predictions")
        if predictions:
            write_text_atomically(
                out_dir / "eval_predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions)
            )
        result = {"steps": loop.steps, "final_eval": final}
        result.update(method=cfg.method, trainable_params=n_trainable, total_params=n_total)
        if cfg.early_stopping_patience:
            result["stopped_early"] = loop.stopped_early
        if cfg.save_best or cfg.early_stopping_patience:
            result["best_step"], result["best_eval_loss"] = loop.best_step, loop.best_eval_loss
        if cfg.save_best:
            result["adapter_step"] = loop.best_step if loop.best_step is not None else loop.steps
        write_text_atomically(out_dir / "result.json", json.dumps(result, indent=2) + "\n")
    return TrainResult(
        out_dir,
        adapter_dir,
        loop.steps,
        loop.interrupted,
        data.stats,
        loop.last_eval,
        loop.records,
        loop.main_process,
        loop.notes,
        loop.best_step if cfg.save_best else None,
        loop.stopped_early,
        loop.memory,
        cfg.method,
        saved,
        n_trainable,
        n_total,
    )


# What a run writes in output_dir beside train_config.yaml and metrics.jsonl (always rewritten) and
# checkpoints/ (the loop's): an overwriting run removes them first, so that none of the earlier
# run's is left beside the new run's files (an interrupted run writes no adapter, a run without
# validation data no predictions).
EARLIER_OUTPUTS = (
    "adapter",
    "result.json",
    "eval_predictions.jsonl",
    "loss.png",
    "memory.json",
    "labels.json",  # a classifier's or tagger's label order (lorakit.tasks.classify, token_classify)
    "model",  # full fine-tuning's model (lorakit.methods)
    "trained",  # BitFit's and the bottleneck adapter's trained tensors
    TRACKING_DIR,
)


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse an ``output_dir`` with files in it (an earlier run, most likely) unless ``resume``
    (continue that run) or ``overwrite`` (replace it) says what to do; an absent or empty folder
    is fine. ``resume`` in a finished run that left no checkpoint would start afresh and replace
    the run's adapter: refused too."""
    from .checkpoint import latest_checkpoint

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a folder: choose another --output-dir")
    if not out.is_dir() or not any(out.iterdir()) or cfg.overwrite:
        return
    if not cfg.resume:
        raise ConfigError(
            f"output_dir {out} is not empty (an earlier run?): continue that run with --resume, "
            "replace it with --overwrite, or choose another --output-dir"
        )
    saved = ("adapter", "model", "trained")  # what a finished run's method wrote (lorakit.methods)
    if latest_checkpoint(out / "checkpoints") is None and any((out / name).exists() for name in saved):
        raise ConfigError(
            f"--resume: the run in {out} is finished and left no checkpoint to continue from: "
            "replace it with --overwrite, or choose another --output-dir"
        )


def _remove_earlier_outputs(out_dir: Path) -> None:
    from ..safe_files.atomic import discard

    for name in EARLIER_OUTPUTS:
        if os.path.lexists(out_dir / name):
            log.info("overwrite: removing %s of the earlier run", out_dir / name)
            discard(out_dir / name)


def check_mixed_precision(mixed_precision: str, device_type: str) -> None:
    """Refuse fp16 mixed precision for a model on the CPU (``device_type``: where the model is or
    will be loaded) before the Accelerator is made and anything is written (accelerate would
    refuse it only once the run's folder and config exist)."""
    if mixed_precision == "fp16" and device_type == "cpu":
        raise ConfigError(
            "mixed_precision=fp16 needs a GPU, and the model is on the CPU; "
            "use mixed_precision=bf16 (supported on CPUs) or no"
        )


def _device_type(model) -> str:
    parameter = next(model.parameters(), None)
    return parameter.device.type if parameter is not None else "cpu"


def _adapter_state(model) -> tuple[dict, list[str], list[str]]:
    """What a run changes in a caller's model besides adding adapters: which parameters train,
    which adapters are active; and which adapters it had."""
    return {p: p.requires_grad for p in model.parameters()}, active_adapters(model), adapters(model)


def _restore_adapter_state(model, state: tuple[dict, list[str], list[str]]) -> None:
    trains, active, had = state
    for name in adapters(model):
        if name not in had:  # the run's adapter, and a task's (DPO's reference adapter)
            delete_adapter(model, name)
    for param, flag in trains.items():
        param.requires_grad_(flag)
    if active:
        set_adapter(model, active)


def _write_config(cfg: TrainConfig, path: Path) -> None:
    import yaml

    write_text_atomically(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
