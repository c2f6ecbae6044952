"""Training tasks: what a run's batches look like, what its loss and metrics are.

One file per task; `make_task(cfg)` picks the one ``TrainConfig.task`` names. The training loop
(`lorakit.training.loop`) asks the task for each batch's loss and for the evaluation, so that the
loop's own machinery (gradient accumulation, checkpoints, bit-for-bit resume, metrics.jsonl) serves
every task alike.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Task
from .causal_lm import CausalLM
from .classify import Classify
from .dpo import DPO
from .reward import Reward
from .token_classify import TokenClassify

TASKS: dict[str, type[Task]] = {task.name: task for task in (CausalLM, Classify, TokenClassify, Reward, DPO)}


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def make_task(cfg) -> Task:
    """The task of run ``cfg`` (a TrainConfig), ready to read its data."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task must be one of {' | '.join(TASKS)}, got {cfg.task!r}")
    return TASKS[cfg.task](cfg)


__all__ = ["DPO", "TASKS", "CausalLM", "Classify", "Reward", "Task", "TokenClassify", "make_task", "task_names"]
