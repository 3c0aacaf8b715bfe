"""RowPlan: exactly which rows (and optionally input columns) of which modules train.

Usage::

    plan = rowsft_nb.select(report, budget=Ratio(0.05))
    plan.trainable_parameters()        # sum of r * d_in (+ d_out * c for columns)
    plan.save("plan.json"); plan = RowPlan.load("plan.json")
    plan.validate(model)               # every module exists, indices in range
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._io import read_json, write_json
from .targets import is_linear_like, linear_shape


def _as_index(name: str, what: str, idx: Any, size: int) -> torch.Tensor:
    t = torch.as_tensor(idx, dtype=torch.int64).flatten()
    t = torch.unique(t, sorted=True)
    if t.numel() and (int(t[0]) < 0 or int(t[-1]) >= size):
        raise ValueError(f"RowPlan: {what} index out of range for {name!r}: "
                         f"got [{int(t[0])}, {int(t[-1])}], valid [0, {size - 1}]")
    return t


@dataclass
class RowPlan:
    """Module name -> sorted unique int64 row indices (and optional column indices).

    ``shapes[name] = (d_out, d_in)`` of the module the indices refer to; ``meta`` records
    the budget, metric, strategy, model class and weights hash that produced the plan.
    """

    rows: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shapes = {k: (int(v[0]), int(v[1])) for k, v in self.shapes.items()}
        for name in list(self.rows) + list(self.columns):
            if name not in self.shapes:
                raise ValueError(f"RowPlan: no shape for module {name!r}")
        self.rows = {k: _as_index(k, "row", v, self.shapes[k][0]) for k, v in self.rows.items()}
        self.columns = {k: _as_index(k, "column", v, self.shapes[k][1])
                        for k, v in self.columns.items()}

    # ------------------------------------------------------------------ counts
    @property
    def modules(self) -> list[str]:
        """Modules with at least one selected row or column."""
        names = [k for k, v in self.rows.items() if v.numel()]
        names += [k for k, v in self.columns.items() if v.numel() and k not in names]
        return names

    def is_empty(self) -> bool:
        return not self.modules

    def num_rows(self) -> int:
        return sum(v.numel() for v in self.rows.values())

    def trainable_parameters(self, bias: bool = False) -> int:
        """Parameters the adapter trains: r * d_in per module (+ r with a bias delta),
        plus d_out * c for selected input columns."""
        total = 0
        for k, v in self.rows.items():
            total += v.numel() * (self.shapes[k][1] + (1 if bias else 0))
        for k, v in self.columns.items():
            total += v.numel() * self.shapes[k][0]
        return total

    # ------------------------------------------------------------------ checks
    def validate(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the module when the plan does not fit ``model``."""
        modules = dict(model.named_modules())
        for name in self.rows.keys() | self.columns.keys():
            m = modules.get(name)
            m = getattr(m, "base_layer", m)
            if m is None:
                raise ValueError(f"RowPlan module {name!r} does not exist in "
                                 f"{type(model).__name__}; was the plan made for another model?")
            if not is_linear_like(m):
                raise ValueError(f"RowPlan module {name!r} is a {type(m).__name__}, "
                                 "not nn.Linear or Conv1D")
            if linear_shape(m) != self.shapes[name]:
                raise ValueError(f"RowPlan module {name!r}: plan shape (d_out, d_in)="
                                 f"{self.shapes[name]} but the model has {linear_shape(m)}")

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {"format": "rowsft_nb.RowPlan", "version": 1, "meta": self.meta,
                "shapes": {k: list(v) for k, v in self.shapes.items()},
                "rows": {k: v.tolist() for k, v in self.rows.items()},
                "columns": {k: v.tolist() for k, v in self.columns.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RowPlan":
        if d.get("format") != "rowsft_nb.RowPlan":
            raise ValueError(f"not a RowPlan (format={d.get('format')!r})")
        return cls(rows=d["rows"], shapes={k: tuple(v) for k, v in d["shapes"].items()},
                   columns=d.get("columns", {}), meta=d.get("meta", {}))

    def save(self, path: str | os.PathLike) -> None:
        """Readable JSON, written atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RowPlan":
        return cls.from_dict(read_json(path))

    def __repr__(self) -> str:
        return (f"RowPlan(modules={len(self.modules)}, rows={self.num_rows():,}, "
                f"columns={sum(v.numel() for v in self.columns.values()):,}, "
                f"trainable={self.trainable_parameters():,})")
