"""How long a PiSSA initialisation takes on one large linear layer: exact against randomized SVD,
lorakit against PEFT, one process.

    python bench/pissa_init.py                                   # 4096 x 14336 (a Llama-3-8B MLP weight), r 16
    python bench/pissa_init.py --cases lorakit-pissa_niter_4,peft-pissa_niter_4 --d-out 4096 --d-in 4096

Each case wraps a fresh ``nn.Linear`` with the same fp32 weight and times adding a rank-r adapter
with that init (SVD, factors and the residual written into the weight). It also prints how far the
adapter's initial update s·B·A is from the exact top-r part U_r S_r V_rᵀ, relative to its norm.
The weight is a random bulk plus 64 directions of geometrically decaying strength above it, the
shape of a trained weight's spectrum; ``--flat`` leaves the bulk alone (a flat spectrum, where no method
finds "the" top-r part: the randomized SVD's worst case).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

CASES = ("lorakit-pissa", "lorakit-pissa_niter_4", "peft-pissa_niter_4", "peft-pissa")


def layer(d_out: int, d_in: int, flat: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(d_in, d_out, bias=False))
    if not flat:
        U = torch.linalg.qr(torch.randn(d_out, 64)).Q
        V = torch.linalg.qr(torch.randn(d_in, 64)).Q
        # The bulk's largest singular value is about std (√d_out + √d_in); the added directions
        # stand 9× to ~1.1× above it, as a trained weight's leading directions stand above its noise.
        edge = model.proj.weight.std().item() * (d_out**0.5 + d_in**0.5)
        strength = edge * (1 + 8 * 0.85 ** torch.arange(64.0))
        with torch.no_grad():
            model.proj.weight.add_((U * strength) @ V.T)
    return model


def initial_update(case: str, model: nn.Module, r: int) -> torch.Tensor:
    """Add the adapter; returns s·B·A (d_out, d_in) at init."""
    library, _, init = case.partition("-")
    if library == "lorakit":
        import lorakit

        lorakit.add_adapter(model, lorakit.LoraConfig(r=r, alpha=r, target_modules=["proj"], init=init, seed=0))
        return model.proj.delta_weight("default").detach()
    import peft

    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], init_lora_weights=init)
    )
    proj = wrapped.base_model.model.proj
    return proj.get_delta_weight("default").detach()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES[:3]), help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--d-out", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=14336)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--flat", action="store_true", help="the Gaussian weight alone (flat spectrum)")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}")
    import lorakit  # noqa: F401  (imports outside the timed part)

    if any(c.startswith("peft-") for c in cases):
        import peft  # noqa: F401
    weight = layer(args.d_out, args.d_in, args.flat).proj.weight.detach().double()
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    top = (U[:, : args.r] * S[: args.r]) @ Vh[: args.r]
    spectrum = "flat" if args.flat else "decaying"
    print(
        f"# {args.d_out}x{args.d_in} fp32 ({spectrum} spectrum), r {args.r}, "
        f"CPU x{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("\n| case | time | relative distance from the exact top-r part |\n|---|---|---|")
    for case in cases:
        model = layer(args.d_out, args.d_in, args.flat)
        start = time.perf_counter()
        update = initial_update(case, model, args.r)
        elapsed = time.perf_counter() - start
        distance = ((update.double() - top).norm() / top.norm()).item()
        print(f"| {case} | {elapsed:.2f} s | {distance:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
