"""Saving and loading adapter directories: layout, round trips, atomic writes, refusals."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import AdapterFileError, LoraConfig
from lorakit.layers import LoraLayer

from .tiny import randomize_adapters, tiny_bert_classifier, tiny_gpt2, tiny_llama


def trained_llama(**config):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, **({"target_modules": ["q_proj", "v_proj"]} | config)))
    randomize_adapters(model, std=0.2)
    return model


def test_layout_matches_peft(tmp_path):
    model = trained_llama(target_modules=["q_proj", "embed_tokens"])
    lorakit.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert not any(".default" in k for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["task_type"] == "CAUSAL_LM"


def test_round_trip_gives_same_outputs(tmp_path, ids):
    model = trained_llama(use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    out = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    fresh = tiny_llama()
    assert lorakit.load_adapter(fresh, tmp_path) == "default"
    torch.testing.assert_close(fresh(ids).logits, out, rtol=0, atol=0)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_load_trainable_and_named(tmp_path):
    lorakit.save_adapter(trained_llama(), tmp_path / "math")
    model = trained_llama()
    name = lorakit.load_adapter(model, tmp_path / "math", trainable=True)
    assert name == "math" and lorakit.adapters(model) == ["default", "math"]
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A["math"].requires_grad and q.active_adapters == ["math"]


def test_modules_to_save_and_bias_round_trip(tmp_path, ids):
    model = tiny_bert_classifier()
    lorakit.add_adapter(
        model, LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only")
    )
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.mul_(3)
        model.bert.encoder.layer[0].attention.self.query.base_layer.bias.add_(1)
    out = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    fresh = tiny_bert_classifier()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, out, rtol=0, atol=0)


def test_gpt2_round_trip(tmp_path, ids):
    model = tiny_gpt2()
    lorakit.add_adapter(model, LoraConfig(target_modules="all-linear"))
    randomize_adapters(model, 0.1)
    out = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    fresh = tiny_gpt2()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, out, rtol=0, atol=0)


def test_legacy_bin_file(tmp_path, ids):
    model = trained_llama()
    out = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    torch.save(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    os.remove(tmp_path / "adapter_model.safetensors")
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, out, rtol=0, atol=0)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = trained_llama()
    lorakit.save_adapter(model, tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    randomize_adapters(model, std=1.0)

    def broken_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pathlib.Path.write_text", broken_write)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(model, tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


def folder_bytes(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_failed_save_creates_no_folder(tmp_path, monkeypatch, failing):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.io.save.save_file" if failing == "weights" else "pathlib.Path.write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(trained_llama(), tmp_path / "runs" / "adapter")
    assert os.listdir(tmp_path) == []


def test_save_replaces_an_earlier_adapter_whole_and_keeps_other_files(tmp_path, ids):
    out = tmp_path / "adapter"
    lorakit.save_adapter(trained_llama(), out)
    (out / "README.md").write_text("notes")
    torch.save({}, out / "adapter_model.bin")  # an earlier PEFT save's weights: not this adapter's
    model = trained_llama(use_rslora=True, target_modules=["v_proj"])
    assert lorakit.save_adapter(model, out) == out
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (out / "README.md").read_text() == "notes" and os.listdir(tmp_path) == ["adapter"]
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, out)
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_save_failing_at_any_rename_leaves_the_earlier_adapter(tmp_path, monkeypatch):
    # Renaming the two files into place one by one could stop between them: new weights beside
    # the earlier config. Every rename of a save is made to fail in turn.
    out = tmp_path / "adapter"
    lorakit.save_adapter(trained_llama(), out)
    (out / "README.md").write_text("notes")
    before = folder_bytes(out)
    model = trained_llama(use_rslora=True, target_modules=["v_proj"])
    real_rename, real_replace, calls = os.rename, os.replace, []

    def counted(real):
        def rename(src, dst, *args, **kwargs):
            calls.append((src, dst))
            if len(calls) == fail_at:
                raise OSError("rename failed")
            return real(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "rename", counted(real_rename))
    monkeypatch.setattr(os, "replace", counted(real_replace))
    for fail_at in range(1, 20):
        calls.clear()
        try:
            lorakit.save_adapter(model, out)
            break  # fail_at is past the save's last rename: every one of them has failed once
        except OSError as exc:
            assert "rename failed" in str(exc)
        assert folder_bytes(out) == before and os.listdir(tmp_path) == ["adapter"]
    assert fail_at > 2 and folder_bytes(out) != before


def test_save_into_the_working_folder_or_through_a_link(tmp_path, monkeypatch):
    # "." and a link name the folder the files go into: the process stays where it was, and a
    # link stays a link to the same folder.
    real = tmp_path / "real"
    lorakit.save_adapter(trained_llama(), real)
    monkeypatch.chdir(real)
    lorakit.save_adapter(trained_llama(use_rslora=True), ".")
    assert os.getcwd() == str(real) and json.loads(Path("adapter_config.json").read_text())["use_rslora"]
    (tmp_path / "link").symlink_to(real)
    lorakit.save_adapter(trained_llama(), tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and not json.loads((real / "adapter_config.json").read_text())["use_rslora"]
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_save_keeps_the_working_folder_of_other_processes(tmp_path, monkeypatch):
    # Another process (a shell, TensorBoard) standing in the folder must see the new adapter, not
    # be left in a deleted folder: the folder itself is never replaced.
    out = tmp_path / "adapter"
    lorakit.save_adapter(trained_llama(), out)
    monkeypatch.chdir(out)
    inode, held = os.stat(".").st_ino, os.open(".", os.O_RDONLY)  # the folder as another process holds it
    try:
        lorakit.save_adapter(trained_llama(use_rslora=True), ".")
        assert os.stat(out).st_ino == inode and os.stat(".").st_ino == inode
        assert sorted(os.listdir(held)) == ["adapter_config.json", "adapter_model.safetensors"]
        config = os.open("adapter_config.json", os.O_RDONLY, dir_fd=held)
        with os.fdopen(config) as handle:
            assert json.load(handle)["use_rslora"]
    finally:
        os.close(held)


def test_save_into_a_folder_whose_parent_is_read_only(tmp_path):
    out = tmp_path / "shared" / "adapter"
    lorakit.save_adapter(trained_llama(), out)
    (out / "README.md").write_text("notes")
    out.parent.chmod(0o555)
    try:
        if os.access(out.parent, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        model = trained_llama(use_rslora=True)
        assert lorakit.save_adapter(model, out) == out
        assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert json.loads((out / "adapter_config.json").read_text())["use_rslora"]
    finally:
        out.parent.chmod(0o755)


def test_save_into_a_mount_point(tmp_path, monkeypatch):
    # A mount point (a Docker/Kubernetes volume) cannot be renamed or removed (EBUSY), nor can a
    # file be moved across it: every rename, replace or rmdir must stay inside the folder.
    out = tmp_path / "volume"
    lorakit.save_adapter(trained_llama(), out)
    (out / "README.md").write_text("notes")
    real_rename, real_replace, real_rmdir = os.rename, os.replace, os.rmdir

    def inside(*paths):
        if not all(Path(p).parent.resolve() == out.resolve() for p in paths):
            raise OSError(errno.EBUSY, "Device or resource busy", str(paths[0]))

    monkeypatch.setattr(os, "rename", lambda src, dst, **kw: inside(src, dst) or real_rename(src, dst, **kw))
    monkeypatch.setattr(os, "replace", lambda src, dst, **kw: inside(src, dst) or real_replace(src, dst, **kw))
    monkeypatch.setattr(os, "rmdir", lambda path, **kw: inside(path) or real_rmdir(path, **kw))
    model = trained_llama(use_rslora=True, target_modules=["v_proj"])
    assert lorakit.save_adapter(model, out) == out
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"]


@pytest.mark.parametrize("earlier", [True, False], ids=["replacing", "new-folder"])
def test_ctrl_c_at_any_step_of_a_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch, earlier):
    # Ctrl-C at each file operation of a save in turn (creating folders and files, writing,
    # moving the earlier files aside, renaming the new ones into place, deleting the earlier
    # ones): before the new config is in place the folder is left byte for byte as it was (or not
    # created); after, the save stands, whole, and reports no failure.
    out = tmp_path / "runs" / "adapter"
    if earlier:
        lorakit.save_adapter(trained_llama(), out)
        (out / "README.md").write_text("notes")
        torch.save({}, out / "adapter_model.bin")  # an earlier PEFT save's weights: removed by a save
    before = folder_bytes(out) if earlier else None
    model = trained_llama(use_rslora=True, target_modules=["v_proj"])
    lorakit.save_adapter(model, tmp_path / "reference")
    after = folder_bytes(tmp_path / "reference") | ({"README.md": b"notes"} if earlier else {})
    calls, armed = [], False

    def interrupting(real):
        def call(*args, **kwargs):
            if armed:
                calls.append(real)
                if len(calls) == fail_at:
                    raise KeyboardInterrupt
            return real(*args, **kwargs)

        return call

    for owner, attr in [
        (os, "mkdir"),
        (os, "open"),
        (os, "rename"),
        (os, "replace"),
        (os, "unlink"),
        (os, "rmdir"),
        (Path, "write_text"),
        (lorakit.io.save, "save_file"),
    ]:
        monkeypatch.setattr(owner, attr, interrupting(getattr(owner, attr)))
    for fail_at in range(1, 40):
        calls.clear()
        armed = True
        try:
            lorakit.save_adapter(model, out)
        except KeyboardInterrupt:
            armed = False
            assert sorted(os.listdir(tmp_path)) == (["reference", "runs"] if earlier else ["reference"])
            assert not earlier or (os.listdir(out.parent) == ["adapter"] and folder_bytes(out) == before)
            continue
        armed = False
        assert folder_bytes(out) == after  # the save stands whole, no backups left behind
        if fail_at > len(calls):
            break  # every step has been interrupted once
        # an interrupt once the files were in place: put the earlier state back for the next round
        shutil.rmtree(tmp_path / "runs")
        if earlier:
            out.mkdir(parents=True)
            for name, data in before.items():
                (out / name).write_bytes(data)
    assert fail_at > (8 if earlier else 4) and folder_bytes(out) == after


class TwoStacks(nn.Module):
    """Layers ``layers.0/1`` at the top and again inside ``block``: ``layers.1`` is a suffix of
    ``block.layers.1``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(5, 5) for _ in range(2)])
        self.block = nn.Module()
        self.block.layers = nn.ModuleList([nn.Linear(5, 5) for _ in range(2)])

    def forward(self, x):
        for layer in [*self.layers, *self.block.layers]:
            x = layer(x)
        return x


def test_exact_module_list_is_saved_so_that_no_namesake_matches(tmp_path):
    # A regex with layers_to_transform is saved as the adapted modules' paths; the list
    # ["layers.1"] would also select block.layers.1 on load (in lorakit and in PEFT).
    model = TwoStacks()
    lorakit.add_adapter(
        model, LoraConfig(r=2, target_modules="all-linear", layers_to_transform=[1], exclude_modules=r"block\..*")
    )
    randomize_adapters(model, std=0.3)
    x = torch.randn(3, 5)
    with torch.no_grad():
        expected = model(x)
    lorakit.save_adapter(model, tmp_path)
    fresh = TwoStacks()
    lorakit.load_adapter(fresh, tmp_path)
    assert [path for path, _ in lorakit.state.lora_layers(fresh)] == ["layers.1"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-6, atol=1e-6)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(TwoStacks(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected, rtol=1e-6, atol=1e-6)


def snapshot(model):
    return [n for n, _ in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    names, state = snapshot(model)
    assert names == snap[0] and all(torch.equal(state[k], snap[1][k]) for k in snap[1])
    assert lorakit.adapters(model) == []


def test_missing_and_corrupt_files(tmp_path):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(AdapterFileError, match="does not exist"):
        lorakit.load_adapter(model, tmp_path / "nope")
    with pytest.raises(AdapterFileError, match="adapter_config.json not found"):
        lorakit.load_adapter(model, tmp_path)
    lorakit.save_adapter(trained_llama(), tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        lorakit.load_adapter(model, tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="holds no adapter_model.safetensors"):
        lorakit.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        lorakit.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_unreadable_legacy_bin_is_refused(tmp_path):
    lorakit.save_adapter(trained_llama(), tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    snap = snapshot(model)
    (tmp_path / "adapter_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        lorakit.load_adapter(model, tmp_path)
    torch.save([torch.zeros(2)], tmp_path / "adapter_model.bin")  # loads, but is no dict of named tensors
    with pytest.raises(AdapterFileError, match="dict of named tensors"):
        lorakit.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_save_to_a_file_path_is_refused(tmp_path):
    (tmp_path / "out").write_text("keep me")
    with pytest.raises(AdapterFileError, match="is a file"):
        lorakit.save_adapter(trained_llama(), tmp_path / "out")
    assert (tmp_path / "out").read_text() == "keep me"


def test_truncated_safetensors_is_refused(tmp_path):
    lorakit.save_adapter(trained_llama(), tmp_path)
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        lorakit.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    lorakit.save_adapter(trained_llama(), tmp_path)
    bigger = tiny_llama(hidden=64)
    snap = snapshot(bigger)
    with pytest.raises(
        AdapterFileError,
        match=r"module 'model.layers.0.self_attn.q_proj' has shape \(4, 32\) in the file but the model needs \(4, 64\)",
    ):
        lorakit.load_adapter(bigger, tmp_path)
    assert_unchanged(bigger, snap)


def test_incomplete_and_foreign_weights_are_refused(tmp_path):
    lorakit.save_adapter(trained_llama(), tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    save_file(tensors, file)
    model = tiny_llama()
    with pytest.raises(AdapterFileError, match="no lora_B weights for module 'model.layers.1.self_attn.v_proj'"):
        lorakit.load_adapter(model, tmp_path)
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] = torch.zeros(16, 4)
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, file)
    with pytest.raises(AdapterFileError, match="does not target"):
        lorakit.load_adapter(model, tmp_path)
    assert lorakit.adapters(model) == [] and not any(isinstance(m, LoraLayer) for m in model.modules())


def test_duplicate_name_on_load(tmp_path):
    lorakit.save_adapter(trained_llama(), tmp_path)
    model = trained_llama()
    with pytest.raises(lorakit.AdapterNameError, match="already exists"):
        lorakit.load_adapter(model, tmp_path, name="default")
