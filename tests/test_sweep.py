"""Experiments (`lorakit sweep`, lorakit.experiments) and the methods beside LoRA (lorakit.methods),
on a tiny Llama saved to a folder with a small trained tokenizer: no downloads, a second or so per run."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lorakit
from lorakit import ConfigError
from lorakit.experiments import SweepConfig, load_config
from lorakit.experiments.driver import example_names, planned_runs
from lorakit.experiments.folder import open_folder
from lorakit.experiments.presets import PRESETS, resolve_targets
from lorakit.targets import find_targets
from lorakit.training import run as run_module
from lorakit.training.config import TrainConfig
from lorakit.training.evaluate import eval_loss

from .serve_double import echo_tokenizer
from .test_training_loop import collate, examples
from .tiny import tiny_gpt2, tiny_llama

WORDS = ["cat", "dog", "red", "blue", "one", "two", "sun", "sky"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a local model folder, and prompt/completion data."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab=512).save_pretrained(root / "model")
    echo_tokenizer().save_pretrained(root / "model")
    rows = [{"prompt": f"say {w}", "completion": w} for w in WORDS]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def base(tiny_dir, **changes):
    options = dict(
        model=str(tiny_dir / "model"),
        data=str(tiny_dir / "train.jsonl"),
        valid_data=str(tiny_dir / "train.jsonl"),
        max_steps=2,
        batch_size=4,
        lr=1e-2,
        device="cpu",
        max_new_tokens=3,
    )
    return {**options, **changes}


# -- the sweep file ----------------------------------------------------------------------------------


def test_grid_expansion_linked_axes_seeds_and_run_names():
    config = SweepConfig.from_mapping(
        {
            "base": {"data": "d.jsonl", "valid_ratio": 0.25, "seed": 5},
            "grid": [{"method": ["frozen"]}, {"r,alpha": [[2, 4], [8, 16]], "target_modules": ["qv", "all-linear"]}],
            "seeds": 2,
        }
    )
    runs = planned_runs(config)
    assert [r.name for r in runs[:3]] == ["000-frozen-s5", "000-frozen-s6", "001-r=2_alpha=4_qv-s5"]
    assert len(runs) == 2 * (1 + 2 * 2)
    assert runs[2].values == {"r": 2, "alpha": 4, "target_modules": "qv"}
    assert config.axes == ["method", "r", "alpha", "target_modules"]
    options = config.train_options(runs[2].values)
    assert options["target_modules"] == PRESETS["qv"] and options["seed"] == 5
    assert config.metric == "exact_match" and config.direction == "maximize"  # causal-lm's default


def test_presets_select_the_same_projections_in_every_family():
    def chosen(model, preset):
        return {name.rsplit(".", 1)[-1] for name, _ in find_targets(model, lorakit.LoraConfig(target_modules=preset))}

    llama = tiny_llama()
    assert chosen(llama, resolve_targets("qv")) == {"q_proj", "v_proj"}
    assert chosen(llama, resolve_targets("qkvo")) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert chosen(llama, resolve_targets("mlp")) == {"gate_proj", "up_proj", "down_proj"}
    everything = {name for name, _ in find_targets(llama, lorakit.LoraConfig(target_modules="all-linear"))}
    assert {n for n, _ in find_targets(llama, lorakit.LoraConfig(target_modules=resolve_targets("attention+mlp")))} == (
        everything
    )
    gpt2 = tiny_gpt2()  # q, k and v are one layer there: c_attn stands for any of them
    assert chosen(gpt2, resolve_targets("qv")) == {"c_attn"}
    qkvo = {n for n, _ in find_targets(gpt2, lorakit.LoraConfig(target_modules=resolve_targets("qkvo")))}
    assert qkvo == {f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")}
    assert resolve_targets(["q_proj"]) == ["q_proj"] and resolve_targets("q_proj,v_proj") == "q_proj,v_proj"
    with pytest.raises(ConfigError, match=r"unknown target-module preset 'qvv'.*\[qvv\]"):
        resolve_targets("qvv")


BAD = [
    ({"rank": [8]}, "unknown sweep key\\(s\\) \\['rank'\\]: training options go under base:"),
    ({"base": {"lrr": 1e-3}}, "base.lrr: unknown training option"),
    ({"base": {"output_dir": "x"}}, "base.output_dir: each run's folder is the sweep's"),
    ({"grid": {"rank": [8]}}, "grid.rank: unknown training option 'rank'"),
    ({"grid": {"r": []}}, "grid.r is empty"),
    ({"grid": {"r": 8}}, "grid.r must be a list of values, got 8"),
    ({"grid": {"r": [4, 0]}}, "grid.r\\[1\\] = 0: r must be"),
    ({"grid": {"lr": ["fast"]}}, "grid.lr\\[0\\] = 'fast': lr must be a positive number"),
    ({"grid": {"target_modules": ["qv", "qkvv"]}}, "unknown target-module preset 'qkvv'"),
    ({"grid": {"method": ["lora", "adapterz"]}}, "grid.method\\[1\\] = 'adapterz': method must be one of lora"),
    ({"grid": {"r,alpha": [[2, 4], [8]]}}, "grid.r,alpha\\[1\\] must be a list of 2 values"),
    ({"grid": {"seed": [0, 1]}}, "grid.seed: seeds are repeated with seeds: K"),
    ({"grid": {"method_options": [{"num_virtual_tokens": 4}]}}, "do not apply to method lora"),
    ({"search": {"lr": {"low": 1e-2, "high": 1e-4}}, "trials": 2}, "search.lr: low \\(0.01\\) must be below high"),
    ({"search": {"lr": {"low": 1e-4, "hi": 1e-2}}, "trials": 2}, "search.lr: unknown key\\(s\\) \\['hi'\\]"),
    ({"search": {"dropout": {"choices": [0.1, 1.5]}}, "trials": 2}, "search.dropout = 1.5: dropout"),
    ({"search": {"r": {"choices": [4, 8]}}, "trials": 2}, "search.r: r is a grid axis too"),
    ({"search": {"lr": {"choices": [1e-3, 1e-2]}}}, "search: set the number of trials"),
    ({"metric": "bleu"}, "metric 'bleu' is not one lorakit knows the direction of"),
    ({"seeds": 0}, "seeds must be an integer >= 1"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[m.split(":")[0][:30] for _, m in BAD])
def test_bad_sweep_configs_are_refused_before_any_run_naming_the_key(changes, message):
    data = {"base": {"data": "d.jsonl", "valid_ratio": 0.25}, "grid": {"r": [4]}}
    for key, value in changes.items():
        data[key] = {**data[key], **value} if key == "base" else value
    with pytest.raises(ConfigError, match=message) as caught:
        SweepConfig.from_mapping(data)
    assert "\n" not in str(caught.value)


def test_the_metric_needs_validation_data():
    with pytest.raises(ConfigError, match="metric exact_match is measured on validation data: set base.valid_data"):
        SweepConfig.from_mapping({"base": {"data": "d.jsonl"}, "grid": {"r": [4]}})
    assert SweepConfig.from_mapping({"base": {"data": "d.jsonl"}, "metric": "train_loss"}).direction == "minimize"


def test_the_built_in_examples_are_valid_sweeps():
    assert {"demo-rank", "demo-modules", "classify-methods"} <= set(example_names())
    for name in example_names():
        config = load_config(name)
        assert planned_runs(config) and config.example_data
    ranks = load_config("demo-rank", overrides=["max_steps=3", "example_data.n_test=8"])
    assert ranks.base["max_steps"] == 3 and ranks.example_data["n_test"] == 8


def test_a_folder_holding_another_sweep_is_refused_saying_what_differs(tmp_path):
    first = SweepConfig.from_mapping({"base": {"data": "d.jsonl", "valid_ratio": 0.25, "lr": 1e-3}})
    assert open_folder(first, tmp_path / "sweep") is False
    grown = SweepConfig.from_mapping({"base": {"data": "d.jsonl", "valid_ratio": 0.25, "lr": 1e-3}, "seeds": 3})
    assert open_folder(grown, tmp_path / "sweep") is True  # more seeds only add runs: the same sweep
    other = SweepConfig.from_mapping({"base": {"data": "d.jsonl", "valid_ratio": 0.25, "lr": 2e-3}})
    with pytest.raises(ConfigError, match=r"holds another sweep \(it differs in base.lr\): continue that one with"):
        open_folder(other, tmp_path / "sweep")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a sweep folder \\(it holds notes.txt\\)"):
        open_folder(first, tmp_path / "mine")


# -- methods: what trains ----------------------------------------------------------------------------


def fake_data(monkeypatch):
    monkeypatch.setattr(
        run_module,
        "prepare_data",
        lambda cfg, tokenizer: run_module.PreparedData(
            examples(16), examples(8), [], collate, SimpleNamespace(summary=lambda: "", n_truncated=0)
        ),
    )


METHODS = [
    # method, model, lr, options, which parameter names train, what is saved
    ("lora", tiny_llama, 1e-2, None, lambda n: ".lora_A." in n or ".lora_B." in n, "adapter/adapter_model.safetensors"),
    ("full", tiny_llama, 1e-2, None, lambda n: True, "model/model.safetensors"),
    ("bitfit", tiny_gpt2, 3e-2, None, lambda n: n.endswith(".bias"), "trained/trained.safetensors"),
    ("bitfit-added", tiny_llama, 3e-2, None, lambda n: n.endswith("_proj.bias"), "trained/trained.safetensors"),
    ("houlsby", tiny_llama, 1e-2, {"bottleneck": 4}, lambda n: "houlsby_adapter" in n or "norm" in n, "trained"),
    ("prompt-tuning", tiny_llama, 0.3, {"num_virtual_tokens": 4}, lambda n: "prompt_encoder" in n, "adapter"),
    ("prefix-tuning", tiny_llama, 0.1, {"num_virtual_tokens": 4}, lambda n: "prompt_encoder" in n, "adapter"),
    ("ia3", tiny_llama, 0.1, None, lambda n: ".ia3_l." in n, "adapter/adapter_config.json"),
]


@pytest.mark.parametrize("method,make,lr,options,trains,saved", METHODS, ids=[m[0] for m in METHODS])
def test_each_method_trains_only_what_it_should_and_its_loss_falls(
    tmp_path, monkeypatch, method, make, lr, options, trains, saved
):
    fake_data(monkeypatch)
    model = make()
    seen = {}
    real = run_module.run_loop

    def recording(trained, *args, **kwargs):
        seen["trainable"] = [n for n, p in trained.named_parameters() if p.requires_grad]
        seen["all"] = [n for n, _ in trained.named_parameters()]
        return real(trained, *args, **kwargs)

    monkeypatch.setattr(run_module, "run_loop", recording)
    result = lorakit.train(
        loaded=(model, None),
        data="x",
        valid_data="y",
        output_dir=str(tmp_path / method),
        max_steps=8,
        batch_size=4,
        lr=lr,
        schedule="constant",
        device="cpu",
        method=method,
        method_options=options,
        progress=False,
    )
    assert seen["trainable"] and all(trains(n) for n in seen["trainable"]), seen["trainable"]
    if method == "full":
        assert seen["trainable"] == seen["all"]
    if method == "prompt-tuning":  # the virtual tokens are the only trained tensor: (4, hidden 32)
        assert result.trainable_params == 4 * 32
    # The loss on the fixed validation examples falls (single training batches are too noisy to compare).
    untrained = eval_loss(make(), examples(8), collate, batch_size=4, device="cpu")
    assert result.final_eval["loss"] < untrained - 1e-3, (result.final_eval["loss"], untrained)
    assert (tmp_path / method / saved).exists()
    summary = json.loads((tmp_path / method / "result.json").read_text())
    assert summary["method"] == method and summary["trainable_params"] == result.trainable_params > 0


def test_the_frozen_model_only_evaluates_and_bitfit_refuses_a_model_without_biases(tmp_path, monkeypatch):
    fake_data(monkeypatch)
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = dict(data="x", valid_data="y", max_steps=3, batch_size=4, device="cpu", progress=False)
    result = lorakit.train(loaded=(model, None), output_dir=str(tmp_path / "frozen"), method="frozen", **options)
    assert result.steps == 0 and result.saved is None and result.trainable_params == 0
    assert result.final_eval["loss"] > 0 and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [r["step"] for r in result.records] == [0] and "eval_loss" in result.records[0]
    with pytest.raises(ConfigError, match="bitfit trains bias terms, and LlamaForCausalLM has none.*bitfit-added"):
        lorakit.train(loaded=(model, None), output_dir=str(tmp_path / "bitfit"), method="bitfit", **options)
    with pytest.raises(ConfigError, match="trains nothing and only evaluates: give validation data"):
        lorakit.train(loaded=(model, None), data="x", output_dir=str(tmp_path / "f2"), method="frozen")
    with pytest.raises(ConfigError, match="task dpo measures the policy against its reference.*method full does"):
        TrainConfig(task="dpo", method="full")


# -- sweeps on the tiny model ------------------------------------------------------------------------


def test_a_failing_run_is_recorded_the_sweep_completes_and_the_report_has_its_plots(tiny_dir, tmp_path):
    """bitfit fails on a bias-free Llama; the rest of the sweep runs, with two seeds per point."""
    out = tmp_path / "sweep"
    table = lorakit.sweep(
        {
            "title": "tiny",
            "base": base(tiny_dir),
            "grid": [{"method": ["frozen", "bitfit"]}, {"r": [2, 4]}],
            "metric": "eval_loss",
        },
        out=out,
        seeds=2,
        progress=False,
    )
    status = {r["run"]: r["status"] for r in table}
    assert status == {
        "000-frozen-s0": "ok",
        "000-frozen-s1": "ok",
        "001-bitfit-s0": "failed",
        "001-bitfit-s1": "failed",
        "002-r=2-s0": "ok",
        "002-r=2-s1": "ok",
        "003-r=4-s0": "ok",
        "003-r=4-s1": "ok",
    }
    failed = table[2]
    assert "ConfigError: method bitfit trains bias terms" in failed["error"]
    assert "Traceback" in (out / "runs" / "001-bitfit-s0" / "sweep_error.txt").read_text()
    lora = table[4]
    assert lora["trainable_params"] > 0 and lora["saved_bytes"] > 0 and lora["peak_memory_bytes"] > 0
    assert lora["wall_s"] > 0 and lora["tokens_per_s"] > 0 and lora["train_loss"] > 0 and "exact_match" in lora
    assert table.verdict().best.method != "bitfit"

    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 9 and csv_lines[0].startswith("run,group,label,method,r,seed,")
    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 8 and data["verdict"]["best"]
    for name in ("metric_vs_rank", "time_vs_rank", "metric_vs_params", "loss_curves"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        import matplotlib.image

        height, width, _ = matplotlib.image.imread(png).shape
        assert height > 200 and width > 200
    report = (out / "report.md").read_text()
    assert "# tiny" in report and "**Best:" in report and " ± " in report
    assert "![Metric vs rank](metric_vs_rank.png)" in report and "## Failed runs" in report
    assert "Noise: the seeds' spread" in report


def test_resume_skips_finished_runs_and_continues_a_killed_one(tiny_dir, tmp_path, monkeypatch):
    import lorakit.training

    config = {"base": base(tiny_dir, max_steps=4, save_every=2), "grid": {"r": [2, 4]}}
    out = tmp_path / "sweep"
    first = lorakit.sweep(config, out=out, progress=False)
    assert [r["steps"] for r in first] == [4, 4]
    # Run 001 "killed" after its step-2 checkpoint: no result, no adapter, no later checkpoint or lines.
    killed = out / "runs" / "001-r=4-s0"
    finished = (out / "runs" / "000-r=2-s0" / "sweep_result.json").read_text()
    for name in ("sweep_result.json", "result.json"):
        (killed / name).unlink()
    for name in ("adapter", "checkpoints/step-0000004"):
        import shutil

        shutil.rmtree(killed / name)
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 2))

    calls = []
    real = lorakit.training.train
    monkeypatch.setattr(lorakit.training, "train", lambda options, **kw: calls.append(options) or real(options, **kw))
    again = lorakit.sweep(config, out=out, progress=False)
    assert [c["output_dir"] for c in calls] == [str(killed)] and calls[0]["resume"] is True
    assert (out / "runs" / "000-r=2-s0" / "sweep_result.json").read_text() == finished
    assert again[1]["status"] == "ok" and again[1]["steps"] == 4 and again[1]["resumed"] is True
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2, 3, 4, 4]  # train lines 1-4, then the final evaluation's
    assert again[1]["eval_loss"] == pytest.approx(first[1]["eval_loss"], rel=1e-5)  # bit-for-bit resume
    with pytest.raises(ConfigError, match="holds another sweep"):
        lorakit.sweep({**config, "grid": {"r": [2, 8]}}, out=out, progress=False)


def test_search_with_a_fixed_seed_is_reproducible_and_continues_without_repeating(tiny_dir, tmp_path):
    config = {
        "base": base(tiny_dir, max_steps=1),
        "search": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "r": {"choices": [2, 4, 8]}},
        "metric": "eval_loss",
        "search_seed": 3,
    }

    def draws(table):
        return [(r["run"], r["lr"], r["r"]) for r in table]

    one = draws(lorakit.sweep(config, out=tmp_path / "one", search=3, progress=False))
    assert draws(lorakit.sweep(config, out=tmp_path / "two", search=3, progress=False)) == one
    assert (tmp_path / "one" / "optuna.db").is_file() and len({lr for _, lr, _ in one}) == 3
    grown = draws(lorakit.sweep(config, out=tmp_path / "one", search=4, progress=False))
    assert grown[:3] == one and grown[3][1] not in {lr for _, lr, _ in one}


def test_two_worker_processes_share_the_runs(tiny_dir, tmp_path):
    out = tmp_path / "sweep"
    table = lorakit.sweep(
        {"base": base(tiny_dir, max_steps=1), "grid": {"r": [2, 4, 8]}}, out=out, devices="cpu,cpu", progress=False
    )
    assert [r["status"] for r in table] == ["ok", "ok", "ok"] and all(r["device"] == "cpu" for r in table)
    assert (out / "report.md").is_file()


def test_gpu_workers_each_see_one_gpu_and_cpu_workers_share_the_cores(monkeypatch):
    """--devices 0,1: each worker's process sees only its GPU (as cuda); cpu,cpu: the cores split."""
    from lorakit.experiments.workers import parse_devices, worker_environment

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert parse_devices("2, 3") == ["2", "3"]
    env, device = worker_environment("3", 2)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and device == "cuda"
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    env, device = worker_environment("cpu", 2)
    assert env["LORAKIT_SWEEP_THREADS"] == "4" and device == "cpu"
    with pytest.raises(ConfigError, match="not a device"):
        parse_devices("gpu0")


@pytest.mark.e2e
def test_lorakit_sweep_command_end_to_end(tiny_dir, tmp_path):
    import yaml

    config = tmp_path / "ranks.yaml"
    config.write_text(yaml.safe_dump({"title": "ranks", "base": base(tiny_dir), "grid": {"r": [2, 4]}}))
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "lorakit", "sweep", str(config), "--out", str(out), "--no-progress"]
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(lorakit.__file__).parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "2 runs, 2 finished, 0 failed" in done.stdout and "best: r=" in done.stdout
    assert {"results.csv", "results.json", "report.md", "metric_vs_rank.png", "sweep.yaml"} <= {
        p.name for p in out.iterdir()
    }
    assert f"lorakit sweep {config} --out {out} --no-progress" in (out / "report.md").read_text()
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "2 runs, 2 finished" in again.stdout  # the same command continues (nothing)
    bad = subprocess.run(
        [sys.executable, "-m", "lorakit", "sweep", str(config), "--out", str(out), "--set", "lr=0.5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: sweep folder") and "base.lr" in bad.stderr


def test_linked_axes_draw_one_rank_line_and_ties_go_to_the_lower_eval_loss(tmp_path):
    from lorakit.experiments.plots import draw_all
    from lorakit.experiments.results import ResultsTable

    def row(r, match, loss):
        group = f"r{r}"
        return dict(run=f"{group}-s0", group=group, label=f"r={r} alpha={2 * r}", method="lora", r=r, alpha=2 * r,
                    status="ok", exact_match=match, eval_loss=loss, wall_s=1.0, tokens_per_s=10.0,
                    trainable_params=100 * r)  # fmt: skip

    rows = [row(2, 0.5, 0.3), row(4, 0.75, 0.2), row(8, 0.75, 0.1)]
    table = ResultsTable(rows, "exact_match", "maximize", ["r", "alpha"], tmp_path, linked=[["r", "alpha"]])
    assert set(draw_all(table, tmp_path)) == {"metric_vs_rank", "time_vs_rank", "metric_vs_params"}
    verdict = table.verdict()
    assert (verdict.best.label, verdict.runner_up.label, verdict.margin) == ("r=8 alpha=16", "r=4 alpha=8", 0.0)
