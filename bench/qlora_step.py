"""QLoRA training-step benchmark: lorakit QLoRA (NF4) vs lorakit bf16 LoRA vs PEFT QLoRA, one process.

    python bench/qlora_step.py                                  # GPU: 1.2B Llama shape, r16 all-linear, 4x2048
    python bench/qlora_step.py --preset llama-8b                # GPU: 8B Llama shape at 1x2048 (the 16 GiB goal)
    python bench/qlora_step.py --preset llama-8b --gradient-checkpointing
    python bench/qlora_step.py --preset tiny --device cpu       # a smoke run of every case on the CPU

Every case builds the same randomly initialised Llama (no download) in the preset's dtype. The
quantized cases replace every linear layer but the LM head with bitsandbytes' NF4 Linear4bit
(double quantization, bf16 compute on a GPU): through ``lorakit.quantize`` where it exists, so
lorakit and PEFT train on the same 4-bit base. Then r16 all-linear adapters, warm-up steps and
timed optimizer steps (forward + backward + AdamW on the adapters). Per case: the median step,
ratios to lorakit bf16 LoRA and to PEFT QLoRA measured in this run, the CUDA peak over the steps
(``max_memory_allocated`` after a reset once the model is built, so quantizing's transient bf16
weights do not count), and lorakit's ``memory_report`` of the tensors after a step. A Markdown
table goes to stdout, everything to --json if given.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

PRESETS = {
    # The 1.2B Llama shape of the fast-training issue (as bench/train_step.py): 4 x 2048 tokens.
    "llama-1b": dict(
        model=dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
        ),
        batch=4,
        seq=2048,
        dtype="bfloat16",
    ),
    # Llama-3-8B's shape: hidden 4096, 32 layers, 32/8 heads, MLP 14336, vocab 128256, untied head.
    "llama-8b": dict(
        model=dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=False,
        ),
        batch=1,
        seq=2048,
        dtype="bfloat16",
    ),
    # Small enough for a CPU: checks that every case runs (fp32 compute there).
    "tiny": dict(
        model=dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            tie_word_embeddings=True,
        ),
        batch=2,
        seq=64,
        dtype="float32",
    ),
}

CASES = {
    "lorakit-lora": "lorakit LoRA r16 all-linear, bf16 base (adapters in the base dtype)",
    "lorakit-qlora": "lorakit QLoRA NF4 r16 all-linear (adapters in the compute dtype)",
    "lorakit-qlora-reference": "lorakit QLoRA NF4 r16 all-linear, fused 4-bit path off (bitsandbytes layer + adapter)",
    "lorakit-qlora-paged8bit": "lorakit QLoRA NF4 r16 all-linear, paged AdamW 8-bit",
    "peft-qlora": "PEFT QLoRA NF4 r16 all-linear, default (fp32 adapters)",
    "peft-qlora-bf16": "PEFT QLoRA NF4 r16 all-linear, adapters in the compute dtype",
}
DEFAULT_CASES = ["lorakit-lora", "lorakit-qlora", "lorakit-qlora-reference", "peft-qlora", "peft-qlora-bf16"]


@dataclass
class Measurement:
    case: str
    median_s: float
    steps: list[float]
    trainable: int
    peak_gib: float | None
    memory: dict = field(default_factory=dict)  # lorakit.memory_report(...).as_dict() after a step


def build_model(preset: dict, device: str):
    """The preset's Llama, randomly initialised straight in its dtype on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = getattr(torch, preset["dtype"])
    config = LlamaConfig(**preset["model"], attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # an 8B model built in fp32 first would need 32 GB for a moment
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def quantize_nf4(model, compute_dtype: torch.dtype):
    """Every linear layer but the LM head to bitsandbytes NF4 (double quantization)."""
    import lorakit

    if hasattr(lorakit, "quantize"):
        return lorakit.quantize(model, "nf4", double_quant=True, compute_dtype=compute_dtype)
    return _bnb_replace(model, compute_dtype)  # before lorakit.quantize existed: the same replacement


def _bnb_replace(model, compute_dtype: torch.dtype):
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        device = module.weight.device
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            module.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
        )
        if module.bias is not None:
            q.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        q = q.to(device)  # quantizes
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
        del module
    return model


def prepare(case: str, model, compute_dtype: torch.dtype):
    """``case``'s model: quantized or not, with r16 all-linear adapters."""
    import lorakit

    if "qlora" in case:
        model = quantize_nf4(model, compute_dtype)
    if case.startswith("peft-"):
        import peft

        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        # PEFT picks its bitsandbytes LoRA layer only on a model that says it was loaded in 4 bits
        # (transformers sets this; a model quantized in place does not).
        model.is_loaded_in_4bit = "qlora" in case
        # PEFT casts adapters to fp32 unless told not to.
        return peft.get_peft_model(model, config, autocast_adapter_dtype=not case.endswith("-bf16"))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    if case.endswith("-reference"):
        from lorakit.state import lora_layers

        for _, layer in lora_layers(model):
            layer.fast_path = False
    return model


def make_step(case: str, preset: dict, device: str, checkpointing: bool):
    """Build ``case``'s model and optimizer; returns (one training step, trainable count, model, optimizer)."""
    from lorakit.training.optim import make_optimizer

    dtype = getattr(torch, preset["dtype"])
    compute_dtype = dtype if device == "cuda" else torch.float32
    model = prepare(case, build_model(preset, device), compute_dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, preset["model"]["vocab_size"], (preset["batch"], preset["seq"]), generator=gen).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if case.endswith("-paged8bit"):
        optimizer = make_optimizer(model, 1e-4, optimizer="paged_adamw8bit")
    else:  # every other case: the same fused torch AdamW over its adapters
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    def zero() -> None:
        optimizer.zero_grad(set_to_none=True)

    return step, zero, sum(p.numel() for p in params), model, optimizer


def run_case(case: str, preset: dict, device: str, warmup: int, steps: int, checkpointing: bool) -> Measurement:
    import lorakit

    step, zero, trainable, model, optimizer = make_step(case, preset, device, checkpointing)
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    memory = {}
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if i == 0:  # gradients and optimizer state both exist now: the step's tensors
            memory = lorakit.memory_report(model, optimizer).as_dict()
            if case.startswith("peft-"):  # PEFT's LoRA layers are not lorakit's: its adapters sit in "base"
                lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
                memory["base"] -= lora
                memory["adapters"] += lora
        zero()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del step, zero, model, optimizer
    gc.collect()  # PEFT models hold reference cycles; free them before the next case's model
    if device == "cuda":
        torch.cuda.empty_cache()
    timed = times[warmup:]
    return Measurement(case, statistics.median(timed), timed, trainable, peak, memory)


def versions() -> str:
    import transformers

    parts = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
    ]
    for name in ("peft", "bitsandbytes"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


def gib(n: float | None) -> str:
    from lorakit.memory import human_bytes

    return "-" if n is None else human_bytes(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="llama-1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant, every case")
    parser.add_argument("--json", help="also write the measurements to this file")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(
        f"# {args.preset}, base {preset['dtype']}, r16 all-linear, batch {preset['batch']}x{preset['seq']}, "
        f"{device_name}{', gradient checkpointing' if args.gradient_checkpointing else ''}; {versions()}",
        flush=True,
    )
    results = []
    for case in cases:
        try:
            results.append(run_case(case, preset, args.device, args.warmup, args.steps, args.gradient_checkpointing))
        except torch.OutOfMemoryError as exc:
            print(f"  {case}: out of memory ({str(exc).splitlines()[0]})", file=sys.stderr, flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        m = results[-1]
        print(
            f"  {case}: median {m.median_s * 1000:.0f} ms, peak {gib(m.peak_gib * 2**30 if m.peak_gib else None)}",
            file=sys.stderr,
            flush=True,
        )
    by_case = {m.case: m for m in results}
    lora, peft_q = by_case.get("lorakit-lora"), by_case.get("peft-qlora")
    print(
        "\n| case | step | x lorakit bf16 LoRA | x PEFT QLoRA | peak memory | peak x lorakit bf16 LoRA "
        "| quantized base | rest of base | adapters+grads+optimizer |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m in results:
        step_ratio = lambda ref: f"{m.median_s / ref.median_s:.2f}" if ref else "-"  # noqa: E731
        peak = f"{m.peak_gib:.2f} GiB" if m.peak_gib is not None else "-"
        peak_ratio = f"{m.peak_gib / lora.peak_gib:.2f}" if lora and lora.peak_gib and m.peak_gib else "-"
        mem = m.memory
        training = mem.get("adapters", 0) + mem.get("gradients", 0) + mem.get("optimizer_state", 0)
        print(
            f"| {CASES[m.case]} | {m.median_s * 1000:.0f} ms | {step_ratio(lora)} | {step_ratio(peft_q)} | {peak} "
            f"| {peak_ratio} | {gib(mem.get('quantized'))} | {gib(mem.get('base'))} | {gib(training)} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "preset": args.preset,
                    "device": device_name,
                    "versions": versions(),
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "results": [vars(m) for m in results],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
