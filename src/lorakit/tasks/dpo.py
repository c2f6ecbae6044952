"""Direct preference optimisation (``task="dpo"``): the adapter learns to prefer chosen over rejected.

Data: preference pairs (`lorakit.tasks.preference_data`), rendered as causal-LM training renders
prompt and answer. Each micro-batch of B pairs is one forward of 2B rows (chosen, then rejected);
a completion's log-probability is summed over its own tokens only (`dpo_loss.sequence_logps`).

The reference is the same model: under ``torch.no_grad()``, in eval mode (no dropout), with the
adapters switched off (`lorakit.use_adapters(model, [])`), so no second copy of the base is ever
in memory. With ``ref_adapter`` a frozen adapter (an SFT run's, say) is loaded as ``reference``:
the reference is the base plus it alone, the policy the base plus it and the trained adapter
(only the latter trains). ``precompute_ref`` computes the reference's log-probabilities once,
before training (it does not depend on the trained adapter's state, so the result is the same),
and drops the reference forward from every step.

Per step, metrics.jsonl gets TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``
and ``rewards/margins`` beside ``loss`` (from that step's forwards, before its update); evaluation
gives the held-out loss and the same four.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..control import set_adapter, use_adapters
from ..errors import ConfigError
from ..models.tokenizer import pad_or_eos_id
from ..state import adapter_configs
from .base import PreparedData, Task
from .dpo_loss import dpo_losses, sequence_logps
from .pair_metrics import PairSums, evaluate_pairs
from .preference_data import run_pairs, with_explicit_prompts
from .preference_tokens import PreferenceCollator, encode_pairs

log = logging.getLogger("lorakit.tasks.dpo")

REFERENCE = "reference"  # the name ref_adapter is loaded under


class DPO(Task):
    name = "dpo"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.packing:
            raise ConfigError("packing joins examples into one sequence; a DPO pair needs its own rows: drop --packing")
        if cfg.ref_adapter is not None:
            check_adapter_dir(cfg.ref_adapter)
        train, valid = run_pairs(cfg)
        self.train_pairs = with_explicit_prompts(train)
        self.valid_pairs = with_explicit_prompts(valid) if valid else []
        self.model: nn.Module | None = None
        self.reference: list[str] = []  # the adapters the reference runs with
        self.sums = PairSums()

    def prepare_model(self, model: nn.Module, tokenizer) -> None:
        self.model = model
        if self.cfg.ref_adapter is None:
            return
        from ..io import load_adapter

        if REFERENCE in adapter_configs(model):
            raise ConfigError(f"the model already has an adapter named {REFERENCE!r}; delete it or leave --ref-adapter")
        load_adapter(model, self.cfg.ref_adapter, name=REFERENCE, trainable=False, activate=False)
        self.reference = [REFERENCE]

    def activate(self, model: nn.Module, name: str) -> None:
        if self.reference:
            set_adapter(model, [*self.reference, name])  # the reference adapter stays frozen

    def prepare_data(self, tokenizer) -> PreparedData:
        train, stats = encode_pairs(self.train_pairs, tokenizer, self.cfg.max_length)
        valid = encode_pairs(self.valid_pairs, tokenizer, self.cfg.max_length)[0] if self.valid_pairs else []
        if stats.n_dropped_all_truncated:
            log.warning(
                "%d of %d preference pairs dropped: max_length=%d left a completion without tokens",
                stats.n_dropped_all_truncated,
                stats.n_records,
                self.cfg.max_length,
            )
        collate = PreferenceCollator(pad_or_eos_id(tokenizer))
        if self.cfg.precompute_ref:
            for examples in (train, valid):
                self._precompute(examples, collate)
        return PreparedData(train, valid, [], collate, stats)

    def _precompute(self, examples: list[dict], collate) -> None:
        """Store each example's reference log-probabilities (``ref_chosen_logps``, ``ref_rejected_logps``)."""
        device = next(self.model.parameters()).device
        size = self.cfg.batch_size
        for start in range(0, len(examples), size):
            part = examples[start : start + size]
            batch = {k: v.to(device) for k, v in collate(part).items()}
            logps = self.reference_logps(batch).tolist()
            chosen, rejected = logps[: len(part)], logps[len(part) :]
            for example, c, r in zip(part, chosen, rejected):
                example["ref_chosen_logps"], example["ref_rejected_logps"] = c, r
        log.info("reference log-probabilities of %d pairs computed before training", len(examples))

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) summed completion log-probabilities under the reference: the same model, adapters
        off (or the reference adapter alone), no gradient, no dropout."""
        if self.model is None:
            raise ConfigError("the DPO task has no model yet: train() gives it one (Task.prepare_model)")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), use_adapters(self.model, self.reference):
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                return sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
        finally:
            self.model.train(was_training)

    def pair_losses(self, forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-pair losses (B,), chosen log-ratios (B,), rejected log-ratios (B,)) of one batch."""
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:  # first: its logits are gone before the policy's activations exist
            ref_chosen, ref_rejected = self.reference_logps(batch).chunk(2)
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        chosen, rejected = sequence_logps(logits, batch["input_ids"], batch["completion_mask"]).chunk(2)
        tokens_chosen, tokens_rejected = batch["completion_mask"].sum(-1).chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        losses = dpo_losses(
            chosen_ratio,
            rejected_ratio,
            self.cfg.beta,
            self.cfg.dpo_loss,
            self.cfg.label_smoothing,
            tokens_chosen,
            tokens_rejected,
        )
        return losses, chosen_ratio, rejected_ratio

    def loss(self, forward, batch):
        losses, chosen_ratio, rejected_ratio = self.pair_losses(forward, batch)
        beta = self.cfg.beta
        self.sums.add(beta * chosen_ratio, beta * rejected_ratio)
        return losses.mean()

    def step_metrics(self, accelerator) -> dict[str, float]:
        return _trl_names(self.sums.pop(accelerator))

    def evaluate(self, model, tokenizer, examples, collate, pairs, cfg, device, accelerator, progress):
        def batch_stats(model, batch):
            losses, chosen_ratio, rejected_ratio = self.pair_losses(model, batch)
            return losses.sum(), cfg.beta * chosen_ratio, cfg.beta * rejected_ratio

        loss, means = evaluate_pairs(model, examples, collate, cfg.batch_size, device, accelerator, batch_stats)
        return {"loss": loss, **_trl_names(means)}


def _trl_names(means: dict[str, float]) -> dict[str, float]:
    names = {"chosen": "chosen", "rejected": "rejected", "accuracy": "accuracies", "margin": "margins"}
    return {f"rewards/{names[k]}": v for k, v in means.items()}


def check_adapter_dir(path: str) -> None:
    """ConfigError unless ``path`` is an adapter directory (an ``adapter_config.json`` in it)."""
    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        return
    if (folder / "adapter" / "adapter_config.json").is_file():
        raise ConfigError(f"--ref-adapter {folder} is a run's folder: give its adapter, {folder / 'adapter'}")
    raise ConfigError(f"--ref-adapter {folder}: no adapter_config.json there; give an adapter directory")
