"""Engine throughput: tokens/s of the built-in engine with requests over 0 (base only), 1, 8, 64
distinct adapters in flight, and many adapters over fewer device slots — one process, no HTTP.

    python bench/serve_engine.py                           # CPU: a small Llama shape, fp32
    python bench/serve_engine.py --preset llama-1b         # GPU: 1.2B Llama shape, bf16, r16 all-linear
    python bench/serve_engine.py --cases base,1,8 --requests 32 --concurrency 16

Every case builds the same randomly initialised model (no download) and r16 all-linear adapters
with random factors (saved once to a temporary folder; "N" adapters register N names over at most
8 distinct folders, so host reads are real per name; the host tier holds every name unless
``--cpu-loras`` says fewer, so many adapters over fewer slots measure host -> slot writes, not
disk reads). Each case submits ``--requests`` requests of
``--prompt`` random tokens and ``--out`` greedy tokens (EOS ignored, so every request makes exactly
``--out`` tokens), keeping ``--concurrency`` in flight (the engine in the main thread, as
``lorakit serve`` runs it), under each ``--decode`` mode (on a GPU "auto" is CUDA graphs over
static rows; "dynamic" the joined-and-trimmed cache, eager), and reports generated tokens/s, the ratio
to the base-only case of the same run, p50/p99 request latency, slot hits/misses/evictions and the
median time of the engine's decode-only steps, and the time the batch's cache joins and trims
(BatchState.join/keep) took. The requests come from one asyncio event loop, as the HTTP server's
handlers take them. Before the timed requests each
case warms up untimed (``--no-warmup`` skips it), as a server does before it takes traffic: one
short request per adapter name (each read from disk into a slot; the slot counters start after)
and requests finishing one step apart, so every decode batch size the timed run meets has had its
CUDA graph captured. With two decode modes the greedy tokens of each case are compared between
them (bf16 batches are not batch-invariant, and a random model's logits are near ties, so
continuations part early; the first token, from the same prefill, should agree).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import platform
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from shapes import LLAMA_1B

PRESETS = {
    "cpu-small": dict(
        model=dict(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=4096,
            max_position_embeddings=4096,
        ),
        dtype="float32",
        requests=32,
        concurrency=16,
        prompt=32,
        out=32,
        slots=8,
        cases="base,1,8,64",
    ),
    "llama-1b": dict(
        model=dict(LLAMA_1B, max_position_embeddings=4096),
        dtype="bfloat16",
        requests=256,
        concurrency=64,
        prompt=128,
        out=128,
        slots=64,
        cases="base,1,8,64,512",
    ),
}


class Counter:
    """The observer: slot events, and nothing else."""

    def __init__(self) -> None:
        self.slots = {"hit": 0, "miss": 0, "eviction": 0}
        self.decode_steps: list[float] = []  # seconds of each engine step that only decoded

    def slot_event(self, kind: str) -> None:
        self.slots[kind] = self.slots.get(kind, 0) + 1

    def request_finished(self, *a, **k) -> None:
        pass

    def step(self, running: int, waiting: int, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        if decode_tokens and not prefill_tokens:
            self.decode_steps.append(seconds)

    def adapter_loaded(self, *a, **k) -> None:
        pass


class Tokenizer:
    """Just what the engine asks of a tokenizer, for a model with a random vocabulary."""

    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = None
    bos_token = None
    chat_template = None

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))

    def convert_tokens_to_ids(self, token):
        return None

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]

    unk_token_id = None


def build_model(preset: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**preset["model"])
    dtype = getattr(torch, preset["dtype"])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def save_adapters(preset: dict, folder: Path, count: int) -> list[Path]:
    """``count`` distinct r16 all-linear adapters with random factors, saved under ``folder``."""
    import lorakit
    from lorakit.state import lora_layers

    model = build_model(dict(preset, dtype="float32"), "cpu")
    dirs = []
    for i in range(count):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"), "a")
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B["a"].copy_(torch.randn(layer.lora_B["a"].shape, generator=gen) * 0.01)
        dirs.append(folder / f"adapter{i}")
        lorakit.save_adapter(model, dirs[-1], "a")
        lorakit.delete_adapter(model, "a")
    return dirs


def run_case(engine, names: list[str | None], args, vocab: int) -> dict:
    """The timed requests, from one asyncio event loop (as the HTTP server's handlers take their
    deltas: pushed by the engine thread with ``call_soon_threadsafe``), ``--concurrency`` in flight."""
    return asyncio.run(_run_case(engine, names, args, vocab))


async def _run_case(engine, names: list[str | None], args, vocab: int) -> dict:
    from lorakit.serve.requests import GenerationRequest, SamplingParams

    gen = torch.Generator().manual_seed(0)
    latencies: list[float] = []
    produced = 0
    outputs: dict[int, list[int]] = {}
    in_flight = asyncio.Semaphore(args.concurrency)
    loop = asyncio.get_running_loop()

    async def one(i: int, prompt: list[int]) -> None:
        nonlocal produced
        params = SamplingParams(max_tokens=args.out, temperature=0, ignore_eos=True)
        started = time.perf_counter()
        handle = engine.submit(GenerationRequest(f"r{i}", prompt, names[i % len(names)], params), loop=loop)
        tokens = []
        async for delta in handle:
            tokens += delta.token_ids
        latencies.append(time.perf_counter() - started)
        produced += delta.completion_tokens
        outputs[i] = tokens
        in_flight.release()

    tasks = []
    started = time.perf_counter()
    for i in range(args.requests):
        prompt = torch.randint(1, vocab, (args.prompt,), generator=gen).tolist()  # the same in every case
        await in_flight.acquire()
        tasks.append(asyncio.create_task(one(i, prompt)))
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "tokens_per_s": produced / seconds,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "tokens": produced,
        "outputs": outputs,
    }


def warm_up(engine, names: list[str | None], args, vocab: int) -> None:
    """Untimed: every adapter name once (read into a slot), and ``--concurrency`` requests that
    finish one decode step apart, so each decode batch size below it runs (and is captured) once."""
    from lorakit.serve.requests import GenerationRequest, SamplingParams

    gen = torch.Generator().manual_seed(1)
    count = max(args.concurrency, len(names))
    handles = []
    for i in range(count):
        prompt = torch.randint(1, vocab, (args.prompt,), generator=gen).tolist()
        params = SamplingParams(max_tokens=2 + i % args.concurrency, temperature=0, ignore_eos=True)
        handles.append(engine.submit(GenerationRequest(f"warm{i}", prompt, names[i % len(names)], params)))
    for handle in handles:
        handle.collect(timeout=600)


def agree(first: dict[int, list[int]], second: dict[int, list[int]]) -> str:
    """How alike two runs' greedy tokens are, request by request."""
    prefixes = []
    for i, tokens in first.items():
        other = second[i]
        common = next((k for k, (a, b) in enumerate(zip(tokens, other)) if a != b), min(len(tokens), len(other)))
        prefixes.append(common)
    n = len(prefixes)
    same_first = sum(p > 0 for p in prefixes)
    same_all = sum(first[i] == second[i] for i in first)
    return (
        f"first token equal in {same_first} of {n}, all tokens in {same_all} of {n}, "
        f"mean common prefix {statistics.mean(prefixes):.1f} tokens"
    )


def run_in_main_thread(engine, names, args, vocab: int, counter: Counter) -> dict:
    """``run_case`` from a client thread while the engine runs in this (the main) thread, as
    ``lorakit serve`` runs it."""
    outcome: dict = {}

    def client() -> None:
        while not engine.is_alive():
            time.sleep(0.01)
        try:
            if args.warmup:
                warm_up(engine, names, args, vocab)
                counter.slots = dict.fromkeys(counter.slots, 0)
                counter.decode_steps.clear()
            outcome.update(run_case(engine, names, args, vocab))
        finally:
            engine.stop(timeout=0)

    thread = threading.Thread(target=client)
    thread.start()
    if args.profile:  # the engine's thread only (the client's runs apart), warm-up included
        profile = cProfile.Profile()
        profile.runcall(engine.run)
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
    else:
        engine.run()
    thread.join()
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu-small")
    parser.add_argument("--cases", help="comma list of: base, or a number of distinct adapters in flight")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--prompt", type=int, help="prompt tokens per request")
    parser.add_argument("--out", type=int, help="generated tokens per request")
    parser.add_argument("--slots", type=int, help="device slots (--max-loras)")
    parser.add_argument(
        "--cpu-loras",
        type=int,
        help="host-memory tier (--max-cpu-loras); default: every adapter of the case, as S-LoRA keeps them all",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="print the engine thread's N costliest functions by own time (cProfile) after each case",
    )
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="time the first requests too")
    parser.add_argument(
        "--decode",
        default="auto",
        help="comma list of the engine's decode modes to run each case under: auto, dynamic, static, graphs; "
        "a mode ending -wait (graphs-wait) runs static rows without overlapping the host's work (Engine.overlap)",
    )
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    for key in ("requests", "concurrency", "prompt", "out", "slots", "cases"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])

    from lorakit.serve import batch_state
    from lorakit.serve.adapter_pool import AdapterPool
    from lorakit.serve.engine import Engine, EngineLimits

    copy_seconds = [0.0]
    for method in ("join", "keep"):
        original = getattr(batch_state.BatchState, method)

        def timed(self, *a, _original=original, **k):
            started = time.perf_counter()
            try:
                return _original(self, *a, **k)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                copy_seconds[0] += time.perf_counter() - started

        setattr(batch_state.BatchState, method, timed)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# {platform.node()} {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}")
    print(f"# torch {torch.__version__}, preset {args.preset}, {args.requests} requests")
    print(f"# concurrency {args.concurrency}, {args.prompt} prompt / {args.out} generated tokens, {args.slots} slots")
    cases = args.cases.split(",")
    counts = [int(c) for c in cases if c != "base"]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = save_adapters(preset, Path(tmp), min(8, max(counts, default=1)))
        print(
            "| decode | case | tokens/s | vs base | p50 s | p99 s | decode step ms (median) "
            "| slot hits/misses/evictions | join+trim s |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        base_rates, first_outputs, agreement = {}, {}, []
        for decode, case in [(d, c) for d in args.decode.split(",") for c in cases]:
            model = build_model(preset, device)
            counter = Counter()
            n = 0 if case == "base" else int(case)
            host = args.cpu_loras or max(64, args.slots, n)
            pool = AdapterPool(model, max_loras=args.slots, max_cpu_loras=host, observer=counter)
            names: list[str | None] = [None] if n == 0 else [f"a{i}" for i in range(n)]
            for i in range(n):
                pool.register(f"a{i}", dirs[i % len(dirs)])
            limits = EngineLimits(
                max_num_seqs=args.concurrency,
                max_queue=max(args.requests, args.concurrency, n) + 1,  # the warm-up's requests too
                max_prefill_tokens=16 * args.prompt,
            )
            tokenizer = Tokenizer(preset["model"]["vocab_size"])
            mode = decode.removesuffix("-wait")
            engine = Engine(model, tokenizer, pool, model_id="bench", limits=limits, decode=mode, observer=counter)
            engine.overlap = not decode.endswith("-wait")
            copy_seconds[0] = 0.0
            result = run_in_main_thread(engine, names, args, preset["model"]["vocab_size"], counter)
            if case == "base":
                base_rates.setdefault(decode, result["tokens_per_s"])
            reference = first_outputs.setdefault(case, (decode, result["outputs"]))
            if reference[0] != decode:
                compared = agree(reference[1], result["outputs"])
                agreement.append(f"case {case}: {decode} vs {reference[0]}: {compared}")
            base_rate = base_rates.get(decode)
            ratio = f"{result['tokens_per_s'] / base_rate:.2f}" if base_rate else "-"
            s = counter.slots
            label = engine.decode_mode + ("" if engine.overlap else " (waits)")
            print(
                f"| {label} | {case} | {result['tokens_per_s']:.1f} | {ratio} | {result['p50']:.2f} | "
                f"{result['p99']:.2f} | {1000 * statistics.median(counter.decode_steps or [0]):.1f} | "
                f"{s['hit']}/{s['miss']}/{s['eviction']} | {copy_seconds[0]:.2f} |"
            )
            sys.stdout.flush()
            del engine, pool, model
            if device == "cuda":
                torch.cuda.empty_cache()
        for line in agreement:
            print(line)


if __name__ == "__main__":
    main()
