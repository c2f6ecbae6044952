"""On a GPU: the fused path against the reference path, eager and under torch.compile (inductor).

    PYTHONPATH=src python scripts/gpu_fast_path_check.py

CI has no GPU; the CPU tests (tests/test_fast_path.py) pin the same equalities. This script
checks them with CUDA kernels: loss and every adapter gradient of a small Llama in fp32 and bf16,
LoRA and DoRA, and that a compiled model matches eager and does not recompile on an adapter swap.
"""

from __future__ import annotations

import torch

import lorakit
from lorakit.state import lora_layers


def small_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config).to("cuda", dtype)


def loss_and_grads(model, ids, fast):
    lorakit.set_fast_path(model, fast)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.float().item(), grads


def randomize(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in list(layer.lora_A.values()) + list(layer.lora_B.values()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def compare(dtype, dora):
    model = small_llama(dtype)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear", use_dora=dora))
    randomize(model)
    model.train()
    ids = torch.randint(0, 1000, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    fast_loss, fast = loss_and_grads(model, ids, True)
    ref_loss, ref = loss_and_grads(model, ids, False)
    worst = max(((fast[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)
    print(
        f"{str(dtype):15s} dora={dora!s:5s} loss fast {fast_loss:.6f} ref {ref_loss:.6f}  "
        f"worst relative grad difference {worst:.2e}"
    )
    limit = 1e-4 if dtype == torch.float32 else 3e-2
    assert abs(fast_loss - ref_loss) <= limit * abs(ref_loss) and worst <= limit, "fast and reference differ"


def kernel_check():
    """The Triton kernels (merged weight, DoRA's ∂m column sums, the MLP's SiLU gate) in bf16
    against the float64 formula (Llama-1B shapes)."""
    from lorakit.kernels import triton_colsum, triton_merge, triton_swiglu

    assert triton_merge.triton is not None, "Triton is not installed here"
    gen = torch.Generator("cuda").manual_seed(0)
    for d_out, d_in in ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)):
        W = torch.randn(d_out, d_in, device="cuda", generator=gen).bfloat16() * 0.02
        A = torch.randn(16, d_in, device="cuda", generator=gen).bfloat16() * 0.02
        B = torch.randn(d_out, 16, device="cuda", generator=gen).bfloat16() * 0.02
        m = torch.rand(d_out, device="cuda", generator=gen).bfloat16() + 0.5
        exact = W.double() + 2.0 * B.double() @ A.double()
        merged = triton_merge.merged_weight(W, A, B, 2.0)
        scaled, c = triton_merge.dora_weight(W, A, B, 2.0, m)
        want_c = m.double() / exact.norm(dim=1)
        errors = [
            ((merged.double() - exact).abs().max() / exact.abs().max()).item(),
            ((c.double() - want_c).abs() / want_c).max().item(),
            ((scaled.double() - want_c[:, None] * exact).abs().max() / (want_c[:, None] * exact).abs().max()).item(),
        ]
        print(
            f"triton merge {d_out}x{d_in} bf16: relative errors merged/norm/dora "
            f"{errors[0]:.1e} {errors[1]:.1e} {errors[2]:.1e}"
        )
        assert max(errors) < 1e-2
        g, out = (torch.randn(4096, d_out, device="cuda", generator=gen).bfloat16() for _ in range(2))
        bias = torch.randn(d_out, device="cuda", generator=gen).bfloat16()
        want = (g.double() * (out.double() - bias.double())).sum(0)
        scale = (g.double().abs() * (out.double() - bias.double()).abs()).sum(0).max()
        error = ((triton_colsum.column_dot(g, out, bias).double() - want).abs().max() / scale).item()
        print(f"triton column dot 4096x{d_out} bf16: relative error {error:.1e}")
        assert error < 1e-5
    g, u, dh = (torch.randn(4096, 8192, device="cuda", generator=gen).bfloat16() * 3 for _ in range(3))
    gd, ud = g.double().requires_grad_(True), u.double().requires_grad_(True)
    h = torch.nn.functional.silu(gd) * ud
    wants = (h, *torch.autograd.grad(h, (gd, ud), dh.double()))
    gots = (triton_swiglu.silu_mul(g, u), *triton_swiglu.silu_mul_backward(dh.clone(), g, u))
    errors = [((got.double() - want).abs().max() / want.abs().max()).item() for got, want in zip(gots, wants)]
    print("triton silu gate 4096x8192 bf16: relative errors h/dg/du " + " ".join(f"{e:.1e}" for e in errors))
    assert max(errors) < 1e-2


def compile_check(dora: bool):
    """A compiled LoRA (or DoRA: its Triton build kernel inside the graph) model against eager."""
    import torch._dynamo

    model = small_llama(torch.bfloat16)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear", use_dora=dora))
    randomize(model)
    model.train()
    ids = torch.randint(0, 1000, (2, 256), device="cuda")
    eager_loss, eager = loss_and_grads(model, ids, True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model)
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    worst = max(
        ((p.grad.float() - eager[n]).norm() / eager[n].norm()).item()
        for n, p in model.named_parameters()
        if p.requires_grad
    )
    print(
        f"torch.compile (inductor, bf16, dora={dora}): loss {loss.item():.6f} vs eager {eager_loss:.6f}, "
        f"worst relative grad difference {worst:.2e}"
    )
    assert abs(loss.item() - eager_loss) < 3e-2 * abs(eager_loss) and worst < 5e-2
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, f"graph breaks: {breaks}"


if __name__ == "__main__":
    kernel_check()
    for dtype in (torch.float32, torch.bfloat16):
        for dora in (False, True):
            compare(dtype, dora)
    for dora in (False, True):
        compile_check(dora)
    print("ok")
