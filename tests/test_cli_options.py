"""CLI flags mirror TrainConfig; a YAML file supplies defaults that flags override."""

import pytest

from lorakit import ConfigError
from lorakit.cli.main import build_parser
from lorakit.cli.options import train_overrides
from lorakit.training.config import TrainConfig


def parse_train(*argv):
    return build_parser().parse_args(["train", *argv])


def test_every_config_field_has_a_flag():
    args = parse_train()
    fields = set(TrainConfig.__dataclass_fields__) - {"extra"}
    assert fields <= set(vars(args))


def test_flags_override_file(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "data: a.jsonl\nlr: 0.001\nr: 8\npacking: true\ntarget_modules: [q_proj, v_proj]\n"
    )
    args = parse_train("--config", str(tmp_path / "run.yaml"), "--lr", "0.002", "--no-packing", "--max-steps", "5")
    cfg = TrainConfig.from_sources(args.config, **train_overrides(args))
    assert cfg.lr == 0.002 and cfg.r == 8 and cfg.packing is False and cfg.max_steps == 5
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.data == "a.jsonl"


def test_comma_separated_targets_and_loraplus():
    args = parse_train("--data", "d.jsonl", "--target-modules", "q_proj,v_proj", "--loraplus-ratio", "16")
    cfg = TrainConfig.from_sources(None, **train_overrides(args))
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.loraplus_ratio == 16.0


def test_train_refuses_a_misspelt_target_beside_a_valid_one(tmp_path, monkeypatch, capsys):
    """`--target-modules qproj,v_proj` used to train v_proj alone and exit 0: now a one-line error
    with a hint, exit 2, before anything is written. Through the parser and the trainer's
    add_adapter (the model and the data are stubbed)."""
    from types import SimpleNamespace

    import lorakit.models
    from lorakit.cli.main import main
    from lorakit.training import run as run_module

    from .tiny import tiny_llama

    model = tiny_llama()
    monkeypatch.setattr(lorakit.models, "load_model", lambda *args, **kwargs: (model, None))
    stats = SimpleNamespace(summary=lambda: "", n_truncated=0)
    monkeypatch.setattr(run_module, "prepare_data", lambda cfg, tokenizer: SimpleNamespace(stats=stats))
    out = tmp_path / "run"
    argv = ["train", "--data", "d.jsonl", "--target-modules", "qproj,v_proj", "--output-dir", str(out)]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no module matched 'qproj' (did you mean 'q_proj'")
    assert not out.exists() and lorakit.adapters(model) == []


@pytest.mark.parametrize(
    "values,fragment",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"r": 0}, "r must be a positive integer"),
        ({"unknown_option": 1}, "unknown training option"),
    ],
)
def test_bad_options(values, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig.from_sources(None, data="d.jsonl", **values)


def test_bad_config_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("lr: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        TrainConfig.from_sources(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_sources(tmp_path / "missing.yaml")


def test_no_fast_path_flag():
    cfg = TrainConfig.from_sources(None, **train_overrides(parse_train("--data", "d.jsonl", "--no-fast-path")))
    assert cfg.fast_path is False
    assert TrainConfig(data="d.jsonl").fast_path is True


def test_float_fields_with_int_defaults_take_fractions():
    """alpha defaults to 16 (an int) but is a float: --alpha 0.5 must parse."""
    cfg = TrainConfig.from_sources(None, **train_overrides(parse_train("--data", "d.jsonl", "--alpha", "0.5")))
    assert cfg.alpha == 0.5


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    """PyYAML reads `2e-4` as a string; the config must still take it as the learning rate."""
    (tmp_path / "run.yaml").write_text("data: a.jsonl\nlr: 2e-4\nweight_decay: 1e-2\n")
    cfg = TrainConfig.from_sources(tmp_path / "run.yaml")
    assert cfg.lr == 2e-4 and cfg.weight_decay == 1e-2


@pytest.mark.parametrize("values", [{"weight_decay": -1.0}, {"max_grad_norm": -1.0}, {"valid_ratio": "x"}])
def test_bad_numbers_are_reported_by_name(values):
    with pytest.raises(ConfigError, match=f"{next(iter(values))} must be a number >= 0"):
        TrainConfig(data="d.jsonl", **values)


def test_overwrite_is_a_flag_and_a_config_key(tmp_path):
    (tmp_path / "run.yaml").write_text("data: a.jsonl\noverwrite: true\n")
    assert TrainConfig.from_sources(tmp_path / "run.yaml").overwrite is True
    args = parse_train("--config", str(tmp_path / "run.yaml"), "--no-overwrite")
    assert TrainConfig.from_sources(args.config, **train_overrides(args)).overwrite is False
    with pytest.raises(ConfigError, match="choose one"):
        TrainConfig.from_sources(None, data="a.jsonl", resume=True, overwrite=True)


def test_train_into_an_earlier_run_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """Issue 18: `train --output-dir` at an existing run silently replaced it."""
    from lorakit.cli.main import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr("lorakit.models.load_model", no_loading)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert main(["train", "--data", str(tmp_path / "d.jsonl"), "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: output_dir {run} is not empty (an earlier run?): continue that run with --resume, "
        "replace it with --overwrite, or choose another --output-dir\n"
    )
    assert main(["train", "--data", "d.jsonl", "--output-dir", str(run), "--resume"]) == 2
    assert "finished and left no checkpoint" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


def _tiny_model_and_tokenizer(*args, **kwargs):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .tiny import tiny_llama

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "{": 2, "}": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )
    return tiny_llama(), tokenizer


def test_the_demo_replaces_its_own_earlier_output_but_no_other_folder(tmp_path, monkeypatch):
    """`make demo` twice trains into the same folder: the second replaces the first; a folder with
    anything else in it is refused before anything is written."""
    import io

    from lorakit.cli import demo
    from lorakit.errors import ConfigError as Refused

    monkeypatch.setattr("lorakit.models.load_model", _tiny_model_and_tokenizer)
    monkeypatch.setattr(demo, "DEMO_TRAIN", 16)
    root = tmp_path / "demo"
    for _ in range(2):
        assert demo.run_demo(output_dir=str(root), steps=1, n_test=2, out=io.StringIO()) == 0
        assert (root / "adapter" / "adapter_model.safetensors").is_file() and (root / "loss.png").is_file()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    with pytest.raises(Refused, match="holds files that are not an earlier demo's \\(thesis.tex\\)"):
        demo.run_demo(output_dir=str(mine), steps=1, n_test=2, out=io.StringIO())
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_a_json_option_error_gives_the_column_an_editor_shows():
    with pytest.raises(ConfigError, match=r"\(Expecting value at column 12\)"):  # the "}" (character 11 from 0)
        TrainConfig.from_sources(None, data="d.jsonl", rank_pattern='{"q_proj": }')
    with pytest.raises(ConfigError, match=r"\(Expecting value at line 2 column 11\)"):
        TrainConfig.from_sources(None, data="d.jsonl", rank_pattern='{"v_proj": 2,\n"q_proj": }')
