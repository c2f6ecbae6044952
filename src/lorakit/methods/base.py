"""`Method`: what trains in a run — the seam between `lorakit.train` and the thing being fine-tuned.

LoRA (any variant) is one method among several baselines a comparison needs: full fine-tuning,
BitFit, the frozen model, PEFT's prompt tuning, prefix tuning and IA³, a Houlsby bottleneck
adapter. `train()` asks the run's method to make the loaded model ready (which tensors train, what
is added), trains what it returns, and asks it to save the result. Everything else (data, loop,
checkpoints, resume, evaluation) is the same for every method.

Modules the task trains in full (a classifier's head: ``Task.lora_config``'s ``modules_to_save``)
train with every method that trains anything: a fresh random head has to learn, whatever else does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError


class Method:
    """One way of fine-tuning; see the module docstring. Stateless: one object serves every run."""

    #: the ``method`` option's value
    name = ""
    #: how reports and tables name it
    title = ""
    #: run by Hugging Face PEFT (labelled so in reports), not by lorakit's own code
    by_peft = False
    #: False: nothing trains, the run only evaluates the model as loaded
    trains = True
    #: ``method_options`` keys this method takes, with their defaults
    options: dict[str, Any] = {}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` (TrainConfig ``method_options``) with the defaults filled in; ConfigError for
        a key this method does not take."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(f"method_options {unknown} do not apply to method {self.name} (it takes: {known})")
        return {**self.options, **options}

    def snapshot(self, model: nn.Module) -> Any:
        """What `restore` needs to put a caller's model back as it came (which tensors trained)."""
        return {p: p.requires_grad for p in model.parameters()}

    def prepare(self, model: nn.Module, task, cfg) -> nn.Module:
        """Make ``model`` ready to train: set ``requires_grad`` on what trains, add what the method
        adds. Returns the module the loop trains: ``model`` itself, or a wrapper (PEFT's)."""
        raise NotImplementedError

    def restore(self, model: nn.Module, snapshot: Any) -> None:
        """Undo `prepare` on a caller's model after a failed run (the trained tensors stay as they are)."""
        for param, flag in snapshot.items():
            param.requires_grad_(flag)

    def save(self, trained: nn.Module, out_dir: Path, tokenizer=None) -> Path | None:
        """Write the result into ``out_dir``; returns the file or folder written (None: nothing)."""
        raise NotImplementedError

    def options_of(self, cfg) -> dict[str, Any]:
        return self.check_options(dict(cfg.method_options or {}))


def task_modules(model: nn.Module, task, cfg) -> list[str]:
    """Names of the modules the task trains in full beside any method (a classifier's head), and
    the run's own ``modules_to_save``: what the task's LoRA config would save whole."""
    if task is None:
        return list(cfg.modules_to_save or [])
    return list(task.lora_config(model, cfg.lora_config()).modules_to_save or [])


def unfreeze_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Set ``requires_grad`` on every parameter of the modules ``names`` (full names or suffixes,
    as ``modules_to_save`` takes them); returns the parameter names unfrozen."""
    from ..targets import matches

    found = []
    for module_name, module in model.named_modules():
        if module_name and names and matches(list(names), module_name):
            for param_name, param in module.named_parameters(prefix=module_name):
                param.requires_grad_(True)
                found.append(param_name)
    return found


def freeze_all(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def save_trained_tensors(trained: nn.Module, folder: Path, method: str, options: dict[str, Any]) -> Path:
    """The trainable tensors by parameter name in ``folder/trained.safetensors``, and
    ``folder/method.json`` (method, options, tensor names): what BitFit and the bottleneck adapter
    leave. Load them with ``model.load_state_dict(load_file(...), strict=False)`` after the same
    method prepared the model."""
    import json

    from safetensors.torch import save_file

    from ..safe_files.atomic import write_text_atomically

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in trained.named_parameters() if p.requires_grad}
    tmp = folder / "trained.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(folder / "trained.safetensors")
    meta = {"method": method, "options": options, "tensors": sorted(tensors)}
    write_text_atomically(folder / "method.json", json.dumps(meta, indent=2) + "\n")
    return folder
