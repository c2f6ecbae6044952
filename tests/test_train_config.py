"""One configuration from the command line to the layer: every LoraConfig option is a TrainConfig
key and a flag, with LoraConfig's defaults, and reaches the adapter the trainer adds."""

import json
from dataclasses import fields
from types import SimpleNamespace

import pytest
import yaml

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.cli.main import build_parser
from lorakit.cli.options import GROUPS, train_overrides
from lorakit.methods import lora as lora_method
from lorakit.training import run as run_module
from lorakit.training.config import NOT_OPTIONS, VARIANT_OPTIONS, TrainConfig
from lorakit.variants.adalora import AdaLoraSchedule

from .test_training_loop import collate, examples
from .tiny import tiny_llama

LORA_FIELDS = [f for f in fields(LoraConfig) if f.name not in NOT_OPTIONS]


def parse_train(*argv):
    return build_parser().parse_args(["train", *argv])


def train_config(*argv) -> TrainConfig:
    return TrainConfig.from_sources(None, **train_overrides(parse_train("--data", "d.jsonl", *argv)))


def test_every_lora_option_is_a_key_and_a_flag_with_the_library_default():
    keys = {f.name: f for f in fields(TrainConfig)}
    flags = vars(parse_train())
    for f in LORA_FIELDS:
        assert f.name in keys and f.name in flags, f.name
        mine = keys[f.name]
        if f.name != "target_modules":  # a run trains all linear layers unless told; the library asks
            assert (mine.default, mine.default_factory) == (f.default, f.default_factory), f.name
    assert TrainConfig(data="x").target_modules == "all-linear"
    assert not set(NOT_OPTIONS) - {"seed"} & set(keys)


def test_adalora_options_are_the_schedule_fields():
    keys = VARIANT_OPTIONS["adalora"]
    assert set(keys) == {f.name for f in fields(AdaLoraSchedule)}
    assert keys["orth_reg_weight"] == "adalora_orth_reg" and keys["target_r"] == "adalora_target_r"
    cfg = train_config(
        "--variant", "adalora", "--adalora-target-r", "4", "--adalora-orth-reg", "0.5", "--adalora-tinit", "3"
    )
    assert cfg.variant_options("adalora") == AdaLoraSchedule(target_r=4, tinit=3, orth_reg_weight=0.5)


def test_every_flag_is_in_a_help_group():
    grouped = {name for names in GROUPS.values() for name in names}
    assert {f.name for f in fields(TrainConfig)} - {"extra"} <= grouped


def test_list_and_dict_options_from_the_command_line():
    cfg = train_config(
        "--exclude-modules",
        "o_proj,down_proj",
        "--modules-to-save",
        "lm_head",
        "--bias",
        "lora_only",
        "--rank-pattern",
        '{"q_proj": 4}',
        "--alpha-pattern",
        '{"v_proj": 2.5}',
        "--layers-to-transform",
        "0,1",
        "--layers-pattern",
        "layers",
        "--adapter-dtype",
        "float32",
        "--projection-prng-key",
        "7",
        "--d-initial",
        "0.5",
        "--no-save-projection",
    )
    lora = cfg.lora_config()
    assert lora.exclude_modules == ["o_proj", "down_proj"] and lora.modules_to_save == ["lm_head"]
    assert lora.rank_pattern == {"q_proj": 4} and lora.alpha_pattern == {"v_proj": 2.5}
    assert lora.layers_to_transform == [0, 1] and lora.layers_pattern == ["layers"]
    assert (lora.bias, lora.adapter_dtype, lora.projection_prng_key, lora.d_initial, lora.save_projection) == (
        "lora_only",
        "float32",
        7,
        0.5,
        False,
    )
    assert train_config("--exclude-modules", "o_proj").lora_config().exclude_modules == "o_proj"  # a regex
    assert train_config("--layers-to-transform", "3").lora_config().layers_to_transform == [3]


def test_existing_flags_and_files_keep_working(tmp_path):
    cfg = train_config("--r", "16", "--alpha", "32", "--variant", "dora", "--target-modules", "q_proj,v_proj")
    lora = cfg.lora_config()
    assert (lora.r, lora.alpha, lora.variant, lora.use_dora, lora.target_modules) == (
        16,
        32,
        "dora",
        True,
        ["q_proj", "v_proj"],
    )
    # a train_config.yaml of a run before every LoraConfig option was a key
    (tmp_path / "old.yaml").write_text(
        "data: a.jsonl\nvariant: adalora\nr: 16\nalpha: 32\n"
        "target_modules: all-linear\nadalora_target_r: 8\nadalora_orth_reg: 0.2\n"
    )
    old = TrainConfig.from_sources(tmp_path / "old.yaml")
    assert old.r == 16 and old.variant_options("adalora").orth_reg_weight == 0.2
    # and the one a run writes now loads back to the same options
    full = train_config("--rank-pattern", '{"q_proj": 4}', "--layers-to-transform", "0", "--modules-to-save", "lm_head")
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(full.to_dict(), sort_keys=False))
    assert TrainConfig.from_sources(tmp_path / "new.yaml") == full


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (("--rank-pattern", "{q_proj: 4}"), "rank_pattern must be a JSON object"),
        (("--alpha-pattern", "[1, 2]"), "alpha_pattern must be a mapping"),
        (("--rank-pattern", '{"q_proj": 0}'), r"rank_pattern\['q_proj'\] must be a positive integer"),
        (("--layers-to-transform", "0,first"), "layers_to_transform must be comma-separated integers"),
        (("--bias", "some"), "bias must be one of"),
        (("--adapter-dtype", "int8"), "adapter_dtype must be one of"),
        (("--exclude-modules", "q_proj("), "exclude_modules 'q_proj\\(' is not a valid regular expression"),
    ],
)
def test_a_bad_value_is_a_one_line_config_error(argv, fragment):
    with pytest.raises(ConfigError, match=fragment) as caught:
        train_config(*argv)
    assert "\n" not in str(caught.value)


def test_flags_reach_the_adapter_the_trainer_adds(tmp_path, monkeypatch):
    monkeypatch.setattr(
        run_module,
        "prepare_data",
        lambda cfg, tokenizer: run_module.PreparedData(
            examples(8), [], [], collate, SimpleNamespace(summary=lambda: "", n_truncated=0)
        ),
    )
    added = []
    real_add_adapter = lora_method.add_adapter  # train() adds the adapter through its method (lorakit.methods)
    monkeypatch.setattr(
        lora_method, "add_adapter", lambda model, config: added.append(config) or real_add_adapter(model, config)
    )
    argv = [
        "--data",
        "x",
        "--output-dir",
        str(tmp_path),
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--exclude-modules",
        "o_proj,down_proj",
        "--modules-to-save",
        "lm_head",
        "--bias",
        "lora_only",
        "--rank-pattern",
        '{"q_proj": 4}',
        "--layers-to-transform",
        "1",
        "--adapter-dtype",
        "float32",
    ]
    model = tiny_llama()
    lorakit.train(None, loaded=(model, None), progress=False, **train_overrides(parse_train(*argv)))
    (config,) = added
    assert config.exclude_modules == ["o_proj", "down_proj"] and config.modules_to_save == ["lm_head"]
    assert (config.bias, config.rank_pattern, config.layers_to_transform, config.adapter_dtype, config.r) == (
        "lora_only",
        {"q_proj": 4},
        [1],
        "float32",
        8,
    )
    adapted = {path: layer.rank("default") for path, layer in lorakit.state.lora_layers(model)}
    assert adapted and all(
        ".layers.1." in path and "o_proj" not in path and "down_proj" not in path for path in adapted
    )
    assert adapted["model.layers.1.self_attn.q_proj"] == 4 and adapted["model.layers.1.self_attn.v_proj"] == 8
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["bias"], saved["modules_to_save"]) == ("lora_only", ["lm_head"])  # the layers: in the names


def test_the_run_file_starts_with_data_and_model():
    assert list(TrainConfig(data="x").to_dict())[:6] == [
        "data",
        "model",
        "valid_data",
        "valid_ratio",
        "output_dir",
        "r",
    ]
