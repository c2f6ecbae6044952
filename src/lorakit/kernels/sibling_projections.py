"""Several LoRA or DoRA projections of one input in one autograd function (attention's q, k, v).

    out_i = x W_iᵀ + b_i + s_i (x A_iᵀ) B_iᵀ          x: (N, d), out_i: (N, d_i)   (DoRA: rescaled rows)

Run as separate layers, each projection is its own autograd node, and autograd adds their three
input gradients with two elementwise passes over (N, d) tensors. Here backward accumulates them
inside the GEMMs (``addmm_`` into one ∂x) and the host makes one call where it made three: in
the forward of a LoRA step, Python's time per layer (not the GPU's) is what sets the pace on a
fast GPU (``bench/gpu_gaps.py``). The three x A_iᵀ come from one GEMM with the A_i stacked, and
so do the three ∂A_i = (s g_i B_i)ᵀ x: each of these skinny GEMMs costs a read of x, whatever
its r. Otherwise each projection's computation is the single layer's (``projection.py``), so
values and gradients are those of the separate layers.

A projection whose output the model never uses gets no gradient (autograd passes None): its
adapter's gradients are None too, as they would be for an unused separate layer.
"""

from __future__ import annotations

import torch

from .projection import project, project_backward, stacked_gb_columns, stacked_input_grads, stacked_inputs


class SiblingProjectionsFunction(torch.autograd.Function):
    """``(out_1, ..., out_k)`` for the k projections of x; see the module docstring.

    Args of ``apply``: x (..., d); for each projection in turn weight, bias, A, B (bias None where
    absent); the k ``Projection`` records; the k magnitudes (None for LoRA). Returns k tensors
    (..., d_i).
    """

    @staticmethod
    def forward(ctx, x, *args):
        count = (len(args) - 1) // 5
        linear, plans, magnitudes = args[: 4 * count], args[4 * count], args[4 * count + 1 :]
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zeros built)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        saved, outs = [x2], []
        xas = stacked_inputs(x2, linear[2::4])  # every x A_iᵀ from one GEMM
        for index, (plan, magnitude) in enumerate(zip(plans, magnitudes)):
            weight, bias, A, B = linear[4 * index : 4 * index + 4]
            out, xa, rescale, merged = project(x2, weight, bias, A, B, magnitude, plan, xas[index])
            # The output only for DoRA's ∂m (the tensor returned: no copy).
            saved += [xa, out if magnitude is not None else None, rescale, merged, weight, bias, A, B, magnitude]
            outs.append(out.view(*lead, out.shape[-1]))
        ctx.save_for_backward(*saved)
        ctx.plans, ctx.lead = plans, lead
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, *saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        count = len(ctx.plans)
        grad_x = None
        result = [None] * (1 + 5 * count + 1)
        # Every ∂A from one GEMM when every projection has a gradient and a trained A (else each its own).
        ranks = [saved[9 * index + 6].shape[0] for index in range(count)]
        wanted = all(g is not None and needs[3 + 4 * i] for i, g in enumerate(grads))
        buffer, columns = stacked_gb_columns(x2, ranks, wanted)
        for index, (plan, grad) in enumerate(zip(ctx.plans, grads)):
            if grad is None:
                continue
            xa, out, rescale, merged, weight, bias, A, B, magnitude = saved[9 * index : 9 * index + 9]
            g = grad.reshape(-1, grad.shape[-1])
            first = 1 + 4 * index
            grad_x, grad_A, grad_B, grad_m = project_backward(
                g,
                x2,
                xa,
                out,
                rescale,
                merged,
                weight,
                bias,
                A,
                B,
                magnitude,
                plan,
                needs[0],
                needs[first + 2],
                needs[first + 3],
                needs[2 + 4 * count + index],
                grad_x=grad_x,
                gb_columns=columns[index],
            )
            result[first + 1] = g.sum(0) if needs[first + 1] else None
            result[first + 2], result[first + 3] = grad_A, grad_B
            result[2 + 4 * count + index] = grad_m
        if buffer is not None:
            result[3 : 1 + 4 * count : 4] = stacked_input_grads(x2, buffer, ranks)
        if grad_x is not None and needs[0]:
            result[0] = grad_x.view(*ctx.lead, grad_x.shape[-1])
        return tuple(result)
