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

Usage::

    plan = select(report, ParamBudget(0.01, allocator="topk", normalizer="rank"),
                  exclude=["down_proj"], multiple_of=8)
    plan = select(report, FixedRows(64), head_aligned=True)

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
from .scoring.report import ImportanceReport
from .targets import module_type, name_matches, short_type

__all__ = ["FixedRows", "Ratio", "TypeRatios", "ParamBudget", "Budget", "budget_from_dict",
           "select", "Selector", "SelectionWarning"]

ALLOCATORS = ("topk", "coverage")
_GLOBAL_CACHE_SIZE = 3  # global orders kept per Selector (~60 MB each at 7B shapes)
SELECT_NORMALIZERS = ("rank", "mean", "max", "sum")


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


Budget = Union[FixedRows, Ratio, TypeRatios, ParamBudget]
_KINDS = {"fixed_rows": FixedRows, "ratio": Ratio, "type_ratios": TypeRatios,
          "param_budget": ParamBudget}


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
        self.report = report
        self._orders: dict[tuple, dict[str, _ModuleOrder]] = {}
        self._globals: "OrderedDict[tuple, _GlobalOrder]" = OrderedDict()  # LRU, ~45 B/row

    # ------------------------------------------------------------------ caches
    def _module_orders(self, columns: bool, head_aligned: bool) -> dict[str, _ModuleOrder]:
        key = (columns, head_aligned)
        if key not in self._orders:
            rep = self.report
            out = {}
            for name in rep.scores:
                if columns:
                    if name not in rep.column_scores:
                        continue
                    s, size, cost, atom = rep.column_scores[name], rep.shapes[name][1], \
                        rep.shapes[name][0], 1
                else:
                    s, size, cost = rep.scores[name], rep.shapes[name][0], rep.shapes[name][1]
                    atom = int(rep.groups.get(name, 1)) if head_aligned else 1
                s = s.detach().double().numpy()
                bad = ~np.isfinite(s)
                if bad.any():
                    what = "column scores" if columns else "scores"
                    raise ValueError(f"{what} of module {name!r} contain {int(bad.sum())} "
                                     "NaN/inf values; re-score (check the calibration loss "
                                     "is finite) or exclude the module")
                if atom < 1 or size % atom:
                    raise ValueError(f"module {name!r}: group size {atom} does not divide its "
                                     f"{size} rows; fix report.groups or use head_aligned=False")
                atoms = s.reshape(-1, atom).sum(1) if atom > 1 else s
                order = np.argsort(-atoms, kind="stable")
                rows = (order[:, None] * atom + np.arange(atom)).ravel() if atom > 1 else order
                out[name] = _ModuleOrder(name, size, cost, atom, atoms[order],
                                         rows.astype(np.int64))
            self._orders[key] = out
        return self._orders[key]

    def _global_order(self, names: tuple[str, ...], columns: bool, head_aligned: bool,
                      multiple_of: int, allocator: str, normalizer: str) -> _GlobalOrder:
        key = (names, columns, head_aligned, multiple_of, allocator, normalizer)
        if key in self._globals:
            self._globals.move_to_end(key)
            return self._globals[key]
        orders = self._module_orders(columns, head_aligned)
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
            parts["cost"].append(chunk_rows.astype(np.int64) * mo.cost)
            parts["unit"].append(np.full(starts_atoms.size, per * mo.atom * mo.cost, np.int64))
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

    # ------------------------------------------------------------------ selection
    def select(self, budget: Budget | dict, *, min_rows: int = 0, max_rows: int | None = None,
               include: str | Sequence[str] | None = None,
               exclude: str | Sequence[str] | None = None, head_aligned: bool = False,
               multiple_of: int = 1, columns: bool = False) -> RowPlan:
        """See :func:`select`."""
        if isinstance(budget, dict):
            budget = budget_from_dict(budget)
        if not isinstance(budget, (FixedRows, Ratio, TypeRatios, ParamBudget)):
            raise TypeError(f"budget must be FixedRows, Ratio, TypeRatios or ParamBudget, "
                            f"got {type(budget).__name__}")
        _check_int("min_rows", min_rows, 0)
        if max_rows is not None:
            _check_int("max_rows", max_rows, 0)
            if max_rows < min_rows:
                raise ValueError(f"max_rows={max_rows} is below min_rows={min_rows}")
        _check_int("multiple_of", multiple_of, 1)
        if columns and head_aligned:
            raise ValueError("head_aligned=True groups rows into heads; it does not apply to "
                             "columns=True. Use one or the other.")
        rep = self.report
        if columns and not rep.column_scores:
            raise ValueError("columns=True needs report.column_scores, and this report has "
                             "none; score with a metric that records input-column scores")
        orders = self._module_orders(columns, head_aligned)
        names = [n for n in rep.scores if n in orders
                 and (include is None or name_matches(n, include))
                 and (exclude is None or not name_matches(n, exclude))]
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
        extra: dict[str, Any] = {}
        if isinstance(budget, ParamBudget):
            counts, extra = self._allocate(budget, tuple(names), columns, head_aligned,
                                           target_parameters, **opts)
            strategy = f"param_budget/{budget.allocator}" + \
                (f"/{budget.normalizer}" if budget.allocator == "topk" else "")
        else:
            counts = self._per_module(budget, names, orders, **opts)
            strategy = budget.to_dict()["kind"]
        chosen = {}
        for name, r in counts.items():
            if r > 0:
                mask = np.zeros(orders[name].size, dtype=bool)
                mask[orders[name].row_order[:r]] = True
                chosen[name] = torch.from_numpy(np.flatnonzero(mask))
        meta = {
            "budget": budget.to_dict(), "metric": rep.metric, "strategy": strategy,
            "model_class": rep.meta.get("model_class"), "model_hash": rep.meta.get("model_hash"),
            "model_parameters": rep.meta.get("model_parameters"),
            "target_parameters": int(target_parameters),
            "options": {"min_rows": min_rows, "max_rows": max_rows,
                        "include": _jsonable(include), "exclude": _jsonable(exclude),
                        "head_aligned": head_aligned, "multiple_of": multiple_of,
                        "columns": columns}, **extra}
        shapes = {n: rep.shapes[n] for n in names}
        plan = RowPlan(rows={} if columns else chosen, shapes=shapes,
                       columns=chosen if columns else {}, meta=meta)
        plan.meta["trainable_parameters"] = plan.trainable_parameters()
        return plan

    def _per_module(self, budget: Budget, names: list[str], orders: dict[str, _ModuleOrder],
                    *, min_rows: int, max_rows: int | None, multiple_of: int) -> dict[str, int]:
        counts, clipped, clipped_mods = {}, 0.0, []
        for name in names:
            mo = orders[name]
            if isinstance(budget, FixedRows):
                want = float(budget.r)
            elif isinstance(budget, Ratio):
                want = budget.ratio * mo.size
            else:
                want = budget.ratio_for(name) * mo.size
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

    def _allocate(self, budget: ParamBudget, names: tuple[str, ...], columns: bool,
                  head_aligned: bool, target_parameters: int, *, min_rows: int,
                  max_rows: int | None, multiple_of: int) -> tuple[dict[str, int], dict]:
        limit = budget.resolve(target_parameters)
        g = self._global_order(names, columns, head_aligned, multiple_of, budget.allocator,
                               budget.normalizer)
        extra: dict[str, Any] = {"budget_params": limit}
        if limit == 0:
            return {n: 0 for n in names}, extra
        size = np.array([self._module_orders(columns, head_aligned)[n].size for n in names])
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
                warnings.warn(f"min_rows={min_rows} alone needs {forced_cost:,} parameters, "
                              f"{forced_cost - limit:,} above the budget of {limit:,}; the plan "
                              "exceeds the budget", SelectionWarning, stacklevel=4)
            eligible = np.flatnonzero(allowed & ~is_forced)
            remaining = limit - forced_cost
        else:
            available = int(g.cum_cost[-1]) if g.cum_cost.size else 0
            eligible = None
        if limit > available:
            warnings.warn(f"ParamBudget of {limit:,} parameters is more than the "
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
            warnings.warn(f"ParamBudget of {limit:,} parameters is below the cost of the "
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
    """Normalize descending-sorted scores: rank -> (n - position) / n; mean/max/sum -> s/stat."""
    if kind == "rank":
        n = s.size
        return (n - np.arange(n, dtype=np.float64)) / n
    denom = {"mean": s.mean(), "max": s.max(), "sum": s.sum()}[kind] if s.size else 0.0
    return s / denom if denom != 0 else np.zeros_like(s)


def _check_int(what: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ValueError(f"{what}={v!r}: expected an int >= {low}")


def _jsonable(spec: Any) -> Any:
    return spec if spec is None or isinstance(spec, str) else list(spec)


# ---------------------------------------------------------------------------- select()
_CACHE: "OrderedDict[int, tuple[weakref.ref, tuple, Selector]]" = OrderedDict()
_CACHE_SIZE = 4


def _fingerprint(report: ImportanceReport) -> tuple:
    """Changes when a score tensor is replaced or modified in place."""
    return (tuple((k, id(v), v._version) for k, v in report.scores.items()),
            tuple((k, id(v), v._version) for k, v in report.column_scores.items()),
            tuple(report.groups.items()), tuple(report.shapes.items()))


def _selector_for(report: ImportanceReport) -> Selector:
    key, fp = id(report), _fingerprint(report)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is report and hit[1] == fp:
        _CACHE.move_to_end(key)
        return hit[2]
    sel = Selector(report)
    _CACHE[key] = (weakref.ref(report), fp, sel)
    _CACHE.move_to_end(key)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return sel


def select(report: ImportanceReport, budget: Budget | dict, *, min_rows: int = 0,
           max_rows: int | None = None, include: str | Sequence[str] | None = None,
           exclude: str | Sequence[str] | None = None, head_aligned: bool = False,
           multiple_of: int = 1, columns: bool = False) -> RowPlan:
    """Pick the rows (or with ``columns=True`` the input columns) to train.

    Usage: ``plan = select(report, ParamBudget(0.01), exclude=["lm_head"], multiple_of=8)``

    - ``include``/``exclude``: which report modules may train (regex fullmatch or list of
      name suffixes, as in :func:`rowsft_nb.find_targets`).
    - ``min_rows``/``max_rows``: per-module floor/ceiling (the floor applies to every module
      the budget gives rows; for ``ParamBudget``, to every included module, with a warning
      when it pushes the plan above the budget).
    - ``head_aligned``: modules with ``report.groups`` select whole heads, ranked by the
      sum of their rows' scores.
    - ``multiple_of``: rows per module come in multiples of this (per-module budgets round to
      the nearest multiple, at least one; ``ParamBudget`` never exceeds its limit because of it).
    A budget above what exists is clipped with a :class:`SelectionWarning`; a zero budget gives
    an empty plan; NaN scores raise ``ValueError`` naming the module. Repeated calls on the same
    report reuse its sorted scores (see :class:`Selector`).
    """
    return _selector_for(report).select(
        budget, min_rows=min_rows, max_rows=max_rows, include=include, exclude=exclude,
        head_aligned=head_aligned, multiple_of=multiple_of, columns=columns)
