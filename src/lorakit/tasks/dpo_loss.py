"""DPO's losses (Rafailov et al. 2023, arXiv:2305.18290) on sequence log-probabilities, in TRL's conventions.

With ``logp`` a completion's log-probability summed over its tokens under the policy and ``ref``
under the reference, the implicit rewards are ``r = beta * (logp - ref)`` and, per pair,

    delta = (logp_c - ref_c) - (logp_r - ref_r)
    sigmoid  -(1 - eps) log sigma(beta delta) - eps log sigma(-beta delta)   (eps: label smoothing,
             conservative DPO; eps = 0 is DPO's own loss)
    hinge    max(0, 1 - beta delta)                                           (SLiC, arXiv:2305.10425)
    ipo      (delta_c / n_c - delta_r / n_r - 1 / (2 beta))^2                (IPO, arXiv:2310.12036)

where IPO's log-ratios are averaged over each completion's ``n`` tokens, as TRL 1.16 does (their
sums make the square grow with the length). TRL 1.16 no longer smooths its ``sigmoid`` loss; the
smoothed form here is the one its earlier releases (and the cDPO note) used, and ``eps = 0`` is
exactly TRL's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's completion tokens: (N, L, V), (N, L), (N, L) -> (N,) (float32
    or wider).

    Token t is predicted from position t - 1. Only the masked positions' logits are taken into
    the (float32) log-softmax, so a long prompt costs no vocabulary-sized rows there.
    """
    mask = completion_mask[:, 1:].bool()
    rows = mask.nonzero()[:, 0]
    dtype = torch.promote_types(logits.dtype, torch.float32)  # half precision up; float64 stays
    picked = logits[:, :-1][mask].to(dtype)  # (tokens, V)
    token_logps = -F.cross_entropy(picked, input_ids[:, 1:][mask], reduction="none")
    return torch.zeros(logits.shape[0], device=logits.device, dtype=dtype).index_add(0, rows, token_logps)


def dpo_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair losses (B,) from the log-ratios ``logp - ref`` (B,) each; see the module docstring.
    ``ipo`` needs each completion's token count (B,)."""
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss averages over each completion's tokens: pass their counts")
        averaged = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        return (averaged - 1 / (2 * beta)) ** 2
    raise ValueError(f"dpo loss must be one of {' | '.join(DPO_LOSSES)}, got {loss_type!r}")
