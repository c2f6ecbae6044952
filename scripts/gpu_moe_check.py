"""GPU check of LoRA on expert stacks (``target_parameters``): backward's rebuilt stacks give the
gradients that keeping them gives.

Run on a machine with a GPU (CI has none; the same check runs on the CPU in the test suite):

    PYTHONPATH=src python scripts/gpu_moe_check.py [--device cuda] [--dtype bfloat16]

A small random Mixtral (transformers' default grouped-GEMM experts on a GPU), r4 on q_proj and on
every expert of ``experts.gate_up_proj`` / ``experts.down_proj``; one backward with the stacks
rebuilt (``layers/rebuilt_weights.py``), one with them kept; exits 1 if a gradient differs by more
than 1% of its largest entry.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    from transformers import MixtralConfig, MixtralForCausalLM

    import lorakit
    import lorakit.layers.parameter as parameter

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(config).to(args.device, getattr(torch, args.dtype)).train()
    lorakit.add_adapter(
        model,
        lorakit.LoraConfig(
            r=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
        ),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    ids = torch.randint(0, 512, (2, 64), device=args.device)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    rebuilt = grads()
    real = parameter.rebuilt_in_backward
    parameter.rebuilt_in_backward = lambda recipes: contextlib.nullcontext()
    try:
        kept = grads()
    finally:
        parameter.rebuilt_in_backward = real
    worst = max(((rebuilt[k] - kept[k]).abs().max() / kept[k].abs().max()).item() for k in kept)
    print(
        f"experts implementation {model.config._experts_implementation}; largest gradient difference, "
        f"rebuilt against kept: {worst:.3g} of the gradient's largest entry"
    )
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
