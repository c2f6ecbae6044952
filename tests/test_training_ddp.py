"""The trainer under DDP: two CPU processes (gloo) started by torchrun, as `accelerate launch` would."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each process trains two steps with evaluation, then evaluates the trained model again alone (no
# accelerator): the gathered metrics must be exactly those, and each process must have run only
# its share of the evaluation batches.
WORKER = r"""
import json, sys
import torch
from accelerate import Accelerator
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lorakit
from lorakit.training import loop as loop_module
from lorakit.training.config import TrainConfig
from lorakit.training.evaluate import evaluate
from tests.tiny import tiny_llama

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
words = [f"w{i}" for i in range(126)]
backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + ["<pad>", "<eos>"])}, unk_token="<pad>"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def example(i, length):
    ids = [(5 * i + k) % 126 for k in range(length)]
    return {"input_ids": ids, "labels": [-100] * (i % 3) + ids[i % 3:]}


def collate(batch):
    width = max(len(b["input_ids"]) for b in batch)
    pad = lambda rows, value: torch.tensor([r + [value] * (width - len(r)) for r in rows])
    return {"input_ids": pad([b["input_ids"] for b in batch], 126), "labels": pad([b["labels"] for b in batch], -100),
            "attention_mask": pad([[1] * len(b["input_ids"]) for b in batch], 0)}


train = [example(i, 10) for i in range(24)]
valid = [example(i, 4 + i % 7) for i in range(19)]  # 5 batches of 4: ranks take 0, 2, 4 and 1, 3
pairs = [(" ".join(words[(3 * i + k) % 126] for k in range(2 + i % 5)), words[i]) for i in range(20)]  # 2 batches of 16

model = tiny_llama()
lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1, seed=0))
counts = {"eval_forwards": 0, "generated_rows": 0, "rng_reads": 0}
forward, generate, rng_state = model.forward, model.generate, loop_module.rng_state


def counted_forward(*args, **kwargs):
    counts["eval_forwards"] += not model.training and "labels" in kwargs  # generation's forwards have none
    return forward(*args, **kwargs)


def counted_generate(*args, **kwargs):
    counts["generated_rows"] += len(kwargs["input_ids"])
    return generate(*args, **kwargs)


def counted_rng_state():
    counts["rng_reads"] += 1
    return rng_state()


model.forward, model.generate, loop_module.rng_state = counted_forward, counted_generate, counted_rng_state
cfg = TrainConfig(data="x", lr=1e-2, max_steps=2, batch_size=4, device="cpu", seed=0, max_new_tokens=3)
result = loop_module.run_loop(model, tokenizer, cfg, train, collate, __import__("pathlib").Path(sys.argv[1]),
                              eval_examples=valid, eval_pairs=pairs, accelerator=accelerator, progress=False)
ddp_counts = dict(counts)
alone = evaluate(model, tokenizer, valid, collate, batch_size=4, pairs=pairs, max_new_tokens=3)
weights = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump({"ddp": result.last_eval, "alone": alone, "counts": ddp_counts, "weights": weights,
               "main": getattr(result, "main_process", None), "world": accelerator.num_processes}, f)
"""


def test_ddp_evaluation_is_sharded_and_gathers_the_single_process_metrics(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(tmp_path / "worker.py"),
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["main"] for r in ranks] == [True, False]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the processes' adapters identical
    for r in ranks:
        assert r["ddp"] == r["alone"]  # loss, perplexity, exact match and every prediction, exactly
    # Each process evaluated only its batches: 3 and 2 of the 5 loss batches, 16 and 4 of the 20 prompts.
    assert [r["counts"]["eval_forwards"] for r in ranks] == [3, 2]
    assert [r["counts"]["generated_rows"] for r in ranks] == [16, 4]
    assert [r["counts"]["rng_reads"] for r in ranks] == [1, 0]  # step 2's start, on the main process only
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[-1]["eval_loss"] == ranks[0]["alone"]["loss"]
