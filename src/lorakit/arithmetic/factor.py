"""Low-rank factors: exact concatenation, SVD re-factorisation with its error, spectra.

An update is kept as ``ΔW = B A`` with B (d_out, r) and A (r, d_in), the scaling folded into B
(conv kernels flattened to (C_out, C_in·k)). Two facts make everything here exact or cheap:

    Σ_i c_i B_i A_i = [c_1 B_1 … c_n B_n] · [A_1; …; A_n]          (concatenation: no error)

    B = Q_B R_B,  Aᵀ = Q_A R_A  ⇒  B A = Q_B (R_B R_Aᵀ) Q_Aᵀ           (QR of the thin factors)

so the singular values of a rank-r update come from the SVD of an r×r matrix, never from the
dense d_out×d_in one. Truncating to rank k keeps ``B' = U_k √S_k``, ``A' = √S_k V_kᵀ`` and drops

    relative error = ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = sqrt(Σ_{j>k} σ_j²) / sqrt(Σ_j σ_j²)     (Eckart–Young).

Dense results (TIES, DARE, slerp, DoRA sources) are truncated by ``best_rank_k``, which needs only
the top k directions and takes them from the eigenvectors of the smaller Gram matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WORK_DTYPE = torch.float64  # factorisations run in float64: the result is then exact to fp32 rounding


@dataclass
class LowRank:
    """``ΔW = B @ A``; B: (d_out, r) with the scaling folded in, A: (r, d_in)."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense(self) -> torch.Tensor:
        return self.B @ self.A


def concatenated(parts: list[LowRank], coefficients: list[float]) -> LowRank:
    """``Σ c_i B_i A_i`` as one adapter of rank Σ r_i (exact)."""
    B = torch.cat([c * p.B.to(WORK_DTYPE) for p, c in zip(parts, coefficients)], dim=1)
    A = torch.cat([p.A.to(WORK_DTYPE) for p in parts], dim=0)
    return LowRank(B, A)


def svd_of_factors(update: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of ``B A`` through QR of the thin factors: O((d_out + d_in) r²) work."""
    Q_B, R_B = torch.linalg.qr(update.B.to(WORK_DTYPE))
    Q_A, R_A = torch.linalg.qr(update.A.to(WORK_DTYPE).T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return Q_B @ U, S, Vh @ Q_A.T


def best_rank_k(delta: torch.Tensor, rank: int) -> tuple[LowRank, float]:
    """The best rank-``rank`` approximation of a dense update and its relative error.

    A full SVD of a d_out×d_in matrix is the slow step of the dense methods; only the top k
    directions are needed, and they are the top eigenvectors of the smaller Gram matrix
    (Δ Δᵀ or Δᵀ Δ, in float64). The stored update is the projection U_k U_kᵀ Δ (resp. Δ V_k V_kᵀ),
    which is exactly the truncated SVD, and the error is measured on the residual itself."""
    M = delta.to(WORK_DTYPE)
    k = max(1, min(rank, *M.shape))
    wide = M.shape[0] <= M.shape[1]
    _, vectors = torch.linalg.eigh(M @ M.T if wide else M.T @ M)  # ascending eigenvalues
    top = vectors[:, -k:].flip(1)
    update = LowRank(top, top.T @ M) if wide else LowRank(M @ top, top.T)
    total = float(M.norm())
    error = float((M - update.dense()).norm()) / total if total > 0 else 0.0
    return update, error


def singular_values(update: LowRank) -> torch.Tensor:
    """The singular values of ``B A`` (descending), from an r×r problem."""
    _, R_B = torch.linalg.qr(update.B.to(WORK_DTYPE))
    _, R_A = torch.linalg.qr(update.A.to(WORK_DTYPE).T)
    return torch.linalg.svdvals(R_B @ R_A.T)


def truncated(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[LowRank, float]:
    """The best rank-``rank`` factors (balanced: √S on each side) and the relative error dropped."""
    k = max(1, min(rank, S.shape[0]))
    root = S[:k].sqrt()
    return LowRank(U[:, :k] * root, root[:, None] * Vh[:k]), dropped_error(S, k)


def dropped_error(S: torch.Tensor, k: int) -> float:
    """``sqrt(Σ_{j>k} σ_j²) / sqrt(Σ σ_j²)``; 0 for a zero update."""
    power = S.to(WORK_DTYPE) ** 2
    total = float(power.sum())
    return math.sqrt(float(power[k:].sum()) / total) if total > 0 else 0.0


def entropy_rank(S: torch.Tensor) -> float:
    """Effective rank exp(H(p)), p_j = σ_j / Σσ (Roy & Vetterli 2007): 1 for one direction,
    r for r equal singular values; 0 for a zero update."""
    total = float(S.sum())
    if total <= 0:
        return 0.0
    p = S[S > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def energy_rank(S: torch.Tensor, energy: float = 0.9) -> int:
    """The fewest singular values holding ``energy`` of ‖ΔW‖_F² (0 for a zero update)."""
    power = S.to(WORK_DTYPE) ** 2
    total = float(power.sum())
    if total <= 0:
        return 0
    return int((torch.cumsum(power, 0) < energy * total * (1 - 1e-12)).sum()) + 1
