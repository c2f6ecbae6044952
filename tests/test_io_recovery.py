"""Adapter folders under stress: concurrent saves and loads, saves killed halfway, permissions."""

import json
import os
import signal
import stat
import threading
import time

import pytest
import torch

import lorakit
from lorakit.io.layout import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from lorakit.safe_files.atomic import replace_files_in_folder, write_atomically

from .test_io import folder_bytes, trained_llama
from .tiny import tiny_llama

needs_flock = pytest.mark.skipif(not hasattr(os, "fork") or os.name != "posix", reason="POSIX flock and fork")


@pytest.fixture
def two_adapters(tmp_path):
    """Adapter A (q_proj and v_proj) saved in ``out``, and the bytes of A's and B's (v_proj only)
    saves: B's weights beside A's config fail to load, and the reverse."""
    a, b = trained_llama(), trained_llama(use_rslora=True, target_modules=["v_proj"])
    lorakit.save_adapter(a, tmp_path / "a")
    lorakit.save_adapter(b, tmp_path / "b")
    lorakit.save_adapter(a, tmp_path / "out")
    return tmp_path / "out", a, b, folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")


def without_locks(monkeypatch):
    """What a platform without fcntl does (Windows): no lock at all."""
    monkeypatch.setattr("lorakit.safe_files.folder_lock.fcntl", None)


@needs_flock
@pytest.mark.parametrize("locked", [True, False], ids=["locked", "unlocked"])
def test_two_saves_into_one_folder_take_turns(two_adapters, monkeypatch, locked):
    # The first save stops just before its config goes in (its weights are in place) until the
    # second is done or a second has passed. Without the lock the second runs meanwhile and the
    # first's config lands beside the second's weights; with it the second waits its turn.
    out, a, b, bytes_a, bytes_b = two_adapters
    if not locked:
        without_locks(monkeypatch)
    first_waits, second_done = threading.Event(), threading.Event()
    real_replace, errors = os.replace, []

    def slow_config(src, dst, **kwargs):
        if threading.current_thread().name == "first" and os.path.basename(dst) == CONFIG_NAME:
            first_waits.set()
            second_done.wait(timeout=2.0)
        return real_replace(src, dst, **kwargs)

    def save(model, done=None):
        try:
            lorakit.save_adapter(model, out)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        if done:
            done.set()

    monkeypatch.setattr(os, "replace", slow_config)
    first = threading.Thread(target=save, args=(a,), name="first")
    second = threading.Thread(target=save, args=(b, second_done), name="second")
    first.start()
    assert first_waits.wait(timeout=30)
    second.start()
    first.join(timeout=30)
    second.join(timeout=30)
    assert not errors
    found = folder_bytes(out)
    mixed = {CONFIG_NAME: bytes_a[CONFIG_NAME], WEIGHTS_NAME: bytes_b[WEIGHTS_NAME]}
    assert found == (mixed if not locked else bytes_b)  # locked: the second went last, whole


@needs_flock
@pytest.mark.parametrize("locked", [True, False], ids=["locked", "unlocked"])
def test_a_load_never_pairs_one_saves_config_with_anothers_weights(two_adapters, monkeypatch, ids, locked):
    # The load stops between reading the config and reading the weights, until a save of B into
    # the folder is done or two seconds have passed. Without the lock it reads A's config and B's
    # weights (and refuses them: they do not fit); with it the save waits until the load is done.
    out, a, b, _, bytes_b = two_adapters
    if not locked:
        without_locks(monkeypatch)
    config_read, save_done = threading.Event(), threading.Event()
    real_read_config = lorakit.io.load.read_config_data

    def slow_read_config(directory):
        config = real_read_config(directory)
        config_read.set()
        save_done.wait(timeout=2.0)
        return config

    def save():
        assert config_read.wait(timeout=30)
        lorakit.save_adapter(b, out)
        save_done.set()

    monkeypatch.setattr(lorakit.io.load, "read_config_data", slow_read_config)
    writer = threading.Thread(target=save)
    writer.start()
    model = tiny_llama()
    try:
        if locked:
            lorakit.load_adapter(model, out)
        else:
            with pytest.raises(lorakit.AdapterFileError, match="no lora_A weights"):
                lorakit.load_adapter(model, out)
    finally:
        writer.join(timeout=30)
    if locked:
        torch.testing.assert_close(model(ids).logits, a(ids).logits, rtol=0, atol=0)
    assert folder_bytes(out) == bytes_b


@needs_flock
def test_the_lock_excludes_every_other_holder_while_its_file_comes_and_goes(tmp_path):
    # Each release removes the lock file while others wait on it: a waiter must then lock the
    # new file, never hold the old one beside a holder of the new.
    from lorakit.safe_files.folder_lock import FolderLock

    inside, overlaps = [], []

    def worker(exclusive):
        for _ in range(40):
            lock = FolderLock(tmp_path)
            assert lock.acquire(exclusive=exclusive)
            inside.append(exclusive)
            if exclusive and len(inside) > 1 or not exclusive and any(inside):
                overlaps.append(list(inside))
            time.sleep(0.0005)
            inside.remove(exclusive)
            lock.release()

    threads = [threading.Thread(target=worker, args=(i % 3 != 0,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert overlaps == [] and os.listdir(tmp_path) == []  # the last one out removed the lock file


def kill_at(step, out, files, removes):
    """Fork a process that runs ``replace_files_in_folder`` and SIGKILLs itself at its ``step``-th
    file operation (open, fsync, rename, replace, unlink, or writing a file); how it ended."""
    pid = os.fork()
    if pid == 0:  # the child: no return into pytest, whatever happens
        try:
            count = [0]

            def counting(real):
                def call(*args, **kwargs):
                    count[0] += 1
                    if count[0] == step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)

                return call

            for attr in ("open", "fsync", "rename", "replace", "unlink"):
                setattr(os, attr, counting(getattr(os, attr)))
            writes = {
                name: counting(lambda tmp, data=data: open(tmp, "wb").write(data)) for name, data in files.items()
            }
            replace_files_in_folder(out, writes, removes=removes)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return "killed" if os.WIFSIGNALED(status) else "finished"


@needs_flock
def test_a_save_killed_at_any_step_is_finished_or_undone_by_the_next_load(two_adapters, ids):
    # A kill leaves the swap as it was at that instant (and the lock file: only the lock goes).
    # The next load must find the earlier adapter whole, or the new one whole, and nothing else.
    out, a, b, bytes_a, bytes_b = two_adapters
    (out / "README.md").write_text("notes")
    torch.save({}, out / LEGACY_WEIGHTS_NAME)  # an earlier PEFT save's weights: the save removes it
    before = folder_bytes(out)
    after = {**bytes_b, "README.md": b"notes"}
    outcomes = []
    for step in range(1, 100):
        ended = kill_at(
            step, out, {WEIGHTS_NAME: bytes_b[WEIGHTS_NAME], CONFIG_NAME: bytes_b[CONFIG_NAME]}, (LEGACY_WEIGHTS_NAME,)
        )
        model = tiny_llama()
        lorakit.load_adapter(model, out)
        found = folder_bytes(out)
        assert found in (before, after), f"killed at step {step}: {sorted(found)}"
        outcomes.append("before" if found == before else "after")
        torch.testing.assert_close(model(ids).logits, (a if found == before else b)(ids).logits, rtol=0, atol=0)
        if ended == "finished":
            break
        for name in list(found):  # the earlier adapter back for the next round
            os.unlink(out / name)
        for name, data in before.items():
            (out / name).write_bytes(data)
    assert ended == "finished" and step > 15
    first_after = outcomes.index("after")  # once the new config is in, the save stands
    assert "before" not in outcomes[first_after:] and first_after > 5


def test_leftovers_of_an_earlier_version_are_restored_on_load(two_adapters, ids):
    # What a save killed mid-swap by lorakit before the journal left: the config moved to a hidden
    # backup and not restored (each backup its own random part), and a temporary file.
    out, a, _, bytes_a, _ = two_adapters
    os.rename(out / CONFIG_NAME, out / f".{CONFIG_NAME}.0123456789ab.old")
    (out / f".{WEIGHTS_NAME}.fedcba987654.tmp").write_bytes(b"half a file")
    (out / f".{WEIGHTS_NAME}.00000000abcd.old").write_bytes(b"an older save's weights")  # its file is there: goes
    (out / ".notes.0123456789ab.old").write_text("not an adapter file: stays")
    model = tiny_llama()
    lorakit.load_adapter(model, out)
    torch.testing.assert_close(model(ids).logits, a(ids).logits, rtol=0, atol=0)
    assert folder_bytes(out) == {**bytes_a, ".notes.0123456789ab.old": b"not an adapter file: stays"}


def test_a_save_cut_off_after_its_weights_is_undone_not_mixed(two_adapters, ids):
    # The state a kill leaves between the two renames: B's weights in place, A's config and
    # weights in backups, B's config still temporary. Restoring only what is missing would put
    # A's config beside B's weights; the journal says to undo the whole save.
    from lorakit.safe_files.journal import backup_path, temp_path, write_journal

    out, a, _, bytes_a, bytes_b = two_adapters
    token = "0123456789ab"
    temp_path(out, CONFIG_NAME, token).write_bytes(bytes_b[CONFIG_NAME])
    write_journal(out, token, [WEIGHTS_NAME, CONFIG_NAME], [LEGACY_WEIGHTS_NAME])
    os.rename(out / CONFIG_NAME, backup_path(out, CONFIG_NAME, token))
    os.rename(out / WEIGHTS_NAME, backup_path(out, WEIGHTS_NAME, token))
    (out / WEIGHTS_NAME).write_bytes(bytes_b[WEIGHTS_NAME])
    model = tiny_llama()
    lorakit.load_adapter(model, out)
    torch.testing.assert_close(model(ids).logits, a(ids).logits, rtol=0, atol=0)
    assert folder_bytes(out) == bytes_a


def test_a_save_cut_off_after_its_config_is_finished_by_the_next_save(two_adapters):
    # Killed once both files were in place, before the backups were deleted: the save stands,
    # and the next save (here of B again) clears its backups before its own work.
    from lorakit.safe_files.journal import backup_path, write_journal

    out, _, b, _, bytes_b = two_adapters
    token = "0123456789ab"
    write_journal(out, token, [WEIGHTS_NAME, CONFIG_NAME], [])
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        os.rename(out / name, backup_path(out, name, token))
        (out / name).write_bytes(bytes_b[name])
    (out / "README.md").write_text("notes")
    lorakit.save_adapter(b, out)
    assert folder_bytes(out) == {**bytes_b, "README.md": b"notes"}


def test_a_save_keeps_the_permissions_of_the_files_it_replaces(tmp_path):
    old_umask = os.umask(0o022)
    try:
        out = tmp_path / "adapter"
        lorakit.save_adapter(trained_llama(), out)
        assert {stat.S_IMODE((out / n).stat().st_mode) for n in os.listdir(out)} == {0o644}  # the umask's
        os.chmod(out / CONFIG_NAME, 0o664)
        os.chmod(out / WEIGHTS_NAME, 0o640)
        lorakit.save_adapter(trained_llama(use_rslora=True), out)
        assert stat.S_IMODE((out / CONFIG_NAME).stat().st_mode) == 0o664
        assert stat.S_IMODE((out / WEIGHTS_NAME).stat().st_mode) == 0o640
        assert json.loads((out / CONFIG_NAME).read_text())["use_rslora"]

        plot = write_atomically(tmp_path / "plot.png", lambda tmp: open(tmp, "wb").write(b"png"), suffix=".png")
        assert stat.S_IMODE(plot.stat().st_mode) == 0o644  # not mkstemp's 0600
        os.chmod(plot, 0o604)
        write_atomically(plot, lambda tmp: open(tmp, "wb").write(b"png2"), suffix=".png")
        assert stat.S_IMODE(plot.stat().st_mode) == 0o604 and plot.read_bytes() == b"png2"
    finally:
        os.umask(old_umask)


def test_a_linked_adapter_file_becomes_a_regular_file_and_its_target_stays(tmp_path):
    # Documented: the link is replaced (moved aside, then deleted), what it pointed to is not
    # written through; the new file takes the target's permissions.
    out = tmp_path / "adapter"
    lorakit.save_adapter(trained_llama(), out)
    shared = tmp_path / "shared_config.json"
    os.replace(out / CONFIG_NAME, shared)
    os.chmod(shared, 0o640)
    (out / CONFIG_NAME).symlink_to(shared)
    before = shared.read_bytes()
    lorakit.save_adapter(trained_llama(use_rslora=True), out)
    assert not (out / CONFIG_NAME).is_symlink() and json.loads((out / CONFIG_NAME).read_text())["use_rslora"]
    assert shared.read_bytes() == before
    assert stat.S_IMODE((out / CONFIG_NAME).stat().st_mode) == 0o640


def test_a_load_leaves_no_lock_file_and_a_read_only_folder_still_loads(tmp_path, monkeypatch, ids):
    out = tmp_path / "adapter"
    model = trained_llama()
    lorakit.save_adapter(model, out)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, out)
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]
    real_open = os.open

    def read_only_folder(path, flags, *args, **kwargs):  # what a folder this user may only read does
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_folder)
    again = tiny_llama()
    lorakit.load_adapter(again, out)  # no lock file can be made: read without one
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]


def test_a_stale_temporary_file_of_safetensors_goes_at_the_next_load(two_adapters, ids):
    """safetensors writes under ``.tmpXXXXXX`` and renames; a kill mid-write leaves that file. It
    goes once unchanged for an hour; a recent one (perhaps another program's running write) and
    other names stay."""
    from lorakit.safe_files.journal import STALE_WRITE_S

    out, a, _, bytes_a, _ = two_adapters
    for name in (".tmpAbC123", ".tmpXyZ789", ".tmpAbC1234", "tmpAbC123"):
        (out / name).write_bytes(b"part of a file")
    old = time.time() - STALE_WRITE_S - 60
    for name in (".tmpAbC123", ".tmpAbC1234", "tmpAbC123"):
        os.utime(out / name, (old, old))
    model = tiny_llama()
    lorakit.load_adapter(model, out)
    torch.testing.assert_close(model(ids).logits, a(ids).logits, rtol=0, atol=0)
    assert set(folder_bytes(out)) == set(bytes_a) | {".tmpXyZ789", ".tmpAbC1234", "tmpAbC123"}
