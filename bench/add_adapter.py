"""How long adding an adapter takes on a Llama-3-8B-shaped model: lorakit vs PEFT, one process.

    python bench/add_adapter.py                  # on the GPU if there is one, else the CPU
    python bench/add_adapter.py --device cpu

The model is built on the meta device and materialised uninitialised with ``to_empty`` (building
8B random weights would take longer than what is measured, and the values do not matter for the
plain LoRA cases). DoRA cases read every weight (the magnitude is the weight's norm), so their
inputs are filled with random values first, outside the timed part. Each case gets a fresh model.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

# Llama-3-8B: hidden 4096, intermediate 14336, 32 layers, 32/8 heads, vocab 128256.
LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)
CASES = ("lorakit-lora", "peft-lora", "lorakit-dora", "peft-dora")


def empty_model(device: str, dtype: torch.dtype, fill: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))
    model = model.to_empty(device=device).to(dtype)
    if fill:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    return model


def add(case: str, model) -> None:
    dora = case.endswith("dora")
    if case.startswith("peft"):
        import peft

        peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=dora))
    else:
        import lorakit

        lorakit.add_adapter(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear", use_dora=dora))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    print(f"# Llama-3-8B shape, bf16, {args.device}; torch {torch.__version__}", flush=True)
    print("\n| case | add_adapter (r16 all-linear) |\n|---|---|")
    for case in args.cases.split(","):
        model = empty_model(args.device, torch.bfloat16, fill=case.endswith("dora"))
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        add(case, model)
        if args.device == "cuda":
            torch.cuda.synchronize()
        print(f"| {case} | {time.perf_counter() - start:.2f} s |", flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
