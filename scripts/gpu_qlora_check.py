"""Run by hand on a GPU machine with bitsandbytes: lorakit's fused QLoRA path on CUDA.

1. The Triton 4-bit dequantization (``kernels/triton_dequant4.py``) equals bitsandbytes'
   ``dequantize_4bit`` bit for bit (NF4/FP4, with and without double quantization, bf16/fp16/fp32),
   and the time of each on the layers of a 1.2B and an 8B Llama (median of 50 calls).
2. A training step of a small bf16 NF4 Llama through the fused path equals the reference path
   (the bitsandbytes layer plus the adapter modules): loss and every adapter gradient.

    python scripts/gpu_qlora_check.py
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def check_dequantization() -> None:
    import bitsandbytes.functional as F

    from lorakit.kernels import triton_dequant4

    torch.manual_seed(0)
    for quant_type in ("nf4", "fp4"):
        for nested in (True, False):
            for shape in ((2048, 2048), (512, 2048), (8192, 2048), (14336, 4096), (7, 2050)):
                w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
                packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
                inner = (
                    (state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset) if nested else None
                )
                for dtype in (torch.bfloat16, torch.float16, torch.float32):
                    state.dtype = dtype
                    want = F.dequantize_4bit(packed, state)
                    got = triton_dequant4.dequantize(
                        packed, state.code, state.absmax, state.blocksize, shape, dtype, inner
                    )
                    # bf16 (QLoRA's compute dtype on a GPU) bit for bit; fp16/fp32 within a unit in
                    # the last place (the nested scale's multiply-add may be fused on the GPU).
                    diff = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                    same = diff == 0 or (dtype != torch.bfloat16 and diff <= 2 * torch.finfo(dtype).eps)
                    status = "ok" if same else "FAIL"
                    print(f"{status} {quant_type} nested={nested} {shape} {dtype} rel.diff={diff:.1e}")
                    if not same:
                        raise SystemExit(1)


def time_dequantization() -> None:
    import bitsandbytes.functional as F

    from lorakit.kernels import triton_dequant4
    from lorakit.kernels.quantized_lora import weight_buffer

    print("\n| weight | bitsandbytes dequantize_4bit | lorakit Triton, shared buffer | ratio |")
    print("|---|---|---|---|")
    for shape in ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (4096, 4096), (14336, 4096), (4096, 14336)):
        w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        inner = (state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset)
        buffer = weight_buffer(shape[0] * shape[1], torch.bfloat16, torch.device("cuda"))

        def ours():
            triton_dequant4.dequantize(
                packed, state.code, state.absmax, state.blocksize, shape, torch.bfloat16, inner, out=buffer
            )

        def theirs():
            F.dequantize_4bit(packed, state)

        times = {}
        for name, fn in (("bnb", theirs), ("ours", ours)):
            for _ in range(5):
                fn()
            samples = []
            for _ in range(50):
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                samples.append(time.perf_counter() - start)
            times[name] = statistics.median(samples)
        print(
            f"| {shape[0]}x{shape[1]} | {times['bnb'] * 1e6:.0f} µs | {times['ours'] * 1e6:.0f} µs "
            f"| {times['ours'] / times['bnb']:.2f} |"
        )


def check_training_step() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.state import lora_layers

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    lorakit.quantize(model, "nf4", compute_dtype="bfloat16")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (layer.lora_A["default"], layer.lora_B["default"]):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.train()
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    results = {}
    for fast in (True, False):
        for _, layer in lora_layers(model):
            layer.fast_path = fast
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fast] = (loss.item(), grads)
    (loss_f, grads_f), (loss_r, grads_r) = results[True], results[False]
    worst = max(((grads_f[n] - grads_r[n]).norm() / grads_r[n].norm()).item() for n in grads_r)
    ok = grads_f.keys() == grads_r.keys() and abs(loss_f - loss_r) < 1e-2 and worst < 2e-2
    print(
        f"\n{'ok' if ok else 'FAIL'} training step, fused vs reference: loss {loss_f:.5f} vs {loss_r:.5f}, "
        f"worst relative gradient difference {worst:.2e} over {len(grads_r)} tensors (bf16)"
    )
    if not ok:
        raise SystemExit(1)


def time_fused_against_reference(preset: str, steps: int = 6) -> None:
    """One quantized model, training steps alternating between the fused path and the reference
    path (fast_path off), so both see the same machine state; medians of ``steps`` each."""
    sys.path.insert(0, "bench")
    from qlora_step import PRESETS, build_model

    import lorakit
    from lorakit.state import lora_layers

    spec = PRESETS[preset]
    model = lorakit.quantize(build_model(spec, "cuda"), "nf4", compute_dtype="bfloat16")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, spec["model"]["vocab_size"], (spec["batch"], spec["seq"]), device="cuda")
    from lorakit.kernels import tuning

    # (fast path, Triton dequantization): fused with lorakit's kernel, fused with bitsandbytes'
    # dequantize_4bit, the reference path.
    ways = {"fused": (True, True), "fused, bnb dequantize": (True, False), "reference": (False, True)}
    times = {way: [] for way in ways}
    for i in range(2 + steps):
        for way, (fast, triton_dequant) in ways.items():
            tuning.TRITON_DEQUANT = triton_dequant
            for _, layer in lora_layers(model):
                layer.fast_path = fast
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            torch.cuda.synchronize()
            if i >= 2:
                times[way].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    tuning.TRITON_DEQUANT = True
    medians = {way: statistics.median(t) for way, t in times.items()}
    cells = ", ".join(f"{way} {m * 1e3:.0f} ms ({m / medians['reference']:.3f})" for way, m in medians.items())
    print(f"\n{preset} ({spec['batch']}x{spec['seq']}, gradient checkpointing), forward+backward, interleaved: {cells}")
    del model


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(torch.cuda.get_device_name(), torch.__version__)
    check_dequantization()
    time_dequantization()
    check_training_step()
    for preset in sys.argv[1:]:
        time_fused_against_reference(preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
