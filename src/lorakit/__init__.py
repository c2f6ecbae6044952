"""lorakit: LoRA fine-tuning for any PyTorch model.

Inject low-rank adapters into a model in place, train them, save them in PEFT's file layout,
merge, combine and export them. The public API (README.md, "API"; the code's layout in
docs/architecture.md):

    LoraConfig, add_adapter, load_adapter, save_adapter, set_adapter, adapters, delete_adapter,
    use_adapters, disable_adapters, adapter_batch, merge, unmerge, unload, trainable_parameters, summary

plus the training entry points (train, TrainConfig, loraplus_optimizer; tasks in docs/tasks.md), score (a reward
model's rewards for texts), DyLoRA's truncate,
adapter arithmetic (combine, compress; see docs/arithmetic.md), set_fast_path (fused layers on by
default; False forces the reference forward) and hotswap_adapter (new weights into an existing
adapter's tensors, so a compiled model does not recompile), quantize / dequantize (a model's
linear layers to bitsandbytes 4-bit or 8-bit and back: QLoRA), and sweep (experiments: a grid or
Optuna search over training options, measured, tabled, plotted and reported; lorakit.experiments).
"""

from .arithmetic import combine, compress
from .config import LoraConfig
from .control import (
    adapter_batch,
    adapters,
    disable_adapters,
    merge,
    set_adapter,
    set_fast_path,
    unmerge,
    use_adapters,
)
from .errors import (
    AdapterFileError,
    AdapterNameError,
    AdapterStateError,
    ConfigError,
    DataError,
    GenerationError,
    LorakitError,
    ModelNotFoundError,
    TargetError,
)
from .hotswap import hotswap_adapter
from .inject import add_adapter, delete_adapter, unload
from .io import load_adapter, save_adapter
from .memory import MemoryReport, memory_report
from .quantization import dequantize, quantize
from .report import summary, trainable_parameters
from .variants.dylora import truncate

__version__ = "0.1.0"


def __getattr__(name: str):
    # Training pulls in accelerate, numpy and (for real runs) transformers: import it on first use
    # so that `import lorakit` stays light.
    if name in ("train", "TrainConfig"):
        from . import training

        return getattr(training, name)
    if name == "score":  # a reward model's rewards (lorakit.tasks.scoring)
        from .tasks.scoring import score

        return score
    if name == "sweep":  # lorakit.experiments: Optuna, matplotlib and training behind it
        from .experiments import sweep

        return sweep
    if name == "loraplus_optimizer":
        from .training.optim import loraplus_optimizer

        return loraplus_optimizer
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


__all__ = [
    "LoraConfig",
    "add_adapter",
    "load_adapter",
    "save_adapter",
    "set_adapter",
    "adapters",
    "delete_adapter",
    "disable_adapters",
    "use_adapters",
    "adapter_batch",
    "merge",
    "unmerge",
    "unload",
    "trainable_parameters",
    "summary",
    "LorakitError",
    "ConfigError",
    "TargetError",
    "AdapterNameError",
    "AdapterStateError",
    "AdapterFileError",
    "ModelNotFoundError",
    "DataError",
    "GenerationError",
    "train",
    "TrainConfig",
    "score",
    "truncate",
    "loraplus_optimizer",
    "sweep",
    "set_fast_path",
    "hotswap_adapter",
    "combine",
    "compress",
    "memory_report",
    "MemoryReport",
    "quantize",
    "dequantize",
]
