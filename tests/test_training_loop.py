"""The training loop on a tiny model: schedules, LoRA+ groups, metrics, checkpoints, bit-for-bit resume."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.training import run as run_module
from lorakit.training.checkpoint import STATE_FILE, latest_checkpoint
from lorakit.training.config import TrainConfig
from lorakit.training.loop import LoopResult, epoch_batches, run_loop
from lorakit.training.optim import lr_multiplier, parameter_groups

from .tiny import tiny_llama


def examples(n=24, length=10):
    rows = ((torch.arange(n) * 5)[:, None] + torch.arange(length)[None, :]) % 128
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows]


def collate(batch):
    ids = torch.tensor([b["input_ids"] for b in batch])
    return {
        "input_ids": ids,
        "labels": torch.tensor([b["labels"] for b in batch]),
        "attention_mask": torch.ones_like(ids),
    }


def adapted_model():
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1, seed=0))
    return model


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_schedules():
    assert lr_multiplier(0, 10, 2, "cosine") == 0.5 and lr_multiplier(1, 10, 2, "cosine") == 1.0
    assert lr_multiplier(2, 10, 2, "cosine") == 1.0
    assert lr_multiplier(6, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_multiplier(9, 10, 0, "constant") == 1.0


def test_loraplus_groups():
    model = adapted_model()
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.0, loraplus_ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"])
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    assert len(parameter_groups(model, 1e-3, 0.0, None)) == 1


def test_epoch_order_is_seeded():
    assert epoch_batches(10, 3, 0, 1) == epoch_batches(10, 3, 0, 1)
    assert epoch_batches(10, 3, 0, 1) != epoch_batches(10, 3, 0, 2)
    assert sorted(i for b in epoch_batches(10, 3, 0, 0) for i in b) == list(range(10))


def test_loop_trains_logs_and_plots(tmp_path):
    model = adapted_model()
    cfg = TrainConfig(data="x", lr=1e-2, max_steps=6, batch_size=8, grad_accum=2, device="cpu", eval_every=3)
    result = run_loop(model, None, cfg, examples(), collate, tmp_path, eval_examples=examples(8), progress=False)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == list(range(1, 7))
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    assert [l["step"] for l in lines if "eval_loss" in l] == [3, 6]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert result.steps == 6 and not result.interrupted


def compile_with_aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend, which traces forward and backward as inductor
    would, without needing a C++ compiler; returns the counter of compiled frames."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: real_compile(module, backend=counter))
    return counter


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_resume_is_bit_for_bit(tmp_path, monkeypatch, compiled):
    counter = compile_with_aot_eager(monkeypatch)
    cfg = dict(data="x", lr=1e-2, max_steps=6, batch_size=4, grad_accum=2, device="cpu", seed=3, compile=compiled)
    straight = adapted_model()
    run_loop(straight, None, TrainConfig(**cfg), examples(), collate, tmp_path / "a", progress=False)

    first = adapted_model()
    run_loop(
        first,
        None,
        TrainConfig(**{**cfg, "max_steps": 6, "save_every": 2}),
        examples(),
        collate,
        tmp_path / "b",
        progress=False,
    )
    # Simulate a crash after step 4: keep checkpoints up to step 4 and resume in a fresh process state.
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000006")
    torch.manual_seed(12345)  # whatever the RNG state was, resume must restore it
    resumed = adapted_model()
    run_loop(resumed, None, TrainConfig(**{**cfg, "resume": True}), examples(), collate, tmp_path / "b", progress=False)
    for name, value in trainable_state(straight).items():
        assert torch.equal(trainable_state(resumed)[name], value), name
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (counter.frame_count > 0) == compiled


def interrupt_at_forward(model, monkeypatch, n):
    """Make the model's ``n``-th forward call raise KeyboardInterrupt (as Ctrl-C would)."""
    calls = {"n": 0}
    original = model.forward

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)


def test_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch):
    model = adapted_model()
    interrupt_at_forward(model, monkeypatch, 4)  # during step 2 (2 micro-batches per step)
    cfg = TrainConfig(data="x", lr=1e-2, max_steps=6, batch_size=4, grad_accum=2, device="cpu")
    result = run_loop(model, None, cfg, examples(), collate, tmp_path, progress=False)
    assert result.interrupted and result.steps == 1
    assert (tmp_path / "checkpoints" / "step-0000001" / "adapter" / "adapter_model.safetensors").is_file()


def test_ctrl_c_during_the_final_evaluation_keeps_the_training(tmp_path, monkeypatch):
    model = adapted_model()
    interrupt_at_forward(model, monkeypatch, 5)  # 2 steps x 2 micro-batches, then the final eval's first batch
    cfg = TrainConfig(data="x", lr=1e-2, max_steps=2, batch_size=4, grad_accum=2, device="cpu")
    result = run_loop(model, None, cfg, examples(), collate, tmp_path, eval_examples=examples(4), progress=False)
    assert not result.interrupted and result.steps == 2 and result.last_eval is None


def test_public_loraplus_optimizer():
    model = adapted_model()
    optimizer = lorakit.loraplus_optimizer(model, lr=2e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-4, 16 * 2e-4]


def test_fast_and_reference_paths_train_the_same_adapter(tmp_path):
    """Three optimizer steps (dropout on, grad accumulation) through the trainer on each path."""
    states = []
    for fast in (True, False):
        model = adapted_model()
        lorakit.set_fast_path(model, fast)
        cfg = TrainConfig(
            data="x", lr=1e-2, max_steps=3, batch_size=8, grad_accum=2, device="cpu", seed=0, fast_path=fast
        )
        run_loop(model, None, cfg, examples(), collate, tmp_path / str(fast), progress=False)
        states.append(trainable_state(model))
    for name, value in states[1].items():
        torch.testing.assert_close(states[0][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_training_steps_train_the_eager_adapter(tmp_path, monkeypatch):
    """--compile: the training steps run through torch.compile (here with the aot_eager backend) and
    train the same adapter as eager steps; the saved checkpoint has the model's own names."""
    counter = compile_with_aot_eager(monkeypatch)
    states = []
    for compiled in (True, False):
        model = adapted_model()
        cfg = TrainConfig(
            data="x",
            lr=1e-2,
            max_steps=3,
            batch_size=8,
            grad_accum=2,
            device="cpu",
            seed=0,
            compile=compiled,
            save_every=3,
        )
        run_loop(model, None, cfg, examples(), collate, tmp_path / str(compiled), progress=False)
        states.append(trainable_state(model))
        if compiled:
            assert counter.frame_count >= 1  # the steps did go through the compiler
            assert not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
            saved = torch.load(latest_checkpoint(tmp_path / "True" / "checkpoints") / STATE_FILE, weights_only=False)
            assert set(saved["trainable"]) == set(trainable_state(model))  # no "_orig_mod." in the names
    for name, value in states[1].items():
        torch.testing.assert_close(states[0][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert set(states[0]) == set(states[1])


def test_compiling_dylora_warns_of_a_graph_per_rank(tmp_path, monkeypatch, caplog):
    """DyLoRA draws a rank per step and each rank compiles its own graph: the run says so up front."""
    compile_with_aot_eager(monkeypatch)
    for compiled in (True, False):
        model = tiny_llama()
        lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"], dylora=True, seed=0))
        cfg = TrainConfig(data="x", lr=1e-2, max_steps=1, batch_size=4, device="cpu", compile=compiled)
        caplog.clear()
        with caplog.at_level("WARNING", logger="lorakit.training"):
            run_loop(model, None, cfg, examples(), collate, tmp_path / str(compiled), progress=False)
        warned = [r.getMessage() for r in caplog.records if "compiles a graph per rank" in r.getMessage()]
        assert len(warned) == (1 if compiled else 0)


def test_ctrl_c_mid_step_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Ctrl-C after the first of a step's two micro-batches: the resumed run redoes that whole step
    (same batches, same dropout masks) instead of skipping the micro-batch already drawn."""
    cfg = dict(data="x", lr=1e-2, max_steps=4, batch_size=4, grad_accum=2, device="cpu", seed=3)
    straight = adapted_model()
    run_loop(straight, None, TrainConfig(**cfg), examples(), collate, tmp_path / "a", progress=False)

    first = adapted_model()
    interrupt_at_forward(first, monkeypatch, 5)  # step 3, first micro-batch
    assert run_loop(first, None, TrainConfig(**cfg), examples(), collate, tmp_path / "b", progress=False).steps == 2
    torch.manual_seed(999)
    resumed = adapted_model()
    run_loop(resumed, None, TrainConfig(**cfg, resume=True), examples(), collate, tmp_path / "b", progress=False)
    for name, value in trainable_state(straight).items():
        assert torch.equal(trainable_state(resumed)[name], value), name


def test_latest_checkpoint_skips_a_cut_off_save(tmp_path):
    for name in ("step-0000002", "step-0000010", "step-0000011.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-0000010"  # by number, not the unfinished .tmp
    assert latest_checkpoint(tmp_path / "none") is None


def test_an_overwriting_run_drops_an_earlier_runs_checkpoints(tmp_path):
    """Otherwise a later --resume in the same directory would continue the earlier run."""
    cfg = dict(data="x", lr=1e-2, batch_size=4, device="cpu", save_every=2)
    run_loop(adapted_model(), None, TrainConfig(**cfg, max_steps=4), examples(), collate, tmp_path, progress=False)
    run_loop(
        adapted_model(),
        None,
        TrainConfig(**cfg, max_steps=2, overwrite=True),
        examples(),
        collate,
        tmp_path,
        progress=False,
    )
    assert latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step-0000002"


def test_a_fresh_run_keeps_an_earlier_runs_checkpoints_and_says_what_to_do(tmp_path):
    """Issue 18: neither resume nor overwrite: the earlier run's checkpoints are not deleted."""
    cfg = dict(data="x", lr=1e-2, batch_size=4, device="cpu", save_every=2)
    run_loop(adapted_model(), None, TrainConfig(**cfg, max_steps=4), examples(), collate, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="earlier run's checkpoints: continue it with --resume, replace it with"):
        run_loop(adapted_model(), None, TrainConfig(**cfg, max_steps=2), examples(), collate, tmp_path, progress=False)
    assert latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step-0000004"


def _folder(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_train_refuses_an_earlier_runs_folder_unless_told_to_resume_or_overwrite(tmp_path, monkeypatch):
    """Issue 18: train() into an existing run silently replaced its adapter, metrics and plot."""
    fake_data(monkeypatch)
    out = tmp_path / "run"

    def run(**own):
        options = dict(data="x", output_dir=str(out), device="cpu", max_steps=2, batch_size=4, lr=1e-2)
        return lorakit.train(loaded=(tiny_llama(), None), **{**options, **own})

    run()  # an absent folder is fine
    first = _folder(out)
    assert {"adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png", "result.json"} <= set(first)
    with pytest.raises(ConfigError, match=f"output_dir {out} is not empty .*--resume.*--overwrite"):
        run(lr=5e-2)
    # --resume in a finished run without checkpoints would start afresh and replace its adapter
    with pytest.raises(ConfigError, match="finished and left no checkpoint to continue from: replace it with"):
        run(resume=True)
    with pytest.raises(ConfigError, match="choose one"):
        run(resume=True, overwrite=True)
    assert _folder(out) == first

    (out / "eval_predictions.jsonl").write_text("an earlier run's predictions\n")
    (out / "notes.txt").write_text("mine\n")
    run(overwrite=True, lr=5e-2)
    replaced = _folder(out)
    assert replaced["adapter/adapter_model.safetensors"] != first["adapter/adapter_model.safetensors"]
    assert "eval_predictions.jsonl" not in replaced  # the new run has no validation data: none of the old's left
    assert replaced["notes.txt"] == b"mine\n"  # overwrite replaces the run, not the user's other files
    assert "overwrite: true" in replaced["train_config.yaml"].decode()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(output_dir=str(empty)).steps == 2  # an empty folder is fine
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run(output_dir=str(tmp_path / "a-file"))


def test_resume_continues_an_earlier_run_in_its_folder(tmp_path, monkeypatch):
    fake_data(monkeypatch)
    options = dict(data="x", output_dir=str(tmp_path), device="cpu", batch_size=4, lr=1e-2, save_every=1)
    lorakit.train(loaded=(tiny_llama(), None), max_steps=2, **options)
    resumed = lorakit.train(loaded=(tiny_llama(), None), max_steps=3, resume=True, **options)
    assert resumed.steps == 3
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]


def test_keep_checkpoints_keeps_the_newest_and_resume_uses_them(tmp_path):
    cfg = dict(data="x", lr=1e-2, batch_size=4, device="cpu", save_every=1, keep_checkpoints=2)
    run_loop(adapted_model(), None, TrainConfig(**cfg, max_steps=5), examples(), collate, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]
    resumed = run_loop(
        adapted_model(),
        None,
        TrainConfig(**cfg, max_steps=6, resume=True),
        examples(),
        collate,
        tmp_path,
        progress=False,
    )
    assert resumed.steps == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000005", "step-0000006"]
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        TrainConfig(data="x", keep_checkpoints=-1)


def test_resume_without_a_checkpoint_is_the_seeded_run(tmp_path):
    cfg = dict(data="x", lr=1e-2, max_steps=2, batch_size=4, device="cpu", seed=5)
    fresh, resumed = adapted_model(), adapted_model()
    run_loop(fresh, None, TrainConfig(**cfg), examples(), collate, tmp_path / "a", progress=False)
    torch.manual_seed(999)
    run_loop(resumed, None, TrainConfig(**cfg, resume=True), examples(), collate, tmp_path / "b", progress=False)
    for name, value in trainable_state(fresh).items():
        assert torch.equal(trainable_state(resumed)[name], value), name


def test_resume_with_other_lora_options_is_refused_before_any_change(tmp_path):
    cfg = dict(data="x", lr=1e-2, max_steps=2, batch_size=4, device="cpu", save_every=2)
    run_loop(adapted_model(), None, TrainConfig(**cfg), examples(), collate, tmp_path, progress=False)
    other = tiny_llama()
    lorakit.add_adapter(other, LoraConfig(r=2, alpha=8, target_modules="all-linear", seed=0))
    before = trainable_state(other)
    with pytest.raises(ConfigError, match="other shape.*train without --resume"):
        run_loop(other, None, TrainConfig(**cfg, resume=True), examples(), collate, tmp_path, progress=False)
    for name, value in before.items():
        assert torch.equal(trainable_state(other)[name], value), name


def test_logged_lr_is_the_one_the_step_used(tmp_path):
    cfg = TrainConfig(data="x", lr=1e-2, max_steps=3, batch_size=4, device="cpu", warmup_steps=2, schedule="constant")
    result = run_loop(adapted_model(), None, cfg, examples(), collate, tmp_path, progress=False)
    assert [r["lr"] for r in result.records] == pytest.approx([0.5e-2, 1e-2, 1e-2])


def fake_data(monkeypatch):
    monkeypatch.setattr(
        run_module,
        "prepare_data",
        lambda cfg, tokenizer: run_module.PreparedData(
            examples(8), [], [], collate, SimpleNamespace(summary=lambda: "", n_truncated=0)
        ),
    )


def test_runs_in_one_process_each_get_their_own_mixed_precision(tmp_path, monkeypatch):
    """accelerate keeps one mixed precision per process; a second run (an ablation, a notebook)
    with another must still get its own, and train with it."""
    fake_data(monkeypatch)
    seen = []
    real_run_loop = run_module.run_loop

    def recording(*args, **kwargs):
        seen.append(kwargs["accelerator"].mixed_precision)
        return real_run_loop(*args, **kwargs)

    monkeypatch.setattr(run_module, "run_loop", recording)
    for i, precision in enumerate(("no", "bf16", "no")):
        result = lorakit.train(
            loaded=(tiny_llama(), None),
            data="x",
            output_dir=str(tmp_path / f"{i}-{precision}"),
            max_steps=1,
            batch_size=4,
            mixed_precision=precision,
            device="cpu",
            progress=False,
        )
        assert result.steps == 1
    assert seen == ["no", "bf16", "no"]


def test_a_launched_process_loads_onto_its_own_gpu_after_the_main_process(tmp_path, monkeypatch):
    """Rank 1 of a launch on cuda:1: it waits for the main process (which fills the model cache),
    then loads the model straight onto cuda:1, not onto "cuda" (GPU 0)."""
    from contextlib import contextmanager

    import lorakit.models

    fake_data(monkeypatch)
    events = []

    class SecondGpuProcess:
        device, is_main_process = torch.device("cuda", 1), False

        @contextmanager
        def main_process_first(self):
            events.append("main process first")
            yield
            events.append("others")

        def wait_for_everyone(self):
            pass

    def load_model(name, dtype, device, gradient_checkpointing):
        events.append(f"load onto {device}")
        return tiny_llama(), None

    done = LoopResult(steps=0, interrupted=False, main_process=False)
    monkeypatch.setattr(run_module, "make_accelerator", lambda cfg: SecondGpuProcess())
    monkeypatch.setattr(run_module, "require_device", lambda device: None)  # no GPU on this machine
    monkeypatch.setattr(lorakit.models, "load_model", load_model)
    monkeypatch.setattr(run_module, "run_loop", lambda *args, **kwargs: done)
    lorakit.train(data="x", device="cuda", output_dir=str(tmp_path / "out"))
    assert events == ["main process first", "load onto cuda:1", "others"]


def test_the_launchers_mixed_precision_applies_unless_the_run_sets_its_own(tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` says so in ACCELERATE_MIXED_PRECISION, which an
    Accelerator given its own precision ignores; a run that sets none gets the launcher's."""
    fake_data(monkeypatch)
    seen = []
    done = LoopResult(steps=0, interrupted=False, main_process=False)
    monkeypatch.setattr(
        run_module, "run_loop", lambda *args, **kwargs: seen.append(kwargs["accelerator"].mixed_precision) or done
    )

    def run(launched, out, **own):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
        return lorakit.train(loaded=(tiny_llama(), None), data="x", output_dir=str(tmp_path / out), device="cpu", **own)

    run("bf16", "launched")
    assert "mixed_precision: bf16" in (tmp_path / "launched" / "train_config.yaml").read_text()
    run("fp16", "own", mixed_precision="bf16")  # the run's own choice wins
    run("no", "plain")
    assert seen == ["bf16", "bf16", "no"]
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):  # the launcher's choice is checked like the run's
        run("fp16", "fp16")
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION='fp8'"):
        run("fp8", "fp8")
    assert not (tmp_path / "fp16").exists() and not (tmp_path / "fp8").exists()


def test_train_with_unmatched_targets_writes_nothing(tmp_path, monkeypatch):
    fake_data(monkeypatch)
    model = tiny_llama()
    with pytest.raises(lorakit.TargetError):
        lorakit.train(loaded=(model, None), data="x", target_modules=["qproj"], output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_fp16_on_a_cpu_model_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    fake_data(monkeypatch)
    model = tiny_llama()
    with pytest.raises(lorakit.ConfigError, match="mixed_precision=bf16"):
        lorakit.train(loaded=(model, None), data="x", mixed_precision="fp16", output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and lorakit.adapters(model) == []


def test_train_failure_gives_the_callers_model_back_without_the_adapter(tmp_path, monkeypatch):
    fake_data(monkeypatch)
    seen = {}

    def failing_loop(model, tokenizer, cfg, *args, **kwargs):
        seen["cfg"] = cfg
        raise RuntimeError("out of memory")

    monkeypatch.setattr(run_module, "run_loop", failing_loop)
    model = tiny_llama()
    # A dict config's None is a value (no clipping), not an unset CLI flag.
    with pytest.raises(RuntimeError, match="out of memory"):
        lorakit.train({"data": "x", "max_grad_norm": None, "output_dir": str(tmp_path)}, loaded=(model, None))
    assert seen["cfg"].max_grad_norm is None
    assert lorakit.adapters(model) == [] and all(p.requires_grad for p in model.parameters())


def test_eval_loss_of_a_fully_masked_set_is_nan_not_zero():
    from lorakit.training.evaluate import eval_loss, perplexity

    model = adapted_model()
    masked = [{**e, "labels": [-100] * len(e["labels"])} for e in examples(4)]
    loss = eval_loss(model, masked, collate)
    assert math.isnan(loss) and math.isnan(perplexity(loss))
    assert eval_loss(model, examples(4), collate) > 0


def test_ctrl_c_after_the_optimizer_update_resumes_bit_for_bit(tmp_path, monkeypatch):
    """A real SIGINT right after step 3's update (on a GPU the likely moment: the host waits for the
    step's loss): the step counts as done, so the resumed run does not apply it a second time."""
    import os
    import signal

    from lorakit.training import loop as loop_module

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("the test runner handles SIGINT itself: a real Ctrl-C would reach its handler")
    cfg = dict(data="x", lr=1e-2, max_steps=4, batch_size=4, grad_accum=2, device="cpu", seed=3)
    straight = adapted_model()
    run_loop(straight, None, TrainConfig(**cfg), examples(), collate, tmp_path / "a", progress=False)

    make_optimizer = loop_module.make_optimizer
    updates = {"n": 0}

    def ctrl_c_after_third_update(optimizer, *args, **kwargs):
        updates["n"] += 1
        if updates["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    def optimizer_with_hook(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        optimizer.register_step_post_hook(ctrl_c_after_third_update)
        return optimizer

    monkeypatch.setattr(loop_module, "make_optimizer", optimizer_with_hook)
    result = run_loop(adapted_model(), None, TrainConfig(**cfg), examples(), collate, tmp_path / "b", progress=False)
    assert result.interrupted and result.steps == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop's guard is gone again
    monkeypatch.setattr(loop_module, "make_optimizer", make_optimizer)
    torch.manual_seed(999)
    resumed = adapted_model()
    run_loop(resumed, None, TrainConfig(**cfg, resume=True), examples(), collate, tmp_path / "b", progress=False)
    for name, value in trainable_state(straight).items():
        assert torch.equal(trainable_state(resumed)[name], value), name
    # The step that counted has its line in the metrics log too: no gap in the resumed run's curve.
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


class NotMainProcess:
    """A one-process Accelerator that answers like rank 1 of a DDP run: not the main process."""

    is_main_process = False

    def __init__(self):
        from accelerate import Accelerator

        self._accelerator = Accelerator(cpu=True)

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


def test_step_start_generators_are_read_only_where_a_checkpoint_can_be_written(tmp_path, monkeypatch):
    """The state of every generator (all CUDA devices' too) at a step's start only serves the Ctrl-C
    checkpoint of that step, which the main process writes after a first step: nowhere else is it read."""
    from lorakit.training import loop as loop_module

    reads = {"n": 0}
    rng_state = loop_module.rng_state

    def counted():
        reads["n"] += 1
        return rng_state()

    monkeypatch.setattr(loop_module, "rng_state", counted)
    cfg = TrainConfig(data="x", lr=1e-2, max_steps=3, batch_size=4, device="cpu")
    run_loop(adapted_model(), None, cfg, examples(), collate, tmp_path / "main", progress=False)
    assert reads["n"] == 2  # steps 2 and 3
    reads["n"] = 0
    result = run_loop(
        adapted_model(),
        None,
        cfg,
        examples(),
        collate,
        tmp_path / "other",
        accelerator=NotMainProcess(),
        progress=False,
    )
    assert reads["n"] == 0 and result.steps == 3 and not result.main_process


def test_only_the_main_process_writes_the_adapter(tmp_path, monkeypatch):
    """Under DDP every process runs train(); the others must not save into the same folder at once."""
    fake_data(monkeypatch)
    done = LoopResult(steps=2, interrupted=False, last_eval={"loss": 1.0}, main_process=False)
    monkeypatch.setattr(run_module, "run_loop", lambda *args, **kwargs: done)
    result = lorakit.train(loaded=(tiny_llama(), None), data="x", output_dir=str(tmp_path))
    assert result.steps == 2
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "result.json").exists()
    assert (tmp_path / "train_config.yaml").is_file()  # rank 0 of a launch, or no launch: the main process
    # Another process of the launch writes not even the run's config: the accelerator that decides
    # is the one the loop gets.
    given = []
    monkeypatch.setattr(run_module, "make_accelerator", lambda cfg: NotMainProcess())
    monkeypatch.setattr(run_module, "run_loop", lambda *args, **kwargs: given.append(kwargs["accelerator"]) or done)
    result = lorakit.train(loaded=(tiny_llama(), None), data="x", output_dir=str(tmp_path / "rank1"))
    assert result.steps == 2 and (tmp_path / "rank1").is_dir()
    assert not any((tmp_path / "rank1").iterdir())
    assert len(given) == 1 and not given[0].is_main_process and not result.main_process


def test_train_failure_keeps_the_callers_own_adapters(tmp_path, monkeypatch):
    """The run's adapter is the one train() adds (named "default"); the caller's others stay, active as they were."""
    fake_data(monkeypatch)

    def failing_loop(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(run_module, "run_loop", failing_loop)
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), name="mine")
    lorakit.set_adapter(model, "mine")
    trains = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="out of memory"):
        lorakit.train(loaded=(model, None), data="x", output_dir=str(tmp_path))
    assert lorakit.adapters(model) == ["mine"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trains
    from lorakit.state import active_adapters

    assert active_adapters(model) == ["mine"]


def test_trainable_tensors_backward_never_reaches_are_named(tmp_path, caplog):
    """An adapter on a module the forward never calls trains nothing: the first step says so."""
    model = tiny_llama()
    model.model.unused = torch.nn.Linear(32, 32)  # like a tower the training data does not go through
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "unused"]))
    cfg = TrainConfig(data="x", max_steps=2, batch_size=4, device="cpu")
    with caplog.at_level("WARNING", logger="lorakit"):
        run_loop(model, None, cfg, examples(), collate, tmp_path, progress=False)
    assert "2 trainable tensors got no gradient" in caplog.text and "model.unused.lora_A.default" in caplog.text
    assert caplog.text.count("got no gradient") == 1  # checked once, not every step
    caplog.clear()
    with caplog.at_level("WARNING", logger="lorakit"):
        run_loop(adapted_model(), None, cfg, examples(), collate, tmp_path / "plain", progress=False)
    assert "got no gradient" not in caplog.text
