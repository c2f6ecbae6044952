"""`Variant`: the one protocol through which a member of the LoRA family changes what a layer does.

A LoRA layer holds, per adapter name, the factors A (r, d_in) and B (d_out, r), a scaling s and a
`Variant` (``layer.variants[name]``). Everything that differs between LoRA, DoRA, VeRA, AdaLoRA,
DyLoRA, LoRA-FA (and any variant added later) is asked of that object, never found out by looking
for a variant's tensors in the layer: the state it attaches, the factors forward uses, its forward
increment, what merging writes into the weight, whether the fused path may run, its file keys
and its config rules. The training loop asks it for hooks (``trainer``).

This class *is* plain LoRA: every method gives LoRA's answer, and a variant overrides what it
changes. Variants live one per file in ``lorakit/variants/`` and are registered by name in
``variants/registry.py``; layers never import them (they only call the object they were given).
Per-layer state a variant needs (DoRA's magnitudes, AdaLoRA's singular values) goes into a
container the variant creates on the layer with ``layer.slot(...)``, named as in PEFT's modules,
so state-dict keys stay PEFT's.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AdapterFileError


class Variant:
    """Plain LoRA, and the protocol every variant answers (override what differs).

    Class attributes describe the variant to config checks, injection and the file code:
    ``name`` (``LoraConfig.variant``), ``legacy_flag`` (the older boolean field of ``LoraConfig``
    that also selects it, e.g. PEFT's ``use_dora``), ``layer_kinds`` (LoRA layer class names it
    adapts; None: all), ``parameter_targets`` (works on ``target_parameters``), ``own_init``
    (draws its own factors: ``init`` must stay "default"), ``peft_type`` (PEFT's name for its
    files), ``low_rank`` (its update is exactly ``s B A``, which adapter arithmetic may treat as
    factors), ``hot_swappable``, ``kept_by_compression`` (a compressed adapter stays this variant;
    else it becomes plain LoRA), ``nested_ranks`` (its first b ranks are an adapter of rank b:
    ``lorakit.truncate``, DyLoRA) and ``slots`` (the containers it adds to a layer, whose tensors
    are its trained state).
    """

    name = "lora"
    title = "LoRA"  # as the paper spells it, for messages
    legacy_flag: str | None = None
    layer_kinds: tuple[str, ...] | None = None
    parameter_targets = True
    own_init = False
    draws_factors = True  # False: injection leaves A, B at zero for ``plan_adapter`` to fill
    peft_type = "LORA"
    low_rank = True
    hot_swappable = True
    kept_by_compression = False
    nested_ranks = True
    slots: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<variant {self.name}>"

    @property
    def label(self) -> str:
        """``'dora' (use_dora)``: the name and the older flag, as messages give them."""
        return f"{self.name!r}" + (f" ({self.legacy_flag})" if self.legacy_flag else "")

    # --- configuration -----------------------------------------------------------------------
    def check_config(self, config: Any) -> None:
        """Raise ConfigError for options this variant cannot take (called by ``LoraConfig``)."""

    def peft_config(self, config: Any, data: dict[str, Any]) -> dict[str, Any]:
        """The ``adapter_config.json`` dict for this variant, given LoRA's (``data``)."""
        return data

    def read_peft_config(self, data: dict[str, Any]) -> dict[str, Any]:
        """A PEFT config dict of this variant's ``peft_type`` as ``LoraConfig`` fields and PEFT's
        LoRA keys (``peft_type`` already removed)."""
        return data

    def own_factors(self, layer: Any, r: int, generator: torch.Generator | None):
        """(A, B) of a new rank-r adapter drawn by the variant itself (float32, on the CPU), or
        None: ``LoraConfig.init`` draws them (``initialization.py``)."""
        return None

    # --- injection ---------------------------------------------------------------------------
    # Whether it works on a quantized base (``layers/quantized.py``); if not, why (for messages).
    quantized_base: str | None = None

    def refusal(self, layer: Any) -> str | None:
        """Why this variant cannot go on ``layer`` (None: it can)."""
        if self.quantized_base is not None and getattr(layer, "quantized", False):
            return f"{self.title} cannot adapt a quantized (bitsandbytes) layer: {self.quantized_base}"
        if self.layer_kinds is not None and type(layer).__name__ not in self.layer_kinds:
            kinds = ", ".join(kind.removeprefix("Lora").lower() for kind in self.layer_kinds)
            return f"{self.title} adapts {kinds} layers only"
        return None

    def plan_adapter(self, planned: Any, config: Any) -> None:
        """Finish an injection plan once every layer is planned (VeRA sizes its shared pair)."""

    def attach(self, layer: Any, name: str, planned_layer: Any, trainable: bool) -> None:
        """Add this variant's state to ``layer`` right after A and B were attached; nothing
        here may fail on user input (``inject.commit``)."""

    def holders(self, layer: Any, name: str) -> list[Any]:
        """This variant's containers (``slots``) on ``layer`` that hold adapter ``name``."""
        modules = layer.__dict__["_modules"]
        return [modules[slot] for slot in self.slots if slot in modules and name in modules[slot]]

    def detach(self, layer: Any, name: str) -> None:
        """Remove this variant's state of adapter ``name`` from ``layer``."""
        for holder in self.holders(layer, name):
            del holder[name]

    def trained_tensors(self, layer: Any, name: str) -> list[torch.Tensor]:
        """The tensors of adapter ``name`` on ``layer``: the adapter's parameters, frozen or not."""
        tensors = [layer.lora_A[name], layer.lora_B[name]]
        for holder in self.holders(layer, name):
            own = holder[name]
            tensors += list(own.parameters()) if isinstance(own, torch.nn.Module) else [own]
        return tensors

    def rank(self, layer: Any, name: str) -> int:
        return layer.lora_A[name].shape[0]

    # --- forward -----------------------------------------------------------------------------
    def live_factors(self, layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) that forward and merging use: the stored factors, or their first b ranks
        while the layer runs the adapter at a nested rank b (``layer.nested_rank``; DyLoRA's
        training, ``lorakit.truncate``), with the scaling of a rank-b adapter (alpha/b, or
        alpha/sqrt(b) with rsLoRA)."""
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        b = layer.nested_rank.get(name)
        if b is None or b >= A.shape[0]:
            return A, B, s
        ratio = A.shape[0] / b
        return A[:b], B[:, :b], s * (ratio**0.5 if layer.rslora[name] else ratio)

    def lora_output(self, layer: Any, x: torch.Tensor, name: str) -> torch.Tensor:
        """``s B A x`` for an input already dropped out and cast to the adapter's dtype."""
        return layer.apply_lora(x, name)

    def factors(self, layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with ``s B A`` the update, in the accumulation dtype (float32 or wider)."""
        return layer.accumulated(*self.live_factors(layer, name))

    def increment(self, layer: Any, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the base output ``base_out = W0 x + b`` for input x."""
        return layer.lora_output(x, name).to(base_out.dtype)

    # Whether ``increment`` reads ``base_out``: the layer then computes W0 x without the adapters
    # merged into the weight when some are.
    needs_base_output = False

    def fused_factors(self, layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, float, Any] | None:
        """(A, B, s, magnitude or None) for the fused kernels, or None: this call must run the
        reference forward. Runs on every fast-path call of every layer, so it reads the module's
        dicts directly (nn.Module's attribute lookup costs more host time than the rank-r GEMMs)."""
        state = layer.__dict__
        if name in state["nested_rank"]:
            A, B, s = self.live_factors(layer, name)
            return A, B, s, None
        modules = state["_modules"]
        return modules["lora_A"]._parameters[name], modules["lora_B"]._parameters[name], state["scaling"][name], None

    # --- merging -----------------------------------------------------------------------------
    def merge_change(self, layer: Any, name: str, check: bool) -> tuple[torch.Tensor, Any]:
        """(what merging adds to W0, laid out like it; a record ``unmerge`` and ``merged_scale``
        get back). ``check``: refuse (AdapterStateError, nothing written) a merge after which W0
        could not be recovered."""
        return layer.delta_weight(name), None

    def unmerge_change(self, layer: Any, name: str, record: Any) -> torch.Tensor:
        """What ``merge_change`` added, to subtract it again (W0 has not changed since)."""
        return layer.delta_weight(name)

    def merged_scale(self, layer: Any, name: str, record: Any) -> torch.Tensor | None:
        """c where merging wrote ``(c - 1) W0 + c dW`` (per output unit, broadcasting on W0), or
        None for c = 1: how ``unmerged_weight`` solves for W0."""
        return None

    def check_merge(self, layer: Any, name: str, records: dict[str, Any]) -> None:
        """Raise AdapterStateError if merging ``name`` after those ``records`` (adapter -> record
        of the merges planned before it, updated here) would lose W0; nothing is written."""

    # --- files -------------------------------------------------------------------------------
    def file_key(self, layer: Any, slot: str) -> str:
        """The key of ``slot`` ("lora_A", "lora_B" or one of ``file_slots``) in PEFT's files,
        relative to the module path."""
        return self.file_slots.get(slot) or layer.peft_keys[slot]

    # Extra per-module tensors in files: {slot name used in ``group_factors`` results: file key}.
    file_slots: dict[str, str] = {}
    # Key suffixes of this variant's per-module tensors in files -> their slot ("lora_A", ...),
    # beyond LoRA's (io/layout.py gathers them from every registered variant).
    file_suffixes: dict[str, str] = {}
    # Keys of tensors a file holds once for the whole adapter (VeRA's shared pair).
    model_keys: tuple[str, ...] = ()
    # Whether a file's lora_A / lora_B are the factors of s B A (VeRA's are scaling vectors), and
    # what ``lorakit inspect`` should add about the spectra of this variant's files.
    file_holds_factors = True
    inspection_note: str | None = None

    def saved_factors(self, layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """(A, B, rank written or None) as the file stores them."""
        return layer.lora_A[name].detach(), layer.lora_B[name].detach(), None

    def extra_tensors(self, layer: Any, name: str) -> dict[str, torch.Tensor]:
        """This variant's per-module tensors that files hold, by ``file_slots`` slot (the live
        parameters: hot-swap writes into them)."""
        return {}

    def saved_extras(self, layer: Any, name: str) -> dict[str, torch.Tensor]:
        """Extra per-module tensors to write, by ``file_slots`` slot."""
        return {slot: tensor.detach() for slot, tensor in self.extra_tensors(layer, name).items()}

    def saved_config(self, config: Any, ranks: dict[str, int], paths: list[str]) -> Any:
        """The config written with the file (``ranks``: the ranks ``saved_factors`` reported)."""
        return config

    def model_tensors(self, layers: list[Any], name: str, config: Any) -> dict[str, torch.Tensor]:
        """Tensors the file holds once for the whole adapter (VeRA's shared pair)."""
        return {}

    def read_model_tensors(self, planned: Any, found: dict[str, torch.Tensor]) -> None:
        """Take the file's ``model_keys`` tensors (``found``, non-empty) into the injection plan."""

    def read_extras(self, layer_plan: Any, found: dict[str, torch.Tensor]) -> None:
        """Check and take this variant's extra per-module tensors (``found``: the module's
        tensors by slot) from a file into the plan; AdapterFileError on a missing, mis-shaped
        or foreign one."""
        foreign = sorted(set(found) - {"lora_A", "lora_B"} - set(self.file_slots))
        if foreign:
            raise AdapterFileError(
                f"the file has {foreign} tensors for {layer_plan.path!r}, which a {self.name!r} "
                "adapter does not have; its config names another variant than its weights"
            )

    # --- training ----------------------------------------------------------------------------
    # A dataclass of this variant's training options (AdaLoRA's budget schedule), validated in its
    # __post_init__, or None. Each field is a training option (YAML key and CLI flag) named
    # ``option_prefix + field`` unless ``option_keys`` names it otherwise; ``option_help`` gives
    # --help's text per field.
    training_options: type | None = None
    option_prefix = ""
    option_keys: dict[str, str] = {}
    option_help: dict[str, str] = {}

    def training_option_keys(self) -> dict[str, str]:
        """Field of ``training_options`` -> its training option's name."""
        if self.training_options is None:
            return {}
        return {f: self.option_keys.get(f, self.option_prefix + f) for f in self.training_options.__dataclass_fields__}

    def check_training_options(self, options: Any, config: Any) -> None:
        """Raise ConfigError if ``options`` do not suit the adapter ``config`` describes (called
        when this variant is the run's)."""

    def trainer(self, model: Any, name: str, run: Any, total_steps: int) -> Any:
        """An object with the training loop's hooks for adapter ``name`` (see
        ``variants/hooks.py``), or None when plain training suffices."""
        return None


LORA = Variant()
