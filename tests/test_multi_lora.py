"""The multi-adapter kernels (``kernels/multi_lora.py``, ``triton_bgmv.py``) and the slot stacks
(``layers/slot_stack.py``): against the formula in float64 and against one another."""

import pytest
import torch
from torch import nn

from lorakit.errors import AdapterStateError
from lorakit.kernels import multi_lora, tuning
from lorakit.kernels.multi_lora import SlotPlan, add_multi_lora
from lorakit.layers import LoraLinear
from lorakit.layers.routing import RowRouting
from lorakit.layers.slot_stack import SlotStack

from .triton_interpreter import run_interpreted


def random_stack(S=5, r=8, d_in=64, d_out=48, dora=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(S, r, d_in, generator=gen) * 0.2
    B = torch.randn(S, d_out, r, generator=gen) * 0.2
    gm1 = torch.randn(S, d_out, generator=gen) * 0.1 if dora else None
    A[0], B[0] = 0, 0
    if dora:
        gm1[0] = 0
    return A, B, gm1


def formula(out, x, slots, A, B, gm1, bias):
    """out[n] + B[s] A[s] x[n] + gm1[s] (out[n] - b), token by token in float64."""
    want = out.double().clone()
    for n, s in enumerate(slots.tolist()):
        want[n] += B[s].double() @ (A[s].double() @ x[n].double())
        if gm1 is not None:
            base = out[n].double() - (0 if bias is None else bias.double())
            want[n] += gm1[s].double() * base
    return want


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("path", ["grouped", "per_slot", "float64"])
def test_kernel_matches_formula(path, dora, bias, monkeypatch):
    A, B, gm1 = random_stack(dora=dora)
    N = 37
    x, out = torch.randn(N, 64), torch.randn(N, 48)
    b = torch.randn(48) if bias else None
    slots = torch.randint(0, 5, (N,))
    slots[3] = 0
    want = formula(out, x, slots, A, B, gm1, b)
    if path == "per_slot":
        monkeypatch.setattr(tuning, "GROUPED_MM", False)
    dtype = torch.float64 if path == "float64" else torch.float32

    def cast(t):
        return None if t is None else t.to(dtype)

    got_out = out.to(dtype).clone()
    plan = SlotPlan.build(slots, 5, "cpu")
    got = add_multi_lora(got_out, cast(x), plan, cast(A), cast(B), cast(gm1), cast(b))
    assert got is got_out  # in place
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_grouped_and_per_slot_paths_agree_on_sorted_rows(monkeypatch):
    A, B, gm1 = random_stack()
    rows, T = 6, 5
    plan = SlotPlan.for_rows([0, 1, 1, 2, 4, 4], T, 5, "cpu")
    assert plan.span == (T, rows * T) and plan.present == (1, 2, 4) and plan.counts == (2 * T, T, 2 * T)
    x, out = torch.randn(rows * T, 64), torch.randn(rows * T, 48)
    grouped = add_multi_lora(out.clone(), x, plan, A, B, gm1)
    monkeypatch.setattr(tuning, "GROUPED_MM", False)
    looped = add_multi_lora(out.clone(), x, plan, A, B, gm1)
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped[:T], out[:T], rtol=0, atol=0)  # slot 0 rows untouched


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_runs_of_one_slot_are_multiplied_where_they_lie(dora, monkeypatch):
    """Rows of a prefill (long runs of one slot, slot 0 among them, slots repeated apart): the
    segment SGMV, the sorted SGMV and the formula agree."""
    A, B, gm1 = random_stack(dora=dora)
    bias = torch.randn(48)
    row_slots, T = [2, 0, 2, 1, 4, 4, 3], 9
    monkeypatch.setattr(tuning, "SEGMENT_TOKENS", 8)
    monkeypatch.setattr(tuning, "BATCHED_ROWS", False)
    plan = SlotPlan.for_rows(row_slots, T, 5, "cpu")
    assert plan.span is None and plan.segments is not None
    run_slots, run_ends = plan.segments
    assert run_slots.tolist() == [2, 0, 2, 1, 4, 3] and run_ends.tolist() == [9, 18, 27, 36, 54, 63]
    x, out = torch.randn(len(row_slots) * T, 64), torch.randn(len(row_slots) * T, 48)
    slots = torch.tensor(row_slots).repeat_interleave(T)
    want = formula(out, x, slots, A, B, gm1, bias)
    got = add_multi_lora(out.clone(), x, plan, A, B, gm1, bias)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(tuning, "SEGMENT_TOKENS", float("inf"))
    sorted_plan = SlotPlan.for_rows(row_slots, T, 5, "cpu")
    assert sorted_plan.segments is None
    torch.testing.assert_close(add_multi_lora(out.clone(), x, sorted_plan, A, B, gm1, bias), got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_of_one_slot_take_batched_gemms(dtype, monkeypatch):
    """A prefill's rows (T tokens each, slot 0 among them): two batched GEMMs, the expand added
    into ``out`` in place; equal to the formula and to SGMV over runs."""
    A, B, _ = random_stack(dora=False)
    row_slots, T = [2, 0, 2, 1, 4, 4, 3], 9
    monkeypatch.setattr(tuning, "SEGMENT_TOKENS", 8)
    plan = SlotPlan.for_rows(row_slots, T, 5, "cpu")
    assert plan.rows is not None and plan.rows[0] == T and plan.rows[1].tolist() == row_slots
    x, out = torch.randn(len(row_slots) * T, 64), torch.randn(len(row_slots) * T, 48)
    want = formula(out, x, torch.tensor(row_slots).repeat_interleave(T), A, B, None, None)
    got_out = out.to(dtype)
    got = add_multi_lora(got_out, x.to(dtype), plan, A.to(dtype), B.to(dtype))
    assert got is got_out
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got[T : 2 * T], out[T : 2 * T].to(dtype), rtol=0, atol=0)  # the base row
    monkeypatch.setattr(tuning, "BATCHED_ROWS", False)
    runs = add_multi_lora(out.to(dtype), x.to(dtype), plan, A.to(dtype), B.to(dtype))
    torch.testing.assert_close(runs, got, rtol=tol, atol=tol)
    assert SlotPlan.for_rows(row_slots, 7, 5, "cpu").rows is None  # rows shorter than SEGMENT_TOKENS


def test_short_runs_are_sorted_by_slot():
    plan = SlotPlan.for_rows([1, 2, 1, 3], 1, 5, "cpu")  # decode: runs of one token
    assert plan.segments is None
    assert SlotPlan.build(torch.zeros(0, dtype=torch.long), 5, "cpu").segments is None


def test_half_precision_on_cpu_keeps_a_float32_intermediate():
    A, B, gm1 = random_stack()
    x, out = torch.randn(20, 64), torch.randn(20, 48)
    slots = torch.randint(0, 5, (20,))
    plan = SlotPlan.build(slots, 5, "cpu")
    want = formula(out.bfloat16(), x.bfloat16(), slots, A.bfloat16(), B.bfloat16(), gm1, None)
    got = add_multi_lora(out.bfloat16(), x.bfloat16(), plan, A.bfloat16(), B.bfloat16(), gm1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_unaligned_shapes_fall_back_to_the_loop():
    A, B, gm1 = random_stack(r=3, d_in=33, d_out=7)
    x, out = torch.randn(9, 33), torch.randn(9, 7)
    slots = torch.tensor([1, 2, 0, 3, 4, 1, 2, 3, 4])
    got = add_multi_lora(out.clone(), x, SlotPlan.build(slots, 5, "cpu"), A, B, gm1)
    torch.testing.assert_close(got.double(), formula(out, x, slots, A, B, gm1, None), rtol=1e-5, atol=1e-5)


def test_autograd_sees_the_call_when_it_records():
    A, B, gm1 = random_stack(dora=False)
    x = torch.randn(10, 64, dtype=torch.float64, requires_grad=True)
    out = torch.randn(10, 48, dtype=torch.float64)
    slots = torch.randint(1, 5, (10,))
    got = add_multi_lora(out, x, SlotPlan.build(slots, 5, "cpu"), A.double(), B.double())
    assert got is not out and got.requires_grad
    got.sum().backward()
    want = torch.stack([A[s].double().T @ B[s].double().sum(0) for s in slots.tolist()])
    torch.testing.assert_close(x.grad, want)


def test_plan_checks():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        SlotPlan.build(torch.tensor([0, 3]), 3, "cpu")
    A, B, _ = random_stack()
    plan = SlotPlan.build(torch.tensor([1, 2]), 5, "cpu")
    with pytest.raises(ValueError, match="2 tokens"):
        add_multi_lora(torch.zeros(3, 48), torch.zeros(3, 64), plan, A, B)
    empty = SlotPlan.build(torch.zeros(4, dtype=torch.long), 5, "cpu")
    out = torch.randn(4, 48)
    assert add_multi_lora(out, torch.randn(4, 64), empty, A, B) is out


BGMV_SCRIPT = r"""
import contextlib
import torch
from lorakit.kernels import triton_bgmv, tuning
from lorakit.kernels.graph_mode import building_cuda_graph
torch.manual_seed(0)
cases = ((5, 8, 1100, 48, 7, 3, True), (3, 16, 64, 300, 5, 1, False), (4, 8, 64, 300, 3, 2, True))
dtypes = ((torch.float32, 1e-5), (torch.float16, 5e-3))
launched = []
class Counted:  # which kernel a call launches
    def __init__(self, name, kernel):
        self.name, self.kernel = name, kernel
    def __getitem__(self, grid):
        launched.append(self.name)
        return self.kernel[grid]
triton_bgmv._one_launch_kernel = Counted("one launch", triton_bgmv._one_launch_kernel)
triton_bgmv._shrink_kernel = Counted("two launches", triton_bgmv._shrink_kernel)
# "auto": one launch eagerly, two in a CUDA graph's warm-up and capture (building_cuda_graph)
modes = {True: "one launch", False: "two launches", "auto": "one launch", "auto in a graph": "two launches"}
for mode, dtype, tol in [(m, d, t) for m in modes for d, t in dtypes]:
    tuning.BGMV_ONE_LAUNCH = "auto" if mode == "auto in a graph" else mode
    for S, r, d_in, d_out, N, split, dora in cases:
        A, B = torch.randn(S, r, d_in) * 0.1, torch.randn(S, d_out, r) * 0.1
        A[0], B[0] = 0, 0
        gm1 = torch.randn(S, d_out) * 0.1 if dora else None
        if dora:
            gm1[0] = 0
        bias = torch.randn(d_out)
        x, out = torch.randn(N, d_in), torch.randn(N, d_out)
        slots = torch.randint(0, S, (N,))
        slots[0] = 0
        want = out.double().clone()
        for n, s in enumerate(slots.tolist()):
            want[n] += B[s].double() @ (A[s].double() @ x[n].double())
            if dora:
                want[n] += gm1[s].double() * (out[n].double() - bias.double())
        got = out.to(dtype).clone()
        c = lambda t: None if t is None else t.to(dtype)
        launched.clear()
        with building_cuda_graph() if mode == "auto in a graph" else contextlib.nullcontext():
            back = triton_bgmv.bgmv(got, c(x), slots, c(A), c(B), c(gm1), c(bias) if dora else None, split=split)
        assert launched == [modes[mode]], (mode, launched)
        assert back is got
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < tol, (dtype, S, r, d_in, err)
        assert torch.equal(got[0], out[0].to(dtype))  # slot 0 untouched
print("ok")
"""


def test_bgmv_kernels_match_formula_in_interpreter():
    run_interpreted(BGMV_SCRIPT)


SIBLING_SCRIPT = r"""
import tempfile, time, pathlib
import torch
import lorakit
from lorakit import LoraConfig
from lorakit.kernels import triton_bgmv, tuning
from lorakit.serve.adapter_pool import AdapterPool
from tests.tiny import randomize_adapters, tiny_llama
torch.manual_seed(0)
# a sibling kernel's call against the formula: two and three projections, uneven ranks, slot 0
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3)):
    for S, ranks, d_in, d_outs, N in (
        (5, (8, 16, 8), 1100, (48, 300, 130), 7), (4, (16, 0), 64, (200, 40), 3), (4, (0, 16, 8), 64, (200, 40, 130), 3)
    ):
        A = [torch.randn(S, r, d_in) * 0.1 for r in ranks]
        B = [torch.randn(S, d, r) * 0.1 for d, r in zip(d_outs, ranks)]
        for a, b in zip(A, B):
            a[0], b[0] = 0, 0
        x, outs = torch.randn(N, d_in), [torch.randn(N, d) for d in d_outs]
        slots = torch.randint(0, S, (N,))
        slots[0] = 0
        got = [o.to(dtype).clone() for o in outs]
        triton_bgmv.sibling_bgmv(got, x.to(dtype), slots, [a.to(dtype) for a in A], [b.to(dtype) for b in B])
        for g, a, b, o in zip(got, A, B, outs):
            update = [b[s].double() @ (a[s].double() @ x[n].double()) for n, s in enumerate(slots.tolist())]
            want = o.double() + torch.stack(update)
            assert ((g.double() - want).abs().max() / want.abs().max()).item() < tol, (dtype, S, ranks)
            assert torch.equal(g[0], o[0].to(dtype))
# a pool's decode step: q, k, v and gate, up share the kernel; the logits equal each layer alone
root = pathlib.Path(tempfile.mkdtemp())
configs = {"plain": LoraConfig(r=4, alpha=8, target_modules="all-linear"),
           "rs": LoraConfig(r=8, alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"])}
for seed, (name, config) in enumerate(configs.items()):
    model = tiny_llama()
    lorakit.add_adapter(model, config)
    torch.manual_seed(seed)
    randomize_adapters(model, std=0.3)
    lorakit.save_adapter(model, root / name)
model = tiny_llama()
pool = AdapterPool(model, max_loras=3)
routes = []
for name in configs:
    pool.register(name, root / name)
    while (route := pool.acquire(name)) is None:
        time.sleep(0.01)
    routes.append(route)
attention = model.model.layers[0].self_attn
assert attention.q_proj.slot_siblings is attention.v_proj.slot_siblings is attention.k_proj.slot_siblings
triton_bgmv.available = lambda *tensors: True  # CPU tensors through the kernels, interpreted
calls = []
real = triton_bgmv.sibling_bgmv
triton_bgmv.sibling_bgmv = lambda outs, *a: calls.append(len(outs)) or real(outs, *a)
rows = [routes[0], routes[1], routes[0], None, routes[1]]
ids = torch.randint(0, 128, (len(rows), 1))
def step(siblings, graphed):
    tuning.SHARED_SIBLINGS = siblings
    if graphed:
        pool.fix_slots(torch.tensor([r.slot if r else 0 for r in rows]))
    else:
        pool.set_rows([r or pool_base for r in rows])
    with torch.inference_mode():
        return model(ids).logits
from lorakit.serve.adapter_pool import BASE_ROUTE as pool_base
for graphed in (False, True):
    calls.clear()
    shared = step(True, graphed)
    assert calls == [3, 2, 3, 2], calls  # each layer: q, k, v once, gate and up once
    calls.clear()
    alone = step(False, graphed)
    assert not calls
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-5)
    triton_bgmv.available = lambda *tensors: False  # the CPU's own path: the formula, no Triton
    torch.testing.assert_close(shared, step(True, graphed), rtol=1e-5, atol=1e-5)
    triton_bgmv.available = lambda *tensors: True
print("ok")
"""


def test_sibling_projections_share_bgmv_in_interpreter():
    """``sibling_bgmv`` against the formula, and a pool's decode step through it (q, k, v and
    gate, up each one call) equal to each layer's own BGMV and to the CPU path."""
    run_interpreted(SIBLING_SCRIPT)


def test_cpu_tensors_never_take_bgmv():
    from lorakit.kernels import triton_bgmv

    assert not triton_bgmv.available(torch.zeros(2, 2), torch.zeros(2, 2))


# --- SlotStack ---------------------------------------------------------------------------------
def linear_layer(d_in=24, d_out=16, dtype=torch.float32, conv1d=False):
    torch.manual_seed(3)
    base = nn.Linear(d_in, d_out).to(dtype)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(d_out, d_in).to(dtype)
        with torch.no_grad():
            conv.weight.copy_(base.weight.T)
            conv.bias.copy_(base.bias)
        base = conv
    return LoraLinear(base)


def test_stack_write_pads_rank_and_folds_scaling_in_fp32():
    layer = linear_layer(dtype=torch.bfloat16)
    stack = SlotStack(layer, 4, max_rank=16)
    A, B = torch.randn(3, 24), torch.randn(16, 3)
    stack.write(2, A, B, 0.37)
    assert stack.r_max == 8 and stack.A.dtype == torch.bfloat16 and stack.ranks == [0, 0, 3, 0]
    assert torch.equal(stack.A[2, :3], A.bfloat16()) and not stack.A[2, 3:].any()
    assert torch.equal(stack.B[2, :, :3], (B * 0.37).bfloat16()) and not stack.B[2, :, 3:].any()
    assert not stack.A[0].any() and not stack.B[0].any() and stack.gm1 is None
    stack.write(1, torch.randn(11, 24), torch.randn(16, 11), 1.0)  # the stack grows to rank 16
    assert stack.r_max == 16 and torch.equal(stack.B[2, :, :3], (B * 0.37).bfloat16())
    # s = 1 copies straight in (a pool's writes): a smaller rank over a larger one leaves zeros
    A1, B1 = torch.randn(5, 24, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64)
    stack.write(1, A1, B1, 1.0)
    assert torch.equal(stack.A[1, :5], A1.bfloat16()) and not stack.A[1, 5:].any()
    assert torch.equal(stack.B[1, :, :5], B1.bfloat16()) and not stack.B[1, :, 5:].any() and stack.ranks[1] == 5
    with pytest.raises(AdapterStateError, match="exceeds"):
        stack.write(1, torch.randn(17, 24), torch.randn(16, 17), 1.0)
    with pytest.raises(AdapterStateError, match="not an adapter slot"):
        stack.write(0, A, B, 1.0)
    with pytest.raises(AdapterStateError, match="do not fit"):
        stack.write(1, torch.randn(3, 25), B, 1.0)
    v = stack.version
    stack.clear(2)
    assert not stack.A[2].any() and not stack.B[2].any() and stack.ranks[2] == 0 and stack.version == v + 1


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_stack_dora_scale_from_w0(conv1d):
    layer = linear_layer(dtype=torch.float64, conv1d=conv1d)
    stack = SlotStack(layer, 3, max_rank=8)
    A, B, m = torch.randn(4, 24).double(), torch.randn(16, 4).double(), torch.rand(16).double() + 0.5
    stack.write(1, A, B, 0.5, magnitude=m)
    W0 = layer.base_layer.weight.T if conv1d else layer.base_layer.weight
    g = m / (W0 + 0.5 * B @ A).norm(dim=1)
    torch.testing.assert_close(stack.gm1[1].double(), g - 1, rtol=1e-6, atol=1e-6)  # gm1 is fp32
    torch.testing.assert_close(stack.B[1, :, :4], 0.5 * g[:, None] * B)
    stack.write(1, A, B, 0.5)  # plain LoRA over a DoRA slot: its term goes
    assert not stack.gm1[1].any()


# --- a layer routed by slots and names ---------------------------------------------------------
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_rows_by_slot_and_by_name(dtype, conv1d):
    layer = linear_layer(dtype=dtype, conv1d=conv1d)
    gen = torch.Generator().manual_seed(5)
    named_A, named_B = torch.randn(2, 24, generator=gen).to(dtype), torch.randn(16, 2, generator=gen).to(dtype)
    layer.add_adapter("named", named_A, named_B, scaling=2.0, dropout=0.0, trainable=False)
    stack = SlotStack(layer, 4, max_rank=8)
    layer.slot_stack = stack
    adapters = {
        1: (torch.randn(4, 24, generator=gen), torch.randn(16, 4, generator=gen), 0.5, None),
        3: (torch.randn(8, 24, generator=gen), torch.randn(16, 8, generator=gen), 1.5, torch.rand(16, generator=gen)),
    }
    for slot, (A, B, s, m) in adapters.items():
        stack.write(slot, A, B, s, magnitude=m)
    x = torch.randn(5, 3, 24, generator=gen).to(dtype)
    names = [None, "named", None, None, None]
    slots = [1, 0, 3, 0, 1]
    layer.row_adapters = RowRouting(names, slots, num_slots=4)
    with torch.no_grad():
        got = layer(x)
    W0 = (layer.base_layer.weight.T if conv1d else layer.base_layer.weight).double()
    b = layer.base_layer.bias.double()
    for row in range(5):
        xr = x[row].double()
        want = xr @ W0.T + b
        if names[row] == "named":
            want = want + 2.0 * xr @ named_A.double().T @ named_B.double().T
        elif slots[row]:
            A, B, s, m = (t.double() if torch.is_tensor(t) else t for t in adapters[slots[row]])
            delta = xr @ A.T @ B.T * s
            if m is None:
                want = want + delta
            else:  # DoRA: m / ||W0 + sBA|| (W0 x + s B A x) + b
                g = m / (W0 + s * B @ A).norm(dim=1)
                want = g * (xr @ W0.T + delta) + b
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(got[row].double(), want, rtol=tol, atol=tol)
    layer.row_adapters.set_rows([None] * 5)  # the same object, other rows: the base alone
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_routing_checks():
    with pytest.raises(AdapterStateError, match="both an adapter name and a slot"):
        RowRouting(["a", None], [1, 0], num_slots=3)
    with pytest.raises(AdapterStateError, match="num_slots"):
        RowRouting([None], [1])
    routing = RowRouting([None, None], [0, 2], num_slots=3)
    with pytest.raises(AdapterStateError, match="2 adapter names but the batch has 3 rows"):
        routing.slot_plan(3, 3, torch.device("cpu"))
    assert routing.slot_plan(2, 8, torch.device("cpu")) is routing.slot_plan(2, 8, torch.device("cpu"))
    assert RowRouting([None, None], [0, 0], num_slots=3).slot_plan(2, 2, torch.device("cpu")) is None


def test_multi_lora_is_tensors_only():
    """The kernels know nothing of layers (the house's rule)."""
    import ast
    import pathlib

    for module in (multi_lora.__file__, pathlib.Path(multi_lora.__file__).with_name("triton_bgmv.py")):
        tree = ast.parse(pathlib.Path(module).read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any("layers" in name for name in imported)


# --- adapter_batch's fast path -----------------------------------------------------------------
def mixed_model(dropout=0.0):
    import lorakit
    from lorakit import LoraConfig

    from .tiny import randomize_adapters, tiny_llama

    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear", dropout=dropout), name="a")
    lorakit.add_adapter(
        model, LoraConfig(r=2, alpha=8, use_dora=True, use_rslora=True, target_modules=["q_proj", "up_proj"]), name="b"
    )
    lorakit.add_adapter(
        model,
        LoraConfig(
            r=6, target_modules=["v_proj", "down_proj"], rank_pattern={"down_proj": 3}, alpha_pattern={"v_proj": 2}
        ),
        name="c",
    )
    randomize_adapters(model, std=0.3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear) and "b" in module.lora_A:
                module.lora_magnitude_vector["b"].mul_(torch.linspace(0.5, 1.5, module.out_dim))
    return model


def single_rows(model, names, ids):
    import lorakit

    outs = []
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with lorakit.disable_adapters(model):
                    outs.append(model(ids[i : i + 1]).logits)
            else:
                lorakit.set_adapter(model, name)
                outs.append(model(ids[i : i + 1]).logits)
    return torch.cat(outs)


class Spy:
    """Counts the multi-adapter kernel's calls from the layers."""

    def __init__(self, monkeypatch):
        import lorakit.layers.linear as linear

        self.calls = 0
        real = linear.add_multi_lora

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(linear, "add_multi_lora", spy)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen", "batched_rows"])
def test_adapter_batch_fast_path_rows_equal_single_runs(mode, monkeypatch):
    """adapter_batch's rows equal each row run alone (also with rows long enough for the named
    stacks to take batched row GEMMs)."""
    import lorakit

    model = mixed_model()
    names = ["b", None, "a", "c", "a", "b"]
    ids = torch.randint(0, 128, (len(names), 7))
    want = single_rows(model, names, ids)
    batched = []
    if mode == "batched_rows":
        monkeypatch.setattr(tuning, "SEGMENT_TOKENS", 4)
        real = multi_lora._batched_rows
        monkeypatch.setattr(multi_lora, "_batched_rows", lambda *a: batched.append(1) or real(*a))
        mode = "no_grad"
    spy = Spy(monkeypatch)
    if mode == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "frozen": torch.enable_grad}[mode]
    with context(), lorakit.adapter_batch(model, names):
        got = model(ids).logits
    assert spy.calls > 0
    assert bool(batched) == (mode == "no_grad" and tuning.SEGMENT_TOKENS == 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_adapter_batch_stack_follows_changed_weights(monkeypatch):
    import lorakit

    model = mixed_model()
    names = ["a", "c", "b"]
    ids = torch.randint(0, 128, (3, 5))
    with torch.no_grad(), lorakit.adapter_batch(model, names):
        first = model(ids).logits
        layer = model.model.layers[0].self_attn.v_proj
        stack = layer.__dict__["_named_stack"][1]
        model(ids)
        assert layer.__dict__["_named_stack"][1] is stack  # kept while nothing changed
        layer.lora_B["c"].mul_(2)  # an in-place change bumps the version
        second = model(ids).logits
    assert layer.__dict__["_named_stack"][1] is not stack
    assert torch.equal(first[0], second[0]) and not torch.allclose(first[1], second[1])
    torch.testing.assert_close(second, single_rows(model, names, ids), rtol=1e-5, atol=1e-5)


def test_adapter_batch_keeps_the_loop_where_autograd_or_dropout_need_it(monkeypatch):
    import lorakit

    names = ["a", "b", None]
    ids = torch.randint(0, 128, (3, 5))
    model = mixed_model()  # trainable adapters, grad enabled: the loop
    want = single_rows(model, names, ids)
    spy = Spy(monkeypatch)
    with lorakit.adapter_batch(model, names):
        got = model(ids).logits
    assert spy.calls == 0 and got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A["a"].grad is not None
    model = mixed_model(dropout=0.3).train()  # a's dropout is active: a stays in the loop
    with torch.no_grad(), lorakit.adapter_batch(model, names):
        model(ids)
    assert spy.calls == 4  # b's layers only: q_proj and up_proj of 2 decoder layers
    model.eval()
    with torch.no_grad(), lorakit.adapter_batch(model, names):
        model(ids)
    assert spy.calls == 4 + 14  # every linear layer has a


def test_graphed_plan_routes_by_its_buffer_only():
    """A CUDA graph's plan: the routing hands it to every layer until the next set_rows and refuses
    another token count; the kernels route by its buffer alone."""
    buffer = torch.zeros(4, dtype=torch.int64)
    plan = SlotPlan.for_graph(buffer, 3)
    assert plan.graphed and plan.tokens == 4 and plan.token_slots is buffer
    routing = RowRouting([None], [0], num_slots=3)
    routing.set_plan(plan, 4)
    assert routing.slot_plan(4, 4, torch.device("cpu")) is plan
    with pytest.raises(AdapterStateError, match="4 tokens"):
        routing.slot_plan(4, 8, torch.device("cpu"))
    A, B, gm1 = random_stack()
    with pytest.raises(ValueError, match="4 tokens"):
        add_multi_lora(torch.zeros(3, 48), torch.zeros(3, 64), SlotPlan.for_graph(buffer, 5), A, B)
    # Off the GPU the slots are gathered on the device: the formula, whatever the buffer holds.
    x, out, bias = torch.randn(4, 64), torch.randn(4, 48), torch.randn(48)
    graphed = SlotPlan.for_graph(buffer, 5)
    for slots in ([0, 1, 4, 1], [3, 0, 0, 2]):
        buffer.copy_(torch.tensor(slots))
        got = add_multi_lora(out.clone(), x, graphed, A, B, gm1, bias)
        want = formula(out, x, torch.tensor(slots), A, B, gm1, bias)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    routing.set_rows([None] * 4, [0, 1, 0, 2], num_slots=3)
    assert not routing.slot_plan(4, 4, torch.device("cpu")).graphed
