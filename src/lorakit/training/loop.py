"""The training loop, on `accelerate` (CPU, one GPU, or DDP under `accelerate launch`).

The data order is a pure function of (seed, epoch), and each optimizer step consumes exactly
``grad_accum`` batches per process, so a run's position is three integers (step, epoch, batch)
and a checkpoint plus those integers resumes bit-for-bit.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..memory import MemoryReport, measured_peak, memory_report
from ..safe_files.atomic import write_text_atomically
from ..state import adapter_configs
from .checkpoint import Position, latest_checkpoint, load_checkpoint, prune_checkpoints, rng_state, save_checkpoint
from .config import TrainConfig
from .evaluate import evaluate
from .launch import make_accelerator, tracking_dir
from .optim import make_optimizer, make_scheduler
from .plot import plot_loss_curve

log = logging.getLogger("lorakit.training")


@dataclass
class LoopResult:
    steps: int
    interrupted: bool
    records: list[dict] = field(default_factory=list)
    last_eval: dict | None = None
    main_process: bool = True  # False on the other processes of a DDP run: they write no files
    notes: list[str] = field(default_factory=list)  # the variants' end-of-training lines (TrainingHooks.finish)
    best_step: int | None = None  # the step of the best eval loss (save_best: the adapter's weights)
    best_eval_loss: float | None = None
    stopped_early: bool = False  # early_stopping_patience evaluations without improvement ended the run
    memory: MemoryReport | None = None  # with memory_report: the tensors after the first step, the run's peak


def epoch_batches(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch, shuffled from (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_examples, generator=gen).tolist()
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def steps_per_epoch(n_examples: int, cfg: TrainConfig, world: int = 1) -> int:
    batches = math.ceil(n_examples / cfg.batch_size)
    return max(1, batches // (cfg.grad_accum * world))


def total_steps(n_examples: int, cfg: TrainConfig, world: int = 1) -> int:
    return cfg.max_steps or cfg.epochs * steps_per_epoch(n_examples, cfg, world)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line (train logs and evals), kept in memory too."""

    def __init__(self, path: Path, resume_step: int | None, report: Callable[[dict], None] | None = None) -> None:
        self.path = path
        self.report = report  # each new record also goes to the experiment trackers
        self.records: list[dict] = []
        if resume_step is not None and path.is_file():
            # Lines written after the checkpoint by the interrupted run are dropped: they will be
            # produced again, identically, by the resumed run.
            self.records = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= resume_step]
        write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def add(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.report is not None:
            self.report(record)


@dataclass
class BestEval:
    """The best eval loss so far and the evaluations since it: early stopping's and save_best's
    state, which rides in each checkpoint's ``extra`` so that a resumed run stops where the
    uninterrupted one would. A NaN loss never counts as an improvement."""

    loss: float | None = None
    step: int | None = None
    evals_since: int = 0

    def update(self, loss: float, step: int) -> bool:
        """Count an evaluation at ``step``; True when it is the best so far."""
        if not math.isnan(loss) and (self.loss is None or loss < self.loss):
            self.loss, self.step, self.evals_since = loss, step, 0
            return True
        self.evals_since += 1
        return False


BEST_FILE = "best.pt"  # in checkpoints/: save_best's trainable tensors of the best evaluation


def _save_best(ckpt_dir: Path, model: nn.Module, best: BestEval) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / (BEST_FILE + ".tmp")
    trainable = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"step": best.step, "eval_loss": best.loss, "trainable": trainable}, tmp)
    tmp.replace(ckpt_dir / BEST_FILE)


@torch.no_grad()
def _load_best(ckpt_dir: Path, model: nn.Module, best: BestEval) -> None:
    saved = torch.load(ckpt_dir / BEST_FILE, map_location="cpu", weights_only=False)
    if saved["step"] != best.step:
        raise ConfigError(
            f"{ckpt_dir / BEST_FILE} holds step {saved['step']}, not the best step {best.step}: "
            "the run's folder was changed; train again with --overwrite"
        )
    params = dict(model.named_parameters())
    for name, value in saved["trainable"].items():
        params[name].copy_(value)


def _tracked_values(record: dict) -> dict:
    """What a metrics line gives the trackers: its numbers but the step (their own axis)."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _hyperparameters(cfg: TrainConfig) -> dict:
    """The run's config as trackers take hyperparameters: numbers, strings and booleans as they
    are, anything else (None, lists, mappings) as its JSON text."""
    return {
        k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str) for k, v in cfg.to_dict().items()
    }


def run_loop(
    model: nn.Module,
    tokenizer,
    cfg: TrainConfig,
    train_examples: list[dict],
    collate: Callable,
    out_dir: Path,
    eval_examples: list[dict] | None = None,
    eval_pairs: list[tuple[str, str]] | None = None,
    accelerator=None,
    progress: bool = True,
    task=None,
) -> LoopResult:
    """Train the model's trainable parameters on ``train_examples``; see the module docstring.

    ``task`` (a `lorakit.tasks.Task`) computes each batch's loss, counts its tokens and evaluates;
    None is causal-LM training, where the model's own ``.loss`` is the loss."""
    from tqdm.auto import tqdm

    from ..tasks import CausalLM

    task = task or CausalLM(cfg)

    accelerator = accelerator or make_accelerator(cfg)
    if (cfg.early_stopping_patience or cfg.save_best) and not eval_examples:
        raise ConfigError(
            "early_stopping_patience and save_best compare evaluations: give validation data "
            "(--valid-data or --valid-ratio)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    world, rank = accelerator.num_processes, accelerator.process_index
    n_steps = total_steps(len(train_examples), cfg, world)
    optimizer = make_optimizer(
        model, cfg.lr, cfg.weight_decay, cfg.loraplus_ratio, cfg.optimizer, device=accelerator.device
    )
    scheduler = make_scheduler(optimizer, n_steps, cfg.warmup_steps, cfg.schedule)
    # Variants whose training is more than backward and a step (AdaLoRA, DyLoRA): variants/hooks.py.
    hooks = [
        h
        for h in (
            config.variant_object.trainer(model, name, cfg, n_steps) for name, config in adapter_configs(model).items()
        )
        if h is not None
    ]
    position = Position()
    best = BestEval()
    torch.manual_seed(cfg.seed)  # a resumed run then restores its checkpoint's generators instead
    if cfg.resume:
        found = latest_checkpoint(ckpt_dir)
        if found is None:
            log.warning("--resume: no checkpoint in %s; starting from scratch", ckpt_dir)
        else:
            position, extra = load_checkpoint(found, model, optimizer, scheduler)
            for hook in hooks:
                if hook.checkpoint_key is not None:
                    hook.load_state_dict(extra[hook.checkpoint_key][hook.name])
            if "best_eval" in extra:
                best = BestEval(**extra["best_eval"])
            log.info("resumed from %s at step %d", found, position.step)
    elif cfg.overwrite:
        if accelerator.is_main_process and ckpt_dir.is_dir():
            # The run replaces an earlier one in this directory; its checkpoints must go too, or a
            # later --resume would continue the earlier run.
            log.info("overwrite: removing the checkpoints of the earlier run in %s", ckpt_dir)
            shutil.rmtree(ckpt_dir)
    elif ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise ConfigError(
            f"{ckpt_dir} holds an earlier run's checkpoints: continue it with --resume, "
            "replace it with --overwrite, or choose another --output-dir"
        )
    tracking = bool(getattr(accelerator, "log_with", None))
    if tracking:  # accelerate's trackers (report_to); they write on the main process only
        where, name = tracking_dir(out_dir), out_dir.resolve().name
        where.mkdir(exist_ok=True)
        accelerator.init_trackers(
            "lorakit",
            config=_hyperparameters(cfg),
            init_kwargs={
                "wandb": {"name": name, "dir": str(where)},
                "mlflow": {"run_name": name, "logging_dir": str(where)},
            },
        )
    metrics = (
        MetricsLog(
            out_dir / "metrics.jsonl",
            position.step if cfg.resume else None,
            report=(lambda r: accelerator.log(_tracked_values(r), step=r["step"])) if tracking else None,
        )
        if accelerator.is_main_process
        else None
    )
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    placed = next(wrapped.parameters()).device  # where accelerate put the model, index included
    log.info(
        "process %d of %d on %s: %d steps of %d x %d examples",
        rank,
        world,
        placed,
        n_steps,
        cfg.grad_accum,
        cfg.batch_size,
    )
    # Compiled: a wrapper that calls the same module, so saving, evaluation (eager: another mode
    # and other shapes, compiled for nothing) and the caller's model are untouched.
    step_forward = torch.compile(wrapped) if cfg.compile else wrapped
    for note in {hook.compile_note for hook in hooks if cfg.compile and hook.compile_note}:
        log.warning("%s", note)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    unchecked = True  # the first step looks for trainable parameters backward never reached
    batches = _batch_stream(len(train_examples), cfg, world, rank, position)

    def evaluate_now() -> dict:
        """Evaluate at the current step, logged to metrics.jsonl and the trackers."""
        return _evaluate_and_log(
            accelerator,
            wrapped,
            tokenizer,
            cfg,
            collate,
            eval_examples,
            eval_pairs,
            metrics,
            position.step,
            progress,
            task,
        )

    def checkpoint(rng: dict | None = None) -> Path:
        extra = {"adalora": {}}  # the key older checkpoints always had
        if cfg.early_stopping_patience or cfg.save_best:
            extra["best_eval"] = vars(best).copy()
        for hook in hooks:
            if hook.checkpoint_key is not None:
                extra.setdefault(hook.checkpoint_key, {})[hook.name] = hook.state_dict()
        path = save_checkpoint(
            ckpt_dir / f"step-{position.step:07d}",
            accelerator.unwrap_model(wrapped),
            optimizer,
            scheduler,
            position,
            extra=extra,
            rng=rng,
        )
        prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
        return path

    bar = tqdm(
        total=n_steps,
        initial=position.step,
        disable=not (progress and accelerator.is_main_process),
        desc="training",
        unit="step",
        dynamic_ncols=True,
    )
    last_eval, interrupted, stopped_early = None, False, False

    def judge(result: dict) -> bool:
        """Count an evaluation for early stopping and save_best; True when the run should stop."""
        if not (cfg.early_stopping_patience or cfg.save_best):
            return False
        if best.update(float(result["loss"]), position.step) and cfg.save_best and accelerator.is_main_process:
            _save_best(ckpt_dir, accelerator.unwrap_model(wrapped), best)
        return bool(cfg.early_stopping_patience) and best.evals_since >= cfg.early_stopping_patience

    memory = None
    if cfg.memory_report and accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)  # the training's peak, not the loading's
    tokens, started = 0, time.perf_counter()
    # Generators' state at the start of the step under way (None between steps): a Ctrl-C during
    # the step saves ``position`` (still the step's start) with it, so the resumed run redoes the
    # whole step with the same batches and dropout masks. Taken only where that checkpoint can be
    # written (the main process, after a first step): reading every generator costs host time,
    # mostly numpy's and Python's (CUDA's are read on the host, without a sync; docs/benchmarks.md).
    step_start_rng = None
    guard = _InterruptGuard()
    try:
        guard.install()
        while position.step < n_steps:
            if accelerator.is_main_process and position.step > 0:
                step_start_rng = rng_state()
            wrapped.train()
            for hook in hooks:
                hook.before_step(position.step)
            # Summed on the device and read once per step: a .item() per micro-batch would make
            # the host wait for the GPU before it could queue the next one.
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(cfg.grad_accum):
                epoch, batch_in_epoch, indices = next(batches)
                host_batch = collate([train_examples[i] for i in indices])
                tokens += task.tokens(host_batch)  # counted on the host, for the same reason
                batch = {k: v.to(accelerator.device) for k, v in host_batch.items()}
                sync = nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(wrapped)
                with sync, accelerator.autocast():
                    loss = task.loss(step_forward, batch) / cfg.grad_accum
                    step_loss += loss.detach().float()
                    for hook in hooks:  # e.g. AdaLoRA's orthogonality term
                        term = hook.loss_term()
                        if term is not None:
                            loss = loss + term / cfg.grad_accum
                accelerator.backward(loss)
            if unchecked:
                _warn_about_unreached(wrapped)
                unchecked = False
            for hook in hooks:
                hook.after_backward()
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step uses (after scheduler.step: the next one's)
            # From the update on the step is done: a Ctrl-C waits until the position and the log say so.
            guard.holding = True
            optimizer.step()
            scheduler.step()
            if cfg.memory_report and memory is None:
                # Taken while gradients and the optimizer's state both exist: the step's tensors.
                memory = memory_report(accelerator.unwrap_model(wrapped), optimizer)
            optimizer.zero_grad(set_to_none=True)
            for hook in hooks:
                hook.after_step(position.step)
            step_loss = step_loss.item()  # after the optimizer's kernels are queued
            task_metrics = task.step_metrics(accelerator)  # every step: it also resets the task's count
            position.step, position.epoch, position.batch = position.step + 1, epoch, batch_in_epoch
            step_start_rng = None
            bar.update(1)
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
            if metrics and (position.step % cfg.log_every == 0 or position.step == n_steps):
                metrics.add(
                    {
                        "step": position.step,
                        "epoch": position.epoch,
                        "loss": step_loss,
                        **task_metrics,
                        "lr": lr,
                        "tokens_per_s": rate,
                    }
                )
            guard.release()  # after the step's metrics line, which a resumed run does not write again
            if cfg.eval_every and position.step % cfg.eval_every == 0 and position.step < n_steps and eval_examples:
                last_eval = evaluate_now()
                stopped_early = judge(last_eval)
            if cfg.save_every and position.step % cfg.save_every == 0 and accelerator.is_main_process:
                checkpoint()
            if stopped_early:
                log.info(
                    "early stopping at step %d: the eval loss has not improved for %d evaluations "
                    "(best %.4f at step %d)",
                    position.step,
                    best.evals_since,
                    best.loss if best.loss is not None else math.nan,
                    best.step if best.step is not None else 0,
                )
                break
    except KeyboardInterrupt:
        guard.uninstall()  # a second Ctrl-C now stops the checkpoint's save at once, as without the guard
        interrupted = True
        optimizer.zero_grad(set_to_none=True)
        for hook in hooks:
            hook.abandon_step()
        if accelerator.is_main_process and position.step > 0:
            path = checkpoint(rng=step_start_rng)
            log.warning("interrupted at step %d; checkpoint saved to %s (continue with --resume)", position.step, path)
    except BaseException:
        if tracking:  # a failed run's trackers keep the steps it logged (flushed, closed)
            accelerator.end_training()
        raise
    finally:
        guard.uninstall()
        bar.close()
    try:
        if not interrupted and eval_examples and not stopped_early:  # an early stop has just evaluated
            try:
                last_eval = evaluate_now()
                judge(last_eval)
            except KeyboardInterrupt:  # training is done: Ctrl-C skips the evaluation, not the adapter
                log.warning("final evaluation interrupted; the trained adapter is still saved")
        if cfg.save_best and not interrupted and best.step is not None and best.step != position.step:
            # The model leaves with the best evaluation's weights: the adapter train() writes.
            accelerator.wait_for_everyone()
            _load_best(ckpt_dir, accelerator.unwrap_model(wrapped), best)
            log.info("save_best: the adapter is step %d's (eval loss %.4f)", best.step, best.loss)
        notes = [note for note in (hook.finish(out_dir, write=accelerator.is_main_process) for hook in hooks) if note]
        if memory is not None:
            memory = _final_memory(memory, accelerator, out_dir)
        records = metrics.records if metrics else []
        if metrics and records:
            plot_loss_curve(records, out_dir / "loss.png")
    finally:
        if tracking:
            accelerator.end_training()  # flushes and closes the trackers' files
    return LoopResult(
        steps=position.step,
        interrupted=interrupted,
        records=records,
        last_eval=last_eval,
        main_process=accelerator.is_main_process,
        notes=notes,
        best_step=best.step,
        best_eval_loss=best.loss,
        stopped_early=stopped_early,
        memory=memory,
    )


def evaluate_only(
    model: nn.Module,
    tokenizer,
    cfg: TrainConfig,
    train_examples: list[dict],
    collate: Callable,
    out_dir: Path,
    eval_examples: list[dict] | None = None,
    eval_pairs: list[tuple[str, str]] | None = None,
    accelerator=None,
    progress: bool = True,
    task=None,
) -> LoopResult:
    """`run_loop`'s result for a method that trains nothing (the frozen model): one evaluation at
    step 0, logged to metrics.jsonl as a trained run's evaluations are."""
    accelerator = accelerator or make_accelerator(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out_dir / "metrics.jsonl", None) if accelerator.is_main_process else None
    model.to(accelerator.device)
    last_eval = _evaluate_and_log(
        accelerator, model, tokenizer, cfg, collate, eval_examples, eval_pairs, metrics, 0, progress, task
    )
    return LoopResult(
        steps=0,
        interrupted=False,
        records=metrics.records if metrics else [],
        last_eval=last_eval,
        main_process=accelerator.is_main_process,
    )


def _final_memory(first_step: MemoryReport, accelerator, out_dir: Path) -> MemoryReport:
    """The first step's tensors with the run's measured peak, logged and written to memory.json."""
    import dataclasses

    peak, label = measured_peak(accelerator.device)
    if accelerator.device.type == "cuda":
        label += " during training"
    report = dataclasses.replace(first_step, peak=peak, peak_label=label)
    log.info("memory after the first step (tensors) and the run's peak:\n%s", report)
    if accelerator.is_main_process:
        write_text_atomically(out_dir / "memory.json", json.dumps(report.as_dict(), indent=2) + "\n")
    return report


class _InterruptGuard:
    """Ctrl-C raises KeyboardInterrupt at once, except while ``holding``: then it waits for ``release``.

    An optimizer step changes the weights, optimizer and scheduler first, and the position that
    counts it (and the metrics line that logs it) last. A Ctrl-C in between (on a GPU the likely
    moment: the host waits in ``.item()`` for the step's kernels) would checkpoint updated weights
    with the step's start position, and the resumed run would apply that step twice. Only Python's
    default handler is replaced, in the main thread (the only one signals reach); elsewhere, or
    under another handler, nothing changes.
    """

    def __init__(self) -> None:
        self.holding = False
        self.held = False
        self.installed = False

    def install(self) -> None:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            signal.signal(signal.SIGINT, self._on_sigint)
            self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.installed = False

    def release(self) -> None:
        self.holding = False
        if self.held:
            self.held = False
            raise KeyboardInterrupt

    def _on_sigint(self, signum, frame) -> None:
        if not self.holding:
            raise KeyboardInterrupt
        self.held = True


def _warn_about_unreached(model: nn.Module) -> None:
    """Trainable parameters without a gradient after a backward do not train: their module is not
    on the forward path (a tower the data never uses), or a parameter target is read by another
    module than its own (target_parameters adapts a parameter where its module's forward reads it)."""
    unreached = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if unreached:
        log.warning(
            "%d trainable tensors got no gradient in the first step and will not train (their module "
            "is not on the forward path, or a target parameter is read outside its module): %s%s",
            len(unreached),
            ", ".join(unreached[:5]),
            " ..." if len(unreached) > 5 else "",
        )


def _batch_stream(
    n_examples: int, cfg: TrainConfig, world: int, rank: int, position: Position
) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, batches consumed in the epoch, indices) for this process, from ``position`` on.

    Epochs are truncated to a multiple of ``grad_accum * world`` batches so every process does the
    same number of micro-steps per optimizer step.
    """
    epoch, consumed = position.epoch, position.batch
    while True:
        batches = epoch_batches(n_examples, cfg.batch_size, cfg.seed, epoch)
        usable = (len(batches) // (cfg.grad_accum * world)) * cfg.grad_accum * world or len(batches)
        while consumed < usable:
            group = batches[consumed : consumed + world]
            consumed += world
            yield epoch, consumed, group[rank % len(group)]
        epoch, consumed = epoch + 1, 0


def _evaluate_and_log(
    accelerator,
    model,
    tokenizer,
    cfg,
    collate,
    eval_examples,
    eval_pairs,
    metrics,
    step,
    progress: bool = True,
    task=None,
) -> dict:
    # Every process evaluates its share of the batches; all get the gathered result. The main
    # process shows its bars (the final evaluation takes tens of seconds), as it does the training bar.
    from ..tasks import CausalLM

    unwrapped, show = accelerator.unwrap_model(model), progress and accelerator.is_main_process
    result = (task or CausalLM(cfg)).evaluate(
        unwrapped, tokenizer, eval_examples, collate, eval_pairs, cfg, accelerator.device, accelerator, show
    )
    if result is None:  # the task evaluates as causal-LM training does
        result = evaluate(
            unwrapped,
            tokenizer,
            eval_examples,
            collate,
            batch_size=cfg.batch_size,
            pairs=eval_pairs,
            max_examples=cfg.eval_max_examples,
            max_new_tokens=cfg.max_new_tokens,
            device=accelerator.device,
            accelerator=accelerator,
            progress=show,
        )
    if metrics:
        metrics.add({"step": step, **{f"eval_{k}": v for k, v in result.items() if k != "predictions"}})
    return result
