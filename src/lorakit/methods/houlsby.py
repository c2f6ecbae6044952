"""The Houlsby bottleneck adapter (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

A small two-layer network added after a sublayer's output, before the residual sum:

    y' = y + W_up · act(W_down · y),   W_down: (m, d), W_up: (d, m), m = ``bottleneck``

placed, as in the paper, after the attention block's output projection and after the feed-forward
block (``targets``: a regex over module names; the default finds Llama's ``o_proj`` / ``down_proj``,
GPT-2's ``attn.c_proj`` / ``mlp.c_proj``, BERT's ``attention.output.dense`` / ``output.dense`` and
other common names). The paper also trains the layer norms (``train_norms``, on by default).
W_up starts at zero, as LoRA's B does, so a fresh adapter changes nothing; W_down starts uniform in
±1/sqrt(d) (nn.Linear's rule), seeded by the run's seed.

The adapter hangs off its module as a child (``<module>.houlsby_adapter``) through a forward hook, so
the model's own parameter names are unchanged. Saved: the trained tensors in ``output_dir/trained/``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .base import Method, freeze_all, save_trained_tensors, task_modules, unfreeze_modules

ATTRIBUTE = "houlsby_adapter"
# Attention output and feed-forward output projections under their common names.
DEFAULT_TARGETS = (
    r"(?:.*\.)?(?:o_proj|out_proj|attn\.c_proj|mlp\.c_proj|attention\.output\.dense|"
    r"(?<!attention\.)output\.dense|down_proj|fc2|dense_4h_to_h|w2)"
)
_HOOKS = "_lorakit_houlsby_hooks"


class Bottleneck(nn.Module):
    """``y -> up(act(down(y)))`` for y of shape (..., d); the hook adds it to y."""

    def __init__(self, d: int, m: int, generator: torch.Generator, dtype=None, device=None) -> None:
        super().__init__()
        self.down = nn.Linear(d, m, dtype=dtype, device=device)
        self.up = nn.Linear(m, d, dtype=dtype, device=device)
        self.act = nn.GELU()
        bound = 1 / math.sqrt(d)
        with torch.no_grad():
            self.down.weight.copy_(torch.empty(m, d).uniform_(-bound, bound, generator=generator))
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(y)))


def _add_adapter(module: nn.Module, inputs, output):
    if isinstance(output, torch.Tensor):
        return output + getattr(module, ATTRIBUTE)(output)
    return output


class Houlsby(Method):
    name = "houlsby"
    title = "Houlsby bottleneck adapter"
    options = {"bottleneck": 64, "targets": DEFAULT_TARGETS, "train_norms": True}

    def prepare(self, model: nn.Module, task, cfg) -> nn.Module:
        from ..config import LoraConfig
        from ..targets import find_targets

        options = self.options_of(cfg)
        m = options["bottleneck"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"method_options.bottleneck must be a positive integer, got {m!r}")
        heads = task_modules(model, task, cfg)
        chosen = find_targets(model, LoraConfig(target_modules=options["targets"], modules_to_save=heads or None))
        freeze_all(model)
        generator = torch.Generator().manual_seed(cfg.seed)
        hooks = []
        for name, module in chosen:
            d = getattr(module, "out_features", None) or getattr(module, "nf", None)  # nf: transformers Conv1D
            if d is None:
                raise ConfigError(f"method houlsby: cannot tell the output width of {name!r} ({type(module).__name__})")
            weight = next(module.parameters())
            module.add_module(ATTRIBUTE, Bottleneck(d, m, generator, dtype=weight.dtype, device=weight.device))
            hooks.append((module, module.register_forward_hook(_add_adapter)))
        model.__dict__[_HOOKS] = hooks
        if options["train_norms"]:
            for module in model.modules():
                if "norm" in type(module).__name__.lower():
                    for param in module.parameters(recurse=False):
                        param.requires_grad_(True)
        unfreeze_modules(model, heads)
        return model

    def restore(self, model: nn.Module, snapshot) -> None:
        for module, handle in model.__dict__.pop(_HOOKS, []):
            handle.remove()
            delattr(module, ATTRIBUTE)
        super().restore(model, snapshot)

    def save(self, trained: nn.Module, out_dir: Path, tokenizer=None) -> Path:
        return save_trained_tensors(trained, out_dir / "trained", self.name, _saved_options(trained))


def _saved_options(trained: nn.Module) -> dict:
    """What method.json records: the bottleneck width and how many modules carry an adapter."""
    adapters = [m for m in trained.modules() if isinstance(m, Bottleneck)]
    return {"bottleneck": adapters[0].down.out_features if adapters else None, "modules": len(adapters)}
