"""FSDP through `accelerate launch`: does `lorakit train` run, save and match a plain run?

    python scripts/gpu_fsdp_check.py [--processes N] [--fsdp-version 1|2]

Builds a small Llama (4 layers, hidden 256, random weights) and a word-level tokenizer in a
temporary folder, writes a small prompt/completion file, then trains the same r8 all-linear
adapter twice for a few steps with the same seed: once as a plain single process, once under
``accelerate launch --use_fsdp`` (N processes, one per GPU). It prints both loss curves, whether
the FSDP run saved an adapter PEFT's layout can load, and the largest difference between the two
adapters' tensors. With one process FSDP shards nothing, but the wrapping, the flat parameters,
the optimizer over them and the gathering for saving are all exercised. Needs a GPU per process:
accelerate runs CPU processes as DDP whatever the FSDP settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def build_model_folder(root: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(254)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = LlamaForCausalLM(config)
    folder = root / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_data(root: Path) -> Path:
    path = root / "train.jsonl"
    with path.open("w") as f:
        for i in range(64):
            prompt = " ".join(f"w{(i * 7 + j) % 200}" for j in range(12))
            completion = " ".join(f"w{(i * 7 + j) % 200 + 20}" for j in range(6))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def train_args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--rank", "8",
        "--target-modules", "all-linear", "--max-steps", "6", "--batch-size", "4", "--lr", "1e-3",
        "--valid-ratio", "0", "--seed", "0",
    ]  # fmt: skip


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [round(r["loss"], 5) for r in rows if "loss" in r and "step" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=max(1, torch.cuda.device_count()))
    parser.add_argument("--fsdp-version", default="2", choices=["1", "2"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lorakit-fsdp-"))
    model, data = build_model_folder(root), write_data(root)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    plain = root / "plain"
    done = subprocess.run([sys.executable, "-m", "lorakit", *train_args(model, data, plain)], env=env, text=True,
                          capture_output=True)  # fmt: skip
    print("plain run exit", done.returncode, done.stderr[-1500:] if done.returncode else "")
    fsdp = root / "fsdp"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", args.fsdp_version,
        "--num_processes", str(args.processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "lorakit", *train_args(model, data, fsdp),
    ]  # fmt: skip
    done = subprocess.run(launch, env=env, text=True, capture_output=True)
    print(f"fsdp v{args.fsdp_version} x{args.processes} exit", done.returncode)
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-6000:])
        return 1
    probe = "from accelerate import Accelerator; print('accelerate distributed_type:', Accelerator().distributed_type)"
    (root / "probe.py").write_text(probe + "\n")
    seen = subprocess.run([*launch[: launch.index("-m", 3)], str(root / "probe.py")], env=env, text=True,
                          capture_output=True)  # fmt: skip
    print(seen.stdout.strip() or seen.stderr[-800:])  # FSDP on GPUs; accelerate turns CPU runs into DDP
    print("plain losses:", losses(plain))
    print("fsdp losses: ", losses(fsdp))
    from safetensors.torch import load_file

    a = load_file(plain / "adapter" / "adapter_model.safetensors")
    b = load_file(fsdp / "adapter" / "adapter_model.safetensors")
    print("same tensor names:", sorted(a) == sorted(b), len(a), "tensors")
    if sorted(a) == sorted(b):
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        print(f"largest |plain - fsdp| over the adapter: {diff:.3g}")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), fsdp / "adapter")
    print("PEFT loads the FSDP run's adapter: yes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
