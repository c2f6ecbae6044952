"""LoraConfig validation and its PEFT JSON form."""

import pytest

from lorakit import ConfigError, LoraConfig


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -2}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"alpha": -1}, "alpha must be a positive number"),
        ({"dropout": 1.0}, "dropout must be a number in [0, 1)"),
        ({"dropout": -0.1}, "dropout must be a number in [0, 1)"),
        ({"bias": "some"}, "bias must be one of"),
        ({"init": "xavier"}, "init must be one of"),
        ({"target_modules": None}, "target_modules is required"),
        ({"target_modules": []}, "non-empty list"),
        ({"target_modules": "q_proj("}, "not a valid regular expression"),
        ({"rank_pattern": {"v_proj": 0}}, "rank_pattern['v_proj'] must be a positive integer"),
        ({"alpha_pattern": {"v_proj": -3}}, "alpha_pattern['v_proj'] must be a positive number"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"adapter_dtype": "int8"}, "adapter_dtype must be one of"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(kwargs, fragment):
    values = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ConfigError) as err:
        LoraConfig(**values)
    assert fragment in str(err.value)
    assert isinstance(err.value, ValueError)


def test_patterns_pick_rank_alpha_and_scaling():
    config = LoraConfig(
        r=8,
        alpha=16,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 4, r"layers\.0\..*q_proj": 2},
        alpha_pattern={"q_proj": 4},
    )
    assert config.rank_for("model.layers.1.self_attn.v_proj") == 4
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 8
    assert config.alpha_for("model.layers.1.self_attn.q_proj") == 4
    assert config.scaling_for("model.layers.1.self_attn.v_proj") == 16 / 4
    rs = LoraConfig(r=16, alpha=8, use_rslora=True, target_modules=["x"])
    assert rs.scaling_for("x") == 8 / 4


def test_round_trip_through_peft_keys():
    config = LoraConfig(
        r=4,
        alpha=8,
        dropout=0.1,
        target_modules=["q_proj"],
        bias="lora_only",
        use_rslora=True,
        init="gaussian",
        modules_to_save=["score"],
        rank_pattern={"q_proj": 2},
        layers_to_transform=1,
        base_model_name_or_path="m",
        task_type="CAUSAL_LM",
    )
    data = config.to_dict()
    assert data["peft_type"] == "LORA" and data["lora_alpha"] == 8 and data["lora_dropout"] == 0.1
    assert data["init_lora_weights"] == "gaussian" and data["layers_to_transform"] == [1]
    back = LoraConfig.from_dict(data)
    assert back.to_dict() == data


def test_peft_config_is_accepted_by_peft():
    peft = pytest.importorskip("peft")
    data = LoraConfig(r=4, target_modules="all-linear", init="default").to_dict()
    peft_config = peft.LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"})
    assert peft_config.init_lora_weights is True and peft_config.r == 4


def test_from_dict_refuses_what_it_cannot_honour():
    with pytest.raises(ConfigError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3", "target_modules": ["q"]})
    with pytest.raises(ConfigError, match="layer_replication"):
        LoraConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"], "layer_replication": [[0, 2]]})


def test_from_dict_ignores_unknown_peft_fields():
    config = LoraConfig.from_dict(
        {
            "peft_type": "LORA",
            "target_modules": ["q"],
            "megatron_core": "x",
            "init_lora_weights": "pissa_niter_4",
            "r": 3,
            "lora_alpha": 6,
        }
    )
    assert config.init == "pissa_niter_4" and config.r == 3 and config.alpha == 6
    assert config.to_dict()["init_lora_weights"] == "pissa_niter_4"  # PEFT's spelling, kept


@pytest.mark.parametrize("init", ["pissa_niter_", "pissa_niter_x", "pissa_niter_-1", "pissa-niter-4"])
def test_a_malformed_fast_pissa_init_is_refused(init):
    from lorakit.training import TrainConfig

    with pytest.raises(ConfigError, match="pissa_niter_<N>"):
        LoraConfig(target_modules=["q"], init=init)
    with pytest.raises(ConfigError, match="pissa_niter_<N>"):  # the trainer's config (--init)
        TrainConfig(data="x", init=init)
    assert TrainConfig(data="x", init="pissa_niter_4").lora_config().init == "pissa_niter_4"
