"""The reward model's and DPO's training options, checked when a TrainConfig is made: valid values,
and set only for their own task (a ``--beta`` on a causal-LM run is a mistake worth saying)."""

from __future__ import annotations

from ..errors import ConfigError
from .dpo_loss import DPO_LOSSES


def check_preference_options(cfg) -> None:
    """ConfigError for a bad value or an option of another task (see the module docstring)."""
    number = (int, float)
    if not isinstance(cfg.beta, number) or isinstance(cfg.beta, bool) or not cfg.beta > 0:
        raise ConfigError(f"beta must be a positive number (DPO's usual 0.1), got {cfg.beta!r}")
    if cfg.dpo_loss not in DPO_LOSSES:
        raise ConfigError(f"dpo_loss must be one of {' | '.join(DPO_LOSSES)}, got {cfg.dpo_loss!r}")
    smoothing = cfg.label_smoothing
    if not isinstance(smoothing, number) or isinstance(smoothing, bool) or not 0 <= smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5) (the share of flipped labels), got {smoothing!r}")
    if smoothing and cfg.dpo_loss != "sigmoid":
        raise ConfigError("label_smoothing applies to the sigmoid loss; drop it or use --dpo-loss sigmoid")
    center = cfg.center_rewards
    if center is not None and (not isinstance(center, number) or isinstance(center, bool) or center < 0):
        raise ConfigError(f"center_rewards must be a number >= 0 (TRL suggests 0.01), got {center!r}")
    given = {
        "dpo": {
            "beta": cfg.beta != 0.1,
            "dpo_loss": cfg.dpo_loss != "sigmoid",
            "label_smoothing": bool(smoothing),
            "ref_adapter": cfg.ref_adapter is not None,
            "precompute_ref": cfg.precompute_ref,
        },
        "reward": {"center_rewards": center is not None},
    }
    for task, options in given.items():
        misplaced = [name for name, set_ in options.items() if set_]
        if misplaced and cfg.task != task:
            raise ConfigError(
                f"{', '.join(misplaced)} {'is' if len(misplaced) == 1 else 'are'} for task={task}, and this run "
                f"is task={cfg.task}: add --task {task} or drop {', '.join(misplaced)}"
            )
