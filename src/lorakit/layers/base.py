"""`LoraLayer`: a frozen base layer plus any number of named low-rank adapters.

    h = base(x) + sum over active adapters a of  s_a * B_a A_a dropout_a(x)

Each adapter has a `Variant` (``layers/variant.py``; plain LoRA by default) that says what its
factors are and what it adds: DoRA rescales each output unit, VeRA scales a shared pair, and so
on (``lorakit/variants/``). This class asks the variant and never looks for a variant's tensors.

With several adapters each one's change is taken against W0 alone and the changes add up, in
forward and in merging alike, so neither the order of the active adapters nor which of them are
merged changes the result.

Subclasses (linear, embedding, conv) say how A and B are shaped, how ``B A`` is applied to an
input, and how the dense update ``s B A`` is laid out in the base weight; this class holds the
adapters and everything about their state (active, merged, disabled, per-row routing).

The base layer is kept as the submodule ``base_layer`` (so any base module type, quantized ones
included, can sit underneath), and A and B live in ``ParameterDict``s keyed by adapter name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import AdapterStateError
from ..kernels.casting import accumulation_dtype
from .routing import RowRouting
from .slot_stack import SlotStack
from .variant import LORA, Variant
from .weight_merging import WeightMerging


class LoraLayer(WeightMerging, nn.Module):
    """Base class of every LoRA layer. See the module docstring for the formula.

    Attributes:
        base_layer: the original module, frozen.
        lora_A / lora_B: adapter name -> parameter (shapes set by the subclass).
        lora_dropout: adapter name -> dropout module (``nn.Identity`` when p = 0).
        scaling: adapter name -> s (alpha / r, or alpha / sqrt(r) with rsLoRA).
        active_adapters: names whose update is added in ``forward``.
        merged_adapters: names whose update currently sits inside the base weight.
        disabled: when True, ``forward`` is the base layer alone.
        row_adapters: during ``adapter_batch`` or serving, the adapter or slot of each batch row
            (a ``RowRouting``).
        slot_stack: a serving pool's adapters in slots (``SlotStack``), or None.
        variants: adapter name -> its `Variant`, which answers everything variant-specific.
        merge_records: adapter name -> what its variant recorded when it was merged (DoRA: the
            norm it used), for unmerging; absent for variants that need none.
        rslora: adapter name -> whether its scaling is alpha / sqrt(r).
        nested_rank: adapter name -> rank b it runs at for now (its first b ranks, scaling of a
            rank-b adapter: DyLoRA's training, ``lorakit.truncate``); absent means full rank.
        init_factors: for inits that move part of W0 into A, B (PiSSA, OLoRA), the initial
            (A0, B0) kept so the update can be expressed against the original W0.
    """

    # Keys of A and B inside PEFT's files, relative to the module path (adapter name stripped).
    peft_keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    # The dimension of the base weight that indexes output units (per-unit norms and magnitudes).
    unit_dim = 0

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.variants: dict[str, Variant] = {}
        self.merge_records: dict[str, Any] = {}
        self.scaling: dict[str, float] = {}
        self.rslora: dict[str, bool] = {}
        self.nested_rank: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: RowRouting | None = None
        # Under routing, the rows' slots of a serving pool (``layers/slot_stack.py``; LoraLinear).
        self.slot_stack: SlotStack | None = None
        self.init_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- what subclasses provide -------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        """Size of the input side of the update (d_in)."""
        raise NotImplementedError

    @property
    def out_dim(self) -> int:
        """Size of the output side of the update (d_out)."""
        raise NotImplementedError

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (A, B) for rank r."""
        raise NotImplementedError

    def apply_lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``s * B A x`` for adapter ``name`` (x already dropped out and cast), adapter dtype."""
        raise NotImplementedError

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x`` without the bias, W0 being ``unmerged_weight()`` (DoRA needs it on the
        dropped-out input, and when other adapters are merged into the base weight)."""
        raise NotImplementedError

    def output_bias(self) -> torch.Tensor | None:
        """The base bias shaped to broadcast against the output, or None."""
        bias = getattr(self.base_layer, "bias", None)
        return bias

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense update ``s * B A`` laid out like the base weight, in float32 (or wider)."""
        raise NotImplementedError

    # --- base weight access ------------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    # Whether the base weight is stored quantized (``layers/quantized.py``): variants and inits
    # that must write or decompose a dense W0 refuse such layers.
    quantized = False

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the dense weight the base layer computes with (adapters default to it)."""
        return self.base_weight.dtype

    def __getattr__(self, name: str) -> Any:
        # Code around a replaced layer keeps reading `layer.weight`, `layer.in_features`,
        # `embed.padding_idx`...: fall back to the base layer for anything not found here.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name == "base_layer":
                raise
            return getattr(base, name)

    def peft_key(self, name: str, slot: str) -> str:
        """Where ``slot`` ("lora_A", "lora_B" or a variant's) of adapter ``name`` goes in PEFT's files."""
        return self.variants[name].file_key(self, slot)

    def slot(self, slot: str, container: type[nn.Module] = nn.ParameterDict) -> nn.Module:
        """The container ``slot`` (adapter name -> tensor or module) a variant keeps its state
        in, created empty on first use."""
        holder = self.__dict__["_modules"].get(slot)
        if holder is None:
            holder = container()
            self.add_module(slot, holder)
        return holder

    # --- the low-rank path ------------------------------------------------------------------
    def live_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) used by forward and merging, as adapter ``name``'s variant defines them."""
        return self.variants[name].live_factors(self, name)

    def dropped_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.lora_dropout[name](x.to(self.lora_A[name].dtype))

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``s * B A dropout(x)`` for adapter ``name``, in the adapter's dtype."""
        return self.variants[name].lora_output(self, self.dropped_input(x, name), name)

    def adapter_increment(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds for input ``x``, given the base output ``base_out = W0 x + b``
        (W0 without any other adapter: see the module docstring)."""
        return self.variants[name].increment(self, x, name, base_out)

    # --- adapters ----------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        A: torch.Tensor,
        B: torch.Tensor,
        scaling: float,
        dropout: float,
        trainable: bool = True,
        rslora: bool = False,
        variant: Variant = LORA,
    ) -> None:
        """Attach adapter ``name`` with ready-made factors (see ``lorakit.initialization``); its
        variant's own state is attached by the variant (``Variant.attach``)."""
        self.variants[name] = variant
        self.rslora[name] = rslora
        self.lora_A[name] = nn.Parameter(A, requires_grad=trainable)
        self.lora_B[name] = nn.Parameter(B, requires_grad=trainable)
        # A new module starts in training mode; follow the layer's mode (an eval model stays eval).
        self.lora_dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        self.scaling[name] = float(scaling)

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (it must not be merged)."""
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        variant = self.variants.pop(name, LORA)
        variant.detach(self, name)
        for holder in (self.lora_A, self.lora_B, self.lora_dropout):
            if name in holder:
                del holder[name]
        for table in (self.scaling, self.rslora, self.merge_records, self.nested_rank):
            table.pop(name, None)
        self.init_factors.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def rank(self, name: str) -> int:
        return self.variants[name].rank(self, name)

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.row_adapters is not None:
            return self._add_per_row(x, result)
        pending = [n for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters]
        # Every adapter gets W0 x + b, not the running sum: DoRA rescales the base output it is
        # given, so handing it an earlier adapter's contribution would make the order matter.
        base_out = result
        if self.merged_adapters and any(self.variants[n].needs_base_output for n in pending):
            # The base layer's output includes the merged adapters; this variant needs W0 x alone.
            bias = self.output_bias()
            base_out = self.base_output_without_bias(x).to(result.dtype)
            base_out = base_out if bias is None else base_out + bias
        for name in pending:
            result = result + self.adapter_increment(x, name, base_out)
        return result

    def _add_per_row(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Row i of the batch gets adapter ``row_adapters.names[i]`` (None: the base alone) and
        slot ``row_adapters.slots[i]`` of this layer's stack. Rows have disjoint adapters, so each
        row's increment reads the base output of its own rows only, whatever was added before."""
        routing = self.row_adapters
        groups = routing.groups(x.shape[0], x.device)
        named = [name for name in groups if name is not None and name in self.lora_A]
        result, served = self.add_stacked(x, base_out, named)
        for name in named:
            if name in served:
                continue
            index = groups[name]
            delta = self.adapter_increment(x.index_select(0, index), name, base_out.index_select(0, index))
            result = result.index_add(0, index, delta)
        return result

    def add_stacked(self, x: torch.Tensor, base_out: torch.Tensor, named: list[str]) -> tuple[torch.Tensor, set[str]]:
        """Under routing: add what the multi-adapter kernels serve (the rows' slots; named adapters
        taken into a stack) to ``base_out``; returns (the result, names served). Layers without
        stacks serve nothing (``LoraLinear`` does)."""
        return base_out, set()

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with ``s B A`` the update, in the accumulation dtype: float32, or float64 if wider."""
        return self.variants[name].factors(self, name)

    @staticmethod
    def accumulated(A: torch.Tensor, B: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) cast to the accumulation dtype of A (float32, or float64 if wider)."""
        acc = accumulation_dtype(A.dtype)
        return A.to(acc), B.to(acc), s

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.rank(n)}, s={self.scaling[n]:g}" for n in self.adapter_names)
        return f"adapters=({ranks}), active={self.active_adapters}, merged={self.merged_adapters}"
