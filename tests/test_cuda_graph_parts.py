"""The CPU-checkable parts of CUDA-graph decoding: the engine's choice of decode mode and the
capture helper's refusal of tensors off the GPU (the graphs themselves: scripts and bench on a GPU)."""

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.serve.cuda_graph import CapturedCall
from lorakit.serve.engine import _decode_mode


def test_decode_mode():
    cpu = torch.device("cpu")
    assert _decode_mode("auto", cpu) == "dynamic"
    assert _decode_mode("static", cpu) == "static"
    with pytest.raises(ConfigError, match="CUDA device"):
        _decode_mode("graphs", cpu)
    with pytest.raises(ConfigError, match="auto, dynamic, static or graphs"):
        _decode_mode("fast", cpu)


def test_capture_needs_cuda_inputs():
    with pytest.raises(ValueError, match="CUDA device"):
        CapturedCall(lambda x: x * 2, {"x": torch.zeros(2)})
