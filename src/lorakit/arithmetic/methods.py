"""Dense merge methods on task vectors, with mergekit's semantics.

Every function here works on dense updates ("task vectors") ΔW_i of one tensor, stacked as
``deltas`` of shape (n, *shape), and knows nothing about layers or adapters. The general form is
mergekit's generalized task arithmetic (Ilharco et al. 2023; TIES: Yadav et al. 2023; DARE:
Yu et al. 2024):

    τ_i  = sparsify(ΔW_i, density_i)                  (magnitude trim, random drop, or nothing)
    v_i  = w_i τ_i
    mask = [sign(v_i) == elected sign]                (TIES only; all ones otherwise)
    Δ    = Σ_i mask_i v_i
    Δ   /= Σ_i mask_i w_i   if normalize              (a zero divisor is replaced by 1)
    Δ   *= λ

The elected sign is + where Σ_i v_i >= 0 ("sum", TIES's "total") or where Σ_i sign(v_i) >= 0
("count"); a trimmed entry (0) never agrees with it. ``rescale`` after sparsifying matches the
norm of the kept entries to the norm before (mergekit's L1 by default; "density" is the DARE
paper's 1/p).
"""

from __future__ import annotations

import math

import torch

RESCALES = ("l1", "l2", "linf", "density")
CONSENSUS = ("sum", "count")


def generalized(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    consensus: str | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Weighted sum of (already sparsified) deltas with optional sign election; see module docstring."""
    w = weights.to(deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w
    if consensus is None:
        mixed = weighted.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    else:
        mask = agrees_with_majority(weighted, consensus).to(deltas.dtype)
        mixed = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * lambda_ if lambda_ != 1 else mixed


def agrees_with_majority(weighted: torch.Tensor, consensus: str = "sum") -> torch.Tensor:
    """Boolean (n, *shape): entry i agrees with the elected sign (+1 on ties of the vote)."""
    sign = weighted.sign()
    vote = weighted.sum(0) if consensus == "sum" else sign.sum(0)
    majority = torch.where(vote >= 0, 1.0, -1.0).to(sign.dtype)
    return sign == majority


def rescaled(original: torch.Tensor, kept: torch.Tensor, rescale: str | None, density: float) -> torch.Tensor:
    """``kept`` scaled so its norm matches ``original``'s (or by 1/density); unchanged for None."""
    if rescale is None:
        return kept
    if rescale == "density":
        return kept / density
    norm = {"l1": lambda t: t.abs().sum(), "l2": torch.linalg.vector_norm, "linf": lambda t: t.abs().max()}[rescale]
    before, after = norm(original), norm(kept)
    if before < 1e-7 or after < 1e-7:  # nothing meaningful to match (mergekit's eps)
        return kept
    return kept * (before / after)


def trim_magnitude(delta: torch.Tensor, density: float, rescale: str | None = None) -> torch.Tensor:
    """Keep the ``int(density · numel)`` entries of largest |value|, zero the rest (TIES's trim)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k == 0:
        return torch.zeros_like(delta)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.topk(delta.abs().flatten(), k, sorted=False).indices] = 1  # O(n) selection, no full sort
    return rescaled(delta, delta * mask.view_as(delta), rescale, density)


def drop_random(
    delta: torch.Tensor, density: float, rescale: str | None = "l1", generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density`` (Bernoulli mask), rescale."""
    if density >= 1:
        return delta
    # Draw on the CPU so that the same seed gives the same mask on every device.
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return rescaled(delta, delta * keep.to(delta.device, delta.dtype), rescale, density)


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation of two tensors (each flattened to one vector), t in [0, 1].

        θ = arccos(<v0/|v0|, v1/|v1|>),   slerp = sin((1-t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1

    When |cos θ| > ``dot_threshold`` the vectors are (anti)parallel and sin θ ≈ 0, so the result
    is the linear interpolation (1-t) v0 + t v1 instead. A vector with norm <= eps is used as is
    for the angle (mergekit's rule), which puts a zero update at a right angle to the other.
    """
    u0 = v0 / v0.norm() if v0.norm() > eps else v0
    u1 = v1 / v1.norm() if v1.norm() > eps else v1
    dot = float((u0 * u1).sum())
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s0 = math.sin((1 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return s0 * v0 + s1 * v1
