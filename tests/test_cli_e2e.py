"""End to end: the real `lorakit` CLI on the real embedded model, a few steps each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.data import write_demo_dataset

pytestmark = pytest.mark.e2e


def lorakit(*args, check=True, timeout=600, stdin=None):
    done = subprocess.run(
        [sys.executable, "-m", "lorakit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        input=stdin,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"lorakit {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory, embedded_model):  # embedded_model: converts the model once, up front
    return write_demo_dataset(tmp_path_factory.mktemp("data"), n_train=24, n_test=4, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data):
    out = tmp_path_factory.mktemp("run")
    from lorakit.models.cache import model_cache_dir

    # --model as a local directory (the converted cache entry) exercises the path a user's own model takes.
    done = lorakit(
        "train",
        "--model",
        str(model_cache_dir("smollm2-135m")),
        "--data",
        str(demo_data["train"]),
        "--valid-data",
        str(demo_data["test"]),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "2e-3",
        "--r",
        "8",
        "--variant",
        "dylora",
        "--max-new-tokens",
        "16",
        "--save-every",
        "1",
    )
    return out, done


def test_train_writes_everything(trained):
    out, done = trained
    assert "adapter:" in done.stdout and "eval:" in done.stdout
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out / "adapter"))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert any("eval_exact_match" in r for r in records)
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoints" / "step-0000002" / "training_state.pt").is_file()
    assert "max_steps: 2" in (out / "train_config.yaml").read_text()


def test_eval_and_generate_use_the_adapter(trained, demo_data):
    out, _ = trained
    done = lorakit(
        "eval", "--adapter", str(out / "adapter"), "--data", str(demo_data["test"]), "--json", "--max-new-tokens", "16"
    )
    result = json.loads(done.stdout)
    assert result["loss"] > 0 and 0 <= result["exact_match"] <= 1 and len(result["predictions"]) == 4
    done = lorakit("generate", "--adapter", str(out / "adapter"), "--max-new-tokens", "8", "Say hello.")
    assert done.stdout.strip()


def test_chat_answers_each_turn(trained):
    out, _ = trained
    done = lorakit("chat", "--adapter", str(out / "adapter"), "--max-new-tokens", "6", stdin="Hello!\nAnd again?\n\n")
    assert done.stdout.count("model>") == 2


def test_eval_per_rank_table(trained, demo_data):
    out, _ = trained
    done = lorakit(
        "eval", "--adapter", str(out / "adapter"), "--data", str(demo_data["test"]), "--ranks", "2,8", "--json"
    )
    rows = json.loads(done.stdout)
    assert [r["rank"] for r in rows] == [2, 8] and all(r["loss"] > 0 for r in rows)
    assert rows[0]["loss"] != rows[1]["loss"]


def test_bad_data_is_reported_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    done = lorakit("train", "--data", str(bad), "--output-dir", str(tmp_path / "out"), "--max-steps", "1", check=False)
    assert done.returncode == 2
    assert "bad.jsonl:line 2" in done.stderr or "bad.jsonl:2" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_demo_runs_end_to_end(tmp_path):
    done = lorakit("demo", "--output-dir", str(tmp_path), "--steps", "2", "--n-test", "4")
    assert "| base model |" in done.stdout and "| + LoRA (2 steps) |" in done.stdout
    assert Path(tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "loss.png").is_file()


@pytest.mark.parametrize("variant", ["dora", "lora-fa", "vera", "adalora"])
def test_every_variant_trains_from_the_cli(tmp_path, demo_data, variant):
    extra = ["--adalora-target-r", "2", "--adalora-tinit", "1"] if variant == "adalora" else []
    done = lorakit(
        "train",
        "--data",
        str(demo_data["train"]),
        "--output-dir",
        str(tmp_path),
        "--variant",
        variant,
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--r",
        "4",
        "--lr",
        "1e-3",
        *extra,
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("VERA" if variant == "vera" else "LORA")
    assert config.get("use_dora", False) == (variant == "dora")
    if variant == "adalora":
        assert "AdaLoRA:" in done.stdout and config["rank_pattern"]


def test_train_under_a_two_process_launch(tmp_path, demo_data):
    """`torchrun --nproc_per_node 2 -m lorakit train` (what `accelerate launch` starts): both
    processes train, and one writes the run's files."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "lorakit",
            "-v",
            "train",
            "--data",
            str(demo_data["train"]),
            "--valid-data",
            str(demo_data["test"]),
            "--output-dir",
            str(tmp_path),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--rank",
            "4",
            "--lr",
            "1e-3",
            "--max-new-tokens",
            "4",
            "--save-every",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    # One gloo group on the CPU (without it each process trains alone, all into one folder).
    assert "process 0 of 2" in done.stderr and "process 1 of 2" in done.stderr, done.stderr[-4000:]
    assert done.stdout.count("adapter:") == 1  # one process saved and reported
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # one log, not one per process
    assert "eval_loss" in records[-1]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-0000001", "step-0000002"]
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == 2
    assert "max_steps: 2" in (tmp_path / "train_config.yaml").read_text()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4  # --rank: --r's alias
