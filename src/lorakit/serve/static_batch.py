"""`StaticBatch`: the running rows' keys and values in fixed buffers, for decode steps in CUDA graphs.

``batch_state.BatchState`` joins and trims transformers' ``DynamicCache`` every step: new tensors
each time, which a CUDA graph cannot replay. Here every running row holds one *static row* of
fixed buffers for its life, as vLLM's decode steps do:

    keys[l], values[l]: (capacity, kv_heads, L, head_dim)    layer l's cache
    mask: (capacity, L) bool     which columns a row attends (its prompt's real tokens, its decode)
    write_at: (capacity,) int64  the column a row's next key/value goes to
    positions: (capacity,) int64 the row's next position id (its count of real tokens)

A row's prefill (left-padded, ``DynamicCache``) is copied in as it is, padding columns masked, so
columns 0 .. T-1 are its prompt and decode tokens follow at T, T+1, ... A decode step of the first
``b`` static rows (``b`` from a few sizes: one CUDA graph each) passes the model a 4-D mask, the
row positions and a ``RowCache`` whose ``update`` writes each row's new key and value at its own
column; attention reads all L columns, the masked ones adding nothing. Free static rows inside
``b`` compute a dummy token (column 0 unmasked) and are not read. L grows (doubling) when a row
would pass it; the buffers are then new tensors and the graphs are captured again, as they are when
the adapter pool's tensors change (``AdapterPool.layout_version``).

With ``graphs=False`` (``Engine(decode="static")``) the same steps run eagerly; the tests
compare them with single-request ``generate``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels.host_copy import host_to_device
from .cuda_graph import CapturedCall

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
FIRST_LENGTH = 256


class RowCache:
    """What the model's attention layers see as the cache during a static decode step: ``update``
    writes each row's key and value (rows, kv_heads, 1, head_dim) at column ``write_at[row]`` and
    returns the layer's whole buffers (rows, kv_heads, L, head_dim)."""

    is_compileable = False

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write_at: torch.Tensor) -> None:
        self.keys, self.values, self.write_at = keys, values, write_at
        self.rows = torch.arange(write_at.shape[0], device=write_at.device)
        self.layers: list = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.rows, :, self.write_at] = key_states[:, :, 0]
        values[self.rows, :, self.write_at] = value_states[:, :, 0]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2]

    def __len__(self) -> int:
        return len(self.keys)


def _row_cache_class():
    """``RowCache`` as a subclass of transformers' ``Cache`` (models check ``isinstance``), made
    once; its ``__init__`` is ``RowCache``'s (the base's takes layer classes this cache has none of)."""
    global _ROW_CACHE
    if _ROW_CACHE is None:
        from transformers.cache_utils import Cache

        _ROW_CACHE = type("RowCache", (RowCache, Cache), {"__init__": RowCache.__init__})
    return _ROW_CACHE


_ROW_CACHE = None


class StaticBatch:
    """Static rows for up to ``capacity`` running requests; see the module docstring.

    ``forward(ids (b, 1), mask (b, 1, 1, L) bool, positions (b, 1), cache)`` runs the model and
    returns the last position's logits (b, vocab); ``pool`` is the engine's ``AdapterPool``
    (routing, and with ``graphs`` the slot buffer the graphs read).
    """

    def __init__(self, model: nn.Module, capacity: int, *, graphs: bool, pool=None, forward=None) -> None:
        config = model.config
        heads = config.num_attention_heads
        self.layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.capacity = capacity
        self.graphs = graphs
        self.pool = pool
        self.forward = forward
        attention = getattr(config, "_attn_implementation", None) or "eager"
        if attention not in ("sdpa", "eager"):
            raise ConfigError(
                f"decoding over static rows passes a 4-D mask, which {attention!r} attention does not take; "
                "load the model with sdpa or eager attention, or decode without CUDA graphs (--enforce-eager)"
            )
        # eager attention adds its mask to the scores: 0 where a row attends, the dtype's minimum elsewhere
        self.additive_mask = attention == "eager"
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros(capacity, 0, dtype=torch.bool, device=self.device)
        self.write_at = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self.ids = torch.zeros(capacity, 1, dtype=torch.int64, device=self.device)
        self.slots = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self.used = [False] * capacity
        self.lengths = [0] * capacity  # columns each used row fills (host copy of write_at)
        self._graphs: dict[int, CapturedCall] = {}
        self._layout = None

    # --- rows ------------------------------------------------------------------------------
    @torch.inference_mode()
    def admit(self, cache, mask: torch.Tensor) -> list[int]:
        """Copy a prefill's rows (``DynamicCache`` of (n, kv_heads, T, head_dim) per layer, left
        padded; ``mask`` (n, T)) into free static rows; returns their static row numbers."""
        n, T = mask.shape
        free = [k for k in range(self.capacity) if not self.used[k]][:n]
        if len(free) < n:
            raise RuntimeError(f"{n} rows do not fit the static batch's {len(free)} free rows")
        self._ensure_length(T + 1)
        rows = torch.tensor(free, device=self.device)
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            cached = cache.layers[layer]
            keys[:, :, :T].index_copy_(0, rows, cached.keys.to(self.dtype))
            values[:, :, :T].index_copy_(0, rows, cached.values.to(self.dtype))
        row_mask = torch.zeros(n, self.length, dtype=torch.bool, device=self.device)
        row_mask[:, :T] = mask.bool()
        self.mask.index_copy_(0, rows, row_mask)
        self.write_at.index_fill_(0, rows, T)
        self.positions.index_copy_(0, rows, mask.sum(dim=1).to(torch.int64))
        for k in free:
            self.used[k], self.lengths[k] = True, T
        return free

    @torch.inference_mode()
    def release(self, row: int) -> None:
        """Free static row ``row``: it computes a dummy token (column 0) until taken again."""
        self.used[row], self.lengths[row] = False, 0
        self.write_at[row] = 0
        self.mask[row] = False
        self.mask[row, 0] = True

    def length_for(self, needed: int) -> int:
        """The L the buffers have once they hold ``needed`` columns (L only grows, doubling from
        FIRST_LENGTH): what the scheduler charges the KV budget for static rows."""
        length = max(FIRST_LENGTH, self.length)
        while length < needed:
            length *= 2
        return length

    def _ensure_length(self, needed: int) -> None:
        """Grow L to at least ``needed`` columns (``length_for``), keeping the rows."""
        if needed <= self.length:
            return
        length = self.length_for(needed)
        shape = (self.capacity, self.kv_heads, length, self.head_dim)
        old = self.length
        keys, values = [], []
        for layer in range(self.layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old:
                k[:, :, :old] = self.keys[layer]
                v[:, :, :old] = self.values[layer]
            keys.append(k)
            values.append(v)
        mask = torch.zeros(self.capacity, length, dtype=torch.bool, device=self.device)
        mask[:, :old] = self.mask
        for k in range(self.capacity):
            if not self.used[k]:
                mask[k, 0] = True
        self.keys, self.values, self.mask, self.length = keys, values, mask, length
        self._graphs.clear()

    # --- decode ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, rows: list[int], tokens: list[int] | torch.Tensor, routes: list) -> torch.Tensor:
        """One decode token for static rows ``rows`` (their last tokens ``tokens``: a list, or a
        (len(rows),) tensor on the device, e.g. the previous step's samples; adapters ``routes``):
        logits (len(rows), vocab) in that order."""
        self._ensure_length(max(self.lengths[k] for k in rows) + 1)
        bucket = next((b for b in ROW_BUCKETS if b > max(rows)), None) or self.capacity
        bucket = min(bucket, self.capacity)
        index = host_to_device(rows, self.device)
        ids = torch.zeros(bucket, 1, dtype=torch.int64, device=self.device)
        ids[index, 0] = host_to_device(tokens, self.device)  # nothing waits for the device
        # The column each row writes now is one it attends.
        self.mask[index, self.write_at[index]] = True
        bucket_routes = self._bucket_routes(bucket, rows, routes)
        slots = self.pool.route_slots(bucket_routes) if self.graphs else None
        if slots is not None:
            logits = self._graphed(bucket, ids, slots, bucket_routes)
        else:
            self.pool.set_rows(bucket_routes)
            logits = self._eager(bucket, ids)
        self.write_at[index] += 1
        self.positions[index] += 1
        for k in rows:
            self.lengths[k] += 1
        return logits.index_select(0, index)

    def _bucket_routes(self, bucket: int, rows: list[int], routes: list) -> list:
        from .adapter_pool import BASE_ROUTE

        full = [BASE_ROUTE] * bucket
        for k, route in zip(rows, routes):
            full[k] = route
        return full

    def _inputs(self, bucket: int) -> dict[str, torch.Tensor]:
        return {
            "ids": self.ids[:bucket],
            "mask": self.mask[:bucket, None, None, :],
            "positions": self.positions[:bucket, None],
            "write_at": self.write_at[:bucket],
        }

    def _run(self, ids, mask, positions, write_at, **_):
        rows = ids.shape[0]
        if self.additive_mask:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min
            )
        cache = _row_cache_class()([k[:rows] for k in self.keys], [v[:rows] for v in self.values], write_at)
        return self.forward(ids, mask, positions, cache)

    def _eager(self, bucket: int, ids: torch.Tensor) -> torch.Tensor:
        self.ids[:bucket].copy_(ids)
        return self._run(**self._inputs(bucket))

    def _graphed(self, bucket: int, ids: torch.Tensor, slots: list[int], routes: list) -> torch.Tensor:
        layout = (self.length, self.pool.layout_version)
        if layout != self._layout:
            self._graphs.clear()
            self._layout = layout
        self.ids[:bucket].copy_(ids)
        self.slots[:bucket].copy_(host_to_device(slots, self.device))
        # The routing the graph was captured with (a replay does not read it; it keeps the model's
        # routing state what the graph computes until the next set_rows).
        self.pool.fix_slots(self.slots[:bucket])
        graph = self._graphs.get(bucket)
        if graph is None:
            inputs = {**self._inputs(bucket), "slots": self.slots[:bucket]}
            try:
                graph = self._graphs[bucket] = CapturedCall(self._run, inputs)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as exc:  # the model's forward does what a capture forbids (a host sync, say)
                warnings.warn(f"CUDA-graph capture failed, decoding eagerly from now on: {exc}", stacklevel=2)
                self.graphs = False
                self.pool.set_rows(routes)
                return self._eager(bucket, ids)
            # Warm-up and capture wrote this step's keys once more at the same columns: harmless.
        return graph()
