"""Data shipped with the package and small loaders (the locate/eval modules build on these)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["shipped_data_path", "SHIPPED_DATA"]

SHIPPED_DATA = Path(__file__).resolve().parent


def shipped_data_path(name: str) -> Path:
    """Path of a data file shipped in ``ssah_plugin/data`` (see its README for sources and licences)."""
    path = SHIPPED_DATA / name
    if not path.is_file():
        raise FileNotFoundError(f"shipped data file {name!r} not found in {SHIPPED_DATA}")
    return path
