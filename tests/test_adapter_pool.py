"""`AdapterPool`: slots, host tier, draining, unregistering, bad files, and mixed batches whose
rows equal each row run with its adapter alone."""

import json
import time

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterFileError, AdapterLoadError, AdapterNameError, ConfigError
from lorakit.kernels import tuning
from lorakit.layers import LoraLinear
from lorakit.serve.adapter_pool import BASE_ROUTE, AdapterPool

from .tiny import randomize_adapters, tiny_llama

CONFIGS = {
    "plain": LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    "rslora": LoraConfig(r=8, alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterns": LoraConfig(
        r=4,
        target_modules=["q_proj", "o_proj", "gate_proj"],
        rank_pattern={"o_proj": 2, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={"gate_proj": 3},
    ),
    "dora": LoraConfig(r=4, use_dora=True, target_modules=["k_proj", "up_proj"]),
    "vera": LoraConfig(r=8, use_vera=True, target_modules=["q_proj", "v_proj"]),
}


def save(directory, kind, seed):
    model = tiny_llama()
    lorakit.add_adapter(model, CONFIGS[kind])
    torch.manual_seed(seed)
    randomize_adapters(model, std=0.3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear) and "lora_magnitude_vector" in module._modules:
                m = module.lora_magnitude_vector["default"]
                m.mul_(torch.linspace(0.6, 1.4, m.numel()))
    path = directory / kind
    lorakit.save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {kind: save(root, kind, seed) for seed, kind in enumerate(CONFIGS)}


class Recorder:
    def __init__(self):
        self.events, self.loads = [], []

    def slot_event(self, kind):
        self.events.append(kind)

    def adapter_loaded(self, name, tier, seconds):
        self.loads.append((name, tier))

    def request_finished(self, *args):
        pass

    def step(self, *args):
        pass


def acquire(pool, name, urgent=False, timeout=30.0):
    """Ask until the pool gives a route (the host read runs in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        route = pool.acquire(name, urgent=urgent)
        if route is not None or time.monotonic() > deadline:
            return route
        time.sleep(0.01)


def alone(directory, ids):
    """Logits of ``ids`` with the adapter in ``directory`` alone (None: the base model)."""
    model = tiny_llama()
    if directory is not None:
        lorakit.load_adapter(model, directory)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "mode, sgmv",
    [
        ("no_grad", "sorted"),
        ("inference_mode", "sorted"),
        ("no_grad", "runs"),
        ("no_grad", "rows"),
        ("inference_mode", "lora-first"),
        ("no_grad", "lora-first-dora"),
    ],
)
def test_mixed_batch_rows_equal_single_adapter_runs(adapter_dirs, mode, sgmv, monkeypatch):
    """Rows of the prefill by SGMV with the tokens sorted by slot, or multiplied in their runs, or
    by batched row GEMMs after the base GEMM, or before it (the base GEMM accumulating onto them)."""
    from lorakit.kernels import multi_lora

    monkeypatch.setattr(tuning, "SEGMENT_TOKENS", float("inf") if sgmv == "sorted" else 1)
    monkeypatch.setattr(tuning, "BATCHED_ROWS", sgmv != "runs")
    monkeypatch.setattr(tuning, "LORA_FIRST", sgmv.startswith("lora-first"))
    first, shared = [], []
    real, real_shared = multi_lora.lora_then_base, multi_lora.siblings_then_base
    monkeypatch.setattr(
        "lorakit.layers.linear.lora_then_base", lambda *a: (out := real(*a)) is not None and first.append(1) or out
    )
    monkeypatch.setattr(
        "lorakit.layers.slot_siblings.siblings_then_base",
        lambda *a: (out := real_shared(*a)) is not None and shared.append(len(out)) or out,
    )
    model = tiny_llama()
    pool = AdapterPool(model, max_loras=4)
    for kind, path in adapter_dirs.items():
        pool.register(kind, path)
    # A named adapter (VeRA's) in the batch takes the layers' general routed path; without one,
    # the lean path (``slots_only``), where a prefill's rows may go first.
    sixth = "rslora" if sgmv.startswith("lora-first") else "vera"
    # Without a DoRA slot, q, k, v and gate, up share their shrink (layers/slot_siblings.py).
    dora = "patterns" if sgmv == "lora-first" else "dora"
    rows = ["plain", None, "rslora", "patterns", dora, sixth, "plain", dora]
    ids = torch.randint(0, 128, (len(rows), 6))
    routes = [acquire(pool, name) for name in rows]
    assert all(r is not None for r in routes)
    assert (routes[5].slot == 0 and routes[5].model_name is not None) == (sixth == "vera")  # VeRA: named
    assert routes[0].slot == routes[6].slot != 0 and routes[1] is BASE_ROUTE
    pool.set_rows(routes)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        got = model(ids).logits
    for i, name in enumerate(rows):
        want = alone(adapter_dirs[name] if name else None, ids[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], want, rtol=1e-5, atol=1e-5, msg=f"row {i} ({name})")
    assert bool(first) == sgmv.startswith("lora-first")  # layers without a DoRA slot took it
    assert shared == ([3, 2] * 2 if sgmv == "lora-first" else [])  # per layer: q, k, v; gate, up
    # Decode: one token per row, the same routes, another order of rows.
    order = [4, 0, 2, 5, 1]
    pool.set_rows([routes[i] for i in order])
    step = torch.randint(0, 128, (len(order), 1))
    with context():
        got = model(step).logits
    for k, i in enumerate(order):
        want = alone(adapter_dirs[rows[i]] if rows[i] else None, step[k : k + 1])
        torch.testing.assert_close(got[k : k + 1], want, rtol=1e-5, atol=1e-5)
    for route in routes:
        pool.release(route)
    pool.close()


def test_slots_lru_eviction_and_draining(adapter_dirs):
    model = tiny_llama()
    recorder = Recorder()
    pool = AdapterPool(model, max_loras=2, observer=recorder)
    for kind in ("plain", "rslora", "patterns"):
        pool.register(kind, adapter_dirs[kind])
    a = acquire(pool, "plain")
    b = acquire(pool, "rslora")
    assert {a.slot, b.slot} == {1, 2} and recorder.events == ["miss", "miss"]
    assert ("plain", "host") in recorder.loads and ("plain", "device") in recorder.loads
    assert acquire(pool, "patterns", timeout=0.5) is None  # both slots pinned
    pool.release(a)
    c = acquire(pool, "patterns")
    assert c.slot == a.slot and recorder.events[-2:] == ["eviction", "miss"]
    b2 = pool.acquire("rslora")
    assert b2.slot == b.slot and recorder.events[-1] == "hit"
    # Every slot pinned: an urgent request marks the least recently used slot as draining...
    assert pool.acquire("plain", urgent=True) is None
    assert pool.acquire("patterns") is None  # ...which new rows of its adapter no longer get
    pool.release(c)
    route = pool.acquire("plain", urgent=True)  # its rows done: the waiting adapter takes it
    assert route is not None and route.slot == c.slot
    assert pool.acquire("patterns") is None  # now it waits in turn
    for r in (b, b2, route):
        pool.release(r)
    assert pool.acquire("patterns") is not None
    pool.close()


def test_unregister_while_pinned(adapter_dirs):
    model = tiny_llama()
    pool = AdapterPool(model, max_loras=2)
    pool.register("d", adapter_dirs["dora"])
    pool.register("v", adapter_dirs["vera"])
    d, v = acquire(pool, "d"), acquire(pool, "v")
    pool.unregister("d")
    pool.unregister("v")
    assert pool.names() == []
    with pytest.raises(AdapterNameError):
        pool.acquire("d")
    ids = torch.randint(0, 128, (2, 5))
    pool.set_rows([d, v])  # rows in flight keep their adapters
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got[:1], alone(adapter_dirs["dora"], ids[:1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:], alone(adapter_dirs["vera"], ids[1:]), rtol=1e-5, atol=1e-5)
    pool.release(d)
    pool.release(v)
    pool.set_rows([BASE_ROUTE])
    assert lorakit.adapters(model) == []  # the named adapter left with its last row
    assert all(not m.slot_stack.A.any() for m in model.modules() if isinstance(m, LoraLinear))
    pool.register("d", adapter_dirs["plain"])  # the name is free again, for another adapter
    route = acquire(pool, "d")
    pool.set_rows([route])
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:1]).logits, alone(adapter_dirs["plain"], ids[:1]), rtol=1e-5, atol=1e-5)
    pool.close()


def test_register_checks(adapter_dirs, tmp_path):
    model = tiny_llama()
    pool = AdapterPool(model, max_loras=2, max_lora_rank=4)
    with pytest.raises(AdapterNameError, match="not allowed"):
        pool.register("bad name", adapter_dirs["plain"])
    with pytest.raises(AdapterNameError, match="not allowed"):
        pool.register("x" * 129, adapter_dirs["plain"])
    pool.register("org/model:v1.2_a-b", adapter_dirs["plain"])
    with pytest.raises(AdapterNameError, match="already registered"):
        pool.register("org/model:v1.2_a-b", adapter_dirs["plain"])
    with pytest.raises(ConfigError, match="rank 8, over the server's maximum 4"):
        pool.register("big", adapter_dirs["rslora"])
    with pytest.raises(AdapterFileError, match="does not exist"):
        pool.register("none", tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        pool.register("broken", broken)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    config = json.loads((adapter_dirs["plain"] / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["qq_proj"]}))
    with pytest.raises(ConfigError, match="does not fit this model"):
        pool.register("foreign", foreign)
    with pytest.raises(AdapterNameError):
        pool.unregister("never")
    assert pool.names() == ["org/model:v1.2_a-b"]
    pool.close()


def test_bad_weights_fail_the_request_not_the_pool(adapter_dirs, tmp_path):
    model = tiny_llama()
    pool = AdapterPool(model, max_loras=2)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter_dirs["plain"] / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    pool.register("bad", bad)
    pool.register("good", adapter_dirs["plain"])
    assert pool.acquire("bad") is None  # read in the background
    with pytest.raises(AdapterLoadError, match="'bad' could not be loaded"):
        acquire(pool, "bad")
    with pytest.raises(AdapterLoadError):
        pool.acquire("bad")
    assert acquire(pool, "good") is not None
    pool.close()


def test_paths_must_stay_inside_base_dir(adapter_dirs, tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / "inside").symlink_to(adapter_dirs["plain"], target_is_directory=True)  # resolves outside
    local = root / "local"
    local.mkdir()
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        (local / file).write_bytes((adapter_dirs["plain"] / file).read_bytes())
    pool = AdapterPool(tiny_llama(), base_dir=root)
    for escape in ("../x", str(adapter_dirs["plain"]), "inside", "local/../../x"):
        with pytest.raises(AdapterFileError, match="outside"):
            pool.register("e", escape)
    pool.register("ok", "local")
    assert pool.directory("ok") == local.resolve()
    pool.close()


def test_host_tier_is_bounded(adapter_dirs):
    pool = AdapterPool(tiny_llama(), max_loras=1, max_cpu_loras=2)
    for kind in ("plain", "rslora", "patterns"):
        pool.register(kind, adapter_dirs[kind])
        route = acquire(pool, kind)
        pool.release(route)
    assert pool.stats()["host"] == 2 and pool.stats()["slots_used"] == 1
    pool.close()


def test_layout_version_marks_what_cuda_graphs_must_capture_again(adapter_dirs):
    """A stack made or reallocated, or a named adapter loaded, bumps the layout; writing an adapter
    into existing stacks of its rank does not. ``fix_slots`` routes by a slot buffer."""
    from lorakit.kernels.multi_lora import SlotPlan

    model = tiny_llama()
    pool = AdapterPool(model, max_loras=1, max_lora_rank=8)
    for kind in ("plain", "dora", "vera"):
        pool.register(kind, adapter_dirs[kind])
    start = pool.layout_version
    plain = acquire(pool, "plain")
    after_plain = pool.layout_version
    assert after_plain > start  # stacks made
    pool.release(plain)
    pool.release(acquire(pool, "plain"))
    assert pool.layout_version == after_plain  # a hit: nothing new
    dora = acquire(pool, "dora")  # its stacks get their DoRA table (a new tensor)
    assert pool.layout_version > after_plain
    grown = pool.layout_version
    pool.release(dora)
    pool.release(acquire(pool, "plain"))  # written back into the same tensors
    assert pool.layout_version == grown
    assert pool.route_slots([BASE_ROUTE]) == [0]
    vera = acquire(pool, "vera")  # a named adapter in the model
    assert pool.layout_version > grown
    assert pool.route_slots([BASE_ROUTE, vera]) is None
    assert pool.route_slots([BASE_ROUTE]) is None  # its wrappers are in every forward while loaded
    pool.release(vera)
    buffer = torch.zeros(3, dtype=torch.int64)
    pool.fix_slots(buffer)
    plan = pool.routing.slot_plan(3, 3, torch.device("cpu"))
    assert isinstance(plan, SlotPlan) and plan.graphed and plan.token_slots is buffer
    pool.set_rows([BASE_ROUTE] * 3)
    assert pool.routing.slot_plan(3, 3, torch.device("cpu")) is None
    pool.close()


def test_slot_only_batches_take_the_lean_path(adapter_dirs):
    """Rows of slots and the base only (no named adapter): each layer's ``slots_only`` call, equal
    to each row run with its adapter alone (DoRA's term included)."""
    model = tiny_llama()
    pool = AdapterPool(model, max_loras=4)
    rows = ["dora", None, "plain", "rslora", "dora"]
    for name in set(rows) - {None}:
        pool.register(name, adapter_dirs[name])
    routes = [acquire(pool, name) for name in rows]
    pool.set_rows(routes)
    ids = torch.randint(0, 128, (len(rows), 1))
    layer = model.model.layers[0].self_attn.k_proj  # a DoRA slot and a plain one
    with torch.no_grad():
        assert layer.slots_only(torch.randn(len(rows), 1, layer.in_features)) is not None
        got = model(ids).logits
    for i, name in enumerate(rows):
        want = alone(adapter_dirs[name] if name else None, ids[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], want, rtol=1e-5, atol=1e-5, msg=f"row {i} ({name})")
    pool.close()


def test_shared_siblings_step_aside_for_autocast_and_hooks(adapter_dirs, monkeypatch):
    """A prefill's rows under autocast run (each GEMM in autocast's dtype), and a hook on a
    sibling's base layer sees that layer run: the shared call, which would run the sibling's GEMM
    itself, steps aside for both."""
    from lorakit.kernels import multi_lora

    monkeypatch.setattr(tuning, "SEGMENT_TOKENS", 1)  # rows of 6 tokens: batched row GEMMs
    shared = []
    real = multi_lora.siblings_then_base
    monkeypatch.setattr(
        "lorakit.layers.slot_siblings.siblings_then_base",
        lambda *a: (out := real(*a)) is not None and shared.append(len(out)) or out,
    )
    model = tiny_llama()
    pool = AdapterPool(model, max_loras=2)
    pool.register("plain", adapter_dirs["plain"])
    route = acquire(pool, "plain")
    ids = torch.randint(0, 128, (2, 6))
    pool.set_rows([route, BASE_ROUTE])
    with torch.no_grad():
        want = model(ids).logits
    assert shared == [3, 2, 3, 2]
    shared.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids).logits.float()
    assert not shared and ((got - want).abs().max() / want.abs().max()).item() < 0.05
    seen = []
    base = model.model.layers[0].self_attn.k_proj.base_layer
    base.register_forward_pre_hook(lambda module, args: seen.append(module))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert seen == [base] and shared == [2, 3, 2]  # layer 0's attention alone, the rest shared
    pool.release(route)
    pool.close()


def test_sibling_records_follow_the_stacks(adapter_dirs):
    """Sibling records cover the projections that serve slots, and are made again when an adapter
    brings stacks to more of them."""
    model = tiny_llama()
    pool = AdapterPool(model, max_loras=2)
    pool.register("rslora", adapter_dirs["rslora"])  # q, v and down
    pool.register("plain", adapter_dirs["plain"])  # every linear layer
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    first = acquire(pool, "rslora")
    assert attention.q_proj.slot_siblings.layers == (attention.q_proj, attention.v_proj)
    assert "slot_siblings" not in mlp.up_proj.__dict__  # down alone: no pair in the MLP
    second = acquire(pool, "plain")
    record = attention.k_proj.slot_siblings
    assert record.layers == (attention.q_proj, attention.k_proj, attention.v_proj)
    assert attention.q_proj.slot_siblings is record and mlp.gate_proj.slot_siblings.layers == (
        mlp.gate_proj,
        mlp.up_proj,
    )
    assert "slot_siblings" not in attention.o_proj.__dict__
    for route in (first, second):
        pool.release(route)
    pool.close()


def test_a_sibling_called_on_another_input_runs_alone(adapter_dirs, monkeypatch):
    """What the first sibling computed is kept for the very same input tensor only: k called on
    another tensor gets k of that tensor."""
    monkeypatch.setattr(tuning, "SEGMENT_TOKENS", 1)  # rows of 6 tokens: batched row GEMMs, shared shrink
    model = tiny_llama()
    pool = AdapterPool(model, max_loras=2)
    pool.register("plain", adapter_dirs["plain"])
    route = acquire(pool, "plain")
    pool.set_rows([route, BASE_ROUTE])
    attention = model.model.layers[0].self_attn
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        attention.q_proj(x)  # the shared call: k and v of x kept
        kept_k = attention.k_proj.slot_siblings.kept[1][1]
        got = attention.k_proj(2 * x)
        monkeypatch.setattr(tuning, "SHARED_SIBLINGS", False)
        want = attention.k_proj(2 * x)
        alone_k = attention.k_proj(x)
    torch.testing.assert_close(kept_k, alone_k, rtol=1e-5, atol=1e-5)  # the shared call kept k of x
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    pool.release(route)
    pool.close()
