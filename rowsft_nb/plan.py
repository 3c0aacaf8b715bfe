"""RowPlan: exactly which rows (and optionally input columns) of which modules train.

Usage::

    plan = rowsft_nb.select(report, budget=Ratio(0.05))
    plan.trainable_parameters()        # sum of r * d_in (+ d_out * c for columns)
    plan.save("plan.json"); plan = RowPlan.load("plan.json")
    plan.validate(model)               # every module exists, indices in range
    plan.memory_estimate(8, 512); plan.equivalent_lora_rank(); plan.overlap(other_plan)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import FileFormatError, read_json_object, write_json
from .targets import is_linear_like, linear_shape


def _as_index(name: str, what: str, idx: Any, size: int) -> torch.Tensor:
    t = torch.as_tensor(idx)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"RowPlan: {what} indices for {name!r} must be integers, got {t.dtype}")
    if t.is_floating_point():
        bad = t[t != torch.round(t)] if t.numel() else t
        if bad.numel():
            raise ValueError(f"RowPlan: {what} index {float(bad.flatten()[0])!r} for {name!r} "
                             "is not an integer; indices are whole row/column numbers")
    t = t.to(torch.int64).flatten()
    t = torch.unique(t, sorted=True)
    if t.numel() and (int(t[0]) < 0 or int(t[-1]) >= size):
        raise ValueError(f"RowPlan: {what} index out of range for {name!r}: "
                         f"got [{int(t[0])}, {int(t[-1])}], valid [0, {size - 1}]")
    return t


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_plan_dict(d: Any) -> None:
    """Types of a plan dict read from JSON; ``ValueError`` naming the first bad entry."""
    if not isinstance(d, dict):
        raise ValueError(f"a RowPlan must be a JSON object, got {type(d).__name__}")
    if d.get("format") != "rowsft_nb.RowPlan":
        raise ValueError(f"not a RowPlan (format={d.get('format')!r})")
    for key in ("rows", "shapes"):
        if key not in d:
            raise ValueError(f"the RowPlan has no {key!r} entry")
    for key in ("rows", "shapes", "columns", "meta"):
        if key in d and not isinstance(d[key], dict):
            raise ValueError(f"RowPlan {key!r} must be an object, got {type(d[key]).__name__}")
    for name, shape in d["shapes"].items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v > 0
                                                                     for v in shape)):
            raise ValueError(f"RowPlan shapes[{name!r}] must be [d_out, d_in] (two positive "
                             f"integers), got {shape!r}")
    for key in ("rows", "columns"):
        for name, idx in d.get(key, {}).items():
            if not isinstance(idx, list):
                raise ValueError(f"RowPlan {key}[{name!r}] must be a list of integers, "
                                 f"got {type(idx).__name__}")
            for i, v in enumerate(idx):
                if not _is_int(v):
                    raise ValueError(f"RowPlan {key}[{name!r}][{i}] is {v!r}, not an integer "
                                     "index")


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

    def equivalent_lora_rank(self) -> float:
        """LoRA rank ``k`` with ``k * sum(d_in + d_out)`` over the plan's modules equal to
        :meth:`trainable_parameters`. Usage: ``plan.equivalent_lora_rank()  # e.g. 32.0``"""
        denom = sum(sum(self.shapes[m]) for m in self.modules)
        return self.trainable_parameters() / denom if denom else 0.0

    def memory_estimate(self, batch_size: int, seq_len: int,
                        dtype: torch.dtype = torch.float32, optimizer: str = "adamw"):
        """Bytes by component for rowsft, LoRA at equal parameters and full fine-tuning
        (:class:`rowsft_nb.memory.MemoryEstimate`; the model is documented there).
        Usage: ``plan.memory_estimate(8, 512, torch.bfloat16).to_frame("GiB")``"""
        from .memory import estimate_memory

        return estimate_memory(self, batch_size, seq_len, dtype=dtype, optimizer=optimizer)

    def overlap(self, other: "RowPlan") -> dict[str, Any]:
        """Jaccard similarity of the selected (module, row) pairs (selected columns count as
        their own pairs): ``{"overall": float, "per_module": {name: float}}`` over the modules
        either plan selects. Usage: ``taylor_plan.overlap(magnitude_plan)["overall"]``"""
        per_module: dict[str, float] = {}
        inter_total = union_total = 0
        for name in dict.fromkeys(self.modules + other.modules):
            if name in self.shapes and name in other.shapes \
                    and self.shapes[name] != other.shapes[name]:
                raise ValueError(f"overlap: module {name!r} has shape {self.shapes[name]} in "
                                 f"one plan and {other.shapes[name]} in the other; the plans "
                                 "were made for different models")
            inter = union = 0
            for mine, theirs in ((self.rows.get(name), other.rows.get(name)),
                                 (self.columns.get(name), other.columns.get(name))):
                a = mine.numpy() if mine is not None else np.zeros(0, np.int64)
                c = theirs.numpy() if theirs is not None else np.zeros(0, np.int64)
                i = np.intersect1d(a, c, assume_unique=True).size
                inter += i
                union += a.size + c.size - i
            per_module[name] = inter / union if union else 1.0
            inter_total += inter
            union_total += union
        overall = inter_total / union_total if union_total else 1.0
        return {"overall": overall, "per_module": per_module}

    # ------------------------------------------------------------------ checks
    def validate(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the module when the plan does not fit ``model``."""
        modules = dict(model.named_modules())
        for name in dict.fromkeys([*self.rows, *self.columns]):  # plan order: deterministic
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
        """Inverse of :meth:`to_dict`; ``ValueError`` naming the first malformed entry."""
        _check_plan_dict(d)
        return cls(rows=d["rows"], shapes={k: tuple(v) for k, v in d["shapes"].items()},
                   columns=d.get("columns", {}), meta=d.get("meta", {}))

    def save(self, path: str | os.PathLike) -> None:
        """Readable JSON, written atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RowPlan":
        """Read a plan saved by :meth:`save`; ``FileFormatError`` naming the file and the
        problem when it is truncated, garbled or not a plan.
        Usage: ``plan = RowPlan.load("plan.json")``"""
        d = read_json_object(path)
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise FileFormatError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        return (f"RowPlan(modules={len(self.modules)}, rows={self.num_rows():,}, "
                f"columns={sum(v.numel() for v in self.columns.values()):,}, "
                f"trainable={self.trainable_parameters():,})")
