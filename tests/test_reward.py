"""Reward model (--task reward): TRL RewardTrainer's loss, the head trained and saved, lorakit.score."""

import json

import pytest
import torch

import lorakit
from lorakit import ConfigError
from lorakit.tasks import make_task
from lorakit.tasks.reward import bradley_terry_loss
from lorakit.training.config import TrainConfig

from .test_data import CHATML, _train_tokenizer
from .test_dpo import ROWS, write_jsonl, yes_no_pairs
from .tiny import randomize_adapters, tiny_llama

IMPLICIT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in ROWS]


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer()


def reward_model(tok, seed=0):
    from transformers import LlamaForSequenceClassification

    config = tiny_llama(vocab=len(tok)).config
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


def reward_task(tmp_path, model, tok, rows, **options):
    task = make_task(TrainConfig(data=write_jsonl(tmp_path / "prefs.jsonl", rows), task="reward", **options))
    task.prepare_model(model, tok)
    return task


@pytest.mark.parametrize("rows", [ROWS, IMPLICIT], ids=["prompt", "implicit"])
def test_loss_equals_trls_reward_trainer(tmp_path, tok, rows):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    margins = [0.5, -1.0, 2.0]
    rows = [{**row, "margin": m} for row, m in zip(rows, margins)]
    model = reward_model(tok)
    task = reward_task(tmp_path, model, tok, rows, center_rewards=0.01)
    lorakit.add_adapter(model, task.lora_config(model, lorakit.LoraConfig(r=4, target_modules="all-linear")))
    randomize_adapters(model, std=0.2)
    args = RewardConfig(
        output_dir=str(tmp_path / "trl"),
        center_rewards_coefficient=0.01,
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=3,
        max_length=None,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    data = task.prepare_data(tok)
    batch = data.collate(data.train)
    for key in ("input_ids", "attention_mask"):  # TRL's tokens, EOS and padding exactly
        assert torch.equal(batch[key], trl_batch[key]), key
    model.train()
    theirs = trainer.compute_loss(model, dict(trl_batch))
    theirs.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ours = task.loss(model, batch)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert any(n.startswith("score.") for n in expected)  # the head trains with the adapter
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-8)
    assert set(task.step_metrics(None)) == {"accuracy", "margin", "mean_reward"}


def test_bradley_terry_formula():
    c, r, m = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0])
    expected = -(torch.log(torch.sigmoid(torch.tensor(0.5))) + torch.log(torch.sigmoid(torch.tensor(-1.0)))) / 2
    torch.testing.assert_close(bradley_terry_loss(c, r, m), expected)
    torch.testing.assert_close(bradley_terry_loss(c, r, m, 0.1), expected + 0.1 * (9 + 1) / 2)


def test_a_reward_model_learns_saves_its_head_and_scores(tmp_path, tok):
    from peft import PeftModel

    train = write_jsonl(tmp_path / "train.jsonl", yes_no_pairs(256, seed=0))
    valid = write_jsonl(tmp_path / "valid.jsonl", yes_no_pairs(64, seed=1))
    model = reward_model(tok)
    result = lorakit.train(
        loaded=(model, tok),
        task="reward",
        data=train,
        valid_data=valid,
        output_dir=str(tmp_path / "run"),
        device="cpu",
        r=8,
        alpha=16,
        lr=1e-2,
        epochs=3,
        batch_size=16,
        warmup_steps=5,
        progress=False,
    )
    assert result.final_eval["accuracy"] > 0.7, result.final_eval
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["score"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss", "accuracy", "margin", "mean_reward"} <= set(r) for r in records if "lr" in r)

    pairs = yes_no_pairs(64, seed=1)
    items = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
    rewards = lorakit.score(model, tok, items, batch_size=5)
    chosen, rejected = rewards[:64], rewards[64:]
    assert sum(c > r for c, r in zip(chosen, rejected)) / 64 == pytest.approx(result.final_eval["accuracy"])
    # PEFT loads the adapter with its head and gives the same rewards.
    peft_model = PeftModel.from_pretrained(reward_model(tok), str(result.adapter_dir)).eval()
    ids = torch.tensor([tok(pairs[0]["prompt"] + pairs[0]["chosen"])["input_ids"] + [tok.eos_token_id]])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits.squeeze().item()
    assert lorakit.score(model, tok, [(pairs[0]["prompt"], pairs[0]["chosen"])])[0] == pytest.approx(theirs, abs=1e-5)


def test_score_renders_every_form_as_training_and_refuses_other_models(tmp_path, tok):
    chat = _train_tokenizer()
    chat.chat_template = CHATML
    model = reward_model(chat)
    prompt = [{"role": "user", "content": "Capital of France?"}]
    answer = [{"role": "assistant", "content": "Paris."}]
    rows = [{"prompt": prompt, "chosen": answer, "rejected": [{"role": "assistant", "content": "Lyon."}]}]
    task = reward_task(tmp_path, model, chat, rows)
    batch = task.prepare_data(chat).collate(task.prepare_data(chat).train)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    scored = lorakit.score(model, chat, [(prompt, answer), [*prompt, *answer], "Paris."])
    assert scored[0] == pytest.approx(trained[0].item(), abs=1e-6)
    assert scored[1] == pytest.approx(scored[0], abs=1e-6)  # the whole conversation renders the same
    with pytest.raises(ConfigError, match="needs a reward model"):
        lorakit.score(tiny_llama(vocab=len(tok)), tok, ["x"])
