"""A lorakit-injected model trains with `transformers.Trainer` unchanged."""

import torch

import lorakit
from lorakit import LoraConfig

from .tiny import tiny_llama


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        # Counting sequences: the next token is always predictable, so the loss must fall.
        starts = torch.arange(n) * 7
        self.rows = (starts[:, None] + torch.arange(length)[None, :]) % 128

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_trainer_trains_only_the_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=8,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset())
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1
    assert result.global_step == 8
    assert type(model).__name__ == "LlamaForCausalLM"
    lorakit.save_adapter(model, tmp_path / "adapter")
    lorakit.unload(model, merge=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
