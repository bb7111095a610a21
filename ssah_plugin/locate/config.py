"""The parameters of a locate run: :class:`LocateConfig`.

Every field is either part of the **method** (it can change the scores or the classes: data, sampling, counted
tokens, sizes, the extra selections, the load dtype) or a **runtime** setting (where and how the same computation
runs: device, batch size, layer-by-layer execution, progress bars). The mask records the method only
(``mask.method["config"] == config.method_dict()``); runtime settings change results at most by floating-point
rounding (batched vs unbatched sums, CPU vs GPU kernels) and are not recorded.

Each field carries its help text and CLI hints in its ``metadata`` (``help``, ``group``, ``kind``, ``choices``,
``runtime``): ``ssah-plugin locate`` builds its options from them, so defaults and help live here only.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ssah_plugin.core.selections import selection_config_problems

__all__ = ["LocateConfig", "CLASS_ORDER", "DEFAULT_SHIPPED_SAFETY", "DEFAULT_SHIPPED_UTILITY", "METHOD_FIELDS",
           "RUNTIME_FIELDS", "CHOICES"]

DEFAULT_SHIPPED_SAFETY = "shipped:safety_refusals.jsonl"
DEFAULT_SHIPPED_UTILITY = "shipped:benign_instructions.jsonl"
CLASS_ORDER = ("SCU", "RU", "UCU")

CALIBRATION = "calibration"
SCORES = "scores and classes"
AUTO = "automatic sizes (ablation sweep on held-apart data)"
SELECTIONS = "extra unit selections (policies decision:F, conflict:F, scu+decision:F, ...)"
RESOURCES = "resources (runtime: not recorded in the mask)"


def _opt(default: Any, help: str, group: str, *, runtime: bool = False, kind: str | None = None,
         choices: tuple | None = None) -> Any:
    """A dataclass field with its documentation. ``kind`` tells the CLI how to parse it: ``fraction`` (0.013 or
    1.3%), ``fractions`` (comma list), ``names`` (comma list of class names), ``samples`` (int, 0 = None)."""
    meta = {"help": help, "group": group, "runtime": runtime, "kind": kind, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class LocateConfig:
    """Every parameter of a locate run; see the module docstring for the method / runtime split.

    ``method_dict()`` is what the mask records, ``runtime_dict()`` the rest; ``from_dict`` rebuilds a config from
    either (also from the ``method["config"]`` of masks written before the split, which held every field).
    """

    # ---- calibration data (method)
    max_samples: int | None = _opt(128, "rows drawn (seeded) from each data set; None (CLI: 0) = all", CALIBRATION,
                                   kind="samples")
    max_length: int | None = _opt(
        None, "longest conversation in tokens; a longer one keeps the end of its prompt and the start of its response "
        "(None: the model's maximum positions)", CALIBRATION)
    tokens: Literal["response", "all"] = _opt(
        "response", "positions counted: 'response' (positions predicting a response token) or 'all' non-padding ones",
        CALIBRATION)
    seed: int = _opt(0, "seed of the row sampling", CALIBRATION)
    own_refusals: bool = _opt(False, "generate the model's replies to the safety prompts and keep the refusals as "
                              "safety data", CALIBRATION)
    refusal_max_new_tokens: int = _opt(64, "reply length for own_refusals", CALIBRATION)
    safety_prompt_field: str | None = _opt(None, "column holding the safety prompt (default: auto-detect)", CALIBRATION)
    safety_response_field: str | None = _opt(None, "column holding the safety response (default: auto-detect)",
                                             CALIBRATION)
    utility_prompt_field: str | None = _opt(None, "column holding the utility prompt (default: auto-detect)",
                                            CALIBRATION)
    utility_response_field: str | None = _opt(None, "column holding the utility response (default: auto-detect)",
                                              CALIBRATION)
    utility_input_field: str | None = _opt(None, "column holding the utility input (default: auto-detect)",
                                           CALIBRATION)
    # ---- scores and classes (method)
    granularity: Literal["channel", "head"] = _opt("channel", "attention unit size", SCORES)
    standardize: Literal["group", "global", "none"] = _opt(
        "group", "z-score scores within each unit group, over all units, or not at all", SCORES)
    scu: float = _opt(0.013, "fraction of all units labelled SCU (paper, Llama-2-7B-Chat)", SCORES, kind="fraction")
    ucu: float = _opt(0.133, "fraction of all units labelled UCU", SCORES, kind="fraction")
    ru: float = _opt(0.148, "fraction of all units labelled RU", SCORES, kind="fraction")
    class_order: tuple[str, ...] = _opt(
        CLASS_ORDER, "order in which classes pick their units; a unit keeps the first class that picks it", SCORES,
        kind="names")
    dtype: str | None = _opt(
        None, "load dtype of locate_pretrained (None: float32 on CPU, the checkpoint's dtype on GPU)", SCORES,
        choices=("float32", "bfloat16", "float16"))
    # ---- automatic sizes (method)
    auto: bool = _opt(False, "choose SCU and RU sizes by an ablation sweep", AUTO)
    auto_holdout: int = _opt(32, "rows of each data set held apart for the sweep", AUTO)
    auto_scu_grid: tuple[float, ...] = _opt((0.0025, 0.005, 0.01, 0.013, 0.02, 0.03, 0.05), "SCU sizes to try", AUTO,
                                            kind="fractions")
    auto_ru_grid: tuple[float, ...] = _opt((0.05, 0.1, 0.148, 0.2, 0.25, 0.3), "RU sizes to try", AUTO,
                                           kind="fractions")
    auto_refusal_drop: float = _opt(
        0.5, "SCU: smallest size whose removal lowers the held-apart refusal rate by at least this (absolute)", AUTO)
    auto_utility_tolerance: float = _opt(0.05, "relative rise of the held-apart benign loss allowed (SCU and RU)",
                                         AUTO)
    auto_ru_refusal_tolerance: float = _opt(
        0.05, "RU: largest size whose removal lowers the refusal rate by at most this (absolute)", AUTO)
    auto_max_new_tokens: int = _opt(48, "reply length in the sweep", AUTO)
    # ---- extra unit selections (method; ssah_plugin.core.selections, docs/locate.md)
    decision_units: bool = _opt(False, "score decision units: harmful vs benign separation at the last prompt token",
                                SELECTIONS)
    decision_fraction: float = _opt(0.05, "fraction of all units in the stored 'decision' set", SELECTIONS,
                                    kind="fraction")
    decision_weight: Literal["norm", "none"] = _opt(
        "norm", "decision score: Cohen's d times ||W[:, j]|| ('norm') or d alone ('none')", SELECTIONS)
    conflict_fraction: float = _opt(0.05, "fraction of all units in the stored 'conflict' set (with task data)",
                                    SELECTIONS, kind="fraction")
    task_max_samples: int | None = _opt(128, "task rows drawn (seeded); None (CLI: 0) = all", SELECTIONS,
                                        kind="samples")
    task_prompt_field: str | None = _opt(None, "column holding the task prompt (default: auto-detect)", SELECTIONS)
    task_response_field: str | None = _opt(None, "column holding the task response (default: auto-detect)",
                                           SELECTIONS)
    task_input_field: str | None = _opt(None, "column holding the task input (default: auto-detect)", SELECTIONS)
    # ---- runtime (not recorded)
    batch_size: int = _opt(8, "sequences per forward pass (and per generation batch)", RESOURCES, runtime=True)
    device: str = _opt("auto", "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...", RESOURCES, runtime=True)
    layerwise: Literal["auto", "on", "off"] = _opt(
        "auto", "locate_pretrained: one decoder layer in memory at a time (same scores; 'auto': when the model "
        "would not fit)", RESOURCES, runtime=True)
    progress: bool = _opt(True, "show progress bars", RESOURCES, runtime=True)

    def __post_init__(self) -> None:
        problems = []
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"max_samples must be >= 1 or None, got {self.max_samples}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"max_length must be >= 2, got {self.max_length}")
        for name in ("tokens", "granularity", "standardize", "layerwise"):
            allowed = CHOICES[name]
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        for name in ("scu", "ucu", "ru"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name} must be a fraction in [0, 1], got {v}")
        if self.scu + self.ucu + self.ru > 1.0 + 1e-9:
            problems.append(f"scu + ucu + ru = {self.scu + self.ucu + self.ru:.3f} exceeds 1")
        self.class_order = tuple(self.class_order)
        if sorted(self.class_order) != sorted(CLASS_ORDER):
            problems.append(f"class_order must be a permutation of {CLASS_ORDER}, got {self.class_order}")
        if self.dtype is not None and self.dtype not in CHOICES["dtype"]:
            problems.append(f"dtype must be None or one of {CHOICES['dtype']}, got {self.dtype!r}")
        if self.auto_holdout < 1:
            problems.append(f"auto_holdout must be >= 1, got {self.auto_holdout}")
        self.auto_scu_grid, self.auto_ru_grid = tuple(self.auto_scu_grid), tuple(self.auto_ru_grid)
        problems += selection_config_problems(self)
        if problems:
            raise ValueError("invalid LocateConfig: " + "; ".join(problems))

    def method_dict(self) -> dict[str, Any]:
        """The method fields (JSON-able; tuples as lists): what ``mask.method["config"]`` records."""
        return {k: _plain(getattr(self, k)) for k in METHOD_FIELDS}

    def runtime_dict(self) -> dict[str, Any]:
        """The runtime fields (device, batch size, layer-by-layer mode, progress bars)."""
        return {k: _plain(getattr(self, k)) for k in RUNTIME_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """Every field (method and runtime)."""
        return {k: _plain(getattr(self, k)) for k in _FIELDS}

    @classmethod
    def from_dict(cls, values: dict[str, Any], **overrides: Any) -> "LocateConfig":
        """A config from ``method_dict()`` / ``to_dict()`` output or a mask's ``method["config"]`` (masks written
        before the method / runtime split also recorded the runtime fields: they are accepted). Keys this version
        does not know are ignored; ``overrides`` (e.g. ``device="cuda"``) win."""
        kw = {k: v for k, v in values.items() if k in _FIELDS}
        kw.update(overrides)
        return cls(**kw)


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


_FIELDS = {f.name: f for f in dataclasses.fields(LocateConfig)}
METHOD_FIELDS: tuple[str, ...] = tuple(n for n, f in _FIELDS.items() if not f.metadata["runtime"])
RUNTIME_FIELDS: tuple[str, ...] = tuple(n for n, f in _FIELDS.items() if f.metadata["runtime"])
_HINTS = typing.get_type_hints(LocateConfig)
#: allowed values of the Literal fields, and of ``dtype``
CHOICES: dict[str, tuple] = {n: typing.get_args(t) for n, t in _HINTS.items() if typing.get_origin(t) is Literal}
CHOICES["dtype"] = _FIELDS["dtype"].metadata["choices"]
