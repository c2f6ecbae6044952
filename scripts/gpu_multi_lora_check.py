"""Run by hand on a GPU machine: the multi-adapter kernels on CUDA against the float64 formula
(BGMV in Triton, SGMV through grouped_mm, the per-slot loop; bf16, fp16, fp32), and a mixed batch
through an `AdapterPool` on a tiny Llama against each row run alone.

    python scripts/gpu_multi_lora_check.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from lorakit.kernels import multi_lora, triton_bgmv, tuning
from lorakit.kernels.multi_lora import SlotPlan, add_multi_lora


def formula(out, x, slots, A, B, gm1, bias):
    want = out.double().clone()
    for n, s in enumerate(slots.tolist()):
        want[n] += B[s].double() @ (A[s].double() @ x[n].double())
        if gm1 is not None:
            want[n] += gm1[s].double() * (out[n].double() - bias.double())
    return want


def check_kernels() -> None:
    torch.manual_seed(0)
    S, r, d_in, d_out = 9, 16, 2048, 1024
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        for tokens, sorted_rows in ((64, False), (64, True), (700, False), (700, "runs")):
            A = torch.randn(S, r, d_in, device="cuda") * 0.05
            B = torch.randn(S, d_out, r, device="cuda") * 0.05
            A[0], B[0] = 0, 0
            gm1 = torch.randn(S, d_out, device="cuda") * 0.1
            gm1[0] = 0
            bias = torch.randn(d_out, device="cuda")
            x, out = torch.randn(tokens, d_in, device="cuda"), torch.randn(tokens, d_out, device="cuda")
            slots = torch.randint(0, S, (tokens,))
            if sorted_rows == "runs":  # a prefill's rows: runs of 100 tokens of one slot
                slots = torch.randint(0, S, (tokens // 100,)).repeat_interleave(100)
            elif sorted_rows:
                slots = slots.sort().values
            want = formula(out.to(dtype), x.to(dtype), slots, A.to(dtype), B.to(dtype), gm1, bias.to(dtype))
            plan = SlotPlan.build(slots, S, "cuda")
            for path, bgmv_tokens, grouped in (("bgmv", 10**9, True), ("sgmv", 0, True), ("loop", 0, False)):
                tuning.BGMV_TOKENS, tuning.GROUPED_MM = bgmv_tokens, grouped
                got = out.to(dtype).clone()
                add_multi_lora(got, x.to(dtype), plan, A.to(dtype), B.to(dtype), gm1, bias.to(dtype))
                err = ((got.double() - want).abs().max() / want.abs().max()).item()
                status = "ok" if err < tol else "FAIL"
                layout = f"tokens={tokens} sorted={sorted_rows} runs={plan.segments is not None}"
                print(f"{status} {path:5s} {str(dtype):15s} {layout} rel.err={err:.2e}")
                if err >= tol:
                    raise SystemExit(1)
    tuning.BGMV_TOKENS, tuning.GROUPED_MM = 256, True
    print("grouped_mm fallbacks taken:", multi_lora._GROUPED_FAILED or "none", multi_lora._WIDE_OUTPUT_FAILED or "")
    print("bgmv available for bf16 CUDA:", triton_bgmv.available(torch.zeros(1, device="cuda", dtype=torch.bfloat16)))


def check_pool() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.tiny import randomize_adapters, tiny_llama

    import lorakit
    from lorakit import LoraConfig
    from lorakit.serve.adapter_pool import AdapterPool

    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for k, config in enumerate(
            [
                LoraConfig(r=8, target_modules="all-linear"),
                LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "up_proj"]),
                LoraConfig(r=16, use_rslora=True, target_modules=["v_proj", "down_proj"]),
            ]
        ):
            model = tiny_llama(hidden=64)
            lorakit.add_adapter(model, config)
            torch.manual_seed(k)
            randomize_adapters(model, 0.2)
            dirs.append(Path(tmp) / f"a{k}")
            lorakit.save_adapter(model, dirs[-1])
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
            model = tiny_llama(hidden=64).to("cuda", dtype)
            pool = AdapterPool(model, max_loras=3)
            for k, path in enumerate(dirs):
                pool.register(f"a{k}", path)
            rows = ["a0", None, "a1", "a0", "a2"]
            routes = []
            for name in rows:
                while (route := pool.acquire(name, urgent=True)) is None:
                    pass
                routes.append(route)
            ids = torch.randint(0, 128, (len(rows), 12), device="cuda")
            for tokens in (12, 1):  # prefill, then a decode-shaped batch
                pool.set_rows(routes)
                with torch.inference_mode():
                    got = model(ids[:, :tokens]).logits.float()
                for i, name in enumerate(rows):
                    ref = tiny_llama(hidden=64).to("cuda", dtype)
                    if name is not None:
                        lorakit.load_adapter(ref, dirs[int(name[1])])
                    with torch.inference_mode():
                        want = ref(ids[i : i + 1, :tokens]).logits.float()
                    err = ((got[i : i + 1] - want).abs().max() / want.abs().max()).item()
                    status = "ok" if err < tol else "FAIL"
                    print(f"{status} pool {str(dtype):15s} tokens={tokens} row {i} ({name}) rel.err={err:.2e}")
            pool.close()


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    check_kernels()
    check_pool()
