"""One run of a sweep: claimed, trained through `lorakit.train`, measured, recorded — or its error recorded.

A run's folder is ``<sweep>/runs/<name>/``. Its state is on disk, so any process on any machine that
shares the folder can pick it up:

- ``sweep_result.json`` with ``"status": "ok"``: finished and measured; skipped from then on.
- checkpoints but no result: a half run (killed, or stopped with Ctrl-C); it resumes from its last
  checkpoint (`lorakit.train(resume=True)`: bit-for-bit on the CPU). How often a run checkpoints is
  the base config's ``save_every``; without one, only a Ctrl-C leaves a checkpoint, and a killed
  run starts again.
- ``"status": "failed"``: the error is recorded (``sweep_error.txt``: the traceback) and the sweep
  goes on; the next start of the sweep tries the run again.

A run is claimed with an exclusive ``flock`` on ``.sweep-claim`` in its folder, held while it runs:
other workers pass it by, and the kernel drops the claim when its process dies, however it dies.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import traceback
from pathlib import Path
from typing import Any

from ..safe_files.atomic import write_text_atomically
from .config import SweepConfig
from .measure import RunMeter, folder_bytes
from .plan import RunSpec, point_label
from .presets import preset_name

try:
    import fcntl
except ImportError:  # Windows: one process per sweep folder
    fcntl = None

log = logging.getLogger("lorakit.experiments")

RESULT_FILE = "sweep_result.json"
ERROR_FILE = "sweep_error.txt"
CLAIM_FILE = ".sweep-claim"
# Options every row shows (their values in effect, whether or not an axis sets them).
DESCRIBED = ("method", "r", "alpha", "target_modules", "variant", "lr", "max_steps", "task")


class Claim:
    """An exclusive, non-blocking claim on a run folder (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / CLAIM_FILE
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError:  # a file system without flock: no claims, one process per sweep
                log.warning("cannot lock %s: run one worker per sweep folder on this file system", self.path)
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def read_result(folder: Path) -> dict | None:
    path = Path(folder) / RESULT_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None  # half written by a killed process (writes are atomic; kept for safety)


def run_one(
    config: SweepConfig,
    folder: Path,
    spec: RunSpec,
    device: str | None = None,
    progress: bool = True,
    trial: int | None = None,
) -> dict | None:
    """Run ``spec`` unless finished or claimed elsewhere; its result row (None: another process has it)."""
    from ..training.checkpoint import latest_checkpoint

    run_dir = Path(folder) / "runs" / spec.name
    done = read_result(run_dir)
    if done is not None and done.get("status") == "ok":
        return done
    claim = Claim(run_dir)
    if not claim.try_acquire():
        return None
    try:
        done = read_result(run_dir)  # finished by another process between the check and the claim
        if done is not None and done.get("status") == "ok":
            return done
        options = config.train_options(spec.values, folder)
        options.update(seed=spec.seed, output_dir=str(run_dir))
        if device is not None:
            options["device"] = device
        resumed = latest_checkpoint(run_dir / "checkpoints") is not None
        options["resume" if resumed else "overwrite"] = True
        row = _row_start(config, spec, options, run_dir, trial, resumed)
        try:
            with RunMeter(options.get("device")) as meter:
                from ..training import train

                result = train(options, progress=progress)
            if result.interrupted:
                raise KeyboardInterrupt  # Ctrl-C inside the run: its checkpoint is saved; stop the sweep
            row.update(_measured(result, meter, options))
            if not config.keep_weights:
                _drop_weights(run_dir, result.saved)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # isolated: recorded, and the sweep goes on
            log.warning("run %s failed: %s", spec.name, exc)
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomically(run_dir / ERROR_FILE, traceback.format_exc())
        write_text_atomically(run_dir / RESULT_FILE, json.dumps(row, indent=2, default=str) + "\n")
        return row
    finally:
        claim.release()
        gc.collect()  # the run's model, optimizer and data go before the next run loads its own
        _empty_cuda_cache()


def _row_start(config, spec: RunSpec, options: dict, run_dir: Path, trial: int | None, resumed: bool) -> dict:
    from ..methods import make_method

    row: dict[str, Any] = {"run": spec.name, "group": spec.group, "label": point_label(spec.values)}
    if trial is not None:
        row["trial"] = trial
    for key, value in spec.values.items():
        row[key] = value if isinstance(value, (int, float, str, bool)) or value is None else preset_name(value)
    row["seed"] = spec.seed
    effective = config.train_config(spec.values).to_dict()
    for key in DESCRIBED:
        if key not in row:
            row[key] = (
                preset_name(config.base.get(key, effective.get(key))) if key == "target_modules" else effective.get(key)
            )
    method = make_method(effective["method"])
    row.update(method_title=method.title + (" (run by PEFT)" if method.by_peft else ""), by_peft=method.by_peft)
    row.update(status="running", error=None, resumed=resumed, output_dir=str(run_dir), device=options.get("device"))
    return row


def _measured(result, meter: RunMeter, options: dict) -> dict:
    """The row's measurements from a finished run."""
    records = result.records or []
    train = [r for r in records if "loss" in r]
    final = {k: v for k, v in (result.final_eval or {}).items() if k != "predictions"}
    out: dict[str, Any] = {
        "status": "ok",
        "steps": result.steps,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "trainable_pct": 100 * result.trainable_params / result.total_params if result.total_params else None,
        "saved_bytes": folder_bytes(result.saved),
        "peak_memory_bytes": meter.peak_bytes,
        "peak_memory_label": meter.peak_label,
        "wall_s": round(meter.wall_s, 3),
        "tokens_per_s": train[-1].get("tokens_per_s") if train else None,
        # the last logged steps' mean: one step's loss is one batch's, too noisy to compare runs by
        "train_loss": sum(r["loss"] for r in train[-5:]) / len(train[-5:]) if train else None,
    }
    for key, value in final.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out["eval_loss" if key == "loss" else key] = value
    predictions = (result.final_eval or {}).get("predictions")
    if predictions:
        out["n_eval"] = len(predictions)  # exact match counts whole answers: one answer is 1/n_eval
    return out


def _drop_weights(run_dir: Path, saved: Path | None) -> None:
    """keep_weights: false — the saved weights and checkpoints go once the run is measured."""
    for path in (saved, run_dir / "checkpoints"):
        if path is not None and Path(path).exists():
            shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
