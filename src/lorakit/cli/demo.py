"""`lorakit demo`: the newcomer's first run, offline on a CPU in a few minutes.

Generates a field-extraction dataset (free-text requests -> JSON) whose test split shares no
values with training, measures the embedded model on the test split, fine-tunes a LoRA adapter,
measures again, and prints a before/after table with example answers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

# Tuned on the embedded SmolLM2-135M on a 2-core CPU: the fewest steps after which nearly every test
# answer is exactly right, in a few minutes (docs/benchmarks.md, "The demo").
DEMO_STEPS = 24
DEMO_TRAIN = 480
DEMO_TEST = 32
DEMO_TRAINING = dict(
    r=16,
    alpha=32,
    target_modules="all-linear",
    lr=2e-3,
    batch_size=8,
    warmup_steps=3,
    schedule="cosine",
    max_length=256,
    max_new_tokens=64,
    seed=0,
)


def run_demo(
    output_dir: str = "runs/demo",
    steps: int | None = None,
    n_test: int | None = None,
    model_name: str = "smollm2-135m",
    out: TextIO | None = None,
) -> int:
    import sys

    from ..data import Collator, eval_pairs, read_records, tokenize_records, write_demo_dataset
    from ..models import load_model
    from ..training import train
    from ..training.evaluate import evaluate

    out = out or sys.stdout
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731 - a local print shorthand
    root = Path(output_dir)
    steps = steps or DEMO_STEPS
    n_test = n_test or DEMO_TEST
    started = time.perf_counter()

    _check_demo_folder(root)  # a folder of the user's is never written into
    say("lorakit demo: teach a 135M-parameter model to extract booking details as JSON\n")
    paths = write_demo_dataset(root / "data", n_train=DEMO_TRAIN, n_test=n_test, seed=0)
    train_file, test_file = Path(paths["train"]), Path(paths["test"])
    say(
        f"1/4 dataset: {DEMO_TRAIN} training and {n_test} held-out test requests (no shared values) "
        f"in {train_file.parent}"
    )

    say(f"2/4 loading {model_name} (the first run converts and caches it)")
    model, tokenizer = load_model(model_name)
    test_records = read_records(test_file)
    test_examples, _ = tokenize_records(test_records, tokenizer, max_length=DEMO_TRAINING["max_length"])
    pairs = eval_pairs(test_records, tokenizer)
    collate = Collator(tokenizer)

    say("3/4 measuring the base model on the test split")
    before = evaluate(
        model,
        tokenizer,
        test_examples,
        collate,
        batch_size=8,
        pairs=pairs,
        max_new_tokens=DEMO_TRAINING["max_new_tokens"],
        progress=True,  # tens of seconds on a CPU: a bar per phase (on stderr), as training shows
    )

    say(f"4/4 fine-tuning LoRA (r={DEMO_TRAINING['r']}, all linear layers) for {steps} steps")
    result = train(
        loaded=(model, tokenizer),
        data=str(train_file),
        valid_data=str(test_file),
        output_dir=str(root),
        max_steps=steps,
        overwrite=True,  # the folder is the demo's own (checked above): a new demo replaces the last one
        **DEMO_TRAINING,
    )
    after = result.final_eval

    say("\n| split: test | exact match | loss |")
    say("|---|---|---|")
    say(f"| base model | {100 * before['exact_match']:.1f}% | {before['loss']:.3f} |")
    say(f"| + LoRA ({steps} steps) | {100 * after['exact_match']:.1f}% | {after['loss']:.3f} |")
    say("\nexamples (test split):")
    for request, b, a in list(zip(test_records, before["predictions"], after["predictions"]))[:3]:
        say(f"  request:   {_request_text(request)}")
        say(f"  base:      {_one_line(b['prediction'])}")
        say(f"  with LoRA: {_one_line(a['prediction'])}  [{'correct' if a['correct'] else 'wrong'}]")
        say()
    say(f"adapter:    {result.adapter_dir}")
    say(f"metrics:    {root / 'metrics.jsonl'}")
    say(f"loss curve: {root / 'loss.png'}")
    say(
        f"took {time.perf_counter() - started:.0f} s. Next: lorakit eval --adapter {result.adapter_dir} "
        f"--data {test_file}"
    )
    say(f"      or: lorakit chat --adapter {result.adapter_dir}")
    return 0


def _check_demo_folder(root: Path, extra: set[str] | frozenset[str] = frozenset()) -> None:
    """The demo writes into a new or empty folder, or over an earlier demo's (which it replaces);
    a folder with anything else in it is refused before anything is written. ``extra``: more names a
    demo writes (the RLHF demo's run folders)."""
    from ..errors import ConfigError
    from ..training.run import EARLIER_OUTPUTS

    # What a demo writes in its folder: its dataset, then a training run's outputs.
    demo_outputs = {"data", "train_config.yaml", "metrics.jsonl", "checkpoints", *EARLIER_OUTPUTS, *extra}

    if root.exists() and not root.is_dir():
        raise ConfigError(f"--output-dir {root} is a file, not a folder: choose another --output-dir")
    others = sorted(p.name for p in root.iterdir() if p.name not in demo_outputs) if root.is_dir() else []
    if others:
        raise ConfigError(
            f"--output-dir {root} holds files that are not an earlier demo's ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}): choose a new or empty folder"
        )


def _one_line(text: str, width: int = 150) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width] + " ..."


def _request_text(record) -> str:
    text = getattr(record, "prompt", None) or str(record)
    return _one_line(text.strip().splitlines()[-1])
