"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def ids():
    return torch.randint(0, 128, (3, 9))


@pytest.fixture(scope="session")
def embedded_model():
    """The real embedded model (converted once per session into the repo's test cache)."""
    from lorakit.models import load_model

    model, tokenizer = load_model("smollm2-135m", device="cpu")
    return model.eval(), tokenizer


def pytest_configure(config):
    # One conversion cache for every test (and the CLI subprocesses they start): the embedded model
    # is converted once per checkout instead of once per test.
    import os
    from pathlib import Path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: fail fast instead of retrying
    os.environ.setdefault("LORAKIT_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "lorakit-test"))
