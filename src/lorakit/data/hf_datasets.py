"""Rows of a Hugging Face `datasets` dataset: a folder written by ``save_to_disk`` (a Dataset or a
DatasetDict) or a dataset name already in the local Hugging Face cache.

Nothing is ever downloaded: a name is looked up with the hub offline (``HF_DATASETS_OFFLINE=1``
semantics), and a name that is not cached is a one-line `DataError`. ``datasets`` is imported
only here, and only when such a source is read (``pip install 'lorakit[datasets]'``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import DataError

log = logging.getLogger("lorakit.data.hf_datasets")

# A hub dataset id: "name" or "owner/name" (what `datasets.load_dataset` takes).
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_INSTALL = "pip install 'lorakit[datasets]'"


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    if (path / "dataset_dict.json").is_file():  # a DatasetDict
        return True
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def looks_like_dataset_name(spec: str) -> bool:
    return bool(_NAME.match(spec))


def dataset_rows(
    spec: str | Path,
    split: str | None,
    default: str | tuple[str, ...] = "train",
    flag: str = "--data-split",
) -> tuple[str, list[str], Iterator[tuple[str, Any]]]:
    """``(label, column names, rows)`` of the saved dataset or cached dataset name ``spec``.

    ``split`` picks a split of a DatasetDict (None: the first of ``default`` it has); a plain
    Dataset has none, so naming one is refused (``flag``: the option to name in errors). Rows are
    ``("row N", dict)``, numbered from 1 as Parquet rows are.
    """
    datasets = _import_datasets(spec)
    path = Path(spec)
    if is_saved_dataset(path):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises its own types for a damaged folder
            raise DataError(f"{path}: not a readable saved dataset ({e})") from None
        label = str(path)
    else:
        loaded = _load_cached(datasets, str(spec))
        label = str(spec)
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        defaults = (default,) if isinstance(default, str) else default
        chosen = split or next((name for name in defaults if name in loaded), defaults[0])
        if chosen not in loaded:
            names = ", ".join(map(repr, splits))
            raise DataError(f"{label}: no split {chosen!r}; its splits are {names} (choose one with {flag})")
        dataset = loaded[chosen]
        label = f"{label}[{chosen}]"
    else:
        if split is not None:
            raise DataError(f"{label} is one Dataset without splits, so split {split!r} does not apply; drop {flag}")
        dataset = loaded
    return label, list(dataset.column_names), ((f"row {i}", row) for i, row in enumerate(dataset, start=1))


def _import_datasets(spec: str | Path) -> Any:
    try:
        import datasets
    except ImportError:
        if not Path(spec).exists():  # most likely a mistyped file name
            raise DataError(
                f"data file not found: {spec} (a Hugging Face dataset name needs the datasets package: {_INSTALL})"
            ) from None
        raise DataError(f"{spec}: a saved Hugging Face dataset needs the datasets package: {_INSTALL}") from None
    return datasets


@contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """The hub offline for ``datasets`` and ``huggingface_hub`` while the block runs (both read their
    offline flag once, at import, from the environment; lorakit never downloads data)."""
    import huggingface_hub.constants as hub_constants

    # datasets names its flag HF_HUB_OFFLINE since 2.19 (HF_DATASETS_OFFLINE before, kept as an alias).
    flags = [(module, name) for module in (datasets.config, hub_constants) for name in _FLAGS if hasattr(module, name)]
    saved = [getattr(module, name) for module, name in flags]
    ds_logger = logging.getLogger("datasets")
    level = ds_logger.level
    for module, name in flags:
        setattr(module, name, True)
    ds_logger.setLevel(logging.ERROR)  # not "using the latest cached version ... (offline mode is enabled)"
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved):
            setattr(module, name, value)
        ds_logger.setLevel(level)


_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _load_cached(datasets: Any, name: str) -> Any:
    with _offline(datasets):
        try:
            return datasets.load_dataset(name)
        except (ConnectionError, FileNotFoundError) as e:  # not cached (DatasetNotFoundError included)
            log.debug("load_dataset(%r) offline: %s", name, e)
            raise DataError(
                f"{name}: not a data file or saved dataset folder, nor a dataset in the local Hugging Face "
                f"cache ({datasets.config.HF_DATASETS_CACHE}); lorakit never downloads data: run "
                f"datasets.load_dataset({name!r}) once online, or pass a file"
            ) from None
        except Exception as e:  # noqa: BLE001 - a cached dataset datasets cannot read: one line, not a traceback
            raise DataError(f"{name}: the cached dataset could not be loaded ({type(e).__name__}: {e})") from None
