"""Run a script's Triton kernels on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``).

The variable is read when Triton is imported, so the script runs in a fresh interpreter; it
prints "ok" as its last line when every check in it held."""

import os
import subprocess
import sys

import pytest


def run_interpreted(script: str) -> None:
    """Run ``script`` with Triton interpreting its kernels; fail with its stderr unless it ends "ok"."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (result.stdout + result.stderr)[-3000:]
