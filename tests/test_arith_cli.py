"""The real CLI for adapter arithmetic (`lorakit combine | export | compress | inspect`) on a tiny
Llama saved as a transformers directory."""

import json
import os
import shutil
import stat

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.cli.main import main

from .durability import watch_publishing
from .test_models import save_tiny_model
from .tiny import randomize_adapters, tiny_llama


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base model directory and two adapters of different ranks saved for it."""
    root = tmp_path_factory.mktemp("arith")
    base = save_tiny_model(root / "base")
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    lorakit.add_adapter(model, LoraConfig(r=2, alpha=2, target_modules=["q_proj", "down_proj"]), "b")
    randomize_adapters(model, std=0.2)
    lorakit.save_adapter(model, root / "a", "a")
    lorakit.save_adapter(model, root / "b", "b")
    return root, base


def with_adapters(setup, *names):
    root, _ = setup
    model = tiny_llama()
    for name in names:
        lorakit.load_adapter(model, root / name, name=name)
    lorakit.set_adapter(model, list(names))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_merge_linear_writes_an_exact_adapter(setup, tmp_path, capsys, ids):
    root, base = setup
    rc = main(
        [
            "combine",
            "--model",
            str(base),
            "--adapter",
            str(root / "a"),
            "--adapter",
            str(root / "b"),
            "--weights",
            "0.7",
            "-0.3",
            "--out",
            str(tmp_path / "ab"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "| model.layers.0.self_attn.q_proj | 4 + 2 | 6 |" in out and "exact" in out
    expected_model = with_adapters(setup, "a", "b")
    lorakit.combine(expected_model, ["a", "b"], [0.7, -0.3], "linear", "ab")
    got = tiny_llama()
    lorakit.load_adapter(got, tmp_path / "ab")
    torch.testing.assert_close(logits(got, ids), logits(expected_model, ids), rtol=1e-5, atol=1e-5)


def test_merge_ties_reports_the_error_as_json(setup, tmp_path, capsys):
    root, base = setup
    rc = main(
        [
            "combine",
            "--model",
            str(base),
            "--adapter",
            str(root / "a"),
            "--adapter",
            str(root / "b"),
            "--method",
            "ties",
            "--density",
            "0.5",
            "--rank",
            "3",
            "--out",
            str(tmp_path / "t"),
            "--json",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "ties" and 0 < report["max_error"] < 1
    assert all(layer["rank"] <= 3 for layer in report["layers"])
    assert (tmp_path / "t" / "adapter_model.safetensors").is_file()


def test_merge_rejects_an_option_the_method_does_not_take(setup, tmp_path, capsys):
    root, base = setup
    rc = main(
        [
            "combine",
            "--model",
            str(base),
            "--adapter",
            str(root / "a"),
            "--density",
            "0.5",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2
    assert "does not take ['density']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_merge_is_the_old_name_of_combine_and_says_so(setup, tmp_path, capsys):
    """Issue 18: the CLI's merge is Python's combine; the old name still works, with a notice."""
    root, base = setup
    sources = ["--model", str(base), "--adapter", str(root / "a"), "--adapter", str(root / "b"), "--json"]
    assert main(["merge", *sources, "--out", str(tmp_path / "old")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "note: `lorakit merge` is now `lorakit combine` (the old name still works)\n"
    assert main(["combine", *sources, "--out", str(tmp_path / "new")]) == 0
    assert capsys.readouterr().err == ""
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "new" / name).read_bytes()


def test_sources_are_named_after_their_runs(setup, tmp_path, capsys):
    """Issue 18: runs/a/adapter and runs/b/adapter were reported as "adapter, adapter1"."""
    from lorakit.cli.commands import source_names

    root, base = setup
    runs = tmp_path / "runs"
    for run, source in (("first", "a"), ("second", "b")):
        shutil.copytree(root / source, runs / run / "adapter")
    adapters = [str(runs / "first" / "adapter"), str(runs / "second" / "adapter")]
    sources = [a for path in adapters for a in ("--adapter", path)]
    assert main(["combine", "--model", str(base), *sources, "--out", str(tmp_path / "mix"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"] == ["first", "second"]
    # Unique names whatever the folders: a run's adapter beside a folder of its run's name, twice.
    same = [str(runs / "first" / "adapter"), str(runs / "first"), str(runs / "first"), str(root / "v1.2")]
    assert [name for _, name in source_names(same)] == ["first", "first_2", "first_3", "v1_2"]


def test_export_saves_a_plain_transformers_model(setup, tmp_path, capsys, ids):
    from transformers import AutoModelForCausalLM

    root, base = setup
    rc = main(
        [
            "export",
            "--model",
            str(base),
            "--adapter",
            str(root / "a"),
            "--adapter",
            str(root / "b"),
            "--out",
            str(tmp_path / "merged"),
        ]
    )
    assert rc == 0 and "model:" in capsys.readouterr().out
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in key for key in plain.state_dict())
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    torch.testing.assert_close(logits(plain, ids), logits(with_adapters(setup, "a", "b"), ids), rtol=1e-5, atol=1e-5)


def test_export_refuses_a_folder_with_files_and_leaves_it_alone(setup, tmp_path, capsys):
    root, base = setup
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_text("an earlier export")
    rc = main(["export", "--model", str(base), "--adapter", str(root / "a"), "--out", str(out)])
    assert rc == 2 and "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "an earlier export"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--model", str(base), "--adapter", str(root / "a"), "--out", str(empty)]) == 0
    assert (empty / "config.json").is_file()


def test_an_empty_out_folder_is_filled_in_place(tmp_path, monkeypatch):
    """An existing empty --out (a container volume, a folder in a read-only parent) is never
    renamed or removed: its inode stays; a failure halfway leaves it empty."""
    from lorakit.safe_files.directory_export import save_directory

    out = tmp_path / "volume"
    out.mkdir()
    inode = out.stat().st_ino

    def write(folder):
        (folder / "config.json").write_text("{}")
        (folder / "shards").mkdir()
        (folder / "shards" / "model.safetensors").write_text("weights")

    real_rename = os.rename

    def refuse_folder_moves(src, dst):  # what a mount point does to a rename of itself
        if os.path.samefile(src, out):
            raise OSError(16, "Device or resource busy")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", refuse_folder_moves)
    monkeypatch.setattr(os, "replace", refuse_folder_moves)
    assert save_directory(out, write) == out
    assert out.stat().st_ino == inode
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "shards"]
    assert (out / "shards" / "model.safetensors").read_text() == "weights"

    again = tmp_path / "again"
    again.mkdir()
    calls = []

    def interrupted_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        save_directory(again, write)
    assert list(again.iterdir()) == []


def test_a_second_ctrl_c_while_an_export_is_undone_still_empties_the_folder(tmp_path, monkeypatch):
    from lorakit.safe_files.directory_export import save_directory

    out = tmp_path / "volume"
    out.mkdir()

    def write(folder):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (folder / name).write_text(name)

    real_rename, real_unlink, renames = os.rename, os.unlink, []

    def interrupted_rename(src, dst):
        renames.append(dst)
        if len(renames) == 3:
            raise KeyboardInterrupt
        return real_rename(src, dst)

    def interrupted_unlink(path, **kwargs):  # the first removal of the undo: a second Ctrl-C
        monkeypatch.setattr(os, "unlink", real_unlink)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", interrupted_rename)
    monkeypatch.setattr(os, "unlink", interrupted_unlink)
    with pytest.raises(KeyboardInterrupt):
        save_directory(out, write)
    assert list(out.iterdir()) == []


def test_an_exported_folder_is_as_open_as_any_new_folder(tmp_path):
    # Not mkdtemp's 0700: the export is meant to be shared, like the files save_pretrained writes.
    from lorakit.safe_files.directory_export import save_directory

    old_umask = os.umask(0o022)
    try:
        out = save_directory(tmp_path / "merged", lambda folder: (folder / "config.json").write_text("{}"))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert os.listdir(tmp_path) == ["merged"] and os.listdir(out) == ["config.json"]


def test_export_one_adapter_in_bfloat16(setup, tmp_path, ids):
    from transformers import AutoModelForCausalLM

    root, base = setup
    assert (
        main(
            [
                "export",
                "--model",
                str(base),
                "--adapter",
                str(root / "a"),
                "--dtype",
                "bfloat16",
                "--out",
                str(tmp_path / "bf16"),
            ]
        )
        == 0
    )
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    # One rounding of the fp32-accumulated sum: the weights equal the fp32 merge cast to bf16.
    reference = with_adapters(setup, "a")
    lorakit.unload(reference, merge=True)
    torch.testing.assert_close(
        plain.model.layers[0].self_attn.q_proj.weight,
        reference.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16),
        rtol=0,
        atol=0,
    )


def test_compress_writes_a_smaller_adapter(setup, tmp_path, capsys):
    root, base = setup
    assert (
        main(
            [
                "compress",
                "--model",
                str(base),
                "--adapter",
                str(root / "a"),
                "--rank",
                "2",
                "--out",
                str(tmp_path / "small"),
            ]
        )
        == 0
    )
    assert "rel. error" in capsys.readouterr().out
    config = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2


def test_inspect_prints_the_table_and_writes_a_png(setup, tmp_path, capsys):
    root, _ = setup
    assert main(["inspect", str(root / "a"), "--plot", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert "| model.layers.1.self_attn.v_proj | 4 | 2 |" in out and "parameters" in out and "file size" in out
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", str(root / "b"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ranks"] == {"2": 4} and info["params"] > 0
    for module in info["modules"]:
        assert module["r90"] <= module["rank"] and 1 <= module["effective_rank"] <= module["rank"] + 1e-9
        assert module["norm"] == pytest.approx(sum(s * s for s in module["singular_values"]) ** 0.5)


def test_inspect_of_a_vera_adapter_says_what_it_cannot_compute(tmp_path, capsys):
    """VeRA's update needs each layer's input size, which the adapter files do not hold: the table
    shows d_in as "?", the JSON as null, and --plot writes no empty figure."""
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], use_vera=True))
    lorakit.save_adapter(model, tmp_path / "vera")
    assert main(["inspect", str(tmp_path / "vera"), "--plot", str(tmp_path / "v.png")]) == 0
    captured = capsys.readouterr()
    assert "| model.layers.0.self_attn.q_proj | 4 | 1 | 32x? | n/a |" in captured.out and "VeRA" in captured.out
    assert "not written" in captured.err and not (tmp_path / "v.png").exists()
    assert main(["inspect", str(tmp_path / "vera"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modules"][0]["shape"] == [32, None] and info["plot"] is None


def test_inspect_with_the_base_model_gives_vera_spectra(tmp_path):
    """Given the model, a VeRA adapter is analysed in it (the shared pair sliced per layer): the
    norms are those of the layers' own updates, and the model is left as it was."""
    from lorakit.arithmetic import inspect_adapter
    from lorakit.state import lora_layers

    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_vera=True))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "vera")
    expected = {path: float(layer.delta_weight("default").norm()) for path, layer in lora_layers(model)}
    base = tiny_llama()
    info = inspect_adapter(tmp_path / "vera", base)
    assert {m.path: m.norm for m in info.modules} == pytest.approx(expected, rel=1e-6)
    assert {m.path: m.shape for m in info.modules}["model.layers.0.mlp.down_proj"] == (32, 64)
    assert lorakit.adapters(base) == [] and not any(True for _ in lora_layers(base))
    assert not any("VeRA" in note for note in info.notes)


@pytest.mark.e2e
def test_the_inspect_command_takes_the_model_for_vera(tmp_path, capsys, embedded_model):
    model, _ = embedded_model
    lorakit.add_adapter(model, LoraConfig(r=8, target_modules=["q_proj"], use_vera=True), "vera")
    try:
        lorakit.save_adapter(model, tmp_path / "vera", "vera")
    finally:
        lorakit.delete_adapter(model, "vera")
    assert main(["inspect", str(tmp_path / "vera"), "--model", "smollm2-135m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [m["shape"] for m in info["modules"]][:1] == [[576, 576]] and info["modules"][0]["norm"] >= 0


def test_inspect_of_a_missing_directory_is_a_clean_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("exists", [False, True], ids=["new-folder", "empty-folder"])
def test_an_export_reaches_the_disk_before_it_is_published(tmp_path, monkeypatch, exists):
    """Every file save_pretrained wrote is fsync'd before the rename that makes the export
    visible, so a power cut cannot leave a published folder of empty files."""
    from lorakit.safe_files.directory_export import save_directory

    out = tmp_path / "merged"
    if exists:
        out.mkdir()

    def write(folder):
        (folder / "config.json").write_text("{}")
        (folder / "shards").mkdir()
        (folder / "shards" / "model-00001.safetensors").write_text("weights")

    published = watch_publishing(monkeypatch)
    save_directory(out, write)
    assert published and all(published)
    assert (out / "shards" / "model-00001.safetensors").read_text() == "weights"


@pytest.mark.parametrize("command", ["combine", "compress"])
def test_merge_and_compress_refuse_a_folder_with_files(setup, tmp_path, capsys, command):
    """Issue 18: merge and compress wrote into any --out, a source adapter's folder included."""
    root, base = setup
    source = root / "a"
    before = {p.name: p.read_bytes() for p in source.iterdir()}

    def run(out):
        extra = ["--adapter", str(root / "b")] if command == "combine" else ["--rank", "2"]
        return main([command, "--model", str(base), "--adapter", str(source), *extra, "--out", str(out)])

    assert run(source) == 2  # the source adapter's own folder
    err = capsys.readouterr().err
    assert err == f"error: --out {source} is a source adapter's folder: choose a new folder for the result\n"
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert run(taken) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {taken} exists and is not an empty folder") and err.count("\n") == 1
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    assert run(a_file) == 2 and "not an empty folder" in capsys.readouterr().err
    assert a_file.read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(empty) == 0 and (empty / "adapter_config.json").is_file()
    assert run(tmp_path / "new" / "folder") == 0 and (tmp_path / "new" / "folder" / "adapter_config.json").is_file()


def test_export_refuses_a_source_adapters_folder(setup, capsys):
    root, base = setup
    source = root / "a"
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    assert main(["export", "--model", str(base), "--adapter", str(source), "--out", str(source)]) == 2
    assert "is a source adapter's folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_every_exported_file_gets_a_new_files_permissions(setup, tmp_path, umask, expected):
    """Issue 18: model.safetensors came out 0600 (safetensors writes privately) beside 0644 files."""
    root, base = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    old_umask = os.umask(umask)
    try:
        for out in (tmp_path / "new", empty):  # a new folder, and an empty one filled in place
            assert main(["export", "--model", str(base), "--adapter", str(root / "a"), "--out", str(out)]) == 0
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
            assert "model.safetensors" in modes and "config.json" in modes
            assert modes == dict.fromkeys(modes, expected), modes
            assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    finally:
        os.umask(old_umask)
