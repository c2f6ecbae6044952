"""`AdapterPool`: many adapters over one model, in tiers disk -> host memory -> device slots.

Each batch row runs with one adapter (or none). LoRA and DoRA adapters on linear modules are
served from *slots*: every adapted linear layer gets a ``SlotStack`` (``layers/slot_stack.py``)
of ``max_loras + 1`` slots, slot 0 empty, and an adapter occupies the same slot number in every
layer it targets (rank zero-padded, scaling folded into B; DoRA's per-unit scale computed from W0
when it is written). One ``RowRouting`` installed on every layer tells each forward which slot
each row uses (``set_rows``), and the multi-adapter kernels add them all at once
(``kernels/multi_lora.py``). Anything a slot cannot hold (VeRA, embedding/conv targets, expert
stacks, modules_to_save, PiSSA files against a changed base) is loaded into the model as a named
adapter (``lorakit.load_adapter``) and routed by name through the layers' per-row loop.

Tiers, each least-recently-used:
- host: up to ``max_cpu_loras`` adapters' factors in CPU memory (pinned when the model is on a
  GPU), read from disk by one background thread, so a cold request waits without holding up
  the engine's other rows;
- device: ``max_loras`` slots; a slot pinned by running rows is never evicted. The oldest waiting
  request (``urgent``) marks the least-recently-used pinned slot as draining: no new rows take it,
  and it goes to the waiting adapter once its rows finish, so a cold adapter is not starved.

Threads: ``register``, ``unregister``, ``names`` and ``directory`` may be called from any thread;
``acquire``, ``release`` and ``set_rows`` only from the engine thread, which alone touches the
model (wrapping modules, writing slots, loading named adapters) and the device tensors.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError, AdapterLoadError, AdapterNameError, ConfigError, LorakitError
from ..init_names import changes_base
from ..inject import delete_adapter
from ..io.layout import group_factors
from ..io.load import load_adapter, read_adapter, read_config_data
from ..io.peft_adalora import is_peft_adalora
from ..kernels.multi_lora import SlotPlan
from ..layers import LoraLinear, is_conv1d
from ..layers.routing import RowRouting
from ..layers.slot_stack import SlotStack
from ..patching.slot_mlp import install_slot_mlps, remove_slot_mlps
from ..patching.slot_siblings import install_slot_siblings, remove_slot_siblings
from ..state import adapter_modules, replace_module
from ..targets import find_targets, is_linear, named_base_modules
from .requests import EngineObserver, NullObserver

NAME_PATTERN = re.compile(r"[A-Za-z0-9._\-/:]{1,128}")
DRAIN_SECONDS = 5.0  # a draining mark lapses unless the waiting request asks again within this time


@dataclass(eq=False)
class _Entry:
    """One registration of an adapter (a new registration of the same name is a new entry)."""

    name: str
    directory: Path
    config: LoraConfig | None  # None for PEFT's AdaLoRA files (read as LoRA with the weights)
    slotted: bool  # served from slots; else loaded into the model by name
    error: str | None = None
    model_name: str | None = None  # the fallback's adapter name inside the model, once loaded
    pins: int = 0  # rows of a fallback adapter in flight


@dataclass(eq=False)
class _Slot:
    entry: _Entry | None = None
    pins: int = 0
    last_used: int = 0
    modules: set[str] = field(default_factory=set)  # module paths written
    drain_for: _Entry | None = None
    drain_until: float = 0.0


@dataclass(frozen=True, eq=False)
class Route:
    """How one batch row runs: ``slot`` of the layers' stacks (0: none) or the model's adapter
    ``model_name`` (None: none); ``name`` is the adapter the request asked for."""

    name: str | None
    slot: int = 0
    model_name: str | None = None
    entry: _Entry | None = None


BASE_ROUTE = Route(None)

# Factors of one module on the host, in float32 (or wider; rounded once, when written into a slot):
# A (r, d_in), s B (d_out, r), DoRA's m (d_out,) or None.
_HostFactors = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


class AdapterPool:
    """Adapters for the rows of a batch; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_loras: int = 8,
        max_cpu_loras: int = 64,
        max_lora_rank: int = 64,
        observer: EngineObserver | None = None,
        base_dir: Path | None = None,
    ) -> None:
        if max_loras < 1 or max_cpu_loras < 1 or max_lora_rank < 1:
            raise ConfigError("max_loras, max_cpu_loras and max_lora_rank must be at least 1")
        self.model = model
        self.max_loras, self.max_cpu_loras, self.max_lora_rank = max_loras, max_cpu_loras, max_lora_rank
        self.observer = observer or NullObserver()
        self.base_dir = Path(base_dir).resolve() if base_dir is not None else None
        self.num_slots = max_loras + 1
        # What slots may adapt: every linear module, by path, with (d_in, d_out); taken once
        # here so the reader thread can check files without walking a model the engine changes.
        self._linear: dict[str, tuple[int, int]] = {}
        for path, module in named_base_modules(model):
            if path and is_linear(module):
                base = module.base_layer if isinstance(module, LoraLinear) else module
                rows, cols = base.weight.shape  # (d_out, d_in); transformers' Conv1D: (d_in, d_out)
                self._linear[path] = (rows, cols) if is_conv1d(base) else (cols, rows)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._host: OrderedDict[_Entry, _HostFactors] = OrderedDict()
        self._reading: set[_Entry] = set()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-adapter-reader")
        self._slots = [_Slot() for _ in range(self.num_slots)]  # index 0 unused (no adapter)
        self._clock = 0
        self._fallbacks = 0
        self._loaded: list[_Entry] = []  # named adapters loaded into the model
        self._pin_host = any(p.is_cuda for p in model.parameters())
        self.routing = RowRouting([], [], num_slots=self.num_slots)
        self._install_routing()
        # Bumped whenever a forward's tensors change identity (a stack made or reallocated, a
        # named adapter loaded into the model): CUDA graphs captured before must be captured again.
        self.layout_version = 0

    # --- any thread --------------------------------------------------------------------------
    def register(self, name: str, directory: str | Path) -> None:
        """Make adapter ``name`` servable from ``directory``. Reads adapter_config.json only."""
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise AdapterNameError(
                f"adapter name {name!r} is not allowed: use letters, digits and . _ - / : (at most 128 characters)"
            )
        path = self._resolve(directory)
        data = read_config_data(path)
        config, slotted = None, True
        if not is_peft_adalora(data):
            try:
                config = LoraConfig.from_dict(data)
            except (LorakitError, TypeError) as exc:
                raise AdapterFileError(f"{path}: {exc}") from None
            self._check_config(name, config)
            slotted = self._slottable(config)
        entry = _Entry(name, path, config, slotted)
        with self._lock:
            if name in self._entries:
                raise AdapterNameError(f"an adapter named {name!r} is already registered; unregister it first")
            self._entries[name] = entry

    def unregister(self, name: str) -> None:
        """Forget adapter ``name``; rows already running with it keep it until released."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                raise AdapterNameError(f"no adapter named {name!r} is registered")
            self._host.pop(entry, None)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def directory(self, name: str) -> Path:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise AdapterNameError(f"no adapter named {name!r} is registered")
        return entry.directory

    def stats(self) -> dict:
        """Counts for monitoring: registered adapters, host-resident ones, occupied slots."""
        with self._lock:
            registered, host = len(self._entries), len(self._host)
        used = sum(1 for slot in self._slots[1:] if slot.entry is not None)
        return {"registered": registered, "host": host, "slots_used": used, "slots": self.max_loras}

    def close(self) -> None:
        """Stop the reader thread and take the routing and the shared-call patches off the model."""
        self._reader.shutdown(wait=True, cancel_futures=True)
        for module in adapter_modules(self.model):
            if module.row_adapters is self.routing:
                module.row_adapters = None
        remove_slot_mlps(self.model)
        remove_slot_siblings(self.model)

    def _resolve(self, directory: str | Path) -> Path:
        path = Path(directory)
        if self.base_dir is not None:
            path = (self.base_dir / path).resolve()
            if not path.is_relative_to(self.base_dir):
                raise AdapterFileError(f"adapter directory {directory} lies outside the adapter directory")
        else:
            path = path.resolve()
        if not path.is_dir():
            raise AdapterFileError(f"adapter directory {directory} does not exist")
        return path

    def _check_config(self, name: str, config: LoraConfig) -> None:
        ranks = [config.r, *(config.rank_pattern or {}).values()]
        if max(ranks) > self.max_lora_rank:
            raise ConfigError(
                f"adapter {name!r} has rank {max(ranks)}, over the server's maximum {self.max_lora_rank} "
                "(raise --max-lora-rank)"
            )
        if config.target_modules is None and not config.target_parameters:
            raise ConfigError(f"adapter {name!r} names no target modules")
        if config.target_modules is not None:
            try:
                find_targets(self.model, config)
            except LorakitError as exc:
                raise ConfigError(f"adapter {name!r} does not fit this model: {exc}") from None

    def _slottable(self, config: LoraConfig) -> bool:
        """LoRA and DoRA on linear modules only, against the unmodified base."""
        if not config.variant_object.hot_swappable or changes_base(config.init):
            return False
        if config.modules_to_save or config.target_parameters or config.target_modules is None:
            return False
        return all(path in self._linear for path, _ in find_targets(self.model, config))

    # --- the reader thread -------------------------------------------------------------------
    def _read(self, entry: _Entry) -> None:
        started = time.perf_counter()
        try:
            factors = self._read_factors(entry)
        except Exception as exc:  # noqa: BLE001 - any failure is reported to the waiting request
            message = str(exc) if isinstance(exc, LorakitError) else f"{type(exc).__name__}: {exc}"
            entry.error = f"adapter {entry.name!r} could not be loaded: {message}"
            factors = None
        with self._lock:
            self._reading.discard(entry)
            if factors is None or self._entries.get(entry.name) is not entry:
                return
            self._host[entry] = factors
            while len(self._host) > self.max_cpu_loras:
                self._host.popitem(last=False)
        self.observer.adapter_loaded(entry.name, "host", time.perf_counter() - started)

    def _read_factors(self, entry: _Entry) -> _HostFactors | None:
        config, weights = read_adapter(entry.directory)
        if not entry.slotted:
            return {}  # checked readable; loaded into the model by name on the engine thread
        parts, _ = group_factors(weights)
        result: _HostFactors = {}
        for path, found in parts.items():
            if "lora_A" not in found or "lora_B" not in found:
                raise AdapterFileError(f"module {path!r} lacks lora_A or lora_B; the adapter is incomplete")
            if path not in self._linear:
                raise AdapterFileError(f"the file adapts {path!r}, which is not a linear module of the model")
            A, B = found["lora_A"], found["lora_B"]
            d_in, d_out = self._linear[path]
            r = A.shape[0]
            if A.shape != (r, d_in) or B.shape != (d_out, r):
                raise AdapterFileError(
                    f"module {path!r}: factors {tuple(A.shape)}, {tuple(B.shape)} do not fit ({d_out}, {d_in})"
                )
            if r > self.max_lora_rank:
                raise AdapterFileError(f"module {path!r} has rank {r}, over the maximum {self.max_lora_rank}")
            # Kept in float32 (or wider), as load_adapter keeps an adapter: the slot rounds once.
            wide = torch.promote_types(A.dtype, torch.float32)
            sB = B.to(wide) * config.scaling_for(path)
            m = found.get("magnitude")
            tensors = [A.to(wide).contiguous(), sB.contiguous(), None if m is None else m.to(wide).reshape(-1)]
            if self._pin_host:  # page-locked memory: the copy into a slot runs at full bus speed
                tensors = [t if t is None else t.pin_memory() for t in tensors]
            result[path] = tuple(tensors)
        if not result:
            raise AdapterFileError(f"{entry.directory} holds no LoRA factors")
        return result

    # --- the engine thread -------------------------------------------------------------------
    def acquire(self, name: str | None, urgent: bool = False) -> Route | None:
        """A route pinned for one row running adapter ``name`` (None: the base), or None while the
        row must wait (its adapter is being read, or every slot is pinned)."""
        if name is None:
            return BASE_ROUTE
        with self._lock:
            entry = self._entries.get(name)
            host = self._host.get(entry) if entry is not None else None
            if host is not None:
                self._host.move_to_end(entry)
        if entry is None:
            raise AdapterNameError(f"no adapter named {name!r} is registered")
        if entry.error is not None:
            raise AdapterLoadError(entry.error)
        if not entry.slotted:
            return self._acquire_fallback(entry, host)
        slot = self._slot_of(entry)
        if slot is not None:
            state = self._slots[slot]
            if state.drain_for is not None and state.drain_for is not entry and time.monotonic() < state.drain_until:
                return None  # leaving for a waiting adapter: no new rows
            self.observer.slot_event("hit")
            return self._pin(slot, entry)
        if host is None:
            self._start_read(entry)
            return None
        slot = self._free_slot(entry, urgent)
        if slot is None:
            return None
        self._write(slot, entry, host)
        self.observer.slot_event("miss")
        return self._pin(slot, entry)

    def release(self, route: Route) -> None:
        """The row that held ``route`` finished."""
        if route.entry is None:
            return
        if route.slot:
            state = self._slots[route.slot]
            state.pins -= 1
            if state.pins == 0 and not self._live(state.entry):
                self._clear(route.slot)  # unregistered while it ran
        else:
            entry = route.entry
            entry.pins -= 1
            if entry.pins == 0:
                self._sweep()

    def set_rows(self, routes: list[Route]) -> None:
        """Row i of the next forward runs with ``routes[i]``."""
        self._sweep()
        self.routing.set_rows([r.model_name for r in routes], [r.slot for r in routes], self.num_slots)

    def route_slots(self, routes: list[Route]) -> list[int] | None:
        """Each route's slot, or None while any named adapter is loaded into the model (its rows
        take the per-row loop, and its wrappers, modules_to_save's among them, index rows by host
        lists that a CUDA graph cannot hold)."""
        if self._loaded or any(r.model_name is not None for r in routes):
            return None
        return [r.slot for r in routes]

    def fix_slots(self, buffer: torch.Tensor) -> None:
        """Route the following forwards of ``len(buffer)`` one-token rows by the slots written into
        ``buffer`` ((rows,) int64 on the model's device) until the next ``set_rows``: what a CUDA
        graph of a decode step is captured with; its replays read the buffer, which the graph's
        owner keeps (``CapturedCall.inputs``)."""
        self._sweep()
        self.routing.set_plan(SlotPlan.for_graph(buffer, self.num_slots), buffer.shape[0])

    def _sweep(self) -> None:
        """Unload named adapters unregistered while no row used them (``release`` does the rest)."""
        for entry in [e for e in self._loaded if e.pins == 0 and not self._live(e)]:
            delete_adapter(self.model, entry.model_name)
            entry.model_name = None
            self._loaded.remove(entry)

    def _live(self, entry: _Entry | None) -> bool:
        with self._lock:
            return entry is not None and self._entries.get(entry.name) is entry

    def _start_read(self, entry: _Entry) -> None:
        with self._lock:
            if entry in self._reading:
                return
            self._reading.add(entry)
        self._reader.submit(self._read, entry)

    def _pin(self, slot: int, entry: _Entry) -> Route:
        state = self._slots[slot]
        state.pins += 1
        self._clock += 1
        state.last_used = self._clock
        if state.drain_for is entry:
            state.drain_for = None
        return Route(entry.name, slot, None, entry)

    def _slot_of(self, entry: _Entry) -> int | None:
        for k in range(1, self.num_slots):
            if self._slots[k].entry is entry:
                return k
        return None

    def _free_slot(self, entry: _Entry, urgent: bool) -> int | None:
        """A slot for ``entry``: an empty one, else the least recently used unpinned one that is
        not draining for another adapter; else, when ``urgent``, mark a pinned one draining."""
        now = time.monotonic()
        free = []
        for k in range(1, self.num_slots):
            state = self._slots[k]
            if state.entry is None:
                return k
            reserved = state.drain_for is not None and state.drain_for is not entry and now < state.drain_until
            if state.pins == 0 and not reserved:
                free.append(k)
        if free:
            k = min(free, key=lambda j: (self._live(self._slots[j].entry), self._slots[j].last_used))
            if self._live(self._slots[k].entry):
                self.observer.slot_event("eviction")
            return k
        if urgent:
            draining = [k for k in range(1, self.num_slots) if self._slots[k].drain_for is entry]
            k = draining[0] if draining else min(range(1, self.num_slots), key=lambda j: self._slots[j].last_used)
            self._slots[k].drain_for, self._slots[k].drain_until = entry, now + DRAIN_SECONDS
        return None

    def _write(self, slot: int, entry: _Entry, host: _HostFactors) -> None:
        started = time.perf_counter()
        state = self._slots[slot]
        for path in state.modules - set(host):
            self._stack(path).clear(slot)
        layout = self.layout_version
        for path, (A, sB, m) in host.items():
            stack = self._stack(path)
            allocations = stack.allocations
            stack.write(slot, A, sB, 1.0, magnitude=m)
            if stack.allocations != allocations:
                self.layout_version += 1
        if self.layout_version != layout:
            # New stacks (or wider ones): the projections of one input that now serve slots share
            # their decode launches (layers/slot_siblings.py), and gated MLPs serving slots on all
            # three projections run a prefill's rows in one fused pass (layers/slot_mlp.py).
            install_slot_siblings(self.model)
            install_slot_mlps(self.model)
        state.entry, state.modules, state.pins = entry, set(host), 0
        state.drain_for = None
        self.observer.adapter_loaded(entry.name, "device", time.perf_counter() - started)

    def _clear(self, slot: int) -> None:
        state = self._slots[slot]
        for path in state.modules:
            self._stack(path).clear(slot)
        self._slots[slot] = _Slot(last_used=state.last_used)

    def _stack(self, path: str) -> SlotStack:
        """The slot stack of module ``path``, wrapping the module in a LoraLinear first if needed."""
        module = self.model.get_submodule(path)
        if not isinstance(module, LoraLinear):
            layer = LoraLinear(module).train(module.training)
            replace_module(self.model, path, layer)
            module = layer
        if module.slot_stack is None:
            module.slot_stack = SlotStack(module, self.num_slots, self.max_lora_rank)
            module.row_adapters = self.routing
            self.layout_version += 1
        return module.slot_stack

    def _acquire_fallback(self, entry: _Entry, host: _HostFactors | None) -> Route | None:
        if entry.model_name is None:
            if host is None:  # read once in the background: a bad file fails without the engine waiting
                self._start_read(entry)
                return None
            self._fallbacks += 1
            model_name = f"serve_{self._fallbacks}"
            started = time.perf_counter()
            try:
                load_adapter(self.model, entry.directory, name=model_name, activate=False)
            except LorakitError as exc:
                entry.error = f"adapter {entry.name!r} could not be loaded: {exc}"
                raise AdapterLoadError(entry.error) from None
            entry.model_name = model_name
            self._loaded.append(entry)
            self._install_routing()
            self.layout_version += 1
            self.observer.adapter_loaded(entry.name, "device", time.perf_counter() - started)
        else:
            self.observer.slot_event("hit")
        entry.pins += 1
        return Route(entry.name, 0, entry.model_name, entry)

    def _install_routing(self) -> None:
        for module in adapter_modules(self.model):
            module.row_adapters = self.routing
