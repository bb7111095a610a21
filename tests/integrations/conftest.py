"""Fixture of the framework integration tests: a tiny model folder, chat data and two masks (see frameworks.py)."""
from __future__ import annotations

import importlib.util
import os

import pytest

from .frameworks import QUIET_ENV, TinyRun, build_tiny_run

if any(importlib.util.find_spec(m) is not None for m in ("axolotl", "llamafactory")):
    os.environ.update(QUIET_ENV)  # in a framework's environment, before the framework is imported in this process


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> TinyRun:
    return build_tiny_run(tmp_path_factory.mktemp("tiny_run"))
