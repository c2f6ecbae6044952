"""QLoRA training: bitsandbytes' optimizers (8-bit state, paged), resume with 8-bit state, the
quantization flags, `memory_report`, and a tiny NF4 model trained on the CPU."""

import json
import logging
import shutil
import sys
import warnings

import pytest
import torch

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.cli.main import build_parser
from lorakit.cli.options import train_overrides
from lorakit.memory import memory_report
from lorakit.training.config import TrainConfig
from lorakit.training.loop import run_loop
from lorakit.training.optim import make_optimizer

from .tiny import tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def examples(n=24, length=10, vocab=128):
    rows = ((torch.arange(n) * 5)[:, None] + torch.arange(length)[None, :]) % vocab
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows]


def collate(batch):
    ids = torch.tensor([b["input_ids"] for b in batch])
    return {
        "input_ids": ids,
        "labels": torch.tensor([b["labels"] for b in batch]),
        "attention_mask": torch.ones_like(ids),
    }


def wide_adapted_model():
    """Adapters big enough that bitsandbytes keeps their moments in 8 bits (>= 4,096 elements: the
    (32, 128) A matrices and the MLP's B) next to small ones it keeps in 32 bits (k/v's (64, 32) B)."""
    model = tiny_llama(hidden=128)
    lorakit.add_adapter(model, LoraConfig(r=32, alpha=32, target_modules="all-linear", dropout=0.1, seed=0))
    return model


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def quantize_linears_directly(model, quant_type="nf4", double_quant=True):
    """Every linear layer but the LM head replaced by bitsandbytes' Linear4bit (fp32 compute), as
    transformers' BitsAndBytesConfig would: independent of lorakit.quantize."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=torch.float32,
                quant_type=quant_type,
                compress_statistics=double_quant,
            )
            q.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))  # .to quantizes
    return model


# --- optimizers --------------------------------------------------------------------------------


def test_adamw8bit_keeps_8_bit_moments_for_large_adapter_tensors():
    model = wide_adapted_model()
    optimizer = make_optimizer(model, 1e-3, optimizer="adamw8bit")
    assert type(optimizer).__name__ == "AdamW8bit"
    model(**collate(examples(4))).loss.backward()
    optimizer.step()
    by_name = {p: n for n, p in model.named_parameters()}
    states = {by_name[p]: s for p, s in optimizer.state.items()}
    big = next(n for n in states if n.endswith("q_proj.lora_A.default"))
    small = next(n for n in states if n.endswith("k_proj.lora_B.default"))
    assert states[big]["state1"].dtype == torch.uint8 and states[big]["state2"].dtype == torch.uint8
    assert states[small]["state1"].dtype == torch.float32


def test_paged_optimizers_run_unpaged_off_the_gpu_with_lorakits_notice(caplog):
    model = wide_adapted_model()
    for option, expected in (("paged_adamw", "AdamW"), ("paged_adamw8bit", "AdamW8bit")):
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, "lorakit.training"):
            warnings.simplefilter("always")
            optimizer = make_optimizer(model, 1e-3, optimizer=option)
            model(**collate(examples(4))).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert type(optimizer).__name__ == expected and type(optimizer).__module__.startswith("bitsandbytes")
        assert [r.getMessage() for r in caplog.records] == [
            f"optimizer {option}: paging needs a CUDA GPU and the adapter trains on the cpu; it runs unpaged "
            "(the same updates, the state held in memory)"
        ]
        assert not [w for w in caught if "aged" in str(w.message)]  # bitsandbytes' own fallback warning


def test_bitsandbytes_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(
        ConfigError, match=r'^optimizer adamw8bit needs bitsandbytes, .*pip install "lorakit\[qlora\]"$'
    ):
        make_optimizer(wide_adapted_model(), 1e-3, optimizer="adamw8bit")


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="optimizer must be one of adamw | adamw8bit"):
        TrainConfig(data="x", optimizer="adam8")


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit", "paged_adamw"])
def test_resume_with_bitsandbytes_state_is_bit_for_bit(tmp_path, optimizer):
    cfg = dict(data="x", lr=1e-2, max_steps=6, batch_size=4, grad_accum=2, device="cpu", seed=3, optimizer=optimizer)
    straight = wide_adapted_model()
    run_loop(straight, None, TrainConfig(**cfg), examples(), collate, tmp_path / "a", progress=False)

    first = wide_adapted_model()
    run_loop(first, None, TrainConfig(**cfg, save_every=2), examples(), collate, tmp_path / "b", progress=False)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000006")  # as if the run died after step 4
    saved = torch.load(tmp_path / "b" / "checkpoints" / "step-0000004" / "training_state.pt", weights_only=False)
    if optimizer.endswith("8bit"):
        quantized = [
            s
            for s in saved["optimizer"]["state"].values()
            if "__bnb_optimizer_quant_state__" in s
            or any(torch.is_tensor(v) and v.dtype == torch.uint8 for v in s.values())
        ]
        assert quantized, "no 8-bit state in the checkpoint"
    torch.manual_seed(12345)  # whatever the generators hold, resume restores them
    resumed = wide_adapted_model()
    run_loop(resumed, None, TrainConfig(**cfg, resume=True), examples(), collate, tmp_path / "b", progress=False)
    for name, value in trainable_state(straight).items():
        assert torch.equal(trainable_state(resumed)[name], value), name


def test_resume_with_another_optimizer_is_refused_before_any_change(tmp_path):
    cfg = dict(data="x", lr=1e-2, max_steps=2, batch_size=4, device="cpu", save_every=2)
    run_loop(wide_adapted_model(), None, TrainConfig(**cfg), examples(), collate, tmp_path, progress=False)
    other = wide_adapted_model()
    before = trainable_state(other)
    with pytest.raises(
        ConfigError, match=r"holds torch\.AdamW's state .* bitsandbytes\.AdamW8bit; resume with --optimizer adamw,"
    ):
        run_loop(
            other,
            None,
            TrainConfig(**{**cfg, "max_steps": 4}, resume=True, optimizer="adamw8bit"),
            examples(),
            collate,
            tmp_path,
            progress=False,
        )
    assert all(torch.equal(before[n], v) for n, v in trainable_state(other).items())


# --- flags and config --------------------------------------------------------------------------


def test_quantization_flags_reach_load_model(tmp_path, monkeypatch):
    args = build_parser().parse_args(
        ["train", "--data", "d.jsonl", "--quantize", "nf4", "--no-double-quant", "--compute-dtype", "fp32",
         "--optimizer", "paged_adamw8bit", "--memory-report"]
    )  # fmt: skip
    cfg = TrainConfig.from_sources(None, **train_overrides(args))
    assert (cfg.quantize, cfg.double_quant, cfg.compute_dtype, cfg.optimizer, cfg.memory_report) == (
        "nf4", False, "fp32", "paged_adamw8bit", True
    )  # fmt: skip
    assert cfg.quantize_kwargs() == {"quantize": "nf4", "double_quant": False, "compute_dtype": "fp32"}
    assert TrainConfig(data="x", quantize="int8").quantize_kwargs()["compute_dtype"] is None  # auto
    assert TrainConfig(data="x").quantize_kwargs() == {}  # load_model is called as before
    assert TrainConfig(data="x", quantize="none").quantize is None

    seen = {}

    def fake_load_model(name, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop after load_model")

    import lorakit.models

    monkeypatch.setattr(lorakit.models, "load_model", fake_load_model)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    with pytest.raises(RuntimeError, match="stop after load_model"):
        lorakit.train(data=str(data), output_dir=str(tmp_path / "run"), quantize="fp4", compute_dtype="bf16")
    assert (seen["quantize"], seen["double_quant"], seen["compute_dtype"]) == ("fp4", True, "bf16")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantize": "nf3"}, "quantize must be nf4 | fp4 | int8 or none, got 'nf3'"),
        ({"quantize": "nf4", "compute_dtype": "fp8"}, "compute_dtype must be auto | bf16 | fp16 | fp32"),
        ({"compute_dtype": "bf16"}, "compute_dtype=bf16 is the dtype a quantized base computes in: add --quantize"),
    ],
)
def test_bad_quantization_options_are_one_line_errors(options, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        TrainConfig(data="x", **options)


def test_quantize_with_a_passed_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"quantize it first \(lorakit\.quantize\(model, 'nf4'\)\)"):
        lorakit.train(loaded=(tiny_llama(), None), data="x", output_dir=str(tmp_path), quantize="nf4")
    assert not any(tmp_path.iterdir())


# --- memory_report -----------------------------------------------------------------------------


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_memory_report_on_a_plain_lora_model_counts_every_tensor_once():
    model = tiny_llama(tie=True)  # tied embedding and head: one tensor
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    adapter = [p for n, p in model.named_parameters() if "lora_" in n]
    base = [p for n, p in model.named_parameters() if "lora_" not in n] + list(model.buffers())
    fresh = memory_report(model)
    assert (fresh.quantized, fresh.base, fresh.adapters, fresh.gradients, fresh.optimizer_state) == (
        0, nbytes(base), nbytes(adapter), 0, 0
    )  # fmt: skip
    optimizer = make_optimizer(model, 1e-3)
    model(**collate(examples(4))).loss.backward()
    optimizer.step()
    report = memory_report(model, optimizer)
    assert report.gradients == nbytes(adapter)
    assert report.optimizer_state == 2 * nbytes(adapter) + 4 * len(adapter)  # exp_avg, exp_avg_sq, fp32 step
    assert report.tensor_bytes == report.base + report.adapters + report.gradients + report.optimizer_state
    assert report.peak > 0 and report.peak_label.startswith("peak RSS, process-wide")
    assert "measured peak" in str(report) and "optimizer state" in str(report)
    assert lorakit.summary(model).splitlines()[-1].startswith("memory: base ")


def test_memory_report_counts_the_quantized_weights_packed_scales_and_nested_state():
    model = quantize_linears_directly(tiny_llama(hidden=128))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    states = [m.weight.quant_state for m in layers]
    assert all(s.nested for s in states)
    packed = nbytes(m.weight for m in layers)
    scales = nbytes(s.absmax for s in states)  # uint8: the scales are themselves quantized
    nested = nbytes(t for s in states for t in (s.state2.absmax, s.state2.code, s.offset))
    maps = nbytes(s.code for s in states)
    report = memory_report(model)
    assert report.quantized_parts == {"packed": packed, "scales": scales, "nested": nested, "maps": maps}
    assert report.quantized == packed + scales + nested + maps
    # Half a byte per weight, packed.
    assert packed == sum(m.in_features * m.out_features for m in layers) // 2
    rest = [p for p in model.parameters() if type(p).__name__ != "Params4bit"] + list(model.buffers())
    assert report.base == nbytes(rest)
    assert report.tensor_bytes == report.quantized + report.base
    assert lorakit.summary(model).splitlines()[-1].startswith("memory: quantized base ")

    # Without double quantization: one fp32 absmax per block of 64 weights, no nested state.
    plain = memory_report(quantize_linears_directly(tiny_llama(hidden=128), double_quant=False))
    assert plain.quantized_parts["nested"] == 0
    assert plain.quantized_parts["scales"] == 4 * (2 * packed // 64)


def test_memory_report_counts_int8_weights_and_their_scales():
    model = tiny_llama(hidden=64)
    linear = model.model.layers[0].mlp.up_proj
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
    q.load_state_dict(linear.state_dict())
    model.model.layers[0].mlp.up_proj = q.to("cpu")
    report = memory_report(model)
    assert report.quantized_parts["packed"] == linear.in_features * linear.out_features  # int8: a byte each
    assert report.quantized_parts["scales"] == 4 * linear.out_features  # one fp32 scale per row
    model(torch.randint(0, 128, (1, 5)))  # a forward moves CB/SCB into the layer's state: not counted twice
    assert memory_report(model).quantized == report.quantized


# --- training on a 4-bit base (needs lorakit.quantize) ------------------------------------------

needs_quantize = pytest.mark.skipif(not hasattr(lorakit, "quantize"), reason="lorakit.quantize not merged yet")


def quantized_state(model):
    """Every quantized tensor (packed, absmax, nested state, code) by module path, cloned."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            s = module.weight.quant_state
            tensors = out[name.removesuffix(".base_layer")] = [
                module.weight.data.clone(),
                s.absmax.clone(),
                s.code.clone(),
            ]
            if s.nested:
                tensors += [s.state2.absmax.clone(), s.state2.code.clone(), s.offset.clone()]
    return out


@needs_quantize
def test_training_a_tiny_nf4_model_changes_only_the_adapter(tmp_path):
    model = lorakit.quantize(tiny_llama(hidden=128), "nf4", double_quant=True, compute_dtype=torch.float32)
    frozen = quantized_state(model)
    assert frozen and all(len(v) == 6 for v in frozen.values())
    lorakit.add_adapter(model, LoraConfig(r=8, alpha=16, target_modules="all-linear", seed=0))
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = trainable_state(model)
    cfg = TrainConfig(
        data="x", lr=1e-2, max_steps=8, batch_size=8, device="cpu", optimizer="adamw8bit", memory_report=True
    )
    result = run_loop(model, None, cfg, examples(), collate, tmp_path, progress=False)
    losses = [r["loss"] for r in result.records]
    assert losses[-1] < losses[0] - 0.1
    after = quantized_state(model)
    for name, tensors in frozen.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[name], strict=True)), name
    assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if p.requires_grad)
    memory = json.loads((tmp_path / "memory.json").read_text())
    assert memory["quantized"] > 0 and memory["gradients"] == memory["adapters"]
    assert memory["tensor_bytes"] == sum(
        memory[k] for k in ("quantized", "base", "adapters", "gradients", "optimizer_state")
    )
    assert result.memory.peak > 0


def test_memory_report_flag_writes_memory_json(tmp_path):
    model = wide_adapted_model()
    cfg = TrainConfig(data="x", lr=1e-2, max_steps=2, batch_size=8, device="cpu", memory_report=True)
    result = run_loop(model, None, cfg, examples(), collate, tmp_path, progress=False)
    written = json.loads((tmp_path / "memory.json").read_text())
    assert written["adapters"] == written["gradients"] == result.memory.adapters > 0
    assert written["optimizer_state"] > 0 and written["peak"] > 0
    assert written["tensor_bytes"] == result.memory.tensor_bytes


# --- transformers.Trainer ----------------------------------------------------------------------


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        self.rows = ((torch.arange(n) * 7)[:, None] + torch.arange(length)[None, :]) % 128

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def trainer_args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(
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


@needs_quantize
def test_trainer_trains_a_model_quantized_by_lorakit(tmp_path):
    """lorakit.quantize leaves no transformers quantizer on the model, so Trainer takes it as it is."""
    from transformers import Trainer

    model = lorakit.quantize(tiny_llama(hidden=64), "nf4", compute_dtype=torch.float32)
    frozen = quantized_state(model)
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=CountingDataset())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1
    after = quantized_state(model)
    assert all(all(torch.equal(a, b) for a, b in zip(v, after[k], strict=True)) for k, v in frozen.items())


def test_a_model_transformers_quantized_trains_with_lorakit_train_not_trainer(tmp_path):
    """transformers.Trainer refuses a model loaded with BitsAndBytesConfig unless it is PEFT's
    PeftModel (its check looks for PEFT's wrapper, not for trainable adapters); lorakit's loop
    trains it, which is what docs/qlora.md tells Trainer users to use."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer

    tiny_llama(hidden=64).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with pytest.raises(ValueError, match="purely quantized models"):
        Trainer(model=model, args=trainer_args(tmp_path / "trainer"), train_dataset=CountingDataset())
    frozen = quantized_state(model)
    cfg = TrainConfig(data="x", lr=2e-2, max_steps=8, batch_size=8, device="cpu", schedule="constant")
    result = run_loop(model, None, cfg, examples(), collate, tmp_path / "run", progress=False)
    assert result.records[-1]["loss"] < result.records[0]["loss"] - 0.1
    after = quantized_state(model)
    assert all(all(torch.equal(a, b) for a, b in zip(v, after[k], strict=True)) for k, v in frozen.items())


# --- the CLI, end to end -----------------------------------------------------------------------


def loader_quantizes():
    import inspect

    from lorakit.models import load_model

    return "quantize" in inspect.signature(load_model).parameters


@pytest.mark.e2e
@pytest.mark.skipif(not loader_quantizes(), reason="load_model(quantize=...) not merged yet")
def test_cli_trains_the_embedded_model_in_nf4_and_resumes_with_8_bit_state(tmp_path, embedded_model):
    import os
    import subprocess

    from lorakit.data import write_demo_dataset

    data = write_demo_dataset(tmp_path / "data", n_train=16, n_test=4, seed=1)
    out = tmp_path / "run"

    def lorakit_cli(*extra):
        done = subprocess.run(
            [sys.executable, "-m", "lorakit", "train", "--data", str(data["train"]), "--output-dir", str(out),
             "--quantize", "nf4", "--optimizer", "paged_adamw8bit", "--memory-report", "--batch-size", "4",
             "--lr", "2e-3", "--r", "8", "--save-every", "1", *extra],
            capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    first = lorakit_cli("--max-steps", "1")
    assert "quantized base" in first.stdout and "measured peak" in first.stdout
    assert "paging needs a CUDA GPU" in first.stderr
    memory = json.loads((out / "memory.json").read_text())
    assert memory["quantized"] > 0 and memory["quantized_parts"]["nested"] > 0
    lorakit_cli("--max-steps", "2", "--resume")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8
