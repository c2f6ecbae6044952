"""Mixed-adapter forward benchmark: one batch whose rows use different adapters, lorakit vs PEFT
vs the base model, measured in one process (issue #19's table).

    python bench/mixed_adapters.py --preset cpu-small      # CPU: SmolLM2-135M shape, fp32, small batches
    python bench/mixed_adapters.py --preset llama-1b       # GPU: 1.2B Llama shape, bf16, r16 all-linear
    python bench/mixed_adapters.py --preset llama-1b --cold-only   # only the cold-adapter timing

Cases, each a forward under ``torch.inference_mode`` of a decode batch (rows x 1 token) and of a
prefill batch (rows x tokens), row i using adapter i mod 8:
- base: the same randomly initialised model with no lorakit modules at all (the floor);
- lorakit one adapter: one adapter active (the fused single-adapter path);
- lorakit adapter_batch: 8 named adapters mixed with ``lorakit.adapter_batch``;
- lorakit pool: 8 adapters in an ``AdapterPool``'s device slots (what ``lorakit serve`` runs);
- lorakit pool, sorted: the same with SGMV always sorting the tokens by slot (no runs: the path
  before segment SGMV, ``tuning.SEGMENT_TOKENS``);
- lorakit pool, runs: the same with a prefill's rows multiplied by SGMV over runs
  (``tuning.BATCHED_ROWS`` off: the path before batched row GEMMs);
- lorakit pool, two launches: the same with BGMV as a shrink and an expand launch in eager
  calls too (``tuning.BGMV_ONE_LAUNCH`` False; its default, "auto", launches once outside a
  graph and twice inside one; decode batches);
- lorakit pool, base first: the same with a prefill's batched rows added after the base GEMM
  (``tuning.LORA_FIRST`` off: the expand reads and writes the base output; by default the
  products are written first and the base GEMM accumulates onto them);
- lorakit pool, no siblings: each projection alone (``tuning.SHARED_SIBLINGS`` off; by default
  q, k, v and gate, up share their shrink in a prefill, their BGMV launches in a decode batch);
- lorakit pool, no slot MLP: the gated MLP through its layers one by one (``tuning.SLOT_MLP`` off;
  by default, on a GPU, one fused pass for a prefill's rows and a decode batch:
  ``kernels/slot_mlp.py``);
- PEFT one adapter / PEFT mixed: PEFT's ``adapter_names=`` forward argument;
- base graph / lorakit pool graph (decode only, CUDA): the base model's and the slot pool's
  decode forward captured once in a CUDA graph (``serve/cuda_graph.py``) and replayed, with the
  rows' slots written into the graph's slot buffer before each replay (what a serving engine
  does for its decode steps: the forward's launches leave the host).
  lorakit pool graph, one launch: the same with BGMV in one launch inside the graph too.
  lorakit pool graph, bn64 / bn256 / split1: the same with the expand's output units per program
  at 64 or 256 (``triton_bgmv.BLOCK_N``, 128) or the shrink unsplit over d_in (tuning trials).
  lorakit pool graph, no siblings: each projection its own two launches (``tuning.SHARED_SIBLINGS``
  off; by default q, k, v share two, and gate, up two: ``layers/slot_siblings.py``).
  lorakit pool graph, no slot MLP: the MLP's layers one by one in the graph (``tuning.SLOT_MLP``
  off; by default its adapters take three launches with the gate: ``kernels/slot_mlp.py``).
Cases are interleaved step by step, so a machine whose speed drifts slows each alike; the table
gives medians and the ratio to the base. Then the cold-adapter time: an adapter already in host
memory written into a device slot (the pool's ``acquire`` of an adapter whose slot was evicted).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from shapes import LLAMA_1B, SMOLLM2_135M

PRESETS = {
    # SmolLM2-135M (the embedded model's shape): 30 layers, hidden 576, 9/3 heads.
    "cpu-small": dict(
        model=SMOLLM2_135M,
        dtype="float32",
        decode=(64, 1),
        prefill=(4, 128),
        rank=16,
        device="cpu",
    ),
    # The 1.2B Llama shape of the issue: hidden 2048, 16 layers, 32/8 heads, vocab 128256.
    "llama-1b": dict(
        model=LLAMA_1B,
        dtype="bfloat16",
        decode=(64, 1),
        prefill=(32, 512),
        rank=16,
        device="cuda",
    ),
}
ADAPTERS = 8
CASES = [
    "base",
    "lorakit-one",
    "lorakit-adapter_batch",
    "lorakit-pool",
    "lorakit-pool-sorted",
    "lorakit-pool-runs",
    "peft-one",
    "peft-mixed",
    "lorakit-pool-two-launch",
    "lorakit-pool-base-first",
    "lorakit-pool-no-siblings",
    "lorakit-pool-no-slot-mlp",
    "base-graph",
    "lorakit-pool-graph",
    "lorakit-pool-graph-one-launch",
    "lorakit-pool-graph-bn64",
    "lorakit-pool-graph-bn256",
    "lorakit-pool-graph-split1",
    "lorakit-pool-graph-no-siblings",
    "lorakit-pool-graph-no-slot-mlp",
]
DECODE_ONLY = {case for case in CASES if "graph" in case}


def build_base(preset: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**preset["model"], attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, preset["dtype"])).eval()


def lorakit_config(rank: int):
    from lorakit import LoraConfig

    return LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear", init="gaussian")


def save_adapters(preset: dict, device: str, root: Path, count: int) -> list[Path]:
    """``count`` random r-``rank`` all-linear adapters (B non-zero) saved under ``root``."""
    import lorakit
    from lorakit.state import lora_layers

    model = build_base(preset, device)
    lorakit.add_adapter(model, lorakit_config(preset["rank"]))
    paths = []
    for k in range(count):
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                for p in (layer.lora_A["default"], layer.lora_B["default"]):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        paths.append(root / f"adapter{k}")
        lorakit.save_adapter(model, paths[-1])
    return paths


def build_cases(preset: dict, device: str, dirs: list[Path], cases: list[str]):
    """case -> (forward(ids) for a decode/prefill batch) closures."""
    import lorakit
    from lorakit.serve.adapter_pool import AdapterPool

    names = [f"a{k}" for k in range(ADAPTERS)]
    built = {}
    if {"base", "base-graph"} & set(cases):
        base = build_base(preset, device)
        built["base"] = lambda ids: base(ids, use_cache=False)
        built["base-graph"] = graphed(lambda ids: base(ids, use_cache=False).logits)
    if {"lorakit-one", "lorakit-adapter_batch"} & set(cases):
        model = build_base(preset, device)
        for name, path in zip(names, dirs):
            lorakit.load_adapter(model, path, name=name)

        def one(ids, model=model):
            lorakit.set_adapter(model, names[0])
            return model(ids, use_cache=False)

        def mixed(ids, model=model):
            with lorakit.adapter_batch(model, [names[i % ADAPTERS] for i in range(ids.shape[0])]):
                return model(ids, use_cache=False)

        built["lorakit-one"], built["lorakit-adapter_batch"] = one, mixed
    if any(case.startswith("lorakit-pool") for case in cases):
        from lorakit.kernels import triton_bgmv, tuning

        model = build_base(preset, device)
        pool = AdapterPool(model, max_loras=ADAPTERS, max_lora_rank=preset["rank"])
        for name, path in zip(names, dirs):
            pool.register(name, path)
        routes = [acquire(pool, name) for name in names]

        def pooled(ids, model=model, pool=pool, routes=routes):
            pool.set_rows([routes[i % ADAPTERS] for i in range(ids.shape[0])])
            return model(ids, use_cache=False)

        def pool_slots(ids, pool=pool, routes=routes):
            slots = torch.tensor([routes[i % ADAPTERS].slot for i in range(ids.shape[0])], device=ids.device)
            pool.fix_slots(slots)
            return {"slots": slots}

        def knob(fn, name, value, module=tuning):
            def call(ids):
                kept = getattr(module, name)
                setattr(module, name, value)
                try:
                    return fn(ids)
                finally:
                    setattr(module, name, kept)

            return call

        def logits(ids, slots, model=model):
            return model(ids, use_cache=False).logits

        built["lorakit-pool"] = pooled
        built["lorakit-pool-sorted"] = knob(pooled, "SEGMENT_TOKENS", float("inf"))
        built["lorakit-pool-runs"] = knob(pooled, "BATCHED_ROWS", False)
        built["lorakit-pool-two-launch"] = knob(pooled, "BGMV_ONE_LAUNCH", False)
        built["lorakit-pool-base-first"] = knob(pooled, "LORA_FIRST", False)
        built["lorakit-pool-no-siblings"] = knob(pooled, "SHARED_SIBLINGS", False)
        built["lorakit-pool-no-slot-mlp"] = knob(pooled, "SLOT_MLP", False)
        built["lorakit-pool-graph-no-siblings"] = knob(graphed(logits, pool_slots), "SHARED_SIBLINGS", False)
        built["lorakit-pool-graph-no-slot-mlp"] = knob(graphed(logits, pool_slots), "SLOT_MLP", False)
        built["lorakit-pool-graph"] = graphed(logits, pool_slots)
        built["lorakit-pool-graph-one-launch"] = knob(graphed(logits, pool_slots), "BGMV_ONE_LAUNCH", True)
        for units in (64, 256):  # the expand's output units per program (BLOCK_N, 128 by default)
            built[f"lorakit-pool-graph-bn{units}"] = knob(graphed(logits, pool_slots), "BLOCK_N", units, triton_bgmv)
        # the shrink unsplit: one program per token over all of d_in
        one = lambda *args: 1  # noqa: E731
        built["lorakit-pool-graph-split1"] = knob(graphed(logits, pool_slots), "programs_per_token", one, triton_bgmv)
    if {"peft-one", "peft-mixed"} & set(cases):
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(build_base(preset, device), str(dirs[0]), adapter_name=names[0])
        for name, path in zip(names[1:], dirs[1:]):
            peft_model.load_adapter(str(path), adapter_name=name)
        peft_model.eval()

        def peft_one(ids, model=peft_model):
            model.set_adapter(names[0])
            return model(input_ids=ids, use_cache=False)

        def peft_mixed(ids, model=peft_model):
            return model(input_ids=ids, use_cache=False, adapter_names=[names[i % ADAPTERS] for i in range(len(ids))])

        built["peft-one"], built["peft-mixed"] = peft_one, peft_mixed
    return {case: built[case] for case in cases}


def graphed(forward, extra_inputs=None):
    """``forward(ids, **extra)`` captured in a CUDA graph at its first call for each ids shape,
    replayed after; ``extra_inputs(ids)`` gives the other buffers the graph reads (a pool's slots)."""
    from lorakit.serve.cuda_graph import CapturedCall

    graphs = {}

    def call(ids):
        if ids.shape not in graphs:
            extra = extra_inputs(ids) if extra_inputs is not None else {}
            graphs[ids.shape] = CapturedCall(forward, {"ids": ids.clone(), **extra})
        return graphs[ids.shape](ids=ids)

    return call


def acquire(pool, name: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while (route := pool.acquire(name)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"adapter {name} did not load in {timeout} s")
        time.sleep(0.005)
    return route


def timed(fn, ids, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        fn(ids)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(built: dict, ids: torch.Tensor, device: str, warmup: int, steps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {case: [] for case in built}
    for i in range(warmup + steps):
        for case, fn in built.items():
            elapsed = timed(fn, ids, device)
            if i >= warmup:
                times[case].append(elapsed)
    return {case: statistics.median(t) for case, t in times.items()}


def graph_agreement(built: dict, ids: torch.Tensor) -> dict[str, float]:
    """Max |graphed - eager| / max |eager| of the decode logits, per graphed case."""
    pairs = {"base-graph": "base", "lorakit-pool-graph": "lorakit-pool"}
    result = {}
    with torch.inference_mode():
        for graph_case, eager_case in pairs.items():
            if graph_case in built and eager_case in built:
                eager = built[eager_case](ids).logits.float()
                got = built[graph_case](ids).float()
                result[graph_case] = ((got - eager).abs().max() / eager.abs().max()).item()
    return result


def cold_adapter(preset: dict, device: str, dirs: list[Path], repeats: int) -> float:
    """Median seconds for ``acquire`` to write an adapter already in host memory into a slot
    (one slot, two adapters taking turns: every acquire evicts the other)."""
    from lorakit.serve.adapter_pool import AdapterPool

    model = build_base(preset, device)
    pool = AdapterPool(model, max_loras=1, max_lora_rank=preset["rank"])
    pool.register("x", dirs[0])
    pool.register("y", dirs[1])
    for name in ("x", "y"):  # both read into host memory; modules wrapped
        pool.release(acquire(pool, name))
    times = []
    for k in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        route = pool.acquire("xy"[k % 2])
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert route is not None
        pool.release(route)
    pool.close()
    return statistics.median(times)


def versions() -> str:
    import transformers

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    parts.append(f"transformers {transformers.__version__}")
    try:
        import peft

        parts.append(f"peft {peft.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu-small")
    parser.add_argument("--device", default=None, help="default: the preset's")
    default_cases = [c for c in CASES if c not in DECODE_ONLY]
    parser.add_argument(
        "--cases", default=",".join(default_cases), help=f"comma-separated, from {CASES} (graphs: CUDA only)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--cold-repeats", type=int, default=10)
    parser.add_argument("--cold-only", action="store_true", help="only the cold-adapter timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    device = args.device or preset["device"]
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {CASES}")
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    results, agreement = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = save_adapters(preset, device, Path(tmp), 2 if args.cold_only else ADAPTERS)
        if not args.cold_only:
            built = build_cases(preset, device, dirs, cases)
            vocab = preset["model"]["vocab_size"]
            gen = torch.Generator().manual_seed(0)
            for shape in ("decode", "prefill"):
                rows, tokens = preset[shape]
                ids = torch.randint(0, vocab, (rows, tokens), generator=gen).to(device)
                chosen = {c: fn for c, fn in built.items() if shape == "decode" or c not in DECODE_ONLY}
                results[shape] = measure(chosen, ids, device, args.warmup, args.steps)
                if shape == "decode":
                    agreement = graph_agreement(built, ids)
            del built
        cold = cold_adapter(preset, device, dirs, args.cold_repeats)
    print(
        f"# {args.preset}, {preset['dtype']}, r{preset['rank']} all-linear, {ADAPTERS} adapters, {device_name}; "
        f"{versions()}"
    )
    if args.cold_only:
        print(f"cold adapter, host memory -> slot: {cold * 1e3:.1f} ms (median of {args.cold_repeats})")
        return 0
    (dr, dt), (pr, pt) = preset["decode"], preset["prefill"]
    print(f"| case | decode {dr}x{dt} | vs base | prefill {pr}x{pt} | vs base |")
    print("|---|---|---|---|---|")
    for case in cases:
        cells = []
        for shape in ("decode", "prefill"):
            t, base = results[shape].get(case), results[shape].get("base")
            if t is None:
                cells += ["-", "-"]
                continue
            cells += [f"{t * 1e3:.1f} ms", f"{t / base:.2f}x" if base else "-"]
            if case == "lorakit-pool-graph" and "base-graph" in results[shape]:
                cells[-1] += f" ({t / results[shape]['base-graph']:.2f}x base graph)"
        print(f"| {case} | " + " | ".join(cells) + " |")
    for case, err in agreement.items():
        print(f"{case}: decode logits vs eager, max |diff| / max |eager| = {err:.2e}")
    print(f"\ncold adapter, host memory -> slot: {cold * 1e3:.1f} ms (median of {args.cold_repeats})")
    if args.json:
        payload = {"preset": args.preset, "device": device_name, "versions": versions(), "results": results}
        Path(args.json).write_text(json.dumps({**payload, "cold_adapter_s": cold}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
