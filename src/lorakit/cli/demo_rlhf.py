"""`lorakit demo --rlhf`: SFT → reward model → DPO on the embedded model, judged by a program.

The seed's RLHF pipeline, offline on a CPU in minutes (data: `lorakit.data.preference_demo`):

1. **SFT**: a LoRA adapter fine-tuned on booking requests answered half as JSON, half as prose.
2. **Reward model**: a one-output classifier (LoRA + head) trained on preference pairs where the
   right JSON beats prose or JSON with a wrong value; its held-out pair accuracy is printed.
3. **DPO**: a second adapter trained on the same pairs with the SFT adapter as the reference (the
   policy is SFT + DPO; the reference is the same weights with only the SFT adapter, so the base is
   in memory once).
4. **Judging**: both policies answer held-out requests (greedy); a program scores each answer (right
   JSON 1, JSON with a wrong value 0.5, anything else 0), and the reward model scores them too. The
   win rate of DPO against SFT is the share of requests where the program prefers DPO's answer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TextIO

# Small enough for a few minutes on 2 CPU cores; the measured outcome is in docs/tasks.md.
RLHF_SIZES = dict(sft_train=240, pairs_train=192, pairs_test=32)
SFT_TRAINING = dict(
    r=16, alpha=32, target_modules="all-linear", lr=2e-3, batch_size=8, warmup_steps=2, max_steps=20, max_length=256
)
REWARD_TRAINING = dict(
    task="reward", r=16, alpha=32, target_modules="all-linear", lr=1e-3, batch_size=8, warmup_steps=2, max_steps=16
)
DPO_TRAINING = dict(
    task="dpo",
    r=16,
    alpha=32,
    target_modules="all-linear",
    lr=1e-4,  # 5e-4 over-optimised: the reward model's favourite, broken JSON (docs/tasks.md)
    batch_size=8,
    warmup_steps=2,
    max_steps=16,
    beta=0.1,
)
MAX_NEW_TOKENS = 64


def run_rlhf_demo(
    output_dir: str = "runs/demo-rlhf", model_name: str = "smollm2-135m", out: TextIO | None = None
) -> int:
    import sys

    from ..data import Collator, tokenize_records
    from ..data.preference_demo import judge, preference_rows, sft_records, win_rate
    from ..data.records import Record
    from ..safe_files.atomic import write_text_atomically
    from ..tasks.scoring import score
    from ..training import train
    from ..training.evaluate import evaluate
    from .adapter_loading import load_with_adapters
    from .demo import _check_demo_folder

    out = out or sys.stdout
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731 - a local print shorthand
    root = Path(output_dir)
    started = time.perf_counter()
    _check_demo_folder(root, extra={"sft", "reward", "dpo", "results.json"})

    say("lorakit demo --rlhf: SFT, then a reward model, then DPO with the SFT adapter as reference\n")
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    sft = sft_records(RLHF_SIZES["sft_train"], "train")
    train_pairs = preference_rows(RLHF_SIZES["pairs_train"], "train")
    test_pairs = preference_rows(RLHF_SIZES["pairs_test"], "test")

    def write_jsonl(name: str, rows: list[dict]) -> str:
        path = data / name
        write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return str(path)

    files = {
        "sft": write_jsonl("sft.jsonl", [r.to_dict() for r in sft]),
        "pairs": write_jsonl("pairs.jsonl", train_pairs),
        "pairs_test": write_jsonl("pairs_test.jsonl", test_pairs),
    }
    say(
        f"1/5 data: {len(sft)} SFT answers (half JSON, half prose), {len(train_pairs)} preference pairs "
        f"(right JSON beats prose or a wrong value), {len(test_pairs)} held-out requests (unseen values), in {data}"
    )
    common = dict(model=model_name, seed=0, overwrite=True)  # the folders are the demo's own (checked above)

    say(f"2/5 SFT adapter ({SFT_TRAINING['max_steps']} steps)")
    sft_run = train(data=files["sft"], output_dir=str(root / "sft"), **SFT_TRAINING, **common)

    say(f"3/5 reward model ({REWARD_TRAINING['max_steps']} steps)")
    reward_run = train(
        data=files["pairs"], valid_data=files["pairs_test"], output_dir=str(root / "reward"), **REWARD_TRAINING,
        **common,
    )  # fmt: skip
    reward_accuracy = reward_run.final_eval["accuracy"]

    say(f"4/5 DPO adapter ({DPO_TRAINING['max_steps']} steps, reference: the SFT adapter)")
    dpo_run = train(
        data=files["pairs"], valid_data=files["pairs_test"], output_dir=str(root / "dpo"),
        ref_adapter=str(sft_run.adapter_dir), **DPO_TRAINING, **common,
    )  # fmt: skip

    say("5/5 both policies answer the held-out requests; a program and the reward model judge them")
    records = [Record.from_prompt_completion(row["prompt"], row["chosen"]) for row in test_pairs]
    truths = [row["fields"] for row in test_pairs]
    answers = {}
    for policy, adapters in (("SFT", [sft_run.adapter_dir]), ("SFT + DPO", [sft_run.adapter_dir, dpo_run.adapter_dir])):
        model, tokenizer, _ = load_with_adapters(model_name, [str(a) for a in adapters], None, "auto")
        examples, _ = tokenize_records(records, tokenizer, max_length=SFT_TRAINING["max_length"])
        from ..data import eval_pairs

        result = evaluate(
            model, tokenizer, examples, Collator(tokenizer), batch_size=8, pairs=eval_pairs(records, tokenizer),
            max_new_tokens=MAX_NEW_TOKENS, progress=True,
        )  # fmt: skip
        answers[policy] = [p["prediction"].strip() for p in result["predictions"]]
        del model
    reward_model, tokenizer, _ = load_with_adapters(
        model_name, [str(reward_run.adapter_dir)], None, "auto", task="sequence-classification", num_labels=1
    )
    from ..tasks.heads import set_pad_token

    set_pad_token(reward_model, tokenizer)
    rewards = {
        policy: score(reward_model, tokenizer, [(r.prompt, a) for r, a in zip(records, texts)])
        for policy, texts in answers.items()
    }

    rows = {}
    for policy, texts in answers.items():
        scores = [judge(a, t) for a, t in zip(texts, truths)]
        rows[policy] = {
            "right_json": sum(s == 1.0 for s in scores) / len(scores),
            "json": sum(s > 0 for s in scores) / len(scores),
            "judge_mean": sum(scores) / len(scores),
            "reward_mean": sum(rewards[policy]) / len(scores),
        }
    wins = win_rate(answers["SFT + DPO"], answers["SFT"], truths)
    say(f"\nreward model, held-out pairs: {100 * reward_accuracy:.1f}% ranked right")
    say("\n| policy (held-out requests) | right JSON | any JSON | judge score | mean reward |")
    say("|---|---|---|---|---|")
    for policy, row in rows.items():
        say(
            f"| {policy} | {100 * row['right_json']:.1f}% | {100 * row['json']:.1f}% | {row['judge_mean']:.3f} | "
            f"{row['reward_mean']:+.3f} |"
        )
    say(f"\nDPO vs SFT win rate (the program's judgement, ties count half): {100 * wins:.1f}%")
    say("\nexamples (held-out):")
    for record, a, b in list(zip(records, answers["SFT"], answers["SFT + DPO"]))[:3]:
        say(f"  request: {record.prompt.splitlines()[-1][:150]}")
        say(f"  SFT:     {a[:150]}")
        say(f"  SFT+DPO: {b[:150]}")
        say()
    summary = {
        "reward_accuracy": reward_accuracy,
        "policies": rows,
        "dpo_win_rate": wins,
        "answers": answers,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_text_atomically(root / "results.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    say(f"adapters: {sft_run.adapter_dir}, {reward_run.adapter_dir}, {dpo_run.adapter_dir}")
    say(f"took {summary['seconds']:.0f} s. Results: {root / 'results.json'}")
    return 0
