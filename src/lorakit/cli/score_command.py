"""`lorakit score`: the rewards a reward adapter (``lorakit train --task reward``) gives texts.

    lorakit score --adapter DIR --text "..." [--text ...] [--prompt "..."]
    lorakit score --adapter DIR --data FILE.jsonl        # preference pairs, or texts / prompt+completion

With preference pairs (``chosen``/``rejected`` lines) it prints both rewards per line and the share
of pairs ranked right; with other records (``text``, ``prompt``/``completion``, ``messages``) one
reward each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError


def add_score_parser(sub) -> None:
    cmd = sub.add_parser(
        "score",
        help="rewards of texts under a reward adapter (lorakit train --task reward)",
        description="Texts are rendered with the chat template as reward training rendered its pairs.",
    )
    cmd.add_argument("--model", default="smollm2-135m", help="base model (alias, directory, .gguf or hub id)")
    cmd.add_argument("--adapter", required=True, help="the reward adapter's directory (a run's output_dir/adapter)")
    given = cmd.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", action="append", help="a text to score (repeatable)")
    given.add_argument(
        "--data",
        help="JSONL/JSON file: preference pairs (prompt, chosen, rejected), or records (text, prompt + completion, "
        "messages)",
    )
    cmd.add_argument("--prompt", help="with --text: the prompt each text answers (rendered as training renders it)")
    cmd.add_argument("--batch-size", type=int, default=8)
    cmd.add_argument("--max-length", type=int, default=512, help="texts are cut to this many tokens, as in training")
    cmd.add_argument("--device", default=None)
    cmd.add_argument("--dtype", default="auto")
    cmd.add_argument("--json", action="store_true", help="print the rewards as JSON")


def cmd_score(args: argparse.Namespace) -> int:
    if args.prompt is not None and args.text is None:
        raise ConfigError("--prompt goes with --text; in --data files the prompt is each line's 'prompt'")
    if args.batch_size < 1 or args.max_length < 2:
        raise ConfigError("--batch-size must be >= 1 and --max-length >= 2")
    _check_reward_adapter(Path(args.adapter))
    pairs = _preference_pairs(args.data) if args.data else None
    items = _items(args, pairs)  # the data is read before the model loads: a bad line fails fast
    model, tokenizer = _load(args)
    from ..tasks.scoring import score

    rewards = score(model, tokenizer, items, batch_size=args.batch_size, max_length=args.max_length)
    if pairs is None:
        if args.json:
            print(json.dumps([{"reward": r} for r in rewards], indent=2))
            return 0
        for reward, item in zip(rewards, items):
            text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
            print(f"{reward:+.4f}  {text[:100]}")
        return 0
    chosen, rejected = rewards[: len(pairs)], rewards[len(pairs) :]
    rows = [{"where": p.where, "chosen": c, "rejected": r} for p, c, r in zip(pairs, chosen, rejected)]
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(rows)
    if args.json:
        print(json.dumps({"accuracy": accuracy, "pairs": rows}, indent=2))
        return 0
    for row in rows:
        print(f"{row['where']}: chosen {row['chosen']:+.4f}  rejected {row['rejected']:+.4f}")
    print(f"accuracy {100 * accuracy:.1f}% of {len(rows)} pairs (chosen scored above rejected)")
    return 0


def _check_reward_adapter(directory: Path) -> None:
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        hint = f": give {directory / 'adapter'}" if (directory / "adapter" / "adapter_config.json").is_file() else ""
        raise ConfigError(f"--adapter {directory}: no adapter_config.json there{hint}")
    task_type = json.loads(config_file.read_text()).get("task_type")
    if task_type != "SEQ_CLS":
        raise ConfigError(
            f"--adapter {directory} is a {task_type or 'plain'} adapter, not a reward model's (SEQ_CLS): "
            "train one with lorakit train --task reward"
        )


def _preference_pairs(path: str):
    """The file's pairs when its first row has 'chosen' (a preference file), else None."""
    from ..data.readers import object_rows
    from ..data.records import Problems

    first = next((row for _, row in object_rows(path, Problems(path))), None)
    if not (isinstance(first, dict) and "chosen" in first):
        return None
    from ..tasks.preference_data import read_preferences

    return read_preferences(path)


def _items(args: argparse.Namespace, pairs) -> list:
    if args.text is not None:
        return [(args.prompt, text) if args.prompt is not None else text for text in args.text]
    if pairs is not None:
        return [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    from ..data import read_records

    items = []
    for record in read_records(args.data):
        if record.kind == "prompt_completion":
            items.append((record.prompt, record.completion))
        else:
            items.append(record.messages if record.kind == "chat" else record.text)
    return items


def _load(args: argparse.Namespace):
    from ..io import load_adapter
    from ..models import load_model
    from ..tasks.heads import set_pad_token

    model, tokenizer = load_model(
        args.model, dtype=args.dtype, device=args.device, task="sequence-classification", num_labels=1
    )
    set_pad_token(model, tokenizer)
    load_adapter(model, args.adapter)
    return model, tokenizer
