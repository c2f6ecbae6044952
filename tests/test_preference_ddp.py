"""DPO under DDP (two gloo CPU processes by torchrun): the step's reward metrics are summed over the
processes, and the gathered evaluation equals one process evaluating everything."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys
import torch
from accelerate import Accelerator
import lorakit
from lorakit.tasks import make_task
from lorakit.training import loop as loop_module
from lorakit.training.config import TrainConfig
from tests.test_data import _train_tokenizer
from tests.test_dpo import yes_no_pairs, write_jsonl
from tests.tiny import tiny_llama
from pathlib import Path
out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
tok = _train_tokenizer()
data = str(out / "p.jsonl")
if accelerator.is_main_process:
    write_jsonl(out / "p.jsonl", yes_no_pairs(32, 0))
    write_jsonl(out / "v.jsonl", yes_no_pairs(10, 1))
accelerator.wait_for_everyone()
cfg = TrainConfig(data=data, valid_data=str(out / "v.jsonl"), task="dpo", lr=1e-2, max_steps=3, batch_size=4,
                  device="cpu", seed=0, eval_every=2)
model = tiny_llama(vocab=len(tok))
task = make_task(cfg)
task.prepare_model(model, tok)
prepared = task.prepare_data(tok)
lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", seed=0))
res = loop_module.run_loop(model, tok, cfg, prepared.train, prepared.collate, out / "run",
                           eval_examples=prepared.valid, accelerator=accelerator, progress=False, task=task)
alone = task.evaluate(model, tok, prepared.valid, prepared.collate, [], cfg, "cpu", None, False)
with open(out / f"rank{accelerator.process_index}.json", "w") as f:
    json.dump({"ddp": res.last_eval, "alone": alone}, f)
"""


def test_dpo_metrics_under_ddp(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    worker = [str(tmp_path / "worker.py"), str(tmp_path)]
    done = subprocess.run([*command, *worker], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["ddp"] == rank["alone"] == ranks[0]["ddp"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # 4 pairs per process and step: the accuracy is a share of both processes' 8 pairs.
    assert all((r["rewards/accuracies"] * 8) % 1 == 0 for r in steps)
    assert any("eval_rewards/accuracies" in r for r in rows)
