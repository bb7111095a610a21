"""Unit classes: the four kinds ``locate`` sorts units into, and their codes in a mask file.

``RU`` redundant, ``SCU`` safety-critical, ``UCU`` utility-critical, ``CU`` complex units (the paper's names). A mask
stores one ``uint8`` code per unit (``g{g}.class``, :mod:`ssah_plugin.core.mask_format`); 255 means "not
classified" (masks built from explicit unit lists).
"""
from __future__ import annotations

__all__ = ["CLASS_NAMES", "CLASS_CODES", "UNKNOWN_CLASS"]

#: class code -> name; 255 means "not classified" (explicit masks).
CLASS_NAMES: dict[int, str] = {0: "RU", 1: "SCU", 2: "UCU", 3: "CU", 255: "unknown"}
#: class name -> code
CLASS_CODES: dict[str, int] = {v: k for k, v in CLASS_NAMES.items()}
UNKNOWN_CLASS = 255
