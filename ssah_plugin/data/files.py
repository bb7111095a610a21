"""Readers of calibration / evaluation data files and of Hugging Face datasets (the sources of
:func:`ssah_plugin.data.rows.load_rows`)."""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

from ssah_plugin.errors import DataError, require

__all__ = ["load_hub_dataset", "read_file"]


def read_file(path: Path) -> list[dict]:
    """The rows of one local file: ``.jsonl`` (``.jsonl.gz``), ``.json`` (a list, or an object holding one list),
    ``.csv`` / ``.tsv``, ``.txt`` (one prompt per line), ``.parquet`` (the ``[data]`` extra). Raises
    :class:`DataError` for an unreadable file, bad JSON (naming the line) or an unknown suffix."""
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    suffix = suffix.lower()
    try:
        if suffix in (".jsonl", ".jsonl.gz"):
            opener = gzip.open if suffix.endswith(".gz") else open
            rows = []
            with opener(path, "rt", encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}: line {i} is not valid JSON ({exc.msg}); each line must be one "
                                        "JSON object") from None
                    rows.append(row)
            return rows
        if suffix == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(f"{path}: a JSON object must hold exactly one list of rows")
                data = lists[0]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of objects")
            return data
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".txt":  # one prompt per line
            with open(path, encoding="utf-8") as f:
                return [{"prompt": line.rstrip("\n")} for line in f if line.strip()]
        if suffix == ".parquet":
            pd = require("pandas", "data", "reading Parquet calibration data")
            require("pyarrow", "data", "reading Parquet calibration data")
            return pd.read_parquet(path).to_dict(orient="records")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read calibration data {str(path)!r}: {exc}") from None
    raise DataError(f"{str(path)!r}: unknown file type {suffix!r}; use .jsonl, .json, .csv, .parquet or .txt")


def load_hub_dataset(name: str, split: str | None) -> list[dict]:
    """Load a Hugging Face dataset (``org/name`` or ``org/name:split``); kept for users with network access."""
    datasets = require("datasets", "data", f"loading the dataset {name!r} from the Hugging Face hub")
    if ":" in name and split is None:
        name, split = name.rsplit(":", 1)
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # network, missing dataset, gated: all user-fixable
        raise DataError(f"cannot load dataset {name!r} (split {split or 'train'!r}): {type(exc).__name__}: {exc}. "
                        "Pass a local .jsonl/.csv/.parquet file instead, or check the name and your network") from None
    return [dict(r) for r in ds]
