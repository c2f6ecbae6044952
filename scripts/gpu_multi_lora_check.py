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


def check_sibling_kernel() -> None:
    """``sibling_bgmv`` (q, k, v of a 1B Llama's shape; gate, up) against the float64 formula."""
    torch.manual_seed(0)
    S, d_in = 9, 2048
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        for d_outs, ranks in (((2048, 512, 512), (16, 16, 8)), ((8192, 8192), (16, 16))):
            for tokens in (1, 64, 256):
                A = [torch.randn(S, r, d_in, device="cuda") * 0.05 for r in ranks]
                B = [torch.randn(S, d, r, device="cuda") * 0.05 for d, r in zip(d_outs, ranks)]
                for a, b in zip(A, B):
                    a[0], b[0] = 0, 0
                x = torch.randn(tokens, d_in, device="cuda")
                outs = [torch.randn(tokens, d, device="cuda") for d in d_outs]
                slots = torch.randint(0, S, (tokens,), device="cuda")
                got = [o.to(dtype).clone() for o in outs]
                c = [t.to(dtype) for t in A], [t.to(dtype) for t in B]
                triton_bgmv.sibling_bgmv(got, x.to(dtype), slots, *c)
                for k, (g, o) in enumerate(zip(got, outs)):
                    want = formula(o.to(dtype), x.to(dtype), slots.cpu(), c[0][k], c[1][k], None, None)
                    err = ((g.double() - want).abs().max() / want.abs().max()).item()
                    status = "ok" if err < tol else "FAIL"
                    print(f"{status} sibling bgmv {str(dtype):15s} d_out={d_outs[k]} tokens={tokens} rel.err={err:.2e}")
                    if err >= tol:
                        raise SystemExit(1)


def check_slot_mlp_kernel() -> None:
    """``triton_slot_mlp.gate_product`` (a 1B Llama's MLP: F = 8192, rows of 512 and 100 tokens)
    against the float64 formula."""
    import torch.nn.functional as F

    from lorakit.kernels import triton_slot_mlp

    torch.manual_seed(0)
    S, width, r = 9, 8192, 16
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        for rows, T in ((4, 512), (3, 100)):
            N = rows * T
            g, u = (torch.randn(N, width, device="cuda", dtype=torch.float64) for _ in range(2))
            h = torch.randn(N, 2 * r, device="cuda", dtype=torch.float64)
            Bg, Bu = (torch.randn(S, width, r, device="cuda", dtype=torch.float64) * 0.05 for _ in range(2))
            Ad = torch.randn(S, r, width, device="cuda", dtype=torch.float64) * 0.05
            Bg[0], Bu[0], Ad[0] = 0, 0, 0  # slot 0: no adapter (the decode form does not read it)
            slots = torch.randint(0, S, (rows,), device="cuda")
            slots[-1] = 0
            low = [t.to(dtype) for t in (g, u, h, Bg, Bu, Ad)]
            g, u, h, Bg, Bu, Ad = (t.double() for t in low)  # the formula on the rounded inputs
            token_slots = slots.repeat_interleave(T)
            a = F.silu(g + torch.einsum("nr,nfr->nf", h[:, :r], Bg[token_slots]))
            a = a * (u + torch.einsum("nr,nfr->nf", h[:, r:], Bu[token_slots]))
            hd = torch.einsum("nf,nrf->nr", a, Ad[token_slots])
            got_a, got_hd = triton_slot_mlp.gate_product(*low, slots, T)
            # the decode form: each token its slot, h as two planes of the shrink's partial sums
            planes = torch.stack([low[2].float() * 0.25, low[2].float() * 0.75])
            tok_a, tok_planes = triton_slot_mlp.gate_product_tokens(*low[:2], planes, *low[3:], token_slots)
            for name, got, want in (
                ("a", got_a, a),
                ("h_down", got_hd, hd),
                ("tokens a", tok_a, a),
                ("tokens h_down", tok_planes.sum(0), hd),
            ):
                err = ((got.double() - want).abs().max() / want.abs().max()).item()
                status = "ok" if err < tol else "FAIL"
                print(f"{status} slot mlp {name:13s} {str(dtype):15s} rows={rows}x{T} rel.err={err:.2e}")
                if err >= tol:
                    raise SystemExit(1)


def alone_logits(dirs, name: str | None, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits of ``ids`` on the tiny Llama in ``dtype`` with adapter ``name`` ("a<k>": dirs[k]) alone
    (None: the base model)."""
    from tests.tiny import tiny_llama

    import lorakit

    ref = tiny_llama(hidden=64).to("cuda", dtype)
    if name is not None:
        lorakit.load_adapter(ref, dirs[int(name[1])])
    with torch.inference_mode():
        return ref(ids).logits.to(torch.float64 if dtype == torch.float64 else torch.float32)


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
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, None)):
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
            # prefill (SGMV over runs; then a prefill's rows as batched GEMMs), then a decode batch
            for tokens, segment in ((12, 64), (12, 8), (1, 64)):
                tuning.SEGMENT_TOKENS = segment
                pool.set_rows(routes)
                with torch.inference_mode():
                    got = model(ids[:, :tokens]).logits.float()
                for i, name in enumerate(rows):
                    want, exact = (alone_logits(dirs, name, ids[i : i + 1, :tokens], d) for d in (dtype, torch.float64))
                    err = ((got[i : i + 1] - want).abs().max() / want.abs().max()).item()
                    # In bf16 two orders of the same sums differ by the dtype's rounding: the pool's
                    # row may be as far from the float64 logits as twice the row run alone is.
                    own = ((want.double() - exact).abs().max() / exact.abs().max()).item()
                    far = ((got[i : i + 1].double() - exact).abs().max() / exact.abs().max()).item()
                    ok = err < tol if dtype == torch.float32 else far <= 2 * own + 5e-3
                    print(
                        f"{'ok' if ok else 'FAIL'} pool {str(dtype):15s} tokens={tokens} segment={segment} row {i} "
                        f"({name}) rel.err={err:.2e} (vs float64: {far:.2e}, alone vs float64: {own:.2e})"
                    )
            tuning.SEGMENT_TOKENS = 64
            check_graphed_forward(model, pool, routes)
            pool.close()
        check_pool_siblings(dirs[0], dirs[2])
        check_pool_slot_mlp(dirs[0], dirs[2])


def pool_over(dirs, dtype: torch.dtype):
    """A tiny Llama on the GPU in ``dtype`` with an `AdapterPool` holding each of ``dirs`` in a slot:
    (model, pool, each adapter's route)."""
    from tests.tiny import tiny_llama

    from lorakit.serve.adapter_pool import AdapterPool

    model = tiny_llama(hidden=64).to("cuda", dtype)
    pool = AdapterPool(model, max_loras=2)
    routes = []
    for k, path in enumerate(dirs):
        pool.register(f"a{k}", path)
        while (route := pool.acquire(f"a{k}", urgent=True)) is None:
            pass
        routes.append(route)
    return model, pool, routes


def check_pool_siblings(*dirs: Path) -> None:
    """Adapters without DoRA (a DoRA slot turns the shared call off): q, k, v and gate, up share
    one call (``sibling_bgmv`` in a decode step, eager and graphed; ``siblings_then_base`` in a
    prefill's rows of more tokens than BGMV takes), against each projection alone."""

    from lorakit.kernels import multi_lora
    from lorakit.layers import slot_siblings
    from lorakit.serve.cuda_graph import CapturedCall

    calls = {"decode": 0, "prefill": 0}
    real_bgmv, real_rows = triton_bgmv.sibling_bgmv, multi_lora.siblings_then_base

    def counted_bgmv(*args):
        calls["decode"] += 1
        return real_bgmv(*args)

    def counted_rows(*args):
        out = real_rows(*args)
        calls["prefill"] += out is not None
        return out

    triton_bgmv.sibling_bgmv, slot_siblings.siblings_then_base = counted_bgmv, counted_rows
    failed = False
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        model, pool, routes = pool_over(dirs, dtype)
        rows = [routes[0], routes[1], routes[0], routes[1]]
        ids = torch.randint(0, 128, (len(rows), 1), device="cuda")
        prompt = torch.randint(0, 128, (len(rows), 80), device="cuda")  # 320 tokens: rows, not BGMV
        results = {}
        for siblings in (True, False):
            tuning.SHARED_SIBLINGS = siblings
            pool.set_rows(rows)
            counts = []
            with torch.inference_mode():
                for name, tokens in (("prefill", prompt), ("eager", ids)):
                    kind = "prefill" if name == "prefill" else "decode"
                    before = calls[kind]
                    results[name, siblings] = model(tokens, use_cache=False).logits.float()
                    counts.append(calls[kind] - before)
            slots = torch.tensor([r.slot for r in rows], device="cuda")
            pool.fix_slots(slots)
            before = calls["decode"]
            forward = lambda ids, slots: model(ids, use_cache=False).logits  # noqa: E731
            graph = CapturedCall(forward, {"ids": ids.clone(), "slots": slots})
            results["graphed", siblings] = graph(ids=ids, slots=slots).float()
            counts.append(calls["decode"] - before)
            results["counts", siblings] = counts
        for k, form in enumerate(("prefill", "eager", "graphed")):
            got, want = results[form, True], results[form, False]
            err = ((got - want).abs().max() / want.abs().max()).item()
            shared, alone = results["counts", True][k], results["counts", False][k]
            ok = err < tol and shared > 0 and alone == 0
            failed |= not ok
            status = "ok" if ok else "FAIL"
            print(f"{status} siblings {form} {dtype}: shared calls {shared} (alone {alone}), rel.err={err:.2e}")
        pool.close()
    triton_bgmv.sibling_bgmv, slot_siblings.siblings_then_base, tuning.SHARED_SIBLINGS = real_bgmv, real_rows, True
    if failed:
        raise SystemExit(1)


def check_pool_slot_mlp(*dirs: Path) -> None:
    """A pool's prefill rows (80 tokens each, more than BGMV takes) and a decode batch, eager and
    graphed, with each MLP in one fused pass (``slot_mlp``), against its layers one by one (fp32)
    and, in bf16, against the float64 logits: no farther from them than twice the layers are."""
    from lorakit.kernels import triton_slot_mlp
    from lorakit.serve.adapter_pool import BASE_ROUTE
    from lorakit.serve.cuda_graph import CapturedCall

    calls = []
    real_rows, real_tokens = triton_slot_mlp.gate_product, triton_slot_mlp.gate_product_tokens
    triton_slot_mlp.gate_product = lambda *a: calls.append(1) or real_rows(*a)
    triton_slot_mlp.gate_product_tokens = lambda *a: calls.append(1) or real_tokens(*a)
    failed = False
    prompt = torch.randint(0, 128, (4, 80), device="cuda")
    exact = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        model, pool, routes = pool_over(dirs, dtype)
        rows = [routes[0], routes[1], BASE_ROUTE, routes[1]]
        slots = torch.tensor([route.slot for route in rows], device="cuda")
        results = {}
        for fused in (True, False) if dtype != torch.float64 else (False,):
            tuning.SLOT_MLP = fused
            for form in ("prefill", "eager", "graphed"):
                calls.clear()
                ids = prompt if form == "prefill" else prompt[:, :1]
                with torch.inference_mode():  # as the engine runs its steps
                    if form == "graphed" and dtype != torch.float64:
                        buffer = slots.clone()  # the graph's slot buffer, which the plan reads
                        pool.fix_slots(buffer)
                        forward = lambda ids, slots: model(ids, use_cache=False).logits  # noqa: E731
                        graph = CapturedCall(forward, {"ids": ids.clone(), "slots": buffer})
                        results[form, fused] = graph().double()
                    else:
                        pool.set_rows(rows)
                        results[form, fused] = model(ids, use_cache=False).logits.double()
                results["calls", form, fused] = len(calls)
        pool.close()
        if dtype == torch.float64:  # the reference (no Triton kernel takes float64)
            exact = {form: results[form, False] for form in ("prefill", "eager", "graphed")}
            continue
        for form in ("prefill", "eager", "graphed"):
            got, want = results[form, True], results[form, False]
            err = ((got - want).abs().max() / want.abs().max()).item()
            reference = exact[form]
            far = ((got - reference).abs().max() / reference.abs().max()).item()
            own = ((want - reference).abs().max() / reference.abs().max()).item()
            # fp32: the fused pass's tiles sum in another order than cuBLAS (1e-6 on the CPU)
            close = err < 1e-4 if dtype == torch.float32 else far <= 2 * own + 5e-3
            fused_calls, apart = results["calls", form, True], results["calls", form, False]
            ok = close and fused_calls >= 2 and apart == 0
            failed |= not ok
            print(
                f"{'ok' if ok else 'FAIL'} pool slot mlp {form} {dtype}: fused calls {fused_calls}, "
                f"vs layers {err:.2e}; vs float64 {far:.2e} (layers {own:.2e})"
            )
    triton_slot_mlp.gate_product, triton_slot_mlp.gate_product_tokens = real_rows, real_tokens
    tuning.SLOT_MLP = True
    if failed:
        raise SystemExit(1)


def check_graphed_forward(model, pool, routes) -> None:
    """The pool's decode forward captured in a CUDA graph, replayed with other slots written into
    its buffer: equal to the eager forward with those routes (the same kernels, so exactly)."""
    from lorakit.serve.cuda_graph import CapturedCall

    rows = len(routes)
    ids = torch.randint(0, 128, (rows, 1), device="cuda")
    slots = torch.tensor([r.slot for r in routes], device="cuda")
    pool.fix_slots(slots)
    graph = CapturedCall(lambda ids, slots: model(ids, use_cache=False).logits, {"ids": ids.clone(), "slots": slots})
    for order in (list(range(rows)), list(reversed(range(rows)))):
        chosen = [routes[i] for i in order]
        if any(r.model_name is not None for r in chosen):
            continue
        got = graph(ids=ids, slots=torch.tensor([r.slot for r in chosen], device="cuda")).float()
        pool.set_rows(chosen)
        with torch.inference_mode():
            want = model(ids, use_cache=False).logits.float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        print(f"{'ok' if err < 1e-6 else 'FAIL'} graphed decode forward {model.dtype} order={order} rel.err={err:.2e}")


def check_graphed_engine() -> None:
    """The engine's decode steps in CUDA graphs give the dynamic cache's greedy tokens (fp32:
    every request; bf16: counted)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from serve_engine import Tokenizer

    from lorakit.serve.adapter_pool import AdapterPool
    from lorakit.serve.engine import Engine, EngineLimits
    from lorakit.serve.requests import GenerationRequest, SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.tiny import randomize_adapters, tiny_llama

    import lorakit

    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for k in range(3):
            model = tiny_llama(hidden=64)
            lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules="all-linear"))
            torch.manual_seed(k)
            randomize_adapters(model, 0.2)
            dirs.append(Path(tmp) / f"a{k}")
            lorakit.save_adapter(model, dirs[-1])
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(1, 128, (int(n),), generator=gen).tolist() for n in torch.randint(3, 40, (24,))]
        for dtype in (torch.float32, torch.bfloat16):
            outputs = {}
            for decode in ("dynamic", "graphs"):
                model = tiny_llama(hidden=64).to("cuda", dtype)
                pool = AdapterPool(model, max_loras=3, max_lora_rank=8)
                for k, path in enumerate(dirs):
                    pool.register(f"a{k}", path)
                engine = Engine(
                    model, Tokenizer(128), pool, model_id="tiny", limits=EngineLimits(max_num_seqs=8), decode=decode
                )
                engine.start()
                handles = []
                for i, prompt in enumerate(prompts):
                    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
                    adapter = [None, "a0", "a1", "a2"][i % 4]
                    handles.append(engine.submit(GenerationRequest(f"r{i}", prompt, adapter, params)))
                answers = [handle.collect(timeout=300)[0] for handle in handles]
                engine.stop()
                outputs[decode] = answers
            same = sum(a == b for a, b in zip(outputs["dynamic"], outputs["graphs"]))
            status = (
                "ok" if same == len(prompts) or (dtype != torch.float32 and same >= 0.95 * len(prompts)) else "FAIL"
            )
            print(f"{status} graphed engine {dtype}: {same} of {len(prompts)} requests with the dynamic cache's tokens")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    check_kernels()
    check_sibling_kernel()
    check_slot_mlp_kernel()
    check_pool()
    check_graphed_engine()
