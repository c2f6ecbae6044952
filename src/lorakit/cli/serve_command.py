"""`lorakit serve`: one base model and many adapters behind an OpenAI-compatible HTTP API.

    lorakit serve --model M --adapter name=DIR ... [--adapter-dir D] [--api-key K] [--host H --port P]

The built-in engine (serve/engine.py) runs on this machine; ``--engine vllm`` hands the same
model and adapters to vLLM instead (serve/vllm_launch.py). Everything a user can get wrong (the
extra not installed, an adapter folder missing, a busy port, runtime loading without a folder
to confine it) is reported before the model is loaded, where that is possible.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from ..errors import ConfigError
from ..serve.vllm_launch import parse_adapters

SERVE_EXTRA = "pip install 'lorakit[serve]'"


def add_serve_parser(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a base model and many adapters over an OpenAI-compatible HTTP API",
        description="Requests name their adapter in the OpenAI `model` field (the base model's id for none); "
        "requests for different adapters are decoded together in one batch.",
    )
    serve.add_argument("--model", default="smollm2-135m", help="base model (alias, directory, .gguf or hub id)")
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter to serve as NAME (repeatable); a bare DIR is named after its folder",
    )
    serve.add_argument(
        "--adapter-dir",
        metavar="DIR",
        help="adapters must resolve inside this folder (runtime loads take paths relative to it)",
    )
    serve.add_argument(
        "--engine",
        choices=["lorakit", "vllm"],
        default="lorakit",
        help="lorakit: the built-in engine (default); vllm: check the adapters and start `vllm serve` with them",
    )
    serve.add_argument("--served-model-name", metavar="NAME", help="the base model's id in the API (default: --model)")
    serve.add_argument(
        "--api-key",
        help="clients must send `Authorization: Bearer KEY`; prefer $LORAKIT_API_KEY (a flag shows in `ps`)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--allow-runtime-adapters",
        action="store_true",
        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --adapter-dir)",
    )
    serve.add_argument("--device", default=None)
    graphs = serve.add_mutually_exclusive_group()
    graphs.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="decode in CUDA graphs over fixed per-row buffers, or fail at start (default on a GPU: "
        "graphs where they can run, else eager steps with a warning)",
    )
    graphs.add_argument(
        "--enforce-eager",
        action="store_true",
        help="decode without CUDA graphs (eager steps over the dynamic cache), as vLLM's flag",
    )
    serve.add_argument("--dtype", default="auto")
    pool = serve.add_argument_group("adapter slots")
    pool.add_argument("--max-loras", type=int, help="adapters resident in device slots at once")
    pool.add_argument("--max-cpu-loras", type=int, help="adapters kept in host memory")
    pool.add_argument("--max-lora-rank", type=int, help="largest adapter rank accepted")
    limits = serve.add_argument_group("limits")
    limits.add_argument("--max-num-seqs", type=int, help="requests decoded together in one batch")
    limits.add_argument("--max-queue", type=int, help="requests waiting for a place; beyond it: 429")
    limits.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (400 beyond)")
    limits.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask for (400 beyond)")
    limits.add_argument("--max-prefill-tokens", type=int, help="prompt tokens prefilled in one engine step")
    limits.add_argument("--kv-cache-gb", type=float, help="admit requests while their KV cache fits in this")
    limits.add_argument("--adapter-load-timeout", type=float, help="seconds a request waits for its adapter (503)")
    limits.add_argument("--max-body-bytes", type=int, help="largest request body (413 beyond; default 4 MiB)")
    vllm = serve.add_argument_group("--engine vllm")
    vllm.add_argument("--dry-run", action="store_true", help="print the vLLM command instead of running it")
    vllm.add_argument(
        "--vllm-arg", dest="vllm_args", action="append", default=[], metavar="ARG", help="pass ARG on to vLLM"
    )


# Flag -> field, for the flags left unset unless given (the defaults live in the engine and the pool).
POOL_FLAGS = ("max_loras", "max_cpu_loras", "max_lora_rank")
LIMIT_FLAGS = (
    "max_num_seqs",
    "max_queue",
    "max_prompt_tokens",
    "max_tokens",
    "max_prefill_tokens",
    "kv_cache_gb",
    "adapter_load_timeout",
)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        return _serve_with_vllm(args)
    _require_serve_extra()
    adapters = parse_adapter_specs(args.adapter)
    adapter_dir = Path(args.adapter_dir).resolve() if args.adapter_dir else None
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise ConfigError(f"--adapter-dir {args.adapter_dir}: no such folder")
    if args.allow_runtime_adapters and adapter_dir is None:
        raise ConfigError(
            "--allow-runtime-adapters needs --adapter-dir: without it a client could make the server read any path"
        )
    api_key = args.api_key or os.environ.get("LORAKIT_API_KEY") or None
    model_id = args.served_model_name or args.model
    if model_id in adapters:
        raise ConfigError(f"adapter name {model_id!r} is the base model's id; name the adapter otherwise")
    if not is_loopback(args.host) and not api_key:
        print(
            f"warning: serving on {args.host} without an API key: anyone who can reach port {args.port} can use "
            "the model (set --api-key or LORAKIT_API_KEY)",
            file=sys.stderr,
        )
    sock = bind(args.host, args.port)  # a busy port is reported now, not after the model has loaded

    from ..models import load_model
    from ..serve.adapter_pool import AdapterPool
    from ..serve.app import DEFAULT_MAX_BODY_BYTES, build_app
    from ..serve.engine import Engine, EngineLimits
    from ..serve.metrics import ServeMetrics

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    metrics = ServeMetrics(base_name=model_id)
    pool = AdapterPool(model, observer=metrics, base_dir=adapter_dir, **_given(args, POOL_FLAGS))
    for name, directory in adapters.items():
        pool.register(name, directory)  # config checks only: weights load when first asked for
    limits = EngineLimits(**_given(args, LIMIT_FLAGS))
    decode = "graphs" if args.cuda_graphs else "dynamic" if args.enforce_eager else "auto"
    engine = Engine(model, tokenizer, pool, model_id=model_id, limits=limits, observer=metrics, decode=decode)
    app = build_app(
        engine,
        api_key=api_key or "",  # "" and not None: the key was looked up here already
        max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
        allow_runtime_adapters=args.allow_runtime_adapters,
        adapter_dir=adapter_dir,
        metrics=metrics,
    )
    url = f"http://{_url_host(args.host)}:{sock.getsockname()[1]}/v1"
    print(f"serving {model_id} with {len(adapters)} adapter(s) at {url}" + (" (API key required)" * bool(api_key)))
    _run(engine, app, sock, verbose=getattr(args, "verbose", False))
    return 0


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """``["name=DIR", "DIR", ...]`` -> {name: folder}, named as ``--engine vllm`` names them
    (``serve.vllm_launch.parse_adapters``); each folder must hold an adapter_config.json."""
    adapters = {name: Path(directory).expanduser() for name, directory in parse_adapters(specs).items()}
    for name, folder in adapters.items():
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(f"--adapter {name}: {folder} has no adapter_config.json")
    return adapters


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (uvicorn is handed it)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _given(args: argparse.Namespace, fields: tuple[str, ...]) -> dict:
    return {field: getattr(args, field) for field in fields if getattr(args, field) is not None}


def _require_serve_extra() -> None:
    missing = [name for name in ("fastapi", "uvicorn", "prometheus_client") if not _importable(name)]
    if missing:
        raise ConfigError(f"lorakit serve needs {', '.join(missing)}: {SERVE_EXTRA}")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _run(engine, app, sock: socket.socket, verbose: bool = False) -> None:
    """The engine in this (the main) thread, uvicorn in another, until Ctrl-C or SIGTERM; then
    uvicorn finishes the requests in flight (a few seconds at most). The engine keeps the main
    thread because torch's CPU kernels run its many small operations much faster there (see
    ``Engine.run``). ``lorakit -v serve`` logs every request (uvicorn's access log)."""
    import signal
    import threading

    import uvicorn

    log_level = "info" if verbose else "warning"
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, lifespan="off")
    server = uvicorn.Server(config)

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop(timeout=0)  # the HTTP server ended (or failed): the engine ends too

    http = threading.Thread(target=serve_http, name="lorakit-http", daemon=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: engine.stop(timeout=0))
    http.start()
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop(timeout=0)
        server.should_exit = True
        http.join(timeout=10)


def _serve_with_vllm(args: argparse.Namespace) -> int:
    """``--engine vllm``: the same model and adapters, checked against vLLM's rules and handed to
    ``vllm serve`` (or printed with ``--dry-run``)."""
    from ..serve.vllm_launch import main_vllm

    return main_vllm(args)
