"""SHA-256 of the adapter files every variant writes after a short seeded training run.

Run before and after a refactor of the layers, variants or file code and compare the two outputs:
the issue asking for the variant protocol (#17) promises the saved files of every variant stay
byte-for-byte the same. Each case trains a tiny Llama (or GPT-2, for Conv1D) through lorakit's own
training loop on the CPU, so variant hooks (DyLoRA's sampled ranks, AdaLoRA's pruning) take part.

    python scripts/variant_file_digests.py > before.txt   # ... change code ...
    python scripts/variant_file_digests.py | diff before.txt -
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_training_loop import collate, examples  # noqa: E402
from tests.tiny import tiny_gpt2, tiny_llama  # noqa: E402

import lorakit  # noqa: E402
from lorakit.training.config import TrainConfig  # noqa: E402
from lorakit.training.loop import run_loop  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
CASES = {
    "lora": dict(variant="lora"),
    "rslora": dict(variant="lora", use_rslora=True),
    "dora": dict(variant="dora"),
    "lora-fa": dict(variant="lora-fa"),
    "dylora": dict(variant="dylora"),
    "vera": dict(variant="vera"),
    "adalora": dict(variant="adalora", adalora_target_r=2, adalora_tinit=1, adalora_tfinal=1),
    "pissa": dict(variant="lora", init="pissa"),
    "olora": dict(variant="dora", init="olora"),
    "gaussian": dict(variant="lora", init="gaussian", dropout=0.1),
}


def digest(folder: Path) -> str:
    return " ".join(f"{p.name}={hashlib.sha256(p.read_bytes()).hexdigest()[:16]}" for p in sorted(folder.iterdir()))


def run_case(options: dict, model, out: Path) -> str:
    cfg = TrainConfig(
        data="x",
        lr=2e-2,
        max_steps=4,
        batch_size=4,
        device="cpu",
        r=4,
        alpha=8,
        seed=3,
        target_modules=options.pop("target_modules", TARGETS),
        **options,
    )
    lorakit.add_adapter(model, cfg.lora_config())
    run_loop(model, None, cfg, examples(16), collate, out, progress=False)
    lorakit.save_adapter(model, out / "adapter")
    return digest(out / "adapter")


def main() -> None:
    torch.use_deterministic_algorithms(True)
    with tempfile.TemporaryDirectory() as tmp:
        for case, options in CASES.items():
            print(case, run_case(dict(options), tiny_llama(), Path(tmp) / case))
        print("gpt2-conv1d", run_case(dict(target_modules=["c_attn", "c_fc"]), tiny_gpt2(), Path(tmp) / "gpt2"))
        print("gpt2-dora", run_case(dict(variant="dora", target_modules=["c_attn"]), tiny_gpt2(), Path(tmp) / "g2"))


if __name__ == "__main__":
    main()
