"""GPU check of `lorakit train --compile`: how often the training step compiles, and what it costs.

Run on a machine with a GPU (CI has none; this is run by hand or on a lent GPU machine):

    PYTHONPATH=src python scripts/gpu_compile_check.py OUT_DIR [--steps 40] [--device cuda]

Builds the small random Llama of ``gpu_ddp_check.py`` (no download), writes the demo dataset and
trains LoRA and DoRA in fp32, each eager and with ``--compile``, without packing, so batches come in many
lengths. For each compiled run it counts dynamo's recompiles and graph breaks (``TORCH_LOGS``) and
checks that there is at most one recompile (a graph for the first shape, one dynamic graph for all
others), no graph break, and that the loss follows the eager run's. Prints the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ddp_check import build_model  # noqa: E402


def train(
    out: Path, data: dict, name: str, steps: int, device: str, extra: list[str]
) -> tuple[list[float], str, float]:
    """(logged losses, stderr, wall seconds) of one `lorakit train` run."""
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "-v",
        "train",
        "--model",
        str(out / "model"),
        "--data",
        str(data["train"]),
        "--output-dir",
        str(out / name),
        "--max-steps",
        str(steps),
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--device",
        device,
        "--dtype",
        "float32",
        "--seed",
        "0",
        *extra,
    ]
    print(" ".join(cmd), flush=True)
    started = time.perf_counter()
    env = {**os.environ, "TORCH_LOGS": "recompiles,graph_breaks"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(done.returncode)
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], done.stderr, wall


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    from lorakit.data import write_demo_dataset

    data = write_demo_dataset(args.out / "data", n_train=512, n_test=16)
    build_model(args.out / "model", data["train"].read_text().splitlines())
    failures = []
    for variant in ("lora", "dora"):
        flags = ["--variant", variant]
        eager, _, eager_wall = train(args.out, data, f"{variant}-eager", args.steps, args.device, flags)
        compiled, log, compiled_wall = train(
            args.out, data, f"{variant}-compiled", args.steps, args.device, [*flags, "--compile"]
        )
        recompiles = log.count("Recompiling function")
        breaks = [line for line in log.splitlines() if "Graph break" in line]
        drift = max(abs(a - b) / abs(b) for a, b in zip(compiled, eager))
        print(
            f"{variant}: eager {eager_wall:.1f} s, compiled {compiled_wall:.1f} s, recompiles {recompiles}, "
            f"graph breaks {len(breaks)}, largest relative loss difference {drift:.2e}, "
            f"losses {eager[0]:.3f} -> {eager[-1]:.3f}"
        )
        if recompiles > 1:
            failures.append(f"{variant}: {recompiles} recompiles")
            print("\n".join(line for line in log.splitlines() if "recompiles" in line)[-4000:])
        if breaks:
            failures.append(f"{variant}: {len(breaks)} graph breaks")
            print("\n".join(breaks[:5]))
        if len(compiled) != args.steps or drift > 1e-3:
            failures.append(f"{variant}: the compiled run's losses left the eager run's ({drift:.2e})")
    if failures:
        print("compile check failed:", "; ".join(failures))
        return 1
    print("compile check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
