"""A bounded load test of an OpenAI-compatible server over loopback: N requests at concurrency C,
spread over the base model and every adapter it lists, sent with the official ``openai`` client.

    python bench/serve_load.py --url http://127.0.0.1:8000/v1 [--api-key K]
    python bench/serve_load.py --serve --adapter a=DIR --adapter b=DIR ... [--model M] [--serve-arg=--max-num-seqs=16]

With ``--serve`` it starts ``lorakit serve`` on a free 127.0.0.1 port as a subprocess (the given
adapters, ``--serve-arg`` passed on), waits for it, runs, and stops it; the same run against
``vllm serve`` is ``--url`` with vLLM's address, so the two engines compare on one workload.

Every request is greedy (temperature 0) with ``ignore_eos`` (vLLM's extension, which lorakit
serve takes too), so each answer is exactly ``--max-tokens`` long and tokens/s compares like with
like. Prompts are seeded and of varied length. Reported: requests sent, answered, lost (no
answer at all), refused by status (a 5xx fails the run), latency p50/p99, time to first token
(streamed runs), generated tokens per second over the whole run's wall time. Exit status 1 when
a request was lost or answered 5xx. Loopback only: ``--url`` must point at this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlparse

WORDS = (
    "the model reads a prompt and answers with a few tokens while other requests for other adapters share "
    "its batch so that many small fine tunes run over one base at once on one machine"
).split()


@dataclass
class Outcome:
    model: str
    status: int | None  # HTTP status; None: no answer at all (connection lost, timeout)
    seconds: float
    first_token: float | None = None
    completion_tokens: int = 0
    error: str | None = None


def prompts(n: int, seed: int, min_words: int = 4, max_words: int = 200) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


async def one_request(client, model: str, prompt: str, max_tokens: int, stream: bool) -> Outcome:
    import openai

    started = time.perf_counter()
    kwargs = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    try:
        if not stream:
            result = await client.completions.create(**kwargs)
            tokens = result.usage.completion_tokens if result.usage else 0
            return Outcome(model, 200, time.perf_counter() - started, completion_tokens=tokens)
        first, tokens = None, 0
        chunks = await client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
        async for chunk in chunks:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - started
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return Outcome(model, 200, time.perf_counter() - started, first, tokens)
    except openai.APIStatusError as exc:
        return Outcome(model, exc.status_code, time.perf_counter() - started, error=str(exc)[:200])
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        return Outcome(model, None, time.perf_counter() - started, error=type(exc).__name__)


async def run_load(
    base_url: str,
    *,
    api_key: str = "none",
    requests: int = 64,
    concurrency: int = 8,
    max_tokens: int = 32,
    stream: bool = False,
    seed: int = 0,
    max_words: int = 200,
    timeout: float = 600.0,
) -> dict:
    """Send ``requests`` requests, at most ``concurrency`` at a time, round-robin over the models
    the server lists (base first, then the adapters); returns the report (see ``summarize``)."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)
    try:
        models = [m.id async for m in client.models.list()]
        texts = prompts(requests, seed, max_words=max_words)
        gate = asyncio.Semaphore(concurrency)

        async def limited(i: int) -> Outcome:
            async with gate:
                return await one_request(client, models[i % len(models)], texts[i], max_tokens, stream)

        started = time.perf_counter()
        outcomes = await asyncio.gather(*(limited(i) for i in range(requests)))
        wall = time.perf_counter() - started
    finally:
        await client.close()
    return summarize(outcomes, wall, models=models, concurrency=concurrency, max_tokens=max_tokens, stream=stream)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(outcomes: list[Outcome], wall: float, **settings) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    latencies = [o.seconds for o in ok]
    firsts = [o.first_token for o in ok if o.first_token is not None]
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else "lost"
        statuses[key] = statuses.get(key, 0) + 1
    tokens = sum(o.completion_tokens for o in ok)
    return {
        **settings,
        "sent": len(outcomes),
        "answered": len(ok),
        "lost": statuses.get("lost", 0),
        "server_errors": sum(n for s, n in statuses.items() if s.startswith("5")),
        "statuses": statuses,
        "latency_p50_s": _percentile(latencies, 0.5),
        "latency_p99_s": _percentile(latencies, 0.99),
        "latency_mean_s": statistics.fmean(latencies) if latencies else None,
        "first_token_p50_s": _percentile(firsts, 0.5),
        "first_token_p99_s": _percentile(firsts, 0.99),
        "generated_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "per_model": {m: sum(1 for o in ok if o.model == m) for m in settings.get("models", [])},
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
    }


def failed(report: dict) -> bool:
    return report["lost"] > 0 or report["server_errors"] > 0


def print_report(report: dict) -> None:
    def fmt(value) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    rows = [
        ("requests sent / answered / lost", f"{report['sent']} / {report['answered']} / {report['lost']}"),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in sorted(report["statuses"].items()))),
        ("concurrency", report["concurrency"]),
        ("models (base + adapters)", len(report["models"])),
        ("max_tokens (ignore_eos)", report["max_tokens"]),
        ("latency p50 / p99 (s)", f"{fmt(report['latency_p50_s'])} / {fmt(report['latency_p99_s'])}"),
        ("first token p50 / p99 (s)", f"{fmt(report['first_token_p50_s'])} / {fmt(report['first_token_p99_s'])}"),
        ("generated tokens", report["generated_tokens"]),
        ("wall time (s)", fmt(report["wall_s"])),
        ("generated tokens/s", fmt(report["tokens_per_s"])),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for error in report["errors"]:
        print(f"error: {error}", file=sys.stderr)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_lorakit_serve(model: str, adapters: list[str], extra: list[str], wait: float = 600.0):
    """``lorakit serve`` on a free loopback port; returns (process, base URL) once it answers."""
    import urllib.request

    port = _free_port()
    argv = [sys.executable, "-m", "lorakit", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    for spec in adapters:
        argv += ["--adapter", spec]
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_API_KEY"}  # the bench talks to it without a key
    process = subprocess.Popen([*argv, *extra], env=env)
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"lorakit serve exited with status {process.returncode}") from None
            if time.monotonic() > deadline:
                process.terminate()
                raise SystemExit("lorakit serve did not come up in time") from None
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the server's OpenAI base URL (on this machine), e.g. http://127.0.0.1:8000/v1")
    where.add_argument("--serve", action="store_true", help="start `lorakit serve` for the run")
    parser.add_argument("--model", default="smollm2-135m", help="--serve: the base model")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="--serve: an adapter")
    parser.add_argument("--serve-arg", action="append", default=[], help="--serve: a flag passed on to lorakit serve")
    parser.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY", "none"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true", help="stream the answers (measures time to first token)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompt-words", type=int, default=200, help="prompts have 4 to this many words")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--url must be a loopback address: this load test stays on this machine")
    process = None
    url = args.url
    if args.serve:
        process, url = start_lorakit_serve(args.model, args.adapter, args.serve_arg)
    try:
        report = asyncio.run(
            run_load(
                url,
                api_key=args.api_key,
                requests=args.requests,
                concurrency=args.concurrency,
                max_tokens=args.max_tokens,
                stream=args.stream,
                seed=args.seed,
                max_words=args.max_prompt_words,
            )
        )
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())
