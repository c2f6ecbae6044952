"""Training: `train` (a whole run), `TrainConfig`, and the loop's building blocks."""

from .config import TrainConfig
from .run import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
