"""Training-step benchmark: lorakit vs PEFT vs the frozen base, measured in one process.

    python bench/train_step.py                       # CPU: SmolLM2-135M shape, fp32, batch 8x64
    python bench/train_step.py --preset llama-1b     # GPU: 1.2B Llama shape, bf16, batch 4x2048
    python bench/train_step.py --interleave --steps 10 --cases frozen,lorakit-lora,peft-lora   # shared CPU
    python bench/train_step.py --preset llama-1b --compile --cases frozen,lorakit-lora,lorakit-dora
    python bench/train_step.py --preset moe --cases frozen,lorakit-lora,lorakit-experts,peft-experts   # MoE

Every case builds the same randomly initialised model (no download), runs warm-up steps, then
times optimizer steps (forward + backward + AdamW) and reports the median, the ratio to the frozen
base (forward + backward with input gradients only: the floor no LoRA step can beat) and peak
memory on GPU. Results go to stdout as a Markdown table (and to --json if given).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from shapes import LLAMA_1B, SMOLLM2_135M

PRESETS = {
    # SmolLM2-135M: 30 layers, hidden 576, 9/3 heads, vocab 49152.
    "smollm2-135m": dict(
        model=SMOLLM2_135M,
        batch=8,
        seq=64,
        dtype="float32",
    ),
    # The 1.2B Llama shape of the fast-training issue: hidden 2048, 16 layers, 32/8 heads, vocab 128256.
    "llama-1b": dict(
        model=LLAMA_1B,
        batch=4,
        seq=2048,
        dtype="bfloat16",
    ),
    # A mixture-of-experts Mixtral shape (transformers 5: experts as stacked 3-D parameters); all-linear
    # there is attention only, the experts need target_parameters.
    "moe": dict(
        arch="mixtral",
        model=dict(
            hidden_size=2048,
            intermediate_size=1024,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            num_local_experts=32,
            num_experts_per_tok=4,
            vocab_size=32000,
        ),
        batch=4,
        seq=2048,
        dtype="bfloat16",
    ),
    "moe-small": dict(
        arch="mixtral",
        model=dict(
            hidden_size=256,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=4096,
        ),
        batch=8,
        seq=64,
        dtype="float32",
    ),
}
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
# The experts cases name attention's projections: PEFT reads "all-linear" on a transformers-5 MoE model as
# its transformers-4 layout (router included, gate_up_proj at rank 2r), which would compare different work.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

CASES = {
    "frozen": "frozen base, fwd+bwd (input grads only)",
    "lorakit-lora": "lorakit LoRA r16 all-linear (adapters in the base dtype)",
    "lorakit-lora-fp32": "lorakit LoRA r16 all-linear, fp32 adapters",
    "lorakit-lora-qv": "lorakit LoRA r16 q_proj,v_proj",
    "lorakit-lora-reference": "lorakit LoRA r16 all-linear, reference path",
    "peft-lora": "PEFT LoRA r16 all-linear, default (fp32 adapters)",
    "peft-lora-bf16": "PEFT LoRA r16 all-linear, adapters in the base dtype",
    "peft-lora-qv": "PEFT LoRA r16 q_proj,v_proj, default",
    "lorakit-dora": "lorakit DoRA r16 all-linear (adapters in the base dtype)",
    "lorakit-dora-fp32": "lorakit DoRA r16 all-linear, fp32 adapters",
    "lorakit-dora-reference": "lorakit DoRA r16 all-linear, reference path",
    "peft-dora": "PEFT DoRA r16 all-linear, default (fp32 adapters)",
    "peft-dora-bf16": "PEFT DoRA r16 all-linear, adapters in the base dtype",
    "lorakit-lora-fa": "lorakit LoRA-FA r16 all-linear",
    "lorakit-dylora": "lorakit DyLoRA r16 all-linear",
    "lorakit-adalora": "lorakit AdaLoRA r16 all-linear (+ rank allocator, orth. reg.)",
    "lorakit-vera": "lorakit VeRA r256 all-linear",
    "peft-vera": "PEFT VeRA r256 all-linear",
    "full": "full fine-tuning",
    "lorakit-experts": "lorakit LoRA r16 attention + every expert (target_parameters)",
    "peft-experts": "PEFT LoRA r16 attention + every expert (target_parameters), default (fp32 adapters)",
    "peft-experts-bf16": "PEFT LoRA r16 attention + every expert, adapters in the base dtype",
}
# The default set: the fast-training issue's rows, for lorakit and PEFT.
DEFAULT_CASES = [
    "frozen",
    "lorakit-lora",
    "lorakit-lora-fp32",
    "lorakit-lora-qv",
    "lorakit-lora-reference",
    "peft-lora",
    "peft-lora-bf16",
    "peft-lora-qv",
    "lorakit-dora",
    "lorakit-dora-fp32",
    "lorakit-dora-reference",
    "peft-dora",
    "peft-dora-bf16",
    "full",
]


@dataclass
class Measurement:
    case: str
    median_s: float
    steps: list[float]
    trainable: int
    peak_gib: float | None


def build_model(preset: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config_class, model_class = (
        (MixtralConfig, MixtralForCausalLM) if preset.get("arch") == "mixtral" else (LlamaConfig, LlamaForCausalLM)
    )
    config = config_class(**preset["model"], attn_implementation="sdpa")
    with torch.device(device):
        model = model_class(config)
    return model.to(getattr(torch, preset["dtype"]))


def prepare(case: str, model):
    """Make ``model`` ready for ``case`` (adapters added, frozen parts frozen); returns the model to train."""
    import lorakit

    if case == "full":
        return model
    if case == "frozen":
        model.requires_grad_(False)
        return model
    if case == "peft-vera":
        import peft

        return peft.get_peft_model(model, peft.VeraConfig(r=256, target_modules="all-linear"))
    if case == "lorakit-vera":
        lorakit.add_adapter(model, lorakit.LoraConfig(r=256, target_modules="all-linear", use_vera=True))
        return model
    if case.startswith("peft-"):
        import peft

        variant, _, option = case.removeprefix("peft-").partition("-")
        targets = ["q_proj", "v_proj"] if option == "qv" else ATTENTION if variant == "experts" else "all-linear"
        config = peft.LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=targets,
            use_dora=variant == "dora",
            target_parameters=EXPERT_PARAMETERS if variant == "experts" else None,
        )
        # PEFT casts adapters to fp32 unless told not to.
        return peft.get_peft_model(model, config, autocast_adapter_dtype=option != "bf16")
    variant = case.removeprefix("lorakit-")
    options = {}
    for suffix, option in (
        ("-fp32", {"adapter_dtype": "float32"}),
        ("-qv", {"target_modules": ["q_proj", "v_proj"]}),
        ("-reference", {}),
    ):
        if variant.endswith(suffix):
            variant = variant.removesuffix(suffix)
            options.update(option)
    flags = {
        "lora": {},
        "dora": {"use_dora": True},
        "lora-fa": {"lora_fa": True},
        "dylora": {"dylora": True},
        "adalora": {"adalora": True},
        "experts": {"target_parameters": EXPERT_PARAMETERS, "target_modules": ATTENTION},
    }[variant]
    config = {"r": 16, "alpha": 32, "target_modules": "all-linear", **flags, **options}
    lorakit.add_adapter(model, lorakit.LoraConfig(**config))
    lorakit.set_fast_path(model, not case.endswith("-reference"))
    return model


def make_step(case: str, preset: dict, device: str, total_steps: int, fused: bool, compiled: bool = False):
    """Build ``case``'s model and optimizer; returns (one training step, trainable parameter count).
    ``compiled``: the forward through torch.compile (inductor; the first warm-up step compiles)."""
    model = prepare(case, build_model(preset, device))
    model.train()
    forward = torch.compile(model) if compiled else model
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, preset["model"]["vocab_size"], (preset["batch"], preset["seq"]), generator=gen).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {})) if params else None
    embed = model.get_input_embeddings()
    allocator = None
    if case == "lorakit-adalora":
        from lorakit.variants.adalora import AdaLoraSchedule, RankAllocator, orthogonal_penalty

        allocator = RankAllocator(model, "default", AdaLoraSchedule(target_r=8), total_steps=total_steps)
    done = [0]

    def step() -> None:
        # The ranges name the phases in a profiler trace (bench/gpu_gaps.py); they cost ~1 µs each.
        with torch.profiler.record_function("forward"):
            if case == "frozen":
                # Backward through every layer for the input gradient only: no weight gradients.
                embeds = embed(ids).detach().requires_grad_(True)
                loss = forward(inputs_embeds=embeds, labels=ids).loss
            else:
                loss = forward(input_ids=ids, labels=ids).loss
            if allocator:  # AdaLoRA's extra work per step, as the trainer does it
                loss = loss + 0.1 * orthogonal_penalty(model, "default")
        with torch.profiler.record_function("backward"):
            loss.backward()
        with torch.profiler.record_function("optimizer"):
            if allocator:
                allocator.update_importance()
            if optimizer:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if allocator:
                allocator.mask(done[0])
        done[0] += 1

    return step, sum(p.numel() for p in params)


def timed(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_case(
    case: str, preset: dict, device: str, warmup: int, steps: int, fused: bool, compiled: bool = False
) -> Measurement:
    """One case on its own (peak memory is per case)."""
    step, trainable = make_step(case, preset, device, warmup + steps, fused, compiled)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timed(step, device) for _ in range(warmup + steps)][warmup:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del step
    gc.collect()  # PEFT models hold reference cycles; free them before the next case's model
    if device == "cuda":
        torch.cuda.empty_cache()
    return Measurement(case, statistics.median(times), times, trainable, peak)


def run_interleaved(
    cases: list[str], preset: dict, device: str, warmup: int, steps: int, fused: bool, compiled: bool = False
) -> list[Measurement]:
    """All cases' models at once, one step of each in turn: a machine whose speed drifts (shared
    CPU cores) slows every case alike, so the ratios stay meaningful. No peak memory."""
    built = [make_step(case, preset, device, warmup + steps, fused, compiled) for case in cases]
    times: list[list[float]] = [[] for _ in cases]
    for i in range(warmup + steps):
        for (step, _), record in zip(built, times):
            elapsed = timed(step, device)
            if i >= warmup:
                record.append(elapsed)
    return [
        Measurement(case, statistics.median(t), t, trainable, None)
        for case, (_, trainable), t in zip(cases, built, times)
    ]


def versions() -> str:
    import transformers

    parts = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
    ]
    try:
        import peft

        parts.append(f"peft {peft.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default=None, help="model shape (default: by device)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument(
        "--merge-ratio",
        type=float,
        default=None,
        help="override lorakit.kernels.tuning.MERGE_RATIO (0: always merged, inf: never)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="build every case first and alternate their steps (for noisy CPUs; no peak memory)",
    )
    parser.add_argument(
        "--optimizer",
        choices=("fused", "foreach"),
        default="fused",
        help="AdamW implementation, the same for every case (default: fused)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="every case's forward through torch.compile (inductor); keep --warmup >= 1 for the compile",
    )
    args = parser.parse_args(argv)
    if args.merge_ratio is not None:
        from lorakit.kernels import tuning

        tuning.MERGE_RATIO = args.merge_ratio
    if args.threads:
        torch.set_num_threads(args.threads)
    preset_name = args.preset or ("llama-1b" if args.device == "cuda" else "smollm2-135m")
    preset = PRESETS[preset_name]
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(
        f"# {preset_name}, {preset['dtype']}, batch {preset['batch']}x{preset['seq']}, {device_name}; "
        f"AdamW ({args.optimizer}){'; torch.compile' if args.compile else ''}; {versions()}",
        flush=True,
    )
    if args.interleave:
        results = run_interleaved(
            cases, preset, args.device, args.warmup, args.steps, args.optimizer == "fused", args.compile
        )
    else:
        results = []
        for case in cases:
            results.append(
                run_case(case, preset, args.device, args.warmup, args.steps, args.optimizer == "fused", args.compile)
            )
            print(f"  {case}: median {results[-1].median_s * 1000:.0f} ms", file=sys.stderr, flush=True)
    frozen = next((m for m in results if m.case == "frozen"), None)
    # Interleaved, step i of every case ran back to back: the median of those per-round ratios
    # is the figure least moved by a machine whose speed drifts over seconds.
    # The best step too: a shared machine's neighbours only ever add time.
    paired = args.interleave and frozen is not None
    print(
        "\n| case | step | x frozen | trainable params | peak memory |"
        + (" x frozen, per round | best step, x frozen |" if paired else "")
    )
    print("|---|---|---|---|---|" + ("---|---|" if paired else ""))
    for m in results:
        ratio = f"{m.median_s / frozen.median_s:.2f}" if frozen else "-"
        peak = f"{m.peak_gib:.1f} GiB" if m.peak_gib is not None else "-"
        row = f"| {CASES[m.case]} | {m.median_s * 1000:.0f} ms | {ratio} | {m.trainable:,} | {peak} |"
        if paired:
            row += (
                f" {statistics.median(t / f for t, f in zip(m.steps, frozen.steps)):.2f} |"
                f" {min(m.steps) * 1000:.0f} ms, {min(m.steps) / min(frozen.steps):.2f} |"
            )
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "preset": preset_name,
                    "device": device_name,
                    "versions": versions(),
                    "results": [vars(m) for m in results],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
