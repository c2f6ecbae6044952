"""Adapter arithmetic (DESIGN's "combine" box): combine adapters exactly on their updates, compress
them, inspect adapter files.

    combine(model, sources, weights, method, name, **options) -> CombineReport    (build.py)
    compress(model, name, rank) -> CombineReport                                  (compression.py)
    inspect_adapter(path) -> AdapterInfo                                          (inspection.py)

Dense merge formulas (mergekit's semantics) live in methods.py, the factor algebra (exact
concatenation, SVD via QR, error) in factor.py, how each layer's update is read in updates.py.
"""

from .build import combine
from .compression import compress
from .inspection import AdapterInfo, inspect_adapter
from .options import METHODS
from .report import CombineReport, LayerReport

__all__ = ["combine", "compress", "inspect_adapter", "AdapterInfo", "CombineReport", "LayerReport", "METHODS"]
