"""Prompt tuning, prefix tuning and IA³, run by Hugging Face PEFT (``pip install peft``).

These are PEFT's implementations, not lorakit's, and reports label them "run by PEFT". PEFT wraps
the model (``get_peft_model``); the loop trains the wrapper, whose forward and ``generate`` take the
same batches, and the result is saved in PEFT's own layout in ``output_dir/adapter/``
(``PeftModel.from_pretrained`` loads it).

- prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` trained input embeddings before the
  prompt; the virtual tokens are the only trained tensor (one (n, d_model) matrix).
- prefix tuning (Li & Liang 2021): trained key/value prefixes in every attention layer.
- IA³ (Liu et al. 2022): learned scaling vectors on keys, values and the feed-forward input;
  ``target_modules`` / ``feedforward_modules`` default to PEFT's choice for the model's type.

A classification task runs with PEFT's SEQ_CLS task type, which trains the model's head as well.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import Method

# lorakit's Task.model_task -> PEFT's TaskType name
PEFT_TASK_TYPES = {
    "causal-lm": "CAUSAL_LM",
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
}
_WRAPPER = "_lorakit_peft_wrapper"  # on the model's __dict__: the wrapper restore() undoes


def require_peft(method: str) -> None:
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"method {method} is run by Hugging Face PEFT, which is not installed: pip install peft")


class PeftMethod(Method):
    by_peft = True
    config_class = ""

    def peft_config(self, options: dict[str, Any], task_type: str, cfg):
        raise NotImplementedError

    def prepare(self, model: nn.Module, task, cfg) -> nn.Module:
        require_peft(self.name)
        import peft

        model_task = getattr(task, "model_task", "causal-lm")
        if model_task not in PEFT_TASK_TYPES:
            raise ConfigError(f"method {self.name} (run by PEFT) has no task type for task {cfg.task}")
        config = self.peft_config(self.options_of(cfg), PEFT_TASK_TYPES[model_task], cfg)
        torch.manual_seed(cfg.seed)  # PEFT draws its initial tensors from torch's global generator
        wrapper = peft.get_peft_model(model, config)
        model.__dict__[_WRAPPER] = wrapper
        return wrapper

    def restore(self, model: nn.Module, snapshot) -> None:
        from peft.tuners.tuners_utils import BaseTuner

        wrapper = model.__dict__.pop(_WRAPPER, None)
        if wrapper is not None and isinstance(wrapper.base_model, BaseTuner):
            wrapper.base_model.unload()  # IA³'s layers out of the caller's model again
        super().restore(model, snapshot)

    def save(self, trained: nn.Module, out_dir: Path, tokenizer=None) -> Path:
        trained.save_pretrained(str(out_dir / "adapter"))
        return out_dir / "adapter"


class PromptTuning(PeftMethod):
    name = "prompt-tuning"
    title = "prompt tuning"
    options = {"num_virtual_tokens": 20}

    def peft_config(self, options, task_type, cfg):
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=int(options["num_virtual_tokens"]))


class PrefixTuning(PeftMethod):
    name = "prefix-tuning"
    title = "prefix tuning"
    options = {"num_virtual_tokens": 20, "prefix_projection": False}

    def peft_config(self, options, task_type, cfg):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            task_type=task_type,
            num_virtual_tokens=int(options["num_virtual_tokens"]),
            prefix_projection=bool(options["prefix_projection"]),
        )


class IA3(PeftMethod):
    name = "ia3"
    title = "IA³"
    options = {"target_modules": None, "feedforward_modules": None}

    def peft_config(self, options, task_type, cfg):
        from peft import IA3Config

        return IA3Config(
            task_type=task_type,
            target_modules=options["target_modules"],
            feedforward_modules=options["feedforward_modules"],
            modules_to_save=cfg.modules_to_save,
        )
