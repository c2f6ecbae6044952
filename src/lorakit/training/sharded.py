"""FSDP2 (``accelerate launch --use_fsdp --fsdp_version 2``): its sharded parameters made whole.

FSDP2 turns every parameter into a DTensor sharded over the processes. Training needs nothing of
lorakit for that, but writing the adapter does: safetensors writes plain tensors, and gathering a
DTensor (``full_tensor``) is a collective that every process must join, while only the main
process writes. So at the end of a run every process gathers the trained model's parameters into
plain ones (`make_parameters_whole`), then the main process saves as usual. Checkpoints written
during the run (``save_every``, ``save_best``) would need the same collective inside the loop; they
are refused up front under FSDP2 (`check_sharding`) rather than failing at the first save.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError


def fsdp_version(accelerator) -> int | None:
    """1 or 2 when the run is under accelerate's FSDP, else None."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is None:
        return None
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def check_sharding(cfg, accelerator) -> None:
    """Refuse what FSDP2 runs cannot do yet, before the model loads."""
    if fsdp_version(accelerator) != 2:
        return
    for option in ("save_every", "save_best"):
        if getattr(cfg, option, None):
            raise ConfigError(
                f"{option} writes checkpoints during the run, which lorakit cannot yet do under FSDP2: "
                "drop it, or launch with --fsdp_version 1 (or plain DDP, LoRA's optimizer state being small)"
            )


def make_parameters_whole(model: nn.Module) -> int:
    """Replace each DTensor parameter of ``model`` by its gathered full tensor (a collective: every
    process must call this, in the same order); returns how many were gathered. Plain parameters
    are left alone, so this is a no-op outside FSDP2."""
    from torch.distributed.tensor import DTensor

    gathered = 0
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                whole = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
                setattr(module, name, whole)
                gathered += 1
    return gathered
