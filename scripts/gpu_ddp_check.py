"""GPU check of `accelerate launch -m lorakit train` (DDP, bf16 mixed precision).

Run on a machine with >= 2 GPUs (CI has none; this is run by hand or on a lent GPU machine):

    PYTHONPATH=src python scripts/gpu_ddp_check.py OUT_DIR [--processes 2]

Builds a small random Llama with a ChatML tokenizer (no download), writes the demo dataset, runs
`accelerate launch --num_processes N -m lorakit train ...` and checks that every process ran, the loss
fell, and the adapter was saved once and loads back. With ``--single-gpu N`` it trains one process
with ``--device cuda:N`` and checks that the model stayed on that GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_model(directory: Path, corpus: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"])
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--single-gpu", type=int, default=None, metavar="N")
    args = parser.parse_args()
    from lorakit.data import write_demo_dataset

    data = write_demo_dataset(args.out / "data", n_train=256, n_test=16)
    corpus = [line for line in data["train"].read_text().splitlines()]
    build_model(args.out / "model", corpus)
    if args.single_gpu is not None:
        return check_single_gpu(args.out, data, args.single_gpu)
    run = args.out / "run"
    cmd = [
        "accelerate",
        "launch",
        "--num_processes",
        str(args.processes),
        "--mixed_precision",
        "bf16",
        "-m",
        "lorakit",
        "-v",
        "train",
        "--model",
        str(args.out / "model"),
        "--data",
        str(data["train"]),
        "--valid-data",
        str(data["test"]),
        "--output-dir",
        str(run),
        "--max-steps",
        "30",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--save-every",
        "10",
        "--max-new-tokens",
        "8",
    ]  # bf16: the launcher's, not a flag of the run
    print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, env={**os.environ}, capture_output=True, text=True)
    print(done.stdout[-3000:])
    print(done.stderr[-3000:], file=sys.stderr)
    if done.returncode != 0:
        return done.returncode
    # Each process loaded the model straight onto its own GPU and trained in one group of N.
    for rank in range(args.processes):
        assert f"process {rank} of {args.processes} on cuda:{rank}" in done.stderr, (
            f"process {rank} is not on cuda:{rank}"
        )
        assert f"on cuda:{rank} as " in done.stderr, f"process {rank} did not load the model onto cuda:{rank}"
    assert done.stdout.count("adapter:") == 1, "more than one process reported the run"
    assert done.stderr.count("mixed precision bf16, as launched") == args.processes, "the launcher's bf16 was not used"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"steps logged: {len(losses)}; first loss {losses[0]:.3f}, last {losses[-1]:.3f}")
    assert len(losses) == 30 and losses[-1] < losses[0] * 0.7, "loss did not fall"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    import lorakit

    model = AutoModelForCausalLM.from_pretrained(args.out / "model")
    lorakit.load_adapter(model, run / "adapter")
    print("DDP check passed:", lorakit.summary(model).splitlines()[0])
    return 0


def check_single_gpu(out: Path, data: dict, index: int) -> int:
    """One process with ``--device cuda:N``: the model loads onto GPU N and trains there."""
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "-v",
        "train",
        "--model",
        str(out / "model"),
        "--data",
        str(data["train"]),
        "--output-dir",
        str(out / f"run-cuda{index}"),
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--device",
        f"cuda:{index}",
    ]
    print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, env={**os.environ}, capture_output=True, text=True)
    print(done.stderr[-3000:], file=sys.stderr)
    if done.returncode != 0:
        return done.returncode
    assert f"on cuda:{index} as " in done.stderr, f"the model was not loaded onto cuda:{index}"
    assert f"process 0 of 1 on cuda:{index}" in done.stderr, f"the model did not train on cuda:{index}"
    print(f"single-GPU check passed: trained on cuda:{index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
