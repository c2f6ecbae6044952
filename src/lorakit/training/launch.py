"""The run's place in a launch: its `accelerate.Accelerator` and the device its model loads onto.

One process (``lorakit train``) or several (``accelerate launch``, ``torchrun``): each process
makes one Accelerator per run, before loading the model, so that it knows its own GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from pathlib import Path

import torch

from ..errors import ConfigError
from ..models.device import parse_device, resolve_device
from .config import MIXED_PRECISION, TRACKERS, TrainConfig

log = logging.getLogger("lorakit.training")
TRACKING_DIR = "tracking"  # in output_dir


def make_accelerator(cfg: TrainConfig):
    """The run's ``accelerate.Accelerator``: this process's device and the mixed precision.

    ``cfg.device`` None/"auto" is the GPU when there is one, else the CPU. Under a launch
    (``accelerate launch``, ``torchrun``) each process gets its own GPU, and on the CPU the processes
    join one gloo group: accelerate forms that group only when told the run is on the CPU, and
    without it every process would train alone, all writing into one folder. An explicit
    ``cuda:N`` of a single process becomes the current GPU, where accelerate then places the model
    (it would otherwise move it to GPU 0). One per run: ``train()`` makes it first, to load the
    model straight onto this process's device, and under DDP only its main process writes."""
    from accelerate import Accelerator

    device = parse_device(resolve_device(cfg.device))
    cpu = device.type == "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        _forget_other_accelerate_settings(cpu, cfg.mixed_precision)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
    trackers = check_trackers(cfg)
    return Accelerator(
        cpu=cpu,
        mixed_precision=cfg.mixed_precision,
        log_with=trackers or None,
        project_dir=str(tracking_dir(cfg.output_dir)) if trackers else None,
    )


def tracking_dir(output_dir) -> Path:
    """Where the trackers' local files go: TensorBoard's events (``lorakit/`` in it), W&B's offline
    runs (``wandb/``), MLflow's artifacts."""
    return Path(output_dir) / TRACKING_DIR


def check_trackers(cfg: TrainConfig) -> list[str]:
    """The run's experiment trackers (``report_to``), each one's package checked to be installed:
    a missing one is a one-line error that says what to install, before anything is loaded."""
    trackers = cfg.trackers()
    for name in trackers:
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"report_to={name} needs the {package} package: pip install {package} "
                f"(or pip install 'lorakit[track]'), or leave {name} out of --report-to"
            )
    return trackers


def _forget_other_accelerate_settings(cpu: bool, mixed_precision: str) -> None:
    """accelerate keeps one device and mixed precision per process and refuses an Accelerator
    with others ("AcceleratorState has already been initialized"): a second run in one process
    (an ablation, a notebook) could not switch to bf16 or to the CPU. A single process has no
    process group to lose, so a state with other settings is reset, as transformers' Trainer
    does; one with the same settings is kept (another Accelerator of the caller's may share it).
    Under a launch the state holds the group: it is kept, and accelerate's check stands."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    state = AcceleratorState._shared_state
    if not state:
        return
    device = PartialState._shared_state.get("device")
    if state.get("_mixed_precision") != mixed_precision or (device is not None and (device.type == "cpu") != cpu):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def process_device(asked: torch.device, accelerator) -> str:
    """Where this process loads the model: the run's device (resolved), with the GPU index the
    launch gave this process."""
    return str(accelerator.device) if asked.type == accelerator.device.type else str(asked)


def with_launch_precision(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the launcher's mixed precision when the run left it at "no".

    ``accelerate launch --mixed_precision bf16`` passes its choice in ``ACCELERATE_MIXED_PRECISION``;
    an Accelerator given a precision of its own ignores it, so a run launched for bf16 would train
    in full precision. A precision the run asks for itself wins."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if cfg.mixed_precision != "no" or launched == "no":
        return cfg
    if launched not in MIXED_PRECISION:
        raise ConfigError(
            f"ACCELERATE_MIXED_PRECISION={launched!r} (from accelerate launch or its config) is not "
            f"one of {MIXED_PRECISION}; pass --mixed-precision to choose"
        )
    log.info("mixed precision %s, as launched (ACCELERATE_MIXED_PRECISION)", launched)
    return dataclasses.replace(cfg, mixed_precision=launched)
