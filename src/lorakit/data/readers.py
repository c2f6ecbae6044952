"""`read_records`: load a JSONL / JSON / CSV / Parquet file, or a Hugging Face dataset (a
``save_to_disk`` folder or a name in the local cache), into validated `Record`s.

Every row is checked before anything is returned; all problems of the file are reported
together (the first few spelled out with file and line, the rest counted) as one
`lorakit.errors.DataError`. The point is to fail in the first second of a run, not after an
hour of training when a bad line is finally reached.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from .hf_datasets import dataset_rows, is_saved_dataset, looks_like_dataset_name
from .records import EXPECTED, FIELDS, Problems, Record, detect_kind, parse_row

log = logging.getLogger("lorakit.data.readers")

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def read_records(
    path: str | Path,
    *,
    split: str | None = None,
    columns: dict[str, str] | None = None,
    default_split: str | tuple[str, ...] = "train",
    split_flag: str = "--data-split",
) -> list[Record]:
    """All records of ``path``, validated; raises DataError naming file and line of each problem.

    The format follows the suffix: ``.jsonl`` (one object per line; blank lines are skipped),
    ``.json`` (a list of objects, one object, or JSONL content), ``.csv`` / ``.tsv`` (columns ``prompt`` and
    ``completion``, or ``text``, or ``messages`` / ``conversations`` holding a JSON list), ``.parquet``
    (needs ``pyarrow`` or ``pandas``). Text must be UTF-8. A folder written by ``save_to_disk`` or a
    dataset name in the local Hugging Face cache is read with ``datasets`` (never downloading);
    ``split`` picks a DatasetDict's split (default: the first of ``default_split`` it has;
    ``split_flag`` is the option errors name). One source must use one shape
    throughout (alpaca and ShareGPT rows included, see `records`); an empty one is refused.

    ``columns`` maps record fields to the source's columns (``{"prompt": "question"}``: the
    column ``question`` is read as ``prompt``), replacing a column already named like the field.
    """
    columns = check_columns(columns)
    spec = str(path)
    path = Path(path)
    a_name = not path.exists() and path.suffix.lower() not in SUFFIXES and looks_like_dataset_name(spec)
    if a_name or is_saved_dataset(path):
        label, names, rows = dataset_rows(spec, split, default_split, split_flag)
        missing = [column for column in columns.values() if column not in names]
        if missing:
            raise DataError(
                f"{label}: no column {', '.join(map(repr, missing))} (--data-columns); its columns are "
                f"{', '.join(map(repr, names))}"
            )
        if detect_kind(_renamed(dict.fromkeys(names), columns)) is None:
            raise DataError(
                f"{label}: columns {', '.join(map(repr, names))}; expected {EXPECTED} "
                "(map yours with --data-columns, e.g. prompt=question,completion=answer)"
            )
        problems = Problems(label)
        records = _parse_rows(((where, _renamed(row, columns)) for where, row in rows), label, problems)
        return _checked(records, label, problems)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(
            f"{path} is a directory but not a saved dataset (save_to_disk); pass a data file ({', '.join(SUFFIXES)})"
        )
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"{path}: unsupported data format {suffix or '(no suffix)'!r}; use one of {', '.join(SUFFIXES)}"
        )
    if split is not None:
        raise DataError(f"{path} is a file without splits, so split {split!r} does not apply; drop {split_flag}")
    problems = Problems(str(path))
    if suffix == ".jsonl":
        rows = _jsonl_rows(path, problems)
    elif suffix == ".json":
        rows = _json_rows(path, problems)
    elif suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, problems, "\t" if suffix == ".tsv" else ",", columns)
    else:
        rows = _parquet_rows(path)
    try:
        records = _parse_rows(_mapped(rows, columns, problems), str(path), problems)
    except UnicodeDecodeError as e:  # e.g. a CSV saved as Latin-1 / Windows-1252 by a spreadsheet
        raise DataError(
            f"{path}: not UTF-8 text (byte {e.object[e.start : e.start + 1]!r} at offset {e.start}); "
            f"save the file as UTF-8 and run again"
        ) from None
    return _checked(records, str(path), problems)


def _checked(records: list[Record], source: str, problems: Problems) -> list[Record]:
    problems.raise_if_any()
    if not records:
        raise DataError(f"{source}: no records (the file is empty); expected {_SHAPES}")
    log.info("read %d %s records from %s", len(records), records[0].kind, source)
    return records


_SHAPES = f"objects with {EXPECTED}"


def parse_columns(text: str | dict[str, str] | None) -> dict[str, str]:
    """``"prompt=question,completion=answer"`` (or that mapping) as ``{field: column}``, checked."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return check_columns(text)
    mapping: dict[str, str] = {}
    for item in str(text).split(","):
        field, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not field or not column:
            raise DataError(
                f"data columns: {item.strip()!r} is not FIELD=COLUMN (e.g. prompt=question,completion=answer)"
            )
        if field in mapping:
            raise DataError(f"data columns: field {field!r} is mapped twice")
        mapping[field] = column
    return check_columns(mapping)


def check_columns(columns: dict[str, str] | None) -> dict[str, str]:
    """``columns`` (field -> the source's column) with every field one that a record shape reads."""
    columns = dict(columns or {})
    for field, column in columns.items():
        if field not in FIELDS:
            raise DataError(f"data columns: unknown field {field!r}; the fields are {', '.join(FIELDS)}")
        if not isinstance(column, str) or not column:
            raise DataError(f"data columns: the column for {field!r} must be a name, got {column!r}")
    return columns


def _renamed(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """``row`` with each mapped column under its field's name (replacing a column of that name)."""
    if not columns:
        return row
    sources = set(columns.values())
    out = {k: v for k, v in row.items() if k not in sources and k not in columns}
    out.update({field: row[column] for field, column in columns.items() if column in row})
    return out


def _mapped(rows: Iterator[tuple[str, Any]], columns: dict[str, str], problems: Problems) -> Iterator[tuple[str, Any]]:
    """File rows with ``columns`` applied; a row without a mapped column is a problem of its own."""
    for where, row in rows:
        if columns and isinstance(row, dict):
            missing = [column for column in columns.values() if column not in row]
            if missing:
                problems.add(where, f"no column {', '.join(map(repr, missing))} (--data-columns)")
                continue
            row = _renamed(row, columns)
        yield where, row


def _parse_rows(rows: Iterator[tuple[str, Any]], source: str, problems: Problems) -> list[Record]:
    """Validate each ``(where, row)``; also refuse a file that mixes shapes."""
    records: list[Record] = []
    first: tuple[str, str] | None = None  # (kind, where) of the first row with a recognisable shape
    for where, row in rows:
        kind = detect_kind(row) if isinstance(row, dict) else None
        if kind is not None:
            if first is None:
                first = (kind, where)
            elif kind != first[0]:
                # Mixed shapes almost always mean two datasets were concatenated by mistake, and
                # they would be masked differently, so refuse rather than guess.
                problems.add(
                    where, f"mixed shapes: this row is {kind!r} but {first[1]} is {first[0]!r}; use one shape per file"
                )
                continue
        record = parse_row(row, f"{source}:{where}", problems, where)
        if record is not None:
            records.append(record)
    return records


def object_rows(path: str | Path, problems: Problems, what: str = "data") -> Iterator[tuple[str, Any]]:
    """``(where, row)`` of every row of a ``.jsonl``, ``.json`` or ``.parquet`` file, the formats
    whose rows may hold nested lists (message lists); ``where`` is "line N" ("item N", "row N").
    Lines that are not JSON go to ``problems``. Raises DataError for a missing file or another
    format (``what`` names the data in that message)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(path, problems)
    elif suffix == ".json":
        yield from _json_rows(path, problems)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise DataError(f"{path}: {what} must be a .jsonl, .json or .parquet file, got {suffix or '(no suffix)'!r}")


def _jsonl_rows(path: Path, problems: Problems) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                # Without its line break: a line cut short would be reported at "column 1" of the
                # next line, not where it ends.
                yield f"line {number}", json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                problems.add(f"line {number}", f"invalid JSON ({e.msg} at column {e.colno})")


def _json_rows(path: Path, problems: Problems) -> Iterator[tuple[str, Any]]:
    """A list of objects, one (possibly pretty-printed) object, or JSONL content."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if _first_line_is_json(text):
            yield from _jsonl_rows(path, problems)  # many ".json" files are really JSONL
        else:  # one document (a list, a pretty-printed object): the error is where the document says
            problems.add(f"line {e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})")
        return
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items, start=1):
        yield f"item {i}", item


def _first_line_is_json(text: str) -> bool:
    """Whether the first non-blank line of ``text`` is a JSON value of its own (JSONL content)."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _csv_rows(path: Path, problems: Problems, delimiter: str, columns: dict[str, str]) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        if header and detect_kind(_renamed(dict.fromkeys(header), columns)) is None:
            names = ", ".join(map(repr, header))
            problems.add("line 1", f"header has columns {names}; expected {EXPECTED} (or use --data-columns)")
            return
        for row in reader:
            where = f"line {reader.line_num}"  # the row's last physical line (quoted cells may span lines)
            row.pop(None, None)  # cells beyond the header: irrelevant here
            if any(value is None for value in row.values()):
                missing = [k for k, v in row.items() if v is None]
                problems.add(where, f"row is missing value(s) for {', '.join(map(repr, missing))}")
                continue
            for key in (columns.get("messages", "messages"), columns.get("conversations", "conversations")):
                if key in row:
                    try:
                        row[key] = json.loads(row[key])
                    except json.JSONDecodeError as e:
                        problems.add(where, f"{key!r} cell is not valid JSON ({e.msg})")
                        break
            else:
                yield where, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    rows = _read_parquet(path)
    for i, row in enumerate(rows, start=1):
        yield f"row {i}", {k: _plain(v) for k, v in row.items()}


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises its own error types for corrupt or non-Parquet files
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    try:
        import pandas as pd
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (or pandas): pip install pyarrow") from None
    try:
        return pd.read_parquet(path).to_dict("records")
    except ImportError as e:  # pandas without a Parquet engine
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow ({e})") from None


def _plain(value: Any) -> Any:
    """numpy arrays/scalars (from pandas) to plain Python, so validation sees lists and strs."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
