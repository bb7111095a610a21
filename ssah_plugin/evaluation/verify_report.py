"""The result of :func:`ssah_plugin.evaluation.verify.verify_checkpoint`: drift per unit set, as text and JSON.

Exit codes of ``ssah-plugin verify``: :data:`EXIT_OK` (no frozen unit drifted beyond the tolerance),
:data:`EXIT_DRIFT`, :data:`EXIT_ERROR` (usage or input error).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["DriftStats", "VerifyReport", "EXIT_OK", "EXIT_DRIFT", "EXIT_ERROR"]

EXIT_OK, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2


@dataclass
class DriftStats:
    """Drift of a set of units. ``changed``: any element differs; ``violating``: max drift above the tolerance."""

    frozen_units: int = 0
    changed_units: int = 0
    violating_units: int = 0
    max_drift: float = 0.0
    trainable_units: int = 0
    trainable_changed_units: int = 0
    trainable_max_drift: float = 0.0

    @property
    def fraction_changed(self) -> float:
        """Fraction of the frozen units whose weights changed at all (0.0 when nothing is frozen)."""
        return self.changed_units / self.frozen_units if self.frozen_units else 0.0

    def add(self, frozen: torch.Tensor, drift: torch.Tensor, tolerance: float) -> None:
        fd, td = drift[frozen], drift[~frozen]
        self.frozen_units += int(fd.numel())
        self.changed_units += int((fd > 0).sum())
        self.violating_units += int((fd > tolerance).sum())
        if fd.numel():
            self.max_drift = max(self.max_drift, float(fd.max()))
        self.trainable_units += int(td.numel())
        self.trainable_changed_units += int((td > 0).sum())
        if td.numel():
            self.trainable_max_drift = max(self.trainable_max_drift, float(td.max()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fraction_changed"] = self.fraction_changed
        return {k: (_json_float(v) if isinstance(v, float) else v) for k, v in d.items()}


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "nan")


@dataclass
class VerifyReport:
    """Result of :func:`verify_checkpoint`. ``ok`` is True iff no frozen unit drifted beyond ``tolerance``."""

    base: str
    tuned: str
    policy: str
    tolerance: float
    total: DriftStats
    per_class: dict[str, DriftStats] | None
    per_layer: dict[int, DriftStats]
    per_group: dict[str, DriftStats]
    tensors_checked: int
    dtype_casts: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.total.violating_units == 0

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_DRIFT

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "exit_code": self.exit_code,
            "base": self.base,
            "tuned": self.tuned,
            "policy": self.policy,
            "tolerance": self.tolerance,
            "tensors_checked": self.tensors_checked,
            "total": self.total.to_dict(),
            "per_class": None if self.per_class is None else {k: v.to_dict() for k, v in self.per_class.items()},
            "per_layer": {str(k): v.to_dict() for k, v in self.per_layer.items()},
            "per_group": {k: v.to_dict() for k, v in self.per_group.items()},
            "dtype_casts": self.dtype_casts,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format_text(self) -> str:
        """A human-readable report (what ``ssah-plugin verify`` prints without ``--json``)."""
        t = self.total
        lines = [
            f"base:   {self.base}",
            f"tuned:  {self.tuned}",
            f"policy: {self.policy}   tolerance: {self.tolerance:g}   tensors checked: {self.tensors_checked}",
        ]
        if self.dtype_casts:
            c = self.dtype_casts[0]
            lines.append(f"dtypes: {len(self.dtype_casts)} tensor(s) compared after casting the base "
                         f"{c['base_dtype']} -> {c['tuned_dtype']} (e.g. {c['tensor']})")
        head = f"{'':<14}{'frozen':>8}{'changed':>9}{'beyond tol':>11}{'max drift':>12}{'trainable':>11}{'moved':>8}"
        lines.append("")

        def row(label: str, s: DriftStats) -> str:
            return (f"{label:<14}{s.frozen_units:>8}{s.changed_units:>9}{s.violating_units:>11}"
                    f"{s.max_drift:>12.3g}{s.trainable_units:>11}{s.trainable_changed_units:>8}")

        if self.per_class:
            lines += ["per class", head] + [row(k, v) for k, v in self.per_class.items()] + [""]
        lines += ["per layer", head] + [row(f"layer {k}", v) for k, v in sorted(self.per_layer.items())]
        lines += [row("all", t), ""]
        if self.ok:
            lines.append(f"OK: {t.frozen_units} frozen units, none drifted beyond {self.tolerance:g} "
                         f"(max drift {t.max_drift:.3g}; {t.trainable_changed_units} of {t.trainable_units} "
                         "trainable units moved)")
        else:
            worst = max(self.per_group.items(), key=lambda kv: kv[1].max_drift)[0]
            lines.append(f"DRIFT: {t.violating_units} of {t.frozen_units} frozen units drifted beyond "
                         f"{self.tolerance:g} (max drift {t.max_drift:.3g}, worst in {worst})")
        return "\n".join(lines)
