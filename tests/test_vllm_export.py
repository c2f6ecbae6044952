"""`lorakit export --format vllm|sglang` and the vLLM launcher: every conversion exact in float64
against the source adapter's own update (computed here from its tensors, by the formula), the
refusals one line and before anything is written, the launcher's command and checks."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig
from lorakit.cli.main import main
from lorakit.errors import ConfigError
from lorakit.serve.engine_rules import check_adapter_dir, vllm_rank_for
from lorakit.serve.vllm_export import convert, export_adapter
from lorakit.serve.vllm_launch import main_vllm, parse_adapters, shown, vllm_command
from lorakit.state import lora_layers

from .test_models import save_tiny_model
from .tiny import randomize_adapters, tiny_llama

F64 = torch.float64
PREFIX = "base_model.model."


def exported_updates(export) -> dict[str, torch.Tensor]:
    """Module path -> B' A' (float64) of an export's tensors."""
    t = export.tensors
    paths = [k[len(PREFIX) : -len(".lora_A.weight")] for k in t if k.endswith(".lora_A.weight")]
    return {p: t[f"{PREFIX}{p}.lora_B.weight"].to(F64) @ t[f"{PREFIX}{p}.lora_A.weight"].to(F64) for p in paths}


def lora_formula(layer, name: str, r: int, alpha: float, rslora: bool) -> torch.Tensor:
    s = alpha / (r**0.5 if rslora else r)
    return s * layer.lora_B[name].detach().to(F64) @ layer.lora_A[name].detach().to(F64)


def model_with(config: LoraConfig, name: str = "a", std: float = 0.3):
    model = tiny_llama()
    lorakit.add_adapter(model, config, name)
    randomize_adapters(model, std=std)
    return model


def assert_exact(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for path in expected:
        torch.testing.assert_close(got[path], expected[path], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_rslora_and_patterns_fold_into_b_exactly(engine):
    config = LoraConfig(
        r=8,
        alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3.0},
    )
    model = model_with(config)
    export = convert(model, "a", engine=engine)
    expected = {}
    for path, layer in lora_layers(model):
        r = 2 if path.endswith("v_proj") else 8
        alpha = 3.0 if path.endswith("down_proj") else 4
        expected[path] = lora_formula(layer, "a", r, alpha, rslora=True)
    assert_exact(exported_updates(export), expected)
    assert export.config["lora_alpha"] == export.config["r"] == 8 and not export.config["use_rslora"]
    ranks = {k: v.shape[0] for k, v in export.tensors.items() if k.endswith("lora_A.weight")}
    if engine == "sglang":  # one rank for every module, no patterns: SGLang has one scaling per adapter
        assert set(ranks.values()) == {8} and "rank_pattern" not in export.config
    else:  # per-module ranks, alpha = rank: scale 1 in vLLM and PEFT alike
        assert sorted(set(ranks.values())) == [2, 8]
        assert all(export.config["alpha_pattern"][k] == v for k, v in export.config["rank_pattern"].items())


def test_vera_converts_exactly_to_lora():
    model = model_with(LoraConfig(r=6, variant="vera", target_modules=["q_proj", "v_proj"]), std=0.5)
    export = convert(model, "a")
    expected = {}
    for path, layer in lora_layers(model):
        projection = layer.vera_projection["a"]
        A_s = projection.vera_A[:, : layer.in_dim].to(F64)
        B_s = projection.vera_B[: layer.out_dim].to(F64)
        d, b = layer.lora_A["a"].detach().to(F64), layer.lora_B["a"].detach().to(F64)
        expected[path] = torch.diag(b) @ B_s @ torch.diag(d) @ A_s  # b ⊙ B_s (d ⊙ (A_s x))
    assert_exact(exported_updates(export), expected)
    assert {m.how for m in export.modules} == {"vera->lora"} and export.max_rank == 6


def test_pissa_is_written_against_the_original_base(ids):
    original = tiny_llama()
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, init="pissa", target_modules=["q_proj", "o_proj"]), "a")
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["a"].add_(0.05 * torch.randn_like(layer.lora_B["a"]))
    export = convert(model, "a")
    expected = {}
    for path, layer in lora_layers(model):
        A0, B0 = layer.init_factors["a"]
        s = 8 / 4
        update = s * (layer.lora_B["a"].to(F64) @ layer.lora_A["a"].to(F64) - B0.to(F64) @ A0.to(F64))
        expected[path] = update
        # the adapted layer's weight, on its residual base, is the original base plus the exported update
        W_orig = dict(original.named_parameters())[f"{path}.weight"].detach().to(F64)
        adapted = layer.base_layer.weight.detach().to(F64) + s * layer.lora_B["a"].to(F64) @ layer.lora_A["a"].to(F64)
        torch.testing.assert_close(W_orig + update, adapted, rtol=1e-5, atol=1e-6)
    assert_exact(exported_updates(export), expected)
    assert export.max_rank == 8  # [B, -B0] [A; A0]


def test_dora_is_refused_or_refactored_with_its_error(tmp_path):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, variant="dora", target_modules=["q_proj"]), "a")
    randomize_adapters(model, std=0.3)
    with pytest.raises(ConfigError, match="refuse DoRA; pass --refactor-dora") as err:
        export_adapter(model, "a", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    export = convert(model, "a", refactor_dora=True)
    got = exported_updates(export)
    for path, layer in lora_layers(model):
        # DoRA's change to W0, from its tensors: m / ||W0 + sBA|| (W0 + sBA) - W0, norm per output row
        W0 = layer.base_layer.weight.detach().to(F64)
        W = W0 + layer.scaling["a"] * layer.lora_B["a"].detach().to(F64) @ layer.lora_A["a"].detach().to(F64)
        m = layer.lora_magnitude_vector["a"].detach().to(F64)
        change = (m / W.norm(dim=1))[:, None] * W - W0
        S = torch.linalg.svdvals(change)
        best = float(S[4:].square().sum().sqrt() / S.square().sum().sqrt())
        reported = next(m for m in export.modules if m.path == path)
        assert reported.rank == 4 and reported.how == "dora->lora (svd)"
        assert reported.error == pytest.approx(best, rel=1e-6)
        assert float((got[path] - change).norm() / change.norm()) == pytest.approx(best, rel=1e-6)


def test_a_fresh_dora_refactors_with_no_error():
    # m = ||W0 + sBA|| at init: the change is exactly sBA (rank r), so nothing is lost.
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, variant="dora", target_modules=["v_proj"]), "a")
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["a"].normal_(0, 0.1)
            layer.lora_magnitude_vector["a"].copy_(
                (layer.base_layer.weight + layer.scaling["a"] * layer.lora_B["a"] @ layer.lora_A["a"]).norm(dim=1)
            )
    export = convert(model, "a", refactor_dora=True)
    assert export.max_error < 1e-6  # the change is computed from float32 weights: float32 rounding only


def test_adalora_exports_its_plain_lora():
    model = model_with(LoraConfig(r=4, alpha=8, variant="adalora", target_modules=["q_proj"]))
    export = convert(model, "a")
    expected = {}
    for path, layer in lora_layers(model):
        E = layer.lora_E["a"].detach().to(F64).reshape(-1, 1)
        expected[path] = layer.scaling["a"] * layer.lora_B["a"].detach().to(F64) @ (E * layer.lora_A["a"].to(F64))
    assert_exact(exported_updates(export), expected)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(r=4, target_modules=["q_proj"], bias="all"), "trains biases"),
        (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "loads no modules_to_save"),
        (LoraConfig(r=64, alpha=8, target_modules=["q_proj"]), "rank 64 is over --max-lora-rank 16"),
        (LoraConfig(r=4, target_modules=["q_proj", "rotary_emb"]), None),
    ],
)
def test_refusals_are_one_line_and_write_nothing(tmp_path, config, message):
    try:
        model = model_with(config)
    except lorakit.errors.LorakitError:
        return  # a target lorakit itself refuses
    with pytest.raises(ConfigError) as err:
        export_adapter(model, "a", tmp_path / "out", max_lora_rank=16)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_folder_with_files_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    model = model_with(LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_adapter(model, "a", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_exported_directory_loads_back_with_the_same_outputs(tmp_path, ids):
    config = LoraConfig(r=8, alpha=4, use_rslora=True, target_modules=["q_proj", "up_proj"], rank_pattern={"q_proj": 3})
    model = model_with(config, std=0.2)
    export_adapter(model, "a", tmp_path / "vllm")
    written = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["lora_alpha"] == written["r"]
    assert check_adapter_dir(tmp_path / "vllm", max_lora_rank=8, architecture="LlamaForCausalLM") == 8
    again = tiny_llama()
    lorakit.load_adapter(again, tmp_path / "vllm")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert set(load_file(str(tmp_path / "vllm" / "adapter_model.safetensors"))) == {
        f"{PREFIX}{p}.lora_{f}.weight" for p, _ in lora_layers(model) for f in "AB"
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Adapter directories as save_adapter writes them, for the file checks and the CLI."""
    root = tmp_path_factory.mktemp("vllm")
    base = save_tiny_model(root / "base")
    cases = {
        "plain": LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        "rslora": LoraConfig(r=4, alpha=8, use_rslora=True, target_modules=["q_proj"], rank_pattern={"q_proj": 2}),
        "dora": LoraConfig(r=4, variant="dora", target_modules=["q_proj"]),
        "vera": LoraConfig(r=4, variant="vera", target_modules=["q_proj"]),
        "bias": LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"),
        "big": LoraConfig(r=24, target_modules=["q_proj"]),
    }
    for name, config in cases.items():
        model = model_with(config, name)
        lorakit.save_adapter(model, root / name, name)
    return root, base


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("dora", "refuses DoRA"),
        ("vera", "serves LoRA adapters, not VERA; `lorakit export --format vllm"),
        ("bias", "loads no trained biases"),
        ("big", "rank 24 is over --max-lora-rank 16"),
    ],
)
def test_file_checks_refuse_what_vllm_would(saved, name, message):
    root, _ = saved
    with pytest.raises(ConfigError) as err:
        check_adapter_dir(root / name, max_lora_rank=16)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_file_checks_accept_rslora_and_patterns_for_vllm_only(saved):
    root, _ = saved
    assert check_adapter_dir(root / "rslora", max_lora_rank=8) == 4  # vLLM 0.32 computes both as PEFT
    with pytest.raises(ConfigError, match="SGLang takes one lora_alpha / r"):
        check_adapter_dir(root / "rslora", engine="sglang")


def test_unsupported_target_for_a_known_architecture(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    from safetensors.torch import save_file

    save_file(
        {
            f"{PREFIX}model.layers.0.mlp.gate.lora_A.weight": torch.zeros(2, 4),
            f"{PREFIX}model.layers.0.mlp.gate.lora_B.weight": torch.zeros(4, 2),
        },
        str(tmp_path / "a" / "adapter_model.safetensors"),
    )
    with pytest.raises(ConfigError, match=r"puts no LoRA on \['gate'\] of LlamaForCausalLM"):
        check_adapter_dir(tmp_path / "a", architecture="LlamaForCausalLM")
    assert check_adapter_dir(tmp_path / "a", architecture="SomethingNewForCausalLM") == 2  # not knowable: passed


def test_cli_export_vllm_and_its_one_line_refusal(saved, tmp_path, capsys):
    root, base = saved
    assert (
        main(
            [
                "export",
                "--format",
                "vllm",
                "--model",
                str(base),
                "--adapter",
                str(root / "vera"),
                "--out",
                str(tmp_path / "v"),
            ]
        )
        == 0
    )
    assert "vera->lora" in capsys.readouterr().out
    assert check_adapter_dir(tmp_path / "v", max_lora_rank=8, architecture="LlamaForCausalLM") == 4
    rc = main(
        [
            "export",
            "--format",
            "vllm",
            "--model",
            str(base),
            "--adapter",
            str(root / "dora"),
            "--out",
            str(tmp_path / "d"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--refactor-dora" in err and not (tmp_path / "d").exists()
    rc = main(
        [
            "export",
            "--format",
            "sglang",
            "--model",
            str(base),
            "--adapter",
            str(root / "dora"),
            "--refactor-dora",
            "--out",
            str(tmp_path / "d"),
        ]
    )
    assert rc == 0 and "relative error max" in capsys.readouterr().out
    assert check_adapter_dir(tmp_path / "d", engine="sglang") == 4


def test_cli_export_vllm_combines_several_adapters(saved, tmp_path, capsys):
    root, base = saved
    rc = main(
        [
            "export",
            "--format",
            "vllm",
            "--model",
            str(base),
            "--adapter",
            str(root / "plain"),
            "--adapter",
            str(root / "rslora"),
            "--weights",
            "0.5",
            "2",
            "--out",
            str(tmp_path / "c"),
        ]
    )
    assert rc == 0
    expected = tiny_llama()
    lorakit.load_adapter(expected, root / "plain", name="plain")
    lorakit.load_adapter(expected, root / "rslora", name="rslora")
    lorakit.combine(expected, ["plain", "rslora"], [0.5, 2.0], "linear", "c")
    got = tiny_llama()
    lorakit.load_adapter(got, tmp_path / "c", name="c")
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)


def test_vllm_command_checks_adapters_and_fits_the_rank(saved, tmp_path):
    root, base = saved
    command = vllm_command(str(base), {"p": root / "plain", "r": root / "rslora"}, port=8123, api_key="sk-x")
    assert command[:4] == ["vllm", "serve", str(base), "--enable-lora"]
    assert command[command.index("--lora-modules") + 1 : command.index("--lora-modules") + 3] == [
        f"p={(root / 'plain').resolve()}",
        f"r={(root / 'rslora').resolve()}",
    ]
    assert command[command.index("--max-lora-rank") + 1] == "8" and command[command.index("--max-loras") + 1] == "2"
    assert command[command.index("--port") + 1] == "8123" and "sk-x" not in shown(command)
    with pytest.raises(ConfigError, match="refuses DoRA"):
        vllm_command(str(base), {"d": root / "dora"})
    with pytest.raises(ConfigError, match="vLLM accepts one of"):
        vllm_command(str(base), {"p": root / "plain"}, max_lora_rank=12)
    assert vllm_rank_for(17) == 32 and vllm_rank_for(320) == 320
    assert parse_adapters([str(root / "plain"), "x=/a"]) == {"plain": str(root / "plain"), "x": "/a"}


def test_main_vllm_dry_run_prints_the_command_and_the_cpu_warning(saved, capsys):
    import argparse

    root, base = saved
    args = argparse.Namespace(
        model=str(base), adapter=[f"p={root / 'plain'}"], dry_run=True, api_key="k", vllm_args=["--dtype", "float32"]
    )
    assert main_vllm(args) == 0
    captured = capsys.readouterr()
    assert "serve" in captured.out and "--enable-lora" in captured.out and "--api-key '****'" in captured.out
    assert captured.out.rstrip().endswith("--dtype float32")
    if not torch.cuda.is_available():
        assert "base-model rows" in captured.err
