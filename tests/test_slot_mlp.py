"""A serving pool's gated MLP over a prefill's rows in one fused pass (kernels/triton_slot_mlp.py,
kernels/slot_mlp.py, layers/slot_mlp.py, patching/slot_mlp.py): the kernel against the float64
formula and a pool's prefill against its layers one by one (both in Triton's CPU interpreter), the
patch installed and undone, and every call it must leave to the layers."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit.kernels import triton_slot_mlp, tuning
from lorakit.patching.gated_mlp import FusedOrOriginalForward
from lorakit.patching.slot_mlp import SlotMlpForward, install_slot_mlps, remove_slot_mlps
from lorakit.serve.adapter_pool import BASE_ROUTE, AdapterPool

from .test_adapter_pool import acquire, adapter_dirs  # noqa: F401 (a fixture)
from .tiny import tiny_llama
from .triton_interpreter import run_interpreted

KERNEL_SCRIPT = r"""
import torch
import torch.nn.functional as F
from lorakit.kernels import triton_slot_mlp
torch.manual_seed(0)
for dtype, tol, parts in ((torch.float32, 1e-5, 1), (torch.float16, 5e-3, 1), (torch.float32, 1e-5, 3)):
    triton_slot_mlp.column_parts = lambda *a: parts  # F over one program per token block, or three
    # rows shorter and longer than a block, F not a multiple of a tile, ranks below 16 and 0
    for S, R, T, F_, rg, ru, rd in ((4, 3, 70, 130, 16, 8, 24), (3, 2, 64, 64, 0, 16, 16), (5, 4, 5, 200, 8, 8, 8)):
        N = R * T
        g, u = torch.randn(N, F_, dtype=torch.float64), torch.randn(N, F_, dtype=torch.float64)
        h = torch.randn(N, rg + ru, dtype=torch.float64)
        Bg = torch.randn(S, F_, rg, dtype=torch.float64) * 0.3
        Bu = torch.randn(S, F_, ru, dtype=torch.float64) * 0.3
        Ad = torch.randn(S, rd, F_, dtype=torch.float64) * 0.1
        Bg[0], Bu[0], Ad[0] = 0, 0, 0
        slots = torch.randint(0, S, (R,))
        slots[0], slots[-1] = S - 1, 0
        token_slots = slots.repeat_interleave(T)
        gp = g + torch.einsum("nr,nfr->nf", h[:, :rg], Bg[token_slots])
        up = u + torch.einsum("nr,nfr->nf", h[:, rg:], Bu[token_slots])
        a = F.silu(gp) * up
        hd = torch.einsum("nf,nrf->nr", a, Ad[token_slots])
        low = [t.to(dtype) for t in (g, u, h, Bg, Bu, Ad)]
        got_a, got_hd = triton_slot_mlp.gate_product(*low, token_slots[::T], T)  # strided row slots
        assert got_a.dtype == dtype and got_hd.dtype == torch.float32 and got_hd.shape == (N, rd)
        error_a = ((got_a.double() - a).abs().max() / a.abs().max()).item()
        assert error_a < tol, (dtype, S, R, T, error_a)
        if rd:
            error_hd = ((got_hd.double() - hd).abs().max() / hd.abs().max()).item()
            assert error_hd < 3 * tol, (dtype, S, R, T, error_hd)
        last = slice((R - 1) * T, N)  # the base row: no expand, h_d of slot 0's zeros
        base_a = F.silu(low[0][last].double()) * low[1][last].double()
        torch.testing.assert_close(got_a[last].double(), base_a, rtol=tol, atol=tol)
        assert not got_hd[last].any()
try:
    triton_slot_mlp.gate_product(*low[:2], low[2][:, :3], *low[3:], token_slots[::T], T)
except ValueError as error:
    assert "h must be" in str(error)
else:
    raise AssertionError("a wrong h was taken")
print("ok")
"""


def test_kernel_matches_formula_in_interpreter():
    run_interpreted(KERNEL_SCRIPT)


TOKEN_KERNEL_SCRIPT = r"""
import torch
import torch.nn.functional as F
from lorakit.kernels import triton_slot_mlp
torch.manual_seed(0)
for parts in (1, 3):
    triton_slot_mlp.programs_per_token = lambda *a: parts
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3)):
        shapes = ((4, 7, 300, 16, 8, 24, 3), (3, 5, 64, 0, 16, 16, 1), (5, 1, 1000, 8, 8, 8, 2))
        for S, N, F_, rg, ru, rd, split in shapes:
            g, u = torch.randn(N, F_, dtype=torch.float64), torch.randn(N, F_, dtype=torch.float64)
            planes = torch.randn(split, N, rg + ru, dtype=torch.float64)
            Bg = torch.randn(S, F_, rg, dtype=torch.float64) * 0.3
            Bu = torch.randn(S, F_, ru, dtype=torch.float64) * 0.3
            Ad = torch.randn(S, rd, F_, dtype=torch.float64) * 0.1
            Bg[0], Bu[0], Ad[0] = 0, 0, 0
            slots = torch.randint(0, S, (N,))
            slots[0] = S - 1
            if N > 1:
                slots[-1] = 0
            planes[:, slots == 0] = float("nan")  # the shrink writes nothing for slot 0
            h = planes.nan_to_num(0.0).sum(0)
            a = F.silu(g + torch.einsum("nr,nfr->nf", h[:, :rg], Bg[slots]))
            a = a * (u + torch.einsum("nr,nfr->nf", h[:, rg:], Bu[slots]))
            factors = [t.to(dtype) for t in (Bg, Bu, Ad)]
            gl, ul = g.to(dtype), u.to(dtype)
            got_a, got_planes = triton_slot_mlp.gate_product_tokens(gl, ul, planes.float(), *factors, slots)
            assert got_a.dtype == dtype and got_planes.dtype == torch.float32 and got_planes.shape[1:] == (N, rd)
            error_a = ((got_a.double() - a).abs().max() / a.abs().max()).item()
            assert error_a < tol, (parts, dtype, N, error_a)
            # h_d of the rounded a (what the down projection reads), slot 0's tokens aside
            hd = torch.einsum("nf,nrf->nr", got_a.double(), factors[2].double()[slots])
            adapted = slots != 0
            if rd:
                got_hd = got_planes.double().sum(0)
                error_hd = ((got_hd[adapted] - hd[adapted]).abs().max() / hd[adapted].abs().max()).item()
                assert error_hd < 1e-5, (parts, dtype, N, error_hd)
print("ok")
"""


def test_token_kernel_matches_formula_in_interpreter():
    """The decode form: each token its slot, h read as the shrink's planes (slot 0's never read:
    NaN there), h_d written as planes whose sum is the shrink of the rounded activation."""
    run_interpreted(TOKEN_KERNEL_SCRIPT)


POOL_SCRIPT = r"""
import pathlib, sys, tempfile, time
import torch
import lorakit
from lorakit.kernels import triton_slot_mlp, tuning
from lorakit.serve.adapter_pool import AdapterPool, BASE_ROUTE
from tests.test_adapter_pool import acquire, save
from tests.tiny import tiny_llama
root = pathlib.Path(tempfile.mkdtemp())
dirs = {kind: save(root, kind, seed) for seed, kind in enumerate(("plain", "rslora", "patterns"))}
model = tiny_llama()
pool = AdapterPool(model, max_loras=3)
for name, path in dirs.items():
    pool.register(name, path)
routes = {name: acquire(pool, name) for name in dirs}
triton_slot_mlp.available = lambda *tensors: True  # CPU tensors through the kernel, interpreted
triton_slot_mlp.BLOCK_M = triton_slot_mlp.BLOCK_N = 32  # rows of 70 tokens and F = 64: several tiles
triton_slot_mlp.column_parts = lambda *a: 2  # F split over two programs per block, as on a GPU
calls = []
real = triton_slot_mlp.gate_product
triton_slot_mlp.gate_product = lambda *a: calls.append(a[0].shape) or real(*a)
# rslora adapts down only, patterns gate only: their other MLP slots are zeros
rows = [routes["plain"], routes["rslora"], BASE_ROUTE, routes["patterns"], routes["plain"]]
ids = torch.randint(0, 128, (len(rows), 70))
def logits(fused):
    tuning.SLOT_MLP = fused
    pool.set_rows(rows)
    with torch.inference_mode():
        return model(ids).logits
fused = logits(True)
assert calls == [torch.Size([len(rows) * 70, 64])] * 2, calls  # once per layer
calls.clear()
apart = logits(False)
assert not calls
torch.testing.assert_close(fused, apart, rtol=1e-5, atol=1e-5)
for i, name in enumerate(["plain", "rslora", None, "patterns", "plain"]):
    alone = tiny_llama()
    if name:
        lorakit.load_adapter(alone, dirs[name])
    with torch.no_grad():
        torch.testing.assert_close(fused[i : i + 1], alone(ids[i : i + 1]).logits, rtol=1e-5, atol=1e-5)
# decode batches (BGMV's regime), eager and as a CUDA graph's plan: the token kernel once per layer
from lorakit.kernels import triton_bgmv
triton_bgmv.available = lambda *tensors: True
triton_slot_mlp.programs_per_token = lambda *a: 3  # several column parts per token, as on a GPU
token_calls = []
real_tokens = triton_slot_mlp.gate_product_tokens
triton_slot_mlp.gate_product_tokens = lambda *a: token_calls.append(a[2].shape[0]) or real_tokens(*a)
step = ids[:, :1]
slots = torch.tensor([route.slot for route in rows])
for graphed in (False, True):
    results = {}
    for fused in (True, False):
        tuning.SLOT_MLP = fused
        token_calls.clear()
        if graphed:
            pool.fix_slots(slots)
        else:
            pool.set_rows(rows)
        with torch.inference_mode():
            results[fused] = model(step).logits
        assert len(token_calls) == (2 if fused else 0), (graphed, fused, token_calls)
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-5)
assert not calls
print("ok")
"""


def test_pool_forwards_through_the_kernels_equal_the_layers_in_interpreter():
    """A pool's prefill (rows of 70 tokens over three adapters and the base): the fused MLP once
    per layer, logits equal to the layers one by one and to each adapter alone; a decode batch,
    eager and graphed: the token kernel once per layer, logits equal to the layers'."""
    run_interpreted(POOL_SCRIPT)


@pytest.fixture
def pool_model(adapter_dirs):  # noqa: F811 (the imported fixture)
    model = tiny_llama()
    pool = AdapterPool(model, max_loras=2)
    pool.register("plain", adapter_dirs["plain"])
    route = acquire(pool, "plain")
    yield model, pool, route
    pool.release(route)
    pool.close()


def test_patch_installed_on_mlps_serving_slots_and_undone(pool_model):
    model, _, _ = pool_model
    mlps = [layer.mlp for layer in model.model.layers]
    assert all(isinstance(mlp.__dict__.get("forward"), SlotMlpForward) for mlp in mlps)
    copied = copy.deepcopy(model)  # the patch is a plain object: the copy's MLP calls the copy
    assert copied.model.layers[0].mlp.forward.mlp is copied.model.layers[0].mlp
    assert install_slot_mlps(model) == len(mlps)  # anew, not wrapped twice
    assert mlps[0].forward.previous is None
    remove_slot_mlps(model)
    assert all("forward" not in mlp.__dict__ for mlp in mlps)
    # the training patch's forward is kept underneath; a user's own forward is left alone
    fused = FusedOrOriginalForward(mlps[0])
    mlps[0].forward = fused
    mlps[1].forward = own = lambda x: x
    assert install_slot_mlps(model) == 1
    assert mlps[0].forward.previous is fused and mlps[1].forward is own
    remove_slot_mlps(model)
    assert mlps[0].forward is fused


def test_mlp_without_slots_on_every_projection_is_not_patched(adapter_dirs):  # noqa: F811
    model = tiny_llama()
    pool = AdapterPool(model, max_loras=2)
    pool.register("rslora", adapter_dirs["rslora"])  # down only in the MLP
    route = acquire(pool, "rslora")
    assert "forward" not in model.model.layers[0].mlp.__dict__
    pool.release(route)
    pool.close()


def rows_calls(monkeypatch):
    """Let the fused call take CPU tensors, and record what reaches ``slot_mlp_rows`` (which then
    declines, so the layers run)."""
    calls = []
    monkeypatch.setattr(triton_slot_mlp, "available", lambda *tensors: True)
    monkeypatch.setattr("lorakit.layers.slot_mlp.slot_mlp_rows", lambda *a: calls.append(a) and None)
    return calls


def test_prefill_rows_reach_the_fused_call(pool_model, monkeypatch):
    model, pool, route = pool_model
    calls = rows_calls(monkeypatch)
    monkeypatch.setattr(tuning, "SEGMENT_TOKENS", 4)
    pool.set_rows([route, BASE_ROUTE])
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        model(ids)
    assert len(calls) == 2  # one per layer
    x2, weights, plan, A_stacks, B_stacks = calls[0]
    mlp = model.model.layers[0].mlp
    assert x2.shape == (12, 32) and plan.rows[0] == 6
    assert all(w is p.base_layer.weight for w, p in zip(weights, (mlp.gate_proj, mlp.up_proj, mlp.down_proj)))
    assert all(A is p.slot_stack.A for A, p in zip(A_stacks, (mlp.gate_proj, mlp.up_proj, mlp.down_proj)))


@pytest.mark.parametrize("case", ["cpu", "knob-off", "decode", "grad", "autocast", "bias", "gelu", "dora"])
def test_calls_the_fused_pass_must_leave_to_the_layers(case, adapter_dirs, monkeypatch):  # noqa: F811
    model = tiny_llama(act="gelu" if case == "gelu" else "silu")
    if case == "bias":
        mlp = model.model.layers[0].mlp
        mlp.up_proj.bias = torch.nn.Parameter(torch.zeros(mlp.up_proj.out_features))
    pool = AdapterPool(model, max_loras=3)
    names = ["plain", "dora"] if case == "dora" else ["plain"]
    for name in names:
        pool.register(name, adapter_dirs[name])
    routes = [acquire(pool, name) for name in names]
    if case != "cpu":
        calls = rows_calls(monkeypatch)
    else:
        calls = []
        monkeypatch.setattr("lorakit.layers.slot_mlp.slot_mlp_rows", lambda *a: calls.append(a) and None)
    monkeypatch.setattr(tuning, "SEGMENT_TOKENS", 4)
    monkeypatch.setattr(tuning, "SLOT_MLP", case != "knob-off")
    pool.set_rows(routes + [BASE_ROUTE])
    ids = torch.randint(0, 128, (len(routes) + 1, 1 if case == "decode" else 6))
    with torch.enable_grad() if case == "grad" else torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            model(ids)
    # dora: up has a DoRA slot in every layer; bias: layer 0's MLP alone keeps its layers
    expected = {"bias": 1}.get(case, 0)
    assert len(calls) == expected, case
    for route in routes:
        pool.release(route)
    pool.close()


@pytest.fixture
def mlp_over_rows(pool_model, monkeypatch):
    """Layer 0's MLP of the pool's model with a prefill's rows routed (a slot and the base, 6
    tokens each), an input for it, and what reaches the fused call (``rows_calls``), which the
    input has reached once already: (mlp, x, calls, the adapter's route)."""
    from lorakit.layers.slot_mlp import slot_mlp_output

    model, pool, route = pool_model
    calls = rows_calls(monkeypatch)
    monkeypatch.setattr(tuning, "SEGMENT_TOKENS", 4)
    mlp = model.model.layers[0].mlp
    pool.set_rows([route, BASE_ROUTE])
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        slot_mlp_output(mlp, x)
    assert len(calls) == 1  # slots only: the fused call is asked
    return mlp, x, calls, route


def test_rows_named_by_adapter_leave_the_mlp_to_its_layers(mlp_over_rows):
    from lorakit.layers.slot_mlp import slot_mlp_output

    mlp, x, calls, route = mlp_over_rows
    with torch.no_grad():
        routing = mlp.gate_proj.row_adapters
        routing.set_rows(["named", None], [0, route.slot], routing.num_slots)  # slots besides a name
        assert slot_mlp_output(mlp, x) is None and len(calls) == 1


@pytest.fixture
def fused_calls_on_cpu(monkeypatch):
    """The fused calls' kernels replaced by shape-right stand-ins, and Triton "available" for CPU
    tensors: what reaches a kernel is recorded; the refusals before it are what is tested."""
    from lorakit.kernels import triton_bgmv

    reached = []
    monkeypatch.setattr(triton_slot_mlp, "available", lambda *tensors: True)
    monkeypatch.setattr(triton_bgmv, "available", lambda *tensors: True)

    def gate_product(g, u, h, B_gate, B_up, A_down, row_slots, T):
        reached.append("rows")
        return torch.zeros_like(g), torch.zeros(g.shape[0], A_down.shape[1])

    def gate_product_tokens(g, u, h, B_gate, B_up, A_down, token_slots):
        reached.append("tokens")
        return torch.zeros_like(g), torch.zeros(1, g.shape[0], A_down.shape[1])

    monkeypatch.setattr(triton_slot_mlp, "gate_product", gate_product)
    monkeypatch.setattr(triton_slot_mlp, "gate_product_tokens", gate_product_tokens)
    monkeypatch.setattr(triton_bgmv, "shrink_planes", lambda x, slots, A: torch.zeros(1, x.shape[0], 8))
    monkeypatch.setattr(triton_bgmv, "expand_planes", lambda outs, h, slots, B: None)
    return reached


def mlp_operands(rank=4, d=16, F=32, S=3):
    torch.manual_seed(0)
    weights = [torch.randn(F, d), torch.randn(F, d), torch.randn(d, F)]
    A = [torch.randn(S, rank, d), torch.randn(S, rank, d), torch.randn(S, rank, F)]
    B = [torch.randn(S, F, rank), torch.randn(S, F, rank), torch.randn(S, d, rank)]
    return weights, A, B


@pytest.mark.parametrize(
    "case",
    ["none", "grad", "autocast", "graphed", "other-tokens", "bgmv", "short-rows", "strided-x", "rank"]
    + ["knob-SLOT_MLP", "knob-SHARED_SIBLINGS", "knob-BATCHED_ROWS", "knob-LORA_FIRST"],
)
def test_the_rows_call_refuses_what_it_does_not_take(case, fused_calls_on_cpu, monkeypatch):
    from lorakit.kernels.multi_lora import SlotPlan
    from lorakit.kernels.slot_mlp import slot_mlp_rows

    monkeypatch.setattr(tuning, "BGMV_TOKENS", 0)  # 140 tokens: rows, not BGMV
    weights, A, B = mlp_operands(rank=80 if case == "rank" else 4)
    T = 3 if case == "short-rows" else 70
    plan = SlotPlan.for_rows([1, 2], T, 3, "cpu")
    x = torch.randn(2 * T, 16)
    if case == "graphed":
        plan = SlotPlan.for_graph(torch.tensor([1, 2] * T), 3)
    if case == "other-tokens":
        x = torch.randn(2 * T - 2, 16)
    if case == "bgmv":
        monkeypatch.setattr(tuning, "BGMV_TOKENS", 256)
    if case == "strided-x":
        x = torch.randn(16, 2 * T).t()
    if case.startswith("knob-"):
        monkeypatch.setattr(tuning, case[5:], False)
    with torch.enable_grad() if case == "grad" else torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            y = slot_mlp_rows(x, weights, plan, A, B)
    assert (y is not None, fused_calls_on_cpu) == ((True, ["rows"]) if case == "none" else (False, [])), case
    if case == "none":
        assert y.shape == (2 * T, 16)


@pytest.mark.parametrize(
    "case", ["none", "graphed", "grad", "autocast", "no-bgmv", "base-only", "strided-stack", "rank", "knob"]
)
def test_the_tokens_call_refuses_what_it_does_not_take(case, fused_calls_on_cpu, monkeypatch):
    from lorakit.kernels.multi_lora import SlotPlan
    from lorakit.kernels.slot_mlp import slot_mlp_tokens

    weights, A, B = mlp_operands(rank=80 if case == "rank" else 4)
    slots = torch.tensor([0, 0, 0] if case == "base-only" else [1, 0, 2])
    plan = SlotPlan.for_graph(slots, 3) if case == "graphed" else SlotPlan.build(slots, 3, "cpu")
    if case == "no-bgmv":
        monkeypatch.setattr(tuning, "BGMV_TOKENS", 0)
    if case == "strided-stack":
        B[2] = torch.randn(3, 8, 16).transpose(1, 2)[:, :, :4]
    if case == "knob":
        monkeypatch.setattr(tuning, "SHARED_SIBLINGS", False)
    with torch.enable_grad() if case == "grad" else torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            y = slot_mlp_tokens(torch.randn(3, 16), weights, plan, A, B)
    taken = case in ("none", "graphed")
    assert (y is not None, fused_calls_on_cpu) == ((True, ["tokens"]) if taken else (False, [])), case


def test_hooks_on_the_activation_and_layers_off_the_fast_path_keep_the_layers(mlp_over_rows):
    from lorakit.layers.slot_mlp import slot_mlp_output

    mlp, x, calls, _ = mlp_over_rows
    with torch.no_grad():
        handle = mlp.act_fn.register_forward_hook(lambda module, args, out: out)
        assert slot_mlp_output(mlp, x) is None
        handle.remove()
        mlp.down_proj.fast_path = False
        assert slot_mlp_output(mlp, x) is None and len(calls) == 1


def test_unload_and_closing_the_pool_take_the_patch_off(adapter_dirs):  # noqa: F811
    import lorakit
    from lorakit.patching.gated_mlp import FusedOrOriginalForward

    model = tiny_llama()
    pool = AdapterPool(model, max_loras=2)
    pool.register("plain", adapter_dirs["plain"])
    pool.release(acquire(pool, "plain"))
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.__dict__.get("forward"), SlotMlpForward)
    pool.close()
    assert "forward" not in mlp.__dict__ and "slot_siblings" not in mlp.gate_proj.__dict__
    # a model trained with lorakit (the fused MLP's forward), then served: unload leaves it plain
    trained = tiny_llama()
    lorakit.add_adapter(trained, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    assert isinstance(trained.model.layers[0].mlp.__dict__.get("forward"), FusedOrOriginalForward)
    pool = AdapterPool(trained, max_loras=2)
    pool.register("plain", adapter_dirs["plain"])
    pool.release(acquire(pool, "plain"))
    assert isinstance(trained.model.layers[0].mlp.forward.previous, FusedOrOriginalForward)
    lorakit.unload(trained)
    assert all("forward" not in layer.mlp.__dict__ for layer in trained.model.layers)
    pool.close()
