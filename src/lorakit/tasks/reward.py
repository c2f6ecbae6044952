"""A reward model (``task="reward"``): sequence classification with one output, trained on pairs.

The model is loaded as ``AutoModelForSequenceClassification`` with ``num_labels=1``; its head is
found and trained with the adapter as a classifier's is (`lorakit.tasks.heads`), and the adapter
is saved as PEFT's ``SEQ_CLS``. Data: preference pairs (`lorakit.tasks.preference_data`), with a
prompt or implicit, rendered as causal-LM training renders them; chosen and rejected go through
one forward (2B rows). The loss is Bradley–Terry's, in TRL ``RewardTrainer``'s conventions:

    loss = mean over pairs of -log sigma(r_chosen - r_rejected - margin)
           + center_rewards * mean((r_chosen + r_rejected)^2)

(``margin`` from the data, 0 where absent; ``center_rewards`` TRL's
``center_rewards_coefficient``, which pulls rewards towards zero mean, Eisenstein et al. 2023).
Per step and in evaluation: ``accuracy`` (share of pairs with r_chosen > r_rejected),
``margin`` (mean r_chosen - r_rejected) and ``mean_reward``, TRL's names; evaluation adds the
held-out ``loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import PreparedData, Task
from .heads import set_pad_token, with_head_saved
from .pair_metrics import PairSums, evaluate_pairs
from .preference_data import run_pairs
from .preference_tokens import PreferenceCollator, encode_pairs


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, center: float | None = None
) -> torch.Tensor:
    """Mean pairwise loss of rewards (B,) each; see the module docstring."""
    difference = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -F.logsigmoid(difference).mean()
    if center:
        loss = loss + center * torch.mean((chosen + rejected) ** 2)
    return loss


class Reward(Task):
    name = "reward"
    peft_task_type = "SEQ_CLS"
    model_task = "sequence-classification"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.packing:
            raise ConfigError("packing joins examples into one sequence; a reward pair needs its own rows")
        self.train_pairs, self.valid_pairs = run_pairs(cfg)
        self.pad_token_id = 0
        self.sums = PairSums()

    def load_kwargs(self) -> dict:
        return {"task": self.model_task, "num_labels": 1}

    def prepare_model(self, model: nn.Module, tokenizer) -> None:
        n = getattr(model.config, "num_labels", None)
        if n != 1:
            raise ConfigError(
                f"a reward model has one output and this model has {n}: load it as a sequence-classification "
                "model with num_labels=1"
            )
        set_pad_token(model, tokenizer)
        # The batches are padded with the id the head looks for when it finds each row's last token.
        self.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def lora_config(self, model: nn.Module, config):
        return with_head_saved(model, config)

    def prepare_data(self, tokenizer) -> PreparedData:
        train, stats = encode_pairs(self.train_pairs, tokenizer, self.cfg.max_length, need_completion=False)
        valid = encode_pairs(self.valid_pairs, tokenizer, self.cfg.max_length, False)[0] if self.valid_pairs else []
        return PreparedData(train, valid, [], PreferenceCollator(self.pad_token_id), stats)

    def rewards(self, forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen (B,), r_rejected (B,)) in float32, from one forward of the 2B rows."""
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits.squeeze(-1).float().chunk(2)

    def loss(self, forward, batch):
        chosen, rejected = self.rewards(forward, batch)
        self.sums.add(chosen, rejected)
        return bradley_terry_loss(chosen, rejected, batch["margin"], self.cfg.center_rewards)

    def step_metrics(self, accelerator) -> dict[str, float]:
        return _trl_names(self.sums.pop(accelerator))

    def evaluate(self, model, tokenizer, examples, collate, pairs, cfg, device, accelerator, progress):
        def batch_stats(model, batch):
            chosen, rejected = self.rewards(model, batch)
            loss = bradley_terry_loss(chosen, rejected, batch["margin"], cfg.center_rewards)
            return loss * len(chosen), chosen, rejected

        loss, means = evaluate_pairs(model, examples, collate, cfg.batch_size, device, accelerator, batch_stats)
        return {"loss": loss, **_trl_names(means)}


def _trl_names(means: dict[str, float]) -> dict[str, float]:
    """RewardTrainer's names: accuracy, margin, mean_reward."""
    if not means:
        return {}
    return {
        "accuracy": means["accuracy"],
        "margin": means["margin"],
        "mean_reward": (means["chosen"] + means["rejected"]) / 2,
    }
