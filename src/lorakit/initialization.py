"""Initial values of A and B for each ``LoraConfig.init``.

- ``default``: A Kaiming-uniform (as in the original LoRA code), B = 0, so the update starts at 0.
  Embeddings are the other way round (A = 0, B ~ N(0, 1)), because their "input" is one-hot.
- ``gaussian``: A ~ N(0, 1/r), B = 0.
- ``pissa`` (Meng et al. 2024): with W0 = U S Vᵀ, the top-r part goes into the adapter,
  ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_rᵀ``, so ``s B A = U_r S_r V_rᵀ``; the caller
  leaves the residual ``W0 - s B A`` in the base weight.
- ``pissa_niter_<N>``: the same with U_r, S_r, V_r from a randomized SVD (Halko, Martinsson and
  Tropp 2011: a random (d_in, r + 8) probe, N power iterations, each re-orthonormalised): far
  faster than the exact SVD on large weights (bench/pissa_init.py, docs/benchmarks.md); where the
  spectrum decays past rank r it finds the same top-r part up to rounding.
- ``olora`` (Büyükakyüz 2024): with W0 = Q R, ``B = Q[:, :r]``, ``A = R[:r]``; residual as above.

Factors are drawn in float32 on the CPU from a per-module generator when a seed is given, so the
same seed gives the same adapter regardless of device or injection order, then cast and moved.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from .errors import TargetError
from .init_names import changes_base, pissa_iterations
from .layers.base import LoraLayer
from .layers.embedding import LoraEmbedding
from .layers.linear import LoraLinear

# Extra probe columns of the randomized SVD beyond r (Halko et al. suggest 5-10).
OVERSAMPLING = 8


def module_generator(seed: int | None, module_name: str) -> torch.Generator | None:
    """A CPU generator whose stream depends on (seed, module name), or None for the global one."""
    if seed is None:
        return None
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(module_name.encode())) % (2**63))
    return gen


def initial_factors(
    layer: LoraLayer, r: int, scaling: float, init: str, dtype: torch.dtype, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for a new rank-r adapter on ``layer``, in ``dtype`` on the base weight's device."""
    shape_a, shape_b = layer.adapter_shapes(r)
    device = layer.base_weight.device
    if device.type == "meta":  # shapes only: nothing to draw
        return torch.empty(shape_a, dtype=dtype, device=device), torch.empty(shape_b, dtype=dtype, device=device)
    if changes_base(init):
        A, B = _decomposition_factors(layer, r, scaling, init, generator)
    else:
        A, B = torch.empty(shape_a), torch.empty(shape_b)
        if isinstance(layer, LoraEmbedding):
            nn.init.zeros_(A)
            nn.init.normal_(B, generator=generator)
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / r, generator=generator)
            nn.init.zeros_(B)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(B)
    return A.to(device=device, dtype=dtype).contiguous(), B.to(device=device, dtype=dtype).contiguous()


def _decomposition_factors(
    layer: LoraLayer, r: int, scaling: float, init: str, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(layer, LoraLinear):
        raise TargetError(f"init={init!r} is defined for linear layers only, not {type(layer.base_layer).__name__}")
    weight = layer.base_weight.detach().float()
    if layer.fan_in_fan_out:
        weight = weight.T
    if r > min(weight.shape):
        raise TargetError(f"init={init!r} needs r <= min(d_out, d_in) = {min(weight.shape)}, got r={r}")
    if init == "olora":
        Q, R = torch.linalg.qr(weight)
        return R[:r].cpu(), Q[:, :r].cpu()
    U, S, Vh = top_singular_triplets(weight, r, pissa_iterations(init), generator)
    root = torch.sqrt(S / scaling)
    return (root[:, None] * Vh).cpu(), (U * root[None, :]).cpu()


def top_singular_triplets(
    weight: torch.Tensor, r: int, iterations: int | None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r (d_out, r), S_r (r,), V_rᵀ (r, d_in)) of ``weight`` (d_out, d_in): from the exact SVD
    when ``iterations`` is None, else from a randomized SVD with that many power iterations (see
    the module docstring), its probe drawn from ``generator`` on the CPU."""
    if iterations is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    probe = torch.randn(weight.shape[1], min(r + OVERSAMPLING, min(weight.shape)), generator=generator)
    basis = torch.linalg.qr(weight @ probe.to(weight)).Q  # (d_out, k): spans W's top range
    for _ in range(iterations):  # W Wᵀ sharpens the spectrum; QR after each product keeps it stable
        basis = torch.linalg.qr(weight @ torch.linalg.qr(weight.T @ basis).Q).Q
    U_small, S, Vh = torch.linalg.svd(basis.T @ weight, full_matrices=False)  # (k, d_in): small
    return (basis @ U_small)[:, :r], S[:r], Vh[:r]
