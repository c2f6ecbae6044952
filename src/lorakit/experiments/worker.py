"""``python -m lorakit.experiments.worker SWEEP_FOLDER --device D``: one worker of a multi-device sweep.

Reads the sweep from the folder's ``sweep.yaml`` (written by the process that started the workers)
and runs whatever runs no other worker holds; see `lorakit.experiments.workers`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.experiments.worker")
    parser.add_argument("folder")
    parser.add_argument("--device", default=None)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # transformers' weight-loading bars would drown the sweep's lines
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    threads = os.environ.get("LORAKIT_SWEEP_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    from ..errors import LorakitError
    from .config import SweepConfig
    from .driver import work
    from .folder import CONFIG_FILE

    folder = Path(args.folder)
    try:
        config = SweepConfig.from_file(folder / CONFIG_FILE)
        work(config, folder, device=args.device, progress=False)
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
