"""Importance metrics: small callables with one signature, in a registry selectable by name.

A metric turns one module's weight (``[d_out, d_in]``, see ``targets.row_weight``) and the
statistics the calibration pass gathered for it (:class:`ModuleStats`) into row scores
``[d_out]`` and input-column scores ``[d_in]`` (higher = more important)::

    rows, cols = METRICS["taylor"](weight, stats)

``metric.needs`` names the statistics the calibration pass must collect (see
``scoring.calibration``); metrics that need none (``l1``, ``l2``, ``random``) run without
data. Add one with :func:`register_metric`.

Definitions (``G`` = dL/dW of one calibration batch, summed over its tokens; sums over
``b`` run over batches; ``X`` = the layer inputs of all calibration tokens):

    l1            sum_j |w_ij|                          cols: sum_i |w_ij|
    l2            sqrt(sum_j w_ij^2)                    cols: sqrt(sum_i w_ij^2)
    taylor        |sum_j w_ij sum_b G_ij|               cols: |sum_i w_ij sum_b G_ij|
    taylor_abs    sum_j |w_ij sum_b G_ij|               cols: sum_i |w_ij sum_b G_ij|
    fisher        sum_b (sum_j w_ij G_ij)^2             cols: sum_b (sum_i w_ij G_ij)^2
    hessian       sum_j w_ij^2 sum_b G_ij^2  (OBD)      cols: sum_i w_ij^2 sum_b G_ij^2
    wanda         sum_j |w_ij| ||X_j||_2                cols: ||X_j||_2 sum_i |w_ij|
    zo_taylor     taylor with G estimated by SPSA:  G ~ (L(W+eZ) - L(W-eZ)) / 2e * Z
    class_taylor  taylor per class c, each turned into quantiles (rank / d_out, in (0, 1]),
                  then averaged over the classes seen: every class counts equally, so
                  neurons that matter to a rare class survive
    random        uniform in [0, 1), seeded per module
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .report import normalize_scores

Scores = tuple[torch.Tensor, torch.Tensor | None]

# Statistics the calibration pass knows how to collect (see calibration.py).
STAT_KINDS = ("taylor", "grad_sum", "grad_sq", "input_sq", "zo", "class")
GRADIENT_STATS = frozenset({"taylor", "grad_sum", "grad_sq", "class"})


@dataclass
class ModuleStats:
    """Calibration statistics of one target module (float32, or float64 for float64 models).

    ``taylor_rows[i]`` = sum_b sum_j w_ij G^b_ij (signed), ``taylor_rows_sq`` the sum of the
    per-batch squares; ``grad_sum`` = sum_b G^b ([d_out, d_in], only for ``taylor_abs``);
    ``hessian_rows[i]`` = sum_b sum_j w_ij^2 (G^b_ij)^2; ``input_sq[j]`` = sum_t x_tj^2;
    ``zo_rows`` the SPSA estimate of ``taylor_rows``; ``class_rows[c]`` the Taylor rows of
    the examples labelled ``c``. ``*_cols`` are the same over input columns. ``seed`` is
    this module's seed (``random``).
    """

    seed: int = 0
    n_batches: int = 0
    taylor_rows: torch.Tensor | None = None
    taylor_cols: torch.Tensor | None = None
    taylor_rows_sq: torch.Tensor | None = None
    taylor_cols_sq: torch.Tensor | None = None
    grad_sum: torch.Tensor | None = None
    hessian_rows: torch.Tensor | None = None
    hessian_cols: torch.Tensor | None = None
    input_sq: torch.Tensor | None = None
    zo_rows: torch.Tensor | None = None
    zo_cols: torch.Tensor | None = None
    class_rows: torch.Tensor | None = None
    class_cols: torch.Tensor | None = None
    class_counts: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The collected statistics that are set, by field name."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


class Metric(Protocol):
    """What ``score()`` calls: ``metric(weight, stats) -> (rows, cols_or_None)``."""

    name: str
    needs: frozenset[str]

    def __call__(self, weight: torch.Tensor, stats: ModuleStats) -> Scores: ...


@dataclass(frozen=True)
class FunctionMetric:
    """A metric from a plain function ``fn(weight, stats) -> (rows, cols)``."""

    name: str
    fn: Callable[[torch.Tensor, ModuleStats], Scores]
    needs: frozenset[str] = frozenset()
    description: str = ""

    def __call__(self, weight: torch.Tensor, stats: ModuleStats) -> Scores:
        return self.fn(weight, stats)

    @property
    def needs_data(self) -> bool:
        return bool(self.needs)

    @property
    def needs_gradients(self) -> bool:
        return bool(self.needs & GRADIENT_STATS)


def _w(weight: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    dtype = like.dtype if like is not None else (
        torch.float64 if weight.dtype == torch.float64 else torch.float32)
    return weight.detach().to(dtype)


def _require(stats: ModuleStats, *fields_: str) -> None:
    missing = [f for f in fields_ if getattr(stats, f) is None]
    if missing:
        raise ValueError(f"ModuleStats lacks {missing}: the calibration pass did not collect "
                         "what this metric needs (run it through score()).")


def _l1(weight: torch.Tensor, stats: ModuleStats) -> Scores:
    w = _w(weight).abs()
    return w.sum(1), w.sum(0)


def _l2(weight: torch.Tensor, stats: ModuleStats) -> Scores:
    w = _w(weight)
    return w.norm(dim=1), w.norm(dim=0)


def _random(weight: torch.Tensor, stats: ModuleStats) -> Scores:
    g = torch.Generator().manual_seed(int(stats.seed))
    d_out, d_in = weight.shape
    return torch.rand(d_out, generator=g), torch.rand(d_in, generator=g)


def _taylor(weight: torch.Tensor, stats: ModuleStats) -> Scores:
    _require(stats, "taylor_rows", "taylor_cols")
    return stats.taylor_rows.abs(), stats.taylor_cols.abs()


def _fisher(weight: torch.Tensor, stats: ModuleStats) -> Scores:
    _require(stats, "taylor_rows_sq", "taylor_cols_sq")
    return stats.taylor_rows_sq.clone(), stats.taylor_cols_sq.clone()


def _taylor_abs(weight: torch.Tensor, stats: ModuleStats) -> Scores:
    _require(stats, "grad_sum")
    wg = (_w(weight, stats.grad_sum).to(stats.grad_sum.device) * stats.grad_sum).abs()
    return wg.sum(1), wg.sum(0)


def _hessian(weight: torch.Tensor, stats: ModuleStats) -> Scores:
    _require(stats, "hessian_rows", "hessian_cols")
    return stats.hessian_rows.clone(), stats.hessian_cols.clone()


def _wanda(weight: torch.Tensor, stats: ModuleStats) -> Scores:
    _require(stats, "input_sq")
    norms = stats.input_sq.clamp_min(0).sqrt()
    w = _w(weight, norms).to(norms.device).abs()
    return w @ norms, w.sum(0) * norms


def _zo_taylor(weight: torch.Tensor, stats: ModuleStats) -> Scores:
    _require(stats, "zo_rows", "zo_cols")
    return stats.zo_rows.abs(), stats.zo_cols.abs()


def _class_taylor(weight: torch.Tensor, stats: ModuleStats) -> Scores:
    _require(stats, "class_rows", "class_cols", "class_counts")
    seen = stats.class_counts > 0
    if not bool(seen.any()):
        raise ValueError("class_taylor saw no labelled example")

    def quantile_mean(per_class: torch.Tensor) -> torch.Tensor:
        ranks = [normalize_scores(per_class[c].abs(), "rank") for c in torch.nonzero(seen)[:, 0]]
        return torch.stack(ranks).mean(0)

    return quantile_mean(stats.class_rows), quantile_mean(stats.class_cols)


METRICS: dict[str, FunctionMetric] = {}


def register_metric(name: str, fn: Callable[[torch.Tensor, ModuleStats], Scores],
                    needs: frozenset[str] | set[str] | tuple[str, ...] = (),
                    description: str = "") -> FunctionMetric:
    """Add a metric to :data:`METRICS` (``needs`` from ``STAT_KINDS``).

    >>> register_metric("l1_cols_only", lambda w, s: (w.abs().sum(1), None))
    """
    unknown = set(needs) - set(STAT_KINDS)
    if unknown:
        raise ValueError(f"Unknown statistics {sorted(unknown)}; choose from {STAT_KINDS}")
    metric = FunctionMetric(name, fn, frozenset(needs), description)
    METRICS[name] = metric
    return metric


register_metric("l1", _l1, (), "L1 norm of each row")
register_metric("l2", _l2, (), "L2 norm of each row")
register_metric("taylor", _taylor, {"taylor"}, "|sum_j w_ij g_ij|, g summed over batches")
register_metric("taylor_abs", _taylor_abs, {"grad_sum"}, "sum_j |w_ij g_ij|")
register_metric("fisher", _fisher, {"taylor"}, "sum over batches of (sum_j w_ij g_ij)^2")
register_metric("hessian", _hessian, {"grad_sq"}, "OBD: sum_j w_ij^2 sum_b g_ij^2")
register_metric("wanda", _wanda, {"input_sq"}, "sum_j |w_ij| ||X_j||")
register_metric("zo_taylor", _zo_taylor, {"zo"}, "taylor with an SPSA gradient estimate")
register_metric("class_taylor", _class_taylor, {"class"},
                "per-class taylor combined by the mean of quantiles")
register_metric("random", _random, (), "seeded uniform baseline")


def get_metric(metric: str | FunctionMetric) -> FunctionMetric:
    """The registered metric called ``metric`` (or ``metric`` itself if already one)."""
    if not isinstance(metric, str):
        if not callable(metric) or not hasattr(metric, "needs"):
            raise TypeError("metric must be a name from METRICS or a metric object with "
                            "`needs` and `__call__(weight, stats)`")
        return metric
    try:
        return METRICS[metric]
    except KeyError:
        raise ValueError(f"Unknown metric {metric!r}; valid names: "
                         f"{', '.join(sorted(METRICS))}") from None
