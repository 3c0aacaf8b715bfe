"""ImportanceReport: per-module neuron scores plus where they came from.

Usage::

    report = rowsft_nb.score(model, loader, metric="taylor")
    report.save("taylor.safetensors"); report = ImportanceReport.load("taylor.safetensors")
    report.summary()              # DataFrame: module, layer, type, rows, mean/max/Gini
    report.normalized("rank")     # scores comparable across layers
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._io import FileFormatError, read_safetensors, write_safetensors
from ..targets import layer_index, module_type

NORMALIZERS = ("none", "mean", "max", "sum", "rank")


@dataclass(init=False)
class ImportanceReport:
    """Scores of every output neuron (row) of every target module.

    ``scores[name]`` is a float32 [d_out] tensor (higher = more important);
    ``column_scores[name]`` an optional [d_in] tensor for input columns;
    ``shapes[name] = (d_out, d_in)``; ``head_dims[name]`` the number of consecutive rows
    that form one attention head (q by head, k/v by KV head), when known (``groups`` is its
    old, deprecated name: ``ImportanceReport(groups=...)`` and ``report.groups`` still work);
    ``meta`` holds metric, n_samples, n_tokens, seconds, model_class, model_hash, seed.
    ``raw_scores`` / ``raw_column_scores``: each row's (column's) own score before grouping
    (``score(groups=...)`` gives every member of a group the group's score); selection
    breaks ties inside a group with them. Empty for ungrouped reports.
    """

    scores: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]
    metric: str
    column_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    head_dims: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    raw_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    raw_column_scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def __init__(self, scores: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                 metric: str, column_scores: dict[str, torch.Tensor] | None = None,
                 head_dims: dict[str, int] | None = None, meta: dict[str, Any] | None = None,
                 raw_scores: dict[str, torch.Tensor] | None = None,
                 raw_column_scores: dict[str, torch.Tensor] | None = None, *,
                 groups: dict[str, int] | None = None) -> None:
        # ``groups=`` is the old name of ``head_dims=`` (rows per attention head)
        if groups is not None and head_dims is not None:
            raise TypeError("ImportanceReport: pass head_dims=... only (groups= is its old name)")
        self.scores, self.shapes, self.metric = scores, shapes, metric
        self.column_scores = column_scores if column_scores is not None else {}
        dims = groups if groups is not None else head_dims
        self.head_dims = {k: int(v) for k, v in (dims or {}).items()}
        self.meta = meta if meta is not None else {}
        self.raw_scores = raw_scores if raw_scores is not None else {}
        self.raw_column_scores = raw_column_scores if raw_column_scores is not None else {}
        self.__post_init__()

    @property
    def groups(self) -> dict[str, int]:
        """Deprecated alias of :attr:`head_dims` (rows per attention head), read-only name;
        the dict is the same object, so ``report.groups[name] = hd`` still updates it."""
        warnings.warn("ImportanceReport.groups is renamed head_dims (rows per attention head; "
                      "score(groups=...) means dependency groups); use report.head_dims",
                      DeprecationWarning, stacklevel=2)
        return self.head_dims

    def __post_init__(self) -> None:
        self.raw_scores = {k: v.detach().float().cpu() for k, v in self.raw_scores.items()}
        self.raw_column_scores = {k: v.detach().float().cpu()
                                  for k, v in self.raw_column_scores.items()}
        for name, s in self.raw_scores.items():
            if name not in self.scores or s.shape != self.scores[name].shape:
                raise ValueError(f"ImportanceReport: raw scores for {name!r} do not match "
                                 "its scores (module and shape)")
        for name, s in self.raw_column_scores.items():
            if name not in self.column_scores or s.shape != self.column_scores[name].shape:
                raise ValueError(f"ImportanceReport: raw column scores for {name!r} do not "
                                 "match its column scores (module and shape)")
        self.scores = {k: v.detach().float().cpu() for k, v in self.scores.items()}
        self.column_scores = {k: v.detach().float().cpu() for k, v in self.column_scores.items()}
        self.shapes = {k: (int(v[0]), int(v[1])) for k, v in self.shapes.items()}
        for name, s in self.scores.items():
            if name not in self.shapes:
                raise ValueError(f"ImportanceReport: no shape for module {name!r}")
            if s.ndim != 1 or s.numel() != self.shapes[name][0]:
                raise ValueError(f"ImportanceReport: scores for {name!r} have shape "
                                 f"{tuple(s.shape)}, expected ({self.shapes[name][0]},)")
        for name, s in self.column_scores.items():
            if s.ndim != 1 or s.numel() != self.shapes[name][1]:
                raise ValueError(f"ImportanceReport: column scores for {name!r} have shape "
                                 f"{tuple(s.shape)}, expected ({self.shapes[name][1]},)")

    # ------------------------------------------------------------------ views
    @property
    def modules(self) -> list[str]:
        return list(self.scores)

    def total_rows(self) -> int:
        return sum(s.numel() for s in self.scores.values())

    def normalized(self, kind: str = "mean") -> "ImportanceReport":
        """A copy with each module's scores divided by their mean/max/sum, or replaced by
        ranks scaled to (0, 1] (``rank``); ``none`` returns a copy unchanged."""
        if kind not in NORMALIZERS:
            raise ValueError(f"Unknown normalizer {kind!r}; choose one of {NORMALIZERS}")

        def norm(s: torch.Tensor) -> torch.Tensor:
            return normalize_scores(s, kind)

        return ImportanceReport(
            scores={k: norm(v) for k, v in self.scores.items()}, shapes=dict(self.shapes),
            metric=self.metric, column_scores={k: norm(v) for k, v in self.column_scores.items()},
            head_dims=dict(self.head_dims), meta={**self.meta, "normalized": kind},
            raw_scores={k: norm(v) for k, v in self.raw_scores.items()},
            raw_column_scores={k: norm(v) for k, v in self.raw_column_scores.items()})

    def summary(self):
        """One row per module: module, layer, type, rows, cols, mean, max, gini."""
        import pandas as pd

        rows = []
        for name, s in self.scores.items():
            rows.append({"module": name, "layer": layer_index(name), "type": module_type(name),
                         "rows": self.shapes[name][0], "cols": self.shapes[name][1],
                         "mean": float(s.mean()), "max": float(s.max()), "gini": gini(s)})
        return pd.DataFrame(rows)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (scores) with the metadata as JSON inside, atomically."""
        tensors = {f"rows/{k}": v for k, v in self.scores.items()}
        tensors.update({f"cols/{k}": v for k, v in self.column_scores.items()})
        tensors.update({f"rawrows/{k}": v for k, v in self.raw_scores.items()})
        tensors.update({f"rawcols/{k}": v for k, v in self.raw_column_scores.items()})
        write_safetensors(path, tensors, {
            "format": "rowsft_nb.ImportanceReport", "version": 1, "metric": self.metric,
            "shapes": {k: list(v) for k, v in self.shapes.items()}, "order": list(self.scores),
            "head_dims": self.head_dims, "meta": self.meta})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImportanceReport":
        """Read a report saved by :meth:`save`; ``FileFormatError`` naming the file and the
        problem when it is truncated, garbled, fails its checksums or is not a report.
        Usage: ``report = ImportanceReport.load("taylor.safetensors")``"""
        tensors, meta = read_safetensors(path)
        if meta.get("format") != "rowsft_nb.ImportanceReport":
            raise FileFormatError(f"{path} is not an ImportanceReport file (format="
                                  f"{meta.get('format')!r}); save one with report.save(path)")
        try:
            order, shapes = meta["order"], meta["shapes"]
            # "groups": the name of head_dims in reports saved before it was renamed
            metric, extra = meta["metric"], meta.get("meta", {})
            groups = meta.get("head_dims", meta.get("groups", {}))
        except KeyError as e:
            raise FileFormatError(f"{path}: the report metadata lacks {e.args[0]!r}; the file "
                                  "is incomplete; re-save it") from None
        if not (isinstance(order, list) and all(isinstance(k, str) for k in order)
                and isinstance(shapes, dict) and isinstance(metric, str)
                and isinstance(groups, dict) and isinstance(extra, dict)):
            raise FileFormatError(f"{path}: the report metadata has wrong types (order: list "
                                  "of names, shapes/head_dims/meta: objects, metric: string)")
        for k in order:
            if f"rows/{k}" not in tensors:
                raise FileFormatError(f"{path} lacks the scores of module {k!r}; the file is "
                                      "incomplete; re-save it")
        try:
            return cls(scores={k: tensors[f"rows/{k}"] for k in order},
                       shapes={k: tuple(v) for k, v in shapes.items()}, metric=metric,
                       column_scores={k[5:]: v for k, v in tensors.items()
                                      if k.startswith("cols/")},
                       head_dims={k: int(v) for k, v in groups.items()}, meta=extra,
                       raw_scores={k[8:]: v for k, v in tensors.items()
                                   if k.startswith("rawrows/")},
                       raw_column_scores={k[8:]: v for k, v in tensors.items()
                                          if k.startswith("rawcols/")})
        except KeyError as e:
            raise FileFormatError(f"{path}: module {e.args[0]!r} has column scores but no "
                                  "shape; the file is garbled; re-save it") from None
        except (ValueError, TypeError, IndexError) as e:
            raise FileFormatError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        return (f"ImportanceReport(metric={self.metric!r}, modules={len(self.scores)}, "
                f"rows={self.total_rows():,})")


def normalize_scores(s: torch.Tensor | np.ndarray, kind: str) -> torch.Tensor | np.ndarray:
    """Normalize one module's scores: none, mean, max, sum, or rank (ranks / n, in (0, 1];
    ties ranked by position). The one normalisation of the library: reports, selection
    and the explorers use it. A tensor gives a float32 tensor; a numpy array keeps its float
    dtype (selection normalises float64).

    >>> normalize_scores(torch.tensor([1.0, 3.0]), "mean")    # tensor([0.5, 1.5])
    """
    if kind not in NORMALIZERS:
        raise ValueError(f"Unknown normalizer {kind!r}; choose one of {NORMALIZERS}")
    if isinstance(s, np.ndarray):
        a = s.astype(np.float64 if s.dtype == np.float64 else np.float32)
        if kind == "none":
            return a.copy()
        if kind == "rank":
            ranks = np.empty(a.size, dtype=a.dtype)
            ranks[np.argsort(a, kind="stable")] = np.arange(1, a.size + 1, dtype=a.dtype) / a.size
            return ranks
        denom = {"mean": a.mean, "max": a.max, "sum": a.sum}[kind]() if a.size else 0.0
        return a / denom if denom != 0 else np.zeros_like(a)
    s = s.float()
    if kind == "none":
        return s.clone()
    if kind == "rank":  # numpy's sort is ~50x faster than torch's on CPU for 1e4-1e5 rows
        order = np.argsort(s.numpy(), kind="stable")
        ranks = np.empty(s.numel(), dtype=np.float32)
        ranks[order] = np.arange(1, s.numel() + 1, dtype=np.float32) / s.numel()
        return torch.from_numpy(ranks)
    denom = {"mean": s.mean(), "max": s.max(), "sum": s.sum()}[kind]
    return s / denom if float(denom) != 0.0 else torch.zeros_like(s)


def gini(s: torch.Tensor) -> float:
    """Gini coefficient of non-negative scores (0 = uniform, -> 1 = concentrated)."""
    x = torch.sort(s.double().clamp_min(0)).values
    n = x.numel()
    total = float(x.sum())
    if n == 0 or total == 0.0:
        return 0.0
    idx = torch.arange(1, n + 1, dtype=torch.float64)
    return float((2 * (idx * x).sum() / (n * total)) - (n + 1) / n)
