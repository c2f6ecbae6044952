"""DPO (--task dpo): TRL's loss and gradients, the reference as adapters off, state kept, learning, resume."""

import copy
import json
import random
import shutil

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.state import active_adapters
from lorakit.tasks import make_task
from lorakit.tasks.dpo_loss import dpo_losses, sequence_logps
from lorakit.training.config import TrainConfig
from lorakit.training.loop import run_loop

from .test_data import CHATML, _train_tokenizer
from .tiny import randomize_adapters, tiny_llama

ROWS = [
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Lyon, I think."},
    {"prompt": "The quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " sleeps."},
    {"prompt": "Hello there!", "chosen": " Hello!", "rejected": " Go away, what do you want?"},
]
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def adapted(tok, seed=0):
    model = tiny_llama(vocab=len(tok))
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=TARGETS, seed=seed))
    return model


def dpo_task(tmp_path, model, tok, **options):
    task = make_task(TrainConfig(data=write_jsonl(tmp_path / "prefs.jsonl", ROWS), task="dpo", **options))
    task.prepare_model(model, tok)
    return task


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def swapped(batch):
    """The batch with chosen and rejected exchanged (rows and reference log-probabilities)."""
    half = batch["input_ids"].shape[0] // 2
    out = {k: torch.cat([v[half:], v[:half]]) for k, v in batch.items() if v.dim() == 2}
    out["ref_chosen_logps"], out["ref_rejected_logps"] = batch["ref_rejected_logps"], batch["ref_chosen_logps"]
    return out


@pytest.mark.parametrize(
    "loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)], ids=str
)
def test_loss_and_gradients_equal_trls(tmp_path, tok, loss_type, smoothing):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = adapted(tok)
    ours = adapted(tok)  # the same seeded model and adapter, for lorakit's side
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.3,
        loss_type=[loss_type],
        precompute_ref_log_probs=True,  # at B = 0: TRL's reference is the base model
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=len(ROWS),
        max_length=None,
        disable_dropout=True,
        bf16=False,  # TRL's default on a CPU would autocast the reference's forward
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    # TRL's own precomputation, on this batch (the dataset's column holds the same numbers)
    trl_batch["ref_chosen_logps"], trl_batch["ref_rejected_logps"] = trainer.compute_ref_log_probs(model, trl_batch)
    randomize_adapters(model, std=0.2)  # after TRL's precompute: the reference stays the base
    randomize_adapters(ours, std=0.2)
    model.train()
    if smoothing:  # TRL 1.16's sigmoid has no smoothing: cDPO is its loss on the pair and on the pair swapped
        theirs = (1 - smoothing) * trainer.compute_loss(model, dict(trl_batch)) + smoothing * trainer.compute_loss(
            model, swapped(trl_batch)
        )
    else:
        theirs = trainer.compute_loss(model, dict(trl_batch))
    theirs.backward()

    task = dpo_task(tmp_path, ours, tok, beta=0.3, dpo_loss=loss_type, label_smoothing=smoothing)
    data = task.prepare_data(tok)
    batch = data.collate(data.train)
    for key in ("input_ids", "attention_mask", "completion_mask"):  # TRL's tokens and masks, exactly
        assert torch.equal(batch[key], trl_batch[key]), key
    ours.train()
    loss = task.loss(ours, batch)  # the reference computed here, with the adapter off
    loss.backward()
    torch.testing.assert_close(loss, theirs, rtol=1e-5, atol=1e-7)
    expected, got = lora_grads(model), lora_grads(ours)
    assert set(got) == set(expected) and len(got) == 2 * 2 * len(TARGETS)  # layers x (A, B) x targets
    for name, grad in expected.items():
        # TRL's tiled float32 log-softmax sums in another order: equal to float32 rounding of the largest entry
        assert (got[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
        assert grad.abs().max() > 0, name
    assert task.step_metrics(None)["rewards/accuracies"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_losses_match_their_formulas():
    c, r = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    delta = c - r
    beta = 0.5
    torch.testing.assert_close(dpo_losses(c, r, beta), -torch.nn.functional.logsigmoid(beta * delta))
    smoothed = dpo_losses(c, r, beta, "sigmoid", 0.1)
    torch.testing.assert_close(
        smoothed, -0.9 * torch.log(torch.sigmoid(beta * delta)) - 0.1 * torch.log(torch.sigmoid(-beta * delta))
    )
    torch.testing.assert_close(dpo_losses(c, r, beta, "hinge"), torch.clamp(1 - beta * delta, min=0))
    n_c, n_r = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 5.0])
    torch.testing.assert_close(dpo_losses(c, r, beta, "ipo", 0, n_c, n_r), (c / n_c - r / n_r - 1 / (2 * beta)) ** 2)


def test_reference_log_probs_equal_a_fresh_copy_of_the_base(tmp_path, tok):
    model = tiny_llama(vocab=len(tok))
    base = copy.deepcopy(model)  # in this test only: lorakit itself never copies the base
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear", dropout=0.3))
    randomize_adapters(model)
    task = dpo_task(tmp_path, model, tok)
    batch = task.prepare_data(tok).collate(task.prepare_data(tok).train)
    model.train()  # the reference pass runs without dropout whatever the model's mode
    with torch.no_grad():
        expected = sequence_logps(
            base(input_ids=batch["input_ids"]).logits, batch["input_ids"], batch["completion_mask"]
        )
        policy = sequence_logps(
            model(input_ids=batch["input_ids"]).logits, batch["input_ids"], batch["completion_mask"]
        )
    torch.testing.assert_close(task.reference_logps(batch), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy, expected)  # the adapter does change the policy
    assert model.training
    # Precomputed: the same numbers stored with each example, whatever the adapter holds by then.
    task = dpo_task(tmp_path, model, tok, precompute_ref=True)
    data = task.prepare_data(tok)
    stored = torch.tensor([[e["ref_chosen_logps"] for e in data.train], [e["ref_rejected_logps"] for e in data.train]])
    torch.testing.assert_close(stored.flatten(), expected, rtol=1e-5, atol=1e-5)


def test_a_step_leaves_the_adapters_and_flags_as_they_were(tmp_path, tok):
    model = adapted(tok)
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["o_proj"]), name="other")
    lorakit.set_adapter(model, "default")  # "other" stays trainable but does not run
    names = [n for n, _ in model.named_parameters()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    task = dpo_task(tmp_path, model, tok)
    data = task.prepare_data(tok)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    task.loss(model, data.collate(data.train)).backward()
    optimizer.step()
    assert [n for n, _ in model.named_parameters()] == names  # no parameter added
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert active_adapters(model) == ["default"] and model.training
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad or n.endswith(".other"))
    assert any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".other"))


def yes_no_pairs(n, seed):
    """The answer is " yes" when the letters hold a q, else " no"; the other answer is rejected."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        letters = [rng.choice("abcdefgh") for _ in range(rng.randint(4, 8))]
        if i % 2:
            letters[rng.randrange(len(letters))] = "q"
        good, bad = (" yes", " no") if i % 2 else (" no", " yes")
        rows.append({"prompt": " ".join(letters) + " ?", "chosen": good, "rejected": bad})
    return rows


def test_dpo_learns_a_synthetic_preference_and_logs_trls_names(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", yes_no_pairs(256, seed=0))
    valid = write_jsonl(tmp_path / "valid.jsonl", yes_no_pairs(64, seed=1))
    result = lorakit.train(
        loaded=(tiny_llama(vocab=len(tok)), tok),
        task="dpo",
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
    assert result.final_eval["rewards/accuracies"] > 0.8, result.final_eval
    assert result.final_eval["rewards/margins"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lr" in r]
    names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
    assert steps and all(all(name in r for name in names) for r in steps)
    assert steps[0]["rewards/margins"] == 0.0  # the first step's forward: a fresh adapter is the reference
    assert "eval_rewards/accuracies" in records[-1]


def test_resume_is_bit_for_bit(tmp_path, tok):
    cfg = dict(task="dpo", data=write_jsonl(tmp_path / "p.jsonl", yes_no_pairs(24, seed=2)), lr=1e-2, max_steps=4)
    cfg.update(batch_size=4, grad_accum=2, device="cpu", seed=3, dropout=0.1)

    def run(out, **more):
        model = tiny_llama(vocab=len(tok))
        task = make_task(TrainConfig(**{**cfg, **more}))
        task.prepare_model(model, tok)
        data = task.prepare_data(tok)
        lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear", dropout=0.1, seed=3))
        run_loop(model, tok, TrainConfig(**{**cfg, **more}), data.train, data.collate, out, progress=False, task=task)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    straight = run(tmp_path / "a")
    run(tmp_path / "b", save_every=2)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000004")
    torch.manual_seed(12345)
    resumed = run(tmp_path / "b", resume=True)
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
    lines = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in "ab"]
    strip = [[{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in part] for part in lines]
    assert strip[0] == strip[1]


def test_ref_adapter_is_the_reference_and_stays_frozen(tmp_path, tok):
    sft = tiny_llama(vocab=len(tok))
    lorakit.add_adapter(sft, LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    randomize_adapters(sft, std=0.3)
    lorakit.save_adapter(sft, tmp_path / "sft")
    reference = copy.deepcopy(sft)  # base + the SFT adapter alone
    model = tiny_llama(vocab=len(tok))
    result = lorakit.train(
        loaded=(model, tok),
        task="dpo",
        data=write_jsonl(tmp_path / "prefs.jsonl", ROWS),
        ref_adapter=str(tmp_path / "sft"),
        output_dir=str(tmp_path / "run"),
        device="cpu",
        max_steps=2,
        batch_size=3,
        lr=1e-2,
        target_modules="all-linear",
        progress=False,
    )
    assert result.steps == 2
    assert active_adapters(model) == ["reference", "default"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".reference"))
    torch.testing.assert_close(
        model.model.layers[0].self_attn.q_proj.lora_A["reference"],
        sft.model.layers[0].self_attn.q_proj.lora_A["default"],
    )
    task = dpo_task(tmp_path, tiny_llama(vocab=len(tok)), tok, ref_adapter=str(tmp_path / "sft"))
    data = task.prepare_data(tok)
    batch = data.collate(data.train)
    task.model = model  # the trained policy: its reference is still base + SFT adapter
    task.reference = ["reference"]
    with torch.no_grad():
        expected = sequence_logps(
            reference(input_ids=batch["input_ids"]).logits, batch["input_ids"], batch["completion_mask"]
        )
    torch.testing.assert_close(task.reference_logps(batch), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(lorakit.ConfigError, match="give its adapter"):
        make_task(TrainConfig(data=str(tmp_path / "prefs.jsonl"), task="dpo", ref_adapter=str(tmp_path / "run")))


def test_conversational_pairs_mask_only_the_compared_answer(tmp_path):
    tok = _train_tokenizer()
    tok.chat_template = CHATML
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Capital of France?"},
    ]
    rows = [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "Lyon."}]},
        # implicit prompt: the shared first messages
        {"chosen": [*prompt, {"role": "assistant", "content": "Paris."}],
         "rejected": [*prompt, {"role": "assistant", "content": "Lyon."}]},
    ]  # fmt: skip
    task = make_task(TrainConfig(data=write_jsonl(tmp_path / "chat.jsonl", rows), task="dpo"))
    examples = task.prepare_data(tok).train
    assert examples[0] == examples[1]
    for side, answer in (("chosen", "Paris."), ("rejected", "Lyon.")):
        ids, mask = examples[0][f"{side}_ids"], examples[0][f"{side}_mask"]
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == answer + "<|im_end|>"
        whole = tok.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
        assert tok.decode(ids) == whole
