"""Row budgets and ``select(report, budget) -> RowPlan``: from importance to the rows that train.

Budgets (each a dataclass with ``to_dict()``; :func:`budget_from_dict` inverts it):

- :class:`FixedRows` ``(r)``: the ``r`` most important rows of every module;
- :class:`Ratio` ``(ratio)``: ``round(ratio * d_out)`` rows of every module;
- :class:`TypeRatios` ``({"q_proj": 0.1, "mlp.down_proj": 0.05}, default=0.0)``: a ratio per
  module type (key = ``short_type`` or a ``module_type`` suffix; the longest matching key wins;
  modules whose ratio is 0 are left out);
- :class:`ParamBudget` ``(params, allocator, normalizer)``: a trainable-parameter budget
  (an int count, or a float in [0, 1] = fraction of the targets' parameters) spread over the
  modules. ``allocator="topk"``: global top-k over per-module normalized scores, a row costing
  its ``d_in``. ``allocator="coverage"``: the smallest ``r`` per module that covers X of its
  score mass, with X as large as the budget allows (same answer as bisection on X, computed
  exactly as one sort by "score mass before this row").
- :class:`RowBudget` ``(rows, normalizer="mean")``: the authors' global mode
  (``--global_finetuning``): every module's scores divided by their mean, one threshold over
  all of them, a budget counted in rows (an int, or a float fraction of the rows).

Options of :func:`select` from the paper: ``per_head=True`` gives every attention head the
same number of rows (the authors' default for q/k/v), beside ``head_aligned=True`` (whole
heads); ``couple="neurons"`` is the whole-neuron mode (their ``--dependency``): an MLP
neuron trains its ``gate_proj``/``up_proj`` rows *and* its ``down_proj`` input column, a
value row its ``v_proj`` row and the matching ``o_proj`` columns (every head of its KV group
under grouped-query attention); budgets count both.

Usage::

    plan = select(report, ParamBudget(0.01, allocator="topk", normalizer="rank"),
                  exclude=["down_proj"], multiple_of=8)
    plan = select(report, FixedRows(64), head_aligned=True)
    plan = select(report, RowBudget(0.05), per_head=True)            # authors' global mode
    plan = select(report, FixedRows(64), couple="neurons")           # whole neurons

Interactive use (sliders): :func:`select` keeps the sorted, normalized scores of the last few
reports, so a new budget on the same report costs a few milliseconds; :class:`Selector` holds
that cache explicitly.
"""
from __future__ import annotations

import math
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch

from .plan import RowPlan
from .scoring.groups import _MLP_PAIRS, ATTENTION_INPUTS
from .scoring.report import NORMALIZERS, ImportanceReport, normalize_scores
from .targets import module_type, name_matches, short_type

__all__ = ["FixedRows", "Ratio", "TypeRatios", "ParamBudget", "RowBudget", "Budget",
           "budget_from_dict", "select", "Selector", "SelectionWarning", "COUPLINGS"]

ALLOCATORS = ("topk", "coverage")
_GLOBAL_CACHE_SIZE = 3  # global orders kept per Selector (~60 MB each at 7B shapes)
# the normalizers of scoring.report.normalize_scores (the one implementation), but "none"
SELECT_NORMALIZERS = tuple(k for k in NORMALIZERS if k != "none")
COUPLINGS = (None, "neurons")  # select(couple=...): None = rows alone, "neurons" = whole neurons


class SelectionWarning(UserWarning):
    """A budget was clipped, or forced above its limit by ``min_rows``."""


# ---------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class FixedRows:
    """``r`` rows in every module. Usage: ``select(report, FixedRows(64))``."""

    r: int

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r < 0:
            raise ValueError(f"FixedRows(r={self.r!r}): r must be an int >= 0 (rows per module)")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "fixed_rows", "r": int(self.r)}


@dataclass(frozen=True)
class Ratio:
    """``round(ratio * d_out)`` rows in every module. Usage: ``select(report, Ratio(0.05))``."""

    ratio: float

    def __post_init__(self) -> None:
        if not _is_real(self.ratio) or not self.ratio >= 0:
            raise ValueError(f"Ratio(ratio={self.ratio!r}): ratio must be a number >= 0 "
                             "(fraction of each module's rows)")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "ratio", "ratio": float(self.ratio)}


@dataclass(frozen=True)
class TypeRatios:
    """A row ratio per module type; unmatched modules get ``default`` (0 = left out).

    Keys match ``short_type(name)`` (``"q_proj"``, ``"dense"``) or a suffix of
    ``module_type(name)`` (``"attention.output.dense"``); the longest matching key wins.
    Usage: ``select(report, TypeRatios({"q_proj": 0.1, "v_proj": 0.1}))``
    """

    ratios: dict[str, float]
    default: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.ratios, dict) or not self.ratios:
            raise ValueError("TypeRatios(ratios=...) needs a non-empty dict like {'q_proj': 0.1}")
        for k, v in list(self.ratios.items()) + [("default", self.default)]:
            if not _is_real(v) or not v >= 0:
                raise ValueError(f"TypeRatios: ratio for {k!r} is {v!r}; use a number >= 0")

    def ratio_for(self, name: str) -> float:
        """The ratio that applies to module ``name``."""
        key = _type_key(name, self.ratios)
        return float(self.ratios[key]) if key is not None else float(self.default)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "type_ratios", "ratios": {k: float(v) for k, v in self.ratios.items()},
                "default": float(self.default)}


@dataclass(frozen=True)
class ParamBudget:
    """A global trainable-parameter budget: ``params`` (int count, or float fraction in
    [0, 1] of the targets' parameters) spread by ``allocator`` ("topk" | "coverage");
    ``normalizer`` ("rank" | "mean" | "max" | "sum") makes scores comparable across modules
    for "topk". Usage: ``select(report, ParamBudget(0.01, "topk", "rank"))``
    """

    params: Union[int, float]
    allocator: str = "topk"
    normalizer: str = "rank"

    def __post_init__(self) -> None:
        p = self.params
        if isinstance(p, bool) or not _is_real(p) or not p >= 0:
            raise ValueError(f"ParamBudget(params={p!r}): params must be an int count >= 0 "
                             "or a float fraction in [0, 1]")
        if isinstance(p, (float, np.floating)) and p > 1:
            raise ValueError(f"ParamBudget(params={p!r}): a float means a fraction of the "
                             f"targets' parameters and must be <= 1; pass an int count "
                             f"(e.g. {int(p):_}) for an absolute budget")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"ParamBudget: unknown allocator {self.allocator!r}; "
                             f"choose one of {ALLOCATORS}")
        if self.normalizer not in SELECT_NORMALIZERS:
            raise ValueError(f"ParamBudget: unknown normalizer {self.normalizer!r}; "
                             f"choose one of {SELECT_NORMALIZERS}")

    def resolve(self, target_parameters: int) -> int:
        """The budget as a parameter count for targets holding ``target_parameters``."""
        if isinstance(self.params, (float, np.floating)):
            return int(math.floor(float(self.params) * target_parameters + 1e-9))
        return int(self.params)

    def to_dict(self) -> dict[str, Any]:
        p = self.params
        return {"kind": "param_budget",
                "params": float(p) if isinstance(p, (float, np.floating)) else int(p),
                "allocator": self.allocator, "normalizer": self.normalizer}


@dataclass(frozen=True)
class RowBudget:
    """A global budget counted in rows, as the authors' global mode (``--global_finetuning``):
    each module's scores divided by their ``normalizer`` ("mean", theirs; or "rank" | "max" |
    "sum"), one threshold over all modules, the ``rows`` highest rows train. ``rows``: an int
    count, or a float in [0, 1] = fraction of the selectable rows (theirs:
    ``int(total_channels * finetuning_ratio)``). With ``couple="neurons"`` a neuron counts as
    every row and column it trains. Usage: ``select(report, RowBudget(0.05))``
    """

    rows: Union[int, float]
    normalizer: str = "mean"

    def __post_init__(self) -> None:
        n = self.rows
        if isinstance(n, bool) or not _is_real(n) or not n >= 0:
            raise ValueError(f"RowBudget(rows={n!r}): rows must be an int count >= 0 or a "
                             "float fraction in [0, 1]")
        if isinstance(n, (float, np.floating)) and n > 1:
            raise ValueError(f"RowBudget(rows={n!r}): a float means a fraction of the rows "
                             f"and must be <= 1; pass an int count (e.g. {int(n):_})")
        if self.normalizer not in SELECT_NORMALIZERS:
            raise ValueError(f"RowBudget: unknown normalizer {self.normalizer!r}; "
                             f"choose one of {SELECT_NORMALIZERS}")

    @property
    def allocator(self) -> str:
        return "topk"

    def resolve(self, total_rows: int) -> int:
        """The budget as a row count when ``total_rows`` rows can be selected."""
        if isinstance(self.rows, (float, np.floating)):
            return int(math.floor(float(self.rows) * total_rows + 1e-9))
        return int(self.rows)

    def to_dict(self) -> dict[str, Any]:
        n = self.rows
        return {"kind": "row_budget",
                "rows": float(n) if isinstance(n, (float, np.floating)) else int(n),
                "normalizer": self.normalizer}


Budget = Union[FixedRows, Ratio, TypeRatios, ParamBudget, RowBudget]
_KINDS = {"fixed_rows": FixedRows, "ratio": Ratio, "type_ratios": TypeRatios,
          "param_budget": ParamBudget, "row_budget": RowBudget}


def budget_from_dict(d: dict[str, Any]) -> Budget:
    """Inverse of ``budget.to_dict()``. Usage: ``budget_from_dict(plan.meta["budget"])``."""
    if not isinstance(d, dict) or d.get("kind") not in _KINDS:
        raise ValueError(f"not a budget dict: {d!r}; expected 'kind' in {sorted(_KINDS)}")
    args = {k: v for k, v in d.items() if k != "kind"}
    return _KINDS[d["kind"]](**args)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) \
        and math.isfinite(float(x))


def _type_key(name: str, keys: Sequence[str]) -> str | None:
    mtype, short = module_type(name), short_type(name)
    hits = [k for k in keys if k == short or mtype == k or mtype.endswith("." + k)]
    return max(hits, key=len) if hits else None


# ---------------------------------------------------------------------------- cached orders
@dataclass
class _ModuleOrder:
    """One module's rows (or columns) in descending importance, as atoms (rows or heads)."""

    name: str
    size: int            # d_out (rows) or d_in (columns)
    cost: int            # parameters per selected row (d_in) or column (d_out)
    atom: int            # rows per atom: 1, or the head size when head-aligned
    atom_scores: np.ndarray  # raw atom scores, sorted descending (float64)
    row_order: np.ndarray    # all row indices, most important atom first (int64)
    vectors: int = 1         # rows + columns trained per unit (> 1 for coupled neurons)


def _unit_order(name: str, s: np.ndarray, raw: np.ndarray, cost: int, *,
                head_dim: int | None = None, per_head: bool = False,
                vectors: int = 1) -> _ModuleOrder:
    """Order of one module's units (rows, or coupled neurons) by score, ties by ``raw``:
    whole heads of ``head_dim`` rows; with ``per_head`` an atom is the k-th best row of every
    head (so any number of atoms is the same number of rows in each head); else single rows."""
    size = s.size
    if not np.isfinite(s).all():
        raise ValueError(f"scores of module {name!r} contain {int((~np.isfinite(s)).sum())} "
                         "NaN/inf values; re-score (check the calibration loss is finite) or "
                         "exclude the module")
    if head_dim and (head_dim < 1 or size % head_dim):
        raise ValueError(f"module {name!r}: head size {head_dim} does not divide its {size} "
                         "rows; fix report.head_dims")
    if per_head and head_dim:
        n_heads = size // head_dim
        S, R = s.reshape(n_heads, head_dim), raw.reshape(n_heads, head_dim)
        within = np.lexsort((-R, -S), axis=-1)            # [heads, head_dim], best first
        ranked = np.take_along_axis(S, within, 1)
        rows = (within + (np.arange(n_heads) * head_dim)[:, None]).T.ravel()  # k-th of each
        return _ModuleOrder(name, size, cost, n_heads, ranked.sum(0), rows.astype(np.int64),
                            vectors)
    atom = head_dim or 1
    atoms, ties = s.reshape(-1, atom).sum(1), raw.reshape(-1, atom).sum(1)
    order = np.lexsort((-ties, -atoms))
    rows = (order[:, None] * atom + np.arange(atom)).ravel()
    return _ModuleOrder(name, size, cost, atom, atoms[order], rows.astype(np.int64), vectors)


@dataclass
class _Coupling:
    """A whole-neuron unit: rows ``i`` of every producer and input columns ``columns[i]`` of
    the consumer train together (``couple="neurons"``)."""

    producers: list[str]
    consumer: str
    columns: np.ndarray       # [n_neurons, k] consumer columns of each neuron (int64)
    head_dim: int | None      # rows per head of value producers (head_aligned / per_head)


_VALUE_OUT = {"v_proj": "o_proj", "v_lin": "out_lin"}  # value projection -> output projection


def _find_couplings(rep: ImportanceReport, names: Sequence[str]) -> list[_Coupling]:
    """Producer/consumer pairs among ``names`` (both must be selectable): MLP
    ``gate_proj``/``up_proj`` -> ``down_proj`` (and BERT ``intermediate.dense`` ->
    ``output.dense``, ``fc1`` -> ``fc2``, GPT-2 ``c_fc`` -> ``c_proj``, T5 ``wi``/``wi_0``/``wi_1``
    -> ``wo`` ...); values ``v_proj`` -> ``o_proj`` (BERT ``attention.self.value`` ->
    ``attention.output.dense``, DistilBERT ``v_lin`` -> ``out_lin``), by head."""
    present, used, out = set(names), set(), []
    mlp_down = dict(_MLP_PAIRS)
    for name in names:
        if name in used:
            continue
        parent, _, last = name.rpartition(".")
        prefix = parent + "." if parent else ""
        producers: list[str] = []
        consumer, value = "", False
        if last in ("gate_proj", "up_proj"):
            producers = [prefix + p for p in ("gate_proj", "up_proj") if prefix + p in present]
            consumer = prefix + "down_proj"
        elif last in ("wi_0", "wi_1"):
            producers = [prefix + p for p in ("wi_0", "wi_1") if prefix + p in present]
            consumer = prefix + "wo"
        elif name.endswith("intermediate.dense"):
            producers, consumer = [name], name[: -len("intermediate.dense")] + "output.dense"
        elif last in mlp_down:
            producers, consumer = [name], prefix + mlp_down[last]
        elif last in _VALUE_OUT:
            producers, consumer, value = [name], prefix + _VALUE_OUT[last], True
        elif name.endswith("attention.self.value"):
            producers, value = [name], True
            consumer = name[: -len("self.value")] + "output.dense"
        if not producers or consumer not in present:
            continue
        n = rep.shapes[producers[0]][0]
        if any(rep.shapes[p][0] != n for p in producers):
            continue
        d_in = rep.shapes[consumer][1]
        hd = rep.head_dims.get(producers[0]) if value else None
        if d_in == n:
            cols = np.arange(n, dtype=np.int64)[:, None]
        elif value and hd and d_in % n == 0 and n % hd == 0:  # grouped-query attention
            rep_heads = d_in // n
            g, d = np.divmod(np.arange(n, dtype=np.int64), hd)
            cols = (g[:, None] * rep_heads + np.arange(rep_heads)) * hd + d[:, None]
        else:
            raise ValueError(f"couple='neurons': {producers[0]!r} has {n} rows but {consumer!r} "
                             f"has {d_in} input columns, so its neurons cannot be paired; for "
                             "grouped-query attention the report needs head_dims for "
                             f"{producers[0]!r} (score the model with rowsft_nb.score), or "
                             "exclude one of the two")
        out.append(_Coupling(producers, consumer, cols, hd))
        used.update(producers)
    return out


def _coupled_unit_scores(rep: ImportanceReport, c: _Coupling) -> tuple[np.ndarray, np.ndarray]:
    """A neuron's score (and tie-break): the mean of its producers' row scores and, when the
    report has them, the consumer's column scores (the authors' group mean)."""
    members, raws = [], []
    for p in c.producers:
        members.append(rep.scores[p].double().numpy())
        raws.append(rep.raw_scores.get(p, rep.scores[p]).double().numpy())
    if c.consumer in rep.column_scores:
        col = rep.column_scores[c.consumer]
        members.append(col.double().numpy()[c.columns].mean(1))
        raws.append(rep.raw_column_scores.get(c.consumer, col).double().numpy()[c.columns]
                    .mean(1))
    return np.mean(members, 0), np.nan_to_num(np.mean(raws, 0))


@dataclass
class _GlobalOrder:
    """All modules' chunks (``multiple_of`` rows rounded to atoms) in global priority order."""

    module: np.ndarray     # module position of each chunk (int32)
    rows: np.ndarray       # rows in each chunk
    start: np.ndarray      # rows of the same module before the chunk
    cost: np.ndarray       # parameters of each chunk
    unit_cost: np.ndarray  # parameters of a full chunk of that module
    cum_cost: np.ndarray   # cumulative cost in priority order
    key: np.ndarray        # priority (descending): normalized score, or 1 - mass before


class Selector:
    """Plans for one report, fast when only the budget changes.

    Usage::

        sel = Selector(report)
        plan = sel.select(ParamBudget(1_000_000))   # first call sorts (~0.3 s at 7B shapes)
        plan = sel.select(ParamBudget(2_000_000))   # later calls reuse the sort (~ms)
    """

    def __init__(self, report: ImportanceReport):
        if not isinstance(report, ImportanceReport):
            raise TypeError(f"select() needs an ImportanceReport, got {type(report).__name__}; "
                            "make one with rowsft_nb.score(model, data)")
        self._report: ImportanceReport | None = report
        self._report_ref: "weakref.ref[ImportanceReport] | None" = None  # select()'s cache
        self._orders: dict[tuple, dict[str, _ModuleOrder]] = {}
        self._globals: "OrderedDict[tuple, _GlobalOrder]" = OrderedDict()  # LRU, ~45 B/row
        self._warned: set[tuple[str, ...]] = set()  # head_aligned warnings already given
        self._couplings: dict[tuple, dict[str, _Coupling]] = {}  # couple="neurons" units

    @property
    def report(self) -> ImportanceReport:
        """The report this selector plans for."""
        return self._report if self._report_ref is None else self._report_ref()

    # ------------------------------------------------------------------ caches
    def _module_orders(self, columns: bool, head_aligned: bool,
                       per_head: bool = False) -> dict[str, _ModuleOrder]:
        key = (columns, head_aligned, per_head)
        if key not in self._orders:
            rep = self.report
            out = {}
            for name in rep.scores:
                if columns:
                    if name not in rep.column_scores:
                        continue
                    s, size, cost, atom = rep.column_scores[name], rep.shapes[name][1], \
                        rep.shapes[name][0], 1
                    raw = rep.raw_column_scores.get(name)
                else:
                    s, size, cost = rep.scores[name], rep.shapes[name][0], rep.shapes[name][1]
                    atom = int(rep.head_dims.get(name, 1)) if head_aligned else 1
                    raw = rep.raw_scores.get(name)
                s = s.detach().double().numpy()
                # tie-break: a row's own score (rows of one group share the group's score)
                raw = s if raw is None else np.nan_to_num(raw.detach().double().numpy())
                bad = ~np.isfinite(s)
                if bad.any():
                    what = "column scores" if columns else "scores"
                    raise ValueError(f"{what} of module {name!r} contain {int(bad.sum())} "
                                     "NaN/inf values; re-score (check the calibration loss "
                                     "is finite) or exclude the module")
                if atom < 1 or size % atom:
                    raise ValueError(f"module {name!r}: group size {atom} does not divide its "
                                     f"{size} rows; fix report.head_dims or use head_aligned=False")
                if per_head and not columns and name in rep.head_dims:
                    out[name] = _unit_order(name, s, raw, cost, per_head=True,
                                            head_dim=int(rep.head_dims[name]))
                    continue
                atoms = s.reshape(-1, atom).sum(1) if atom > 1 else s
                ties = raw.reshape(-1, atom).sum(1) if atom > 1 else raw
                order = np.lexsort((-ties, -atoms))  # by score, then own score; stable
                rows = (order[:, None] * atom + np.arange(atom)).ravel() if atom > 1 else order
                out[name] = _ModuleOrder(name, size, cost, atom, atoms[order],
                                         rows.astype(np.int64))
            self._orders[key] = out
        return self._orders[key]

    def _coupled_orders(self, names: tuple[str, ...], head_aligned: bool, per_head: bool
                        ) -> tuple[list[str], dict[str, _ModuleOrder], dict[str, _Coupling]]:
        """``couple="neurons"``: the names the budget sees (a coupling is seen under its first
        producer; its other producers and its consumer are not selected on their own), their
        orders, and ``{first producer: coupling}``."""
        key = ("couple", names, head_aligned, per_head)
        if key not in self._orders:
            rep = self.report
            orders = dict(self._module_orders(False, head_aligned, per_head))
            couplings = {c.producers[0]: c for c in _find_couplings(rep, names)}
            for first, c in couplings.items():
                s, raw = _coupled_unit_scores(rep, c)
                cost = sum(rep.shapes[p][1] for p in c.producers) + \
                    c.columns.shape[1] * rep.shapes[c.consumer][0]
                hd = c.head_dim if (head_aligned or per_head) else None
                orders[first] = _unit_order(first, s, raw, cost, head_dim=hd,
                                            per_head=per_head,
                                            vectors=len(c.producers) + c.columns.shape[1])
            self._orders[key] = orders
            self._couplings[key] = couplings
        couplings = self._couplings[key]
        hidden = {n for c in couplings.values() for n in c.producers[1:] + [c.consumer]}
        return [n for n in names if n not in hidden], self._orders[key], couplings

    def _global_order(self, names: tuple[str, ...], orders: dict[str, _ModuleOrder],
                      okey: tuple, multiple_of: int, allocator: str, normalizer: str,
                      unit: str = "params") -> _GlobalOrder:
        """``unit``: what a chunk costs, "params" (its parameters) or "rows" (rows and
        coupled columns it trains)."""
        key = (names, okey, multiple_of, allocator, normalizer, unit)
        if key in self._globals:
            self._globals.move_to_end(key)
            return self._globals[key]
        parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                              ("module", "rows", "start", "cost", "unit", "key")}
        for i, name in enumerate(names):
            mo = orders[name]
            n_atoms = mo.atom_scores.size
            per = _atoms_per_chunk(mo.atom, multiple_of)
            starts_atoms = np.arange(0, n_atoms, per)
            if allocator == "topk":
                atom_key = _normalize_sorted(mo.atom_scores, normalizer)
                counts = np.diff(np.append(starts_atoms, n_atoms))
                chunk_key = np.add.reduceat(atom_key, starts_atoms) / counts
            else:  # coverage: priority = 1 - (share of score mass before the chunk)
                mass = np.clip(mo.atom_scores, 0.0, None)
                total = mass.sum()
                before = (np.concatenate([[0.0], np.cumsum(mass)[:-1]]) / total if total > 0
                          else np.arange(n_atoms) / n_atoms)
                chunk_key = 1.0 - before[starts_atoms]
            chunk_rows = np.minimum(per, n_atoms - starts_atoms) * mo.atom
            parts["module"].append(np.full(starts_atoms.size, i, dtype=np.int64))
            parts["rows"].append(chunk_rows.astype(np.int64))
            parts["start"].append((starts_atoms * mo.atom).astype(np.int64))
            each = mo.cost if unit == "params" else mo.vectors
            parts["cost"].append(chunk_rows.astype(np.int64) * each)
            parts["unit"].append(np.full(starts_atoms.size, per * mo.atom * each, np.int64))
            parts["key"].append(chunk_key)
        cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
        perm = np.argsort(-cat["key"], kind="stable")  # stable: keeps each module's order
        cost = cat["cost"][perm].astype(np.int64)
        g = _GlobalOrder(module=cat["module"][perm].astype(np.int32),
                         rows=cat["rows"][perm].astype(np.int32),
                         start=cat["start"][perm].astype(np.int32), cost=cost,
                         unit_cost=cat["unit"][perm].astype(np.int64),
                         cum_cost=np.cumsum(cost), key=cat["key"][perm])
        self._globals[key] = g
        while len(self._globals) > _GLOBAL_CACHE_SIZE:
            self._globals.popitem(last=False)
        return g

    def _warn_headless(self, names: list[str], option: str = "head_aligned") -> None:
        """Warn once per set of modules when ``head_aligned=True`` (or ``per_head=True``)
        cannot apply: attention projections without head groups, or no module with head
        groups at all."""
        groups = self.report.head_dims
        headless = [n for n in names if n not in groups]
        attention = [n for n in headless if short_type(n) in ATTENTION_INPUTS]
        bad = headless if len(headless) == len(names) else attention
        key = (option, *bad)
        if not bad or key in self._warned:
            return
        self._warned.add(key)
        types = sorted({module_type(n) for n in bad})
        warnings.warn(f"{option}=True cannot apply to {len(bad)} module(s) without head "
                      f"groups in report.head_dims (types: {', '.join(types[:6])}"
                      f"{' ...' if len(types) > 6 else ''}; e.g. {bad[0]!r}); their rows are "
                      "selected one by one. Score with rowsft_nb.score(...) on the model to "
                      "get head groups, or set report.head_dims[name] = head_dim.",
                      SelectionWarning, stacklevel=4)

    # ------------------------------------------------------------------ selection
    def select(self, budget: Budget | dict, *, min_rows: int = 0, max_rows: int | None = None,
               include: str | Sequence[str] | None = None,
               exclude: str | Sequence[str] | None = None, head_aligned: bool = False,
               multiple_of: int = 1, columns: bool = False, per_head: bool = False,
               couple: str | None = None) -> RowPlan:
        """See :func:`select`."""
        if isinstance(budget, dict):
            budget = budget_from_dict(budget)
        if not isinstance(budget, (FixedRows, Ratio, TypeRatios, ParamBudget, RowBudget)):
            raise TypeError(f"budget must be FixedRows, Ratio, TypeRatios, ParamBudget or "
                            f"RowBudget, got {type(budget).__name__}")
        _check_int("min_rows", min_rows, 0)
        if max_rows is not None:
            _check_int("max_rows", max_rows, 0)
            if max_rows < min_rows:
                raise ValueError(f"max_rows={max_rows} is below min_rows={min_rows}")
        _check_int("multiple_of", multiple_of, 1)
        if columns and head_aligned:
            raise ValueError("head_aligned=True groups rows into heads; it does not apply to "
                             "columns=True. Use one or the other.")
        if per_head and (head_aligned or columns):
            raise ValueError("per_head=True gives every head the same number of rows; it does "
                             "not combine with head_aligned=True (whole heads) or columns=True. "
                             "Use one of them.")
        if couple not in COUPLINGS:
            raise ValueError(f"couple must be None or 'neurons' (whole-neuron mode), got "
                             f"{couple!r}")
        if couple and columns:
            raise ValueError("couple='neurons' selects rows with their coupled columns; it "
                             "does not combine with columns=True")
        rep = self.report
        if columns and not rep.column_scores:
            raise ValueError("columns=True needs report.column_scores, and this report has "
                             "none; score with a metric that records input-column scores")
        orders = self._module_orders(columns, head_aligned, per_head)
        names = [n for n in rep.scores if n in orders
                 and (include is None or name_matches(n, include))
                 and (exclude is None or not name_matches(n, exclude))]
        if (head_aligned or per_head) and names:
            self._warn_headless(names, "per_head" if per_head else "head_aligned")
        if not names:
            raise ValueError(f"no module of the report is left by include={include!r} "
                             f"exclude={exclude!r}{' with column scores' if columns else ''}; "
                             f"report modules: {', '.join(rep.modules[:6])}"
                             f"{' ...' if len(rep.modules) > 6 else ''}")
        if isinstance(budget, TypeRatios):
            unknown = [k for k in budget.ratios if not any(_type_key(n, [k]) for n in rep.scores)]
            if unknown:
                types = sorted({short_type(n) for n in rep.scores})
                raise ValueError(f"TypeRatios keys {unknown} match no module; module types "
                                 f"here: {types}")
        target_parameters = sum(rep.shapes[n][0] * rep.shapes[n][1] for n in names)
        opts = dict(min_rows=min_rows, max_rows=max_rows, multiple_of=multiple_of)
        all_names, couplings, okey = names, {}, (columns, head_aligned, per_head)
        if couple:
            names, orders, couplings = self._coupled_orders(tuple(names), head_aligned, per_head)
            okey = (*okey, "neurons", tuple(all_names))
            if not couplings:
                warnings.warn("couple='neurons' found no MLP or value/output pair among the "
                              "selected modules (both sides must be in the report and not "
                              "excluded); rows are selected alone", SelectionWarning,
                              stacklevel=3)
        extra: dict[str, Any] = {}
        if isinstance(budget, (ParamBudget, RowBudget)):
            counts, extra = self._allocate(budget, tuple(names), orders, okey,
                                           target_parameters, **opts)
            if isinstance(budget, RowBudget):
                strategy = f"row_budget/{budget.normalizer}"
            else:
                strategy = f"param_budget/{budget.allocator}" + \
                    (f"/{budget.normalizer}" if budget.allocator == "topk" else "")
        else:
            members = {k: c.producers for k, c in couplings.items()}  # TypeRatios: any producer
            counts = self._per_module(budget, names, orders, members=members, **opts)
            strategy = budget.to_dict()["kind"]
        chosen, coupled_columns = {}, {}
        for name, r in counts.items():
            if r > 0:
                idx = np.sort(orders[name].row_order[:r])
                c = couplings.get(name)
                for producer in (c.producers if c else [name]):
                    chosen[producer] = torch.from_numpy(idx)
                if c:
                    coupled_columns[c.consumer] = torch.from_numpy(np.sort(c.columns[idx].ravel()))
        meta = {
            "budget": budget.to_dict(), "metric": rep.metric, "strategy": strategy,
            "model_class": rep.meta.get("model_class"), "model_hash": rep.meta.get("model_hash"),
            "model_parameters": rep.meta.get("model_parameters"),
            "target_parameters": int(target_parameters),
            "options": {"min_rows": min_rows, "max_rows": max_rows,
                        "include": _jsonable(include), "exclude": _jsonable(exclude),
                        "head_aligned": head_aligned, "multiple_of": multiple_of,
                        "columns": columns, "per_head": per_head, "couple": couple}, **extra}
        shapes = {n: rep.shapes[n] for n in all_names}
        plan = RowPlan(rows={} if columns else chosen, shapes=shapes,
                       columns=chosen if columns else coupled_columns, meta=meta)
        plan.meta["trainable_parameters"] = plan.trainable_parameters()
        return plan

    def _per_module(self, budget: Budget, names: list[str], orders: dict[str, _ModuleOrder],
                    *, min_rows: int, max_rows: int | None, multiple_of: int,
                    members: dict[str, list[str]] | None = None) -> dict[str, int]:
        counts, clipped, clipped_mods = {}, 0.0, []
        for name in names:
            mo = orders[name]
            if isinstance(budget, FixedRows):
                want = float(budget.r)
            elif isinstance(budget, Ratio):
                want = budget.ratio * mo.size
            else:  # a coupled neuron takes the largest ratio of its producers
                want = max(budget.ratio_for(n) for n in (members or {}).get(name, [name])) \
                    * mo.size
            if want <= 0:
                counts[name] = 0
                continue
            if want > mo.size:
                clipped += want - mo.size
                clipped_mods.append(name)
            unit = _atoms_per_chunk(mo.atom, multiple_of) * mo.atom
            r = max(1, math.floor(want / unit + 0.5)) * unit  # nearest multiple, >= one unit
            r = max(r, math.ceil(min_rows / unit) * unit)
            if max_rows is not None and max_rows < mo.size:
                r = min(r, (max_rows // unit) * unit)
            counts[name] = min(r, mo.size)
        if clipped_mods:
            warnings.warn(f"{budget!r} asks for more rows than {len(clipped_mods)} module(s) "
                          f"have (e.g. {clipped_mods[0]!r} has {orders[clipped_mods[0]].size}); "
                          f"clipped by {clipped:,.0f} rows in total", SelectionWarning,
                          stacklevel=4)
        return counts

    def _allocate(self, budget: ParamBudget | RowBudget, names: tuple[str, ...],
                  orders: dict[str, _ModuleOrder], okey: tuple, target_parameters: int, *,
                  min_rows: int, max_rows: int | None, multiple_of: int
                  ) -> tuple[dict[str, int], dict]:
        rows = isinstance(budget, RowBudget)
        what, kind = ("rows", "RowBudget") if rows else ("parameters", "ParamBudget")
        limit = budget.resolve(sum(orders[n].size * orders[n].vectors for n in names)
                               if rows else target_parameters)
        g = self._global_order(names, orders, okey, multiple_of, budget.allocator,
                               budget.normalizer, "rows" if rows else "params")
        extra: dict[str, Any] = {"budget_rows" if rows else "budget_params": limit}
        if limit == 0:
            return {n: 0 for n in names}, extra
        size = np.array([orders[n].size for n in names])
        constrained = min_rows > 0 or (max_rows is not None and max_rows < size.max())
        forced = np.zeros(0, dtype=np.int64)
        remaining = limit
        if constrained:
            allowed = np.ones(g.module.size, dtype=bool)
            if max_rows is not None:
                allowed = (g.start + g.rows <= max_rows) | (size[g.module] <= max_rows)
            is_forced = (g.start < min_rows) & allowed
            forced = np.flatnonzero(is_forced)
            forced_cost = int(g.cost[forced].sum())
            available = int(g.cost[allowed].sum())
            if forced_cost > limit:
                warnings.warn(f"min_rows={min_rows} alone needs {forced_cost:,} {what}, "
                              f"{forced_cost - limit:,} above the budget of {limit:,}; the plan "
                              "exceeds the budget", SelectionWarning, stacklevel=4)
            eligible = np.flatnonzero(allowed & ~is_forced)
            remaining = limit - forced_cost
        else:
            available = int(g.cum_cost[-1]) if g.cum_cost.size else 0
            eligible = None
        if limit > available:
            warnings.warn(f"{kind} of {limit:,} {what} is more than the "
                          f"{available:,} the selected modules allow; clipped by "
                          f"{limit - available:,}", SelectionWarning, stacklevel=4)
        taken = [forced] + _greedy_fill(g, eligible, remaining)
        idx = np.concatenate(taken)
        r = np.bincount(g.module[idx], weights=g.rows[idx], minlength=len(names))
        counts = {n: int(round(v)) for n, v in zip(names, r)}
        if budget.allocator == "coverage":
            # the score-mass share every module with rows left to add already covers
            taken_mask = np.zeros(g.module.size, dtype=bool)
            taken_mask[idx] = True
            first_untaken = int(np.argmin(taken_mask))
            extra["coverage"] = 1.0 if taken_mask[first_untaken] else \
                float(1.0 - g.key[first_untaken])
        if 0 < limit and not idx.size:
            warnings.warn(f"{kind} of {limit:,} {what} is below the cost of the "
                          f"cheapest unit ({int(g.unit_cost.min()):,}); the plan is empty",
                          SelectionWarning, stacklevel=4)
        return counts, extra


def _greedy_fill(g: _GlobalOrder, eligible: np.ndarray | None, budget: int) -> list[np.ndarray]:
    """Take chunks in priority order while they fit; once one does not, skip every chunk of
    modules whose full chunk costs more than what is left, and go on (a few rounds at most:
    one per distinct chunk cost). Keeps each module's chunks a prefix of its order."""
    taken: list[np.ndarray] = []
    if budget <= 0:
        return taken
    if eligible is None:  # fast path: cached cumulative cost over every chunk
        k = int(np.searchsorted(g.cum_cost, budget, side="right"))
        taken.append(np.arange(k))
        if k == g.cost.size:
            return taken
        budget -= int(g.cum_cost[k - 1]) if k else 0
        rest = np.arange(k, g.cost.size)
    else:
        rest = eligible
    while rest.size and budget > 0:
        rest = rest[g.unit_cost[rest] <= budget]
        if not rest.size:
            break
        cum = np.cumsum(g.cost[rest])
        k = int(np.searchsorted(cum, budget, side="right"))
        taken.append(rest[:k])
        if k == rest.size:
            break
        # k >= 1: rest[0] costs at most its unit cost, which fits. rest[k] does not fit, so
        # the next filter drops its module's remaining chunks (same unit cost).
        budget -= int(cum[k - 1])
        rest = rest[k:]
    return taken


def _atoms_per_chunk(atom: int, multiple_of: int) -> int:
    return multiple_of // math.gcd(atom, multiple_of)


def _normalize_sorted(s: np.ndarray, kind: str) -> np.ndarray:
    """Normalize descending-sorted scores with the library's one normaliser
    (:func:`rowsft_nb.scoring.report.normalize_scores`): mean/max/sum -> s / stat; rank ->
    (n - position) / n, the rank in this order (ties already broken, so every module's
    chunks stay a prefix of its order)."""
    if kind == "rank":
        return normalize_scores(np.arange(s.size, 0, -1, dtype=np.float64), "rank")
    return normalize_scores(np.asarray(s, dtype=np.float64), kind)


def _check_int(what: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ValueError(f"{what}={v!r}: expected an int >= {low}")


def _jsonable(spec: Any) -> Any:
    return spec if spec is None or isinstance(spec, str) else list(spec)


# ---------------------------------------------------------------------------- select()
# select()'s cache lives on the report (``report._rowsft_selector = (fingerprint, Selector)``,
# the Selector holding the report weakly): it dies with the report. Only the last
# _CACHE_SIZE reports keep theirs (bounded memory); older ones drop it.
_CACHE_ATTR = "_rowsft_selector"
_RECENT: "OrderedDict[int, weakref.ref]" = OrderedDict()
_CACHE_SIZE = 4


def _fingerprint(report: ImportanceReport) -> tuple:
    """Changes when a score tensor is replaced or modified in place."""
    return (tuple((k, id(v), v._version) for k, v in report.scores.items()),
            tuple((k, id(v), v._version) for k, v in report.column_scores.items()),
            tuple((k, id(v), v._version) for k, v in report.raw_scores.items()),
            tuple((k, id(v), v._version) for k, v in report.raw_column_scores.items()),
            tuple(report.head_dims.items()), tuple(report.shapes.items()))


def _selector_for(report: ImportanceReport) -> Selector:
    if not isinstance(report, ImportanceReport):
        return Selector(report)  # raises the TypeError naming what select() needs
    fp = _fingerprint(report)
    hit = vars(report).get(_CACHE_ATTR)
    if hit is not None and hit[0] == fp and hit[1].report is report:
        sel = hit[1]
    else:
        sel = Selector(report)
        sel._report, sel._report_ref = None, weakref.ref(report)  # no report <-> cache cycle
        vars(report)[_CACHE_ATTR] = (fp, sel)
    key = id(report)
    _RECENT.pop(key, None)
    _RECENT[key] = weakref.ref(report)
    while len(_RECENT) > _CACHE_SIZE:
        old = _RECENT.popitem(last=False)[1]()
        if old is not None:
            vars(old).pop(_CACHE_ATTR, None)
    return sel


def select(report: ImportanceReport, budget: Budget | dict, *, min_rows: int = 0,
           max_rows: int | None = None, include: str | Sequence[str] | None = None,
           exclude: str | Sequence[str] | None = None, head_aligned: bool = False,
           multiple_of: int = 1, columns: bool = False, per_head: bool = False,
           couple: str | None = None) -> RowPlan:
    """Pick the rows (or with ``columns=True`` the input columns) to train.

    Usage: ``plan = select(report, ParamBudget(0.01), exclude=["lm_head"], multiple_of=8)``

    - ``include``/``exclude``: which report modules may train (regex fullmatch or list of
      name suffixes, as in :func:`rowsft_nb.find_targets`).
    - ``min_rows``/``max_rows``: per-module floor/ceiling (the floor applies to every module
      the budget gives rows; for ``ParamBudget``, to every included module, with a warning
      when it pushes the plan above the budget).
    - ``head_aligned``: modules with ``report.head_dims`` select whole heads, ranked by the
      sum of their rows' scores.
    - ``per_head``: modules with ``report.head_dims`` give every head the same number of
      rows, each head its best ones (the authors' allocation for q/k/v); a module's row count
      is a multiple of its number of heads (for ``ParamBudget``/``RowBudget`` an atom is the
      k-th best row of every head, scored by their sum).
    - ``couple="neurons"``: whole-neuron mode. The neurons of gate/up (``intermediate.dense``,
      ``fc1`` ...) are selected once for all producers and train their input columns of
      ``down_proj`` (``output.dense``, ``fc2`` ...) too; value rows train the ``o_proj``
      columns that read them (all query heads of the KV group). A neuron's score is the mean
      of its rows' scores (and of the consumer's column scores when the report has them);
      ``FixedRows(r)`` = r neurons, ``ParamBudget`` counts rows and columns, ``RowBudget``
      counts every row and column. Consumers get only the coupled columns; pairs with one
      side excluded select rows alone.
    - ``multiple_of``: rows per module come in multiples of this (per-module budgets round to
      the nearest multiple, at least one; ``ParamBudget`` never exceeds its limit because of it).
    A budget above what exists is clipped with a :class:`SelectionWarning`; a zero budget gives
    an empty plan; NaN scores raise ``ValueError`` naming the module. Repeated calls on the same
    report reuse its sorted scores (see :class:`Selector`).
    """
    return _selector_for(report).select(
        budget, min_rows=min_rows, max_rows=max_rows, include=include, exclude=exclude,
        head_aligned=head_aligned, multiple_of=multiple_of, columns=columns,
        per_head=per_head, couple=couple)
