"""Importance metrics: small objects that own their settings, in a registry by name.

A metric turns one module's weight ``W`` ([d_out, d_in], ``targets.row_weight``) and the
statistics the calibration pass gathered for it (:class:`ModuleStats`, see
``scoring.statistics``) into row scores [d_out] and input-column scores [d_in] (higher =
more important)::

    rows, cols = Taylor()(weight, stats)          # what score() does per module
    score(model, batches, metric=ClassTaylor(aggregate="topk", k=3))

``metric.needs`` names the statistics (``statistics.STATISTICS``); metrics needing none run
without data. Adding a metric = one small object with ``name``, ``needs`` and
``__call__(weight, stats)`` (plus its test); :func:`register_metric` puts it in
:data:`METRICS` under a name.

Definitions, as in the authors' code (``CenjhihLi/sparsity_finetuning``,
``methods/finetuner_importance.py``). ``G`` = sum over calibration batches of dL/dW (batch-mean
loss); ``g^e`` = the gradient of example e's own loss; column scores are the same formula
with the sum over rows ``i`` instead of columns ``j`` (the authors' "in channel" mode):

    l1                     sum_j |w_ij|
    l2                     sum_j w_ij^2            (the authors' p=2 norm importance: no sqrt)
    taylor                 sum_j |w_ij G_ij|       (the paper's default, multivariable=False)
    taylor_multivariable   |sum_j w_ij G_ij|       (Taylor(multivariable=True))
    fisher                 sum_b (sum_j w_ij G^b_ij)^2          (not in the authors' code)
    hessian                sum_j w_ij^2 mean_e (g^e_ij)^2       (OBD, per-example squares)
    wanda                  sum_j |w_ij| ||X_j||_2   (Wanda's |W| * ||X||; see Wanda below)
    zo_taylor              sum_j |w_ij Ghat_ij|, Ghat the SPSA estimate of G
    class_taylor           agg_c sum_j |w_ij G^c_ij|, G^c = mean over class-c examples of g^e
    taylor2_class          agg_c sum_j |w_ij G^c_ij + w_ij^2 H^c_ij|, H^c = mean (g^e)^2
    random                 uniform in [0, 1), seeded per module

``agg`` over the classes seen in the data: ``max`` (default), ``mean``, ``topk`` (mean of the
k largest), ``topk_mean`` (average of that and the mean), ``quantiles`` (mean of the 11
quantiles 0, 0.1, ..., 1), ``upper_quantiles`` (mean of the quantiles 0.5, 0.6, ..., 1).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .statistics import STATISTICS

Scores = tuple[torch.Tensor, torch.Tensor | None]

GRADIENT_SOURCES = frozenset({"gradient", "example_gradient"})


@dataclass
class ModuleStats:
    """The finished statistics of one target module: ``values[name]`` per statistic
    (float32, float64 for float64 models), this module's ``seed`` (``random``), the examples
    seen and, for class statistics, ``class_counts`` [C].

    >>> stats["grad_sum"]            # same as stats.values["grad_sum"]
    """

    seed: int = 0
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    n_examples: int = 0
    class_counts: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.values[name]
        except KeyError:
            raise ValueError(f"ModuleStats lacks {name!r}: the calibration pass did not "
                             "collect what this metric needs (run it through score()).") from None

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.values)


class Metric:
    """Base of the metric objects: ``name``, ``needs`` (statistic names) and
    ``__call__(weight, stats) -> (rows, cols)``. Settings are dataclass fields."""

    name: str = ""
    needs: frozenset[str] = frozenset()

    def __call__(self, weight: torch.Tensor, stats: ModuleStats) -> Scores:
        raise NotImplementedError

    @property
    def needs_data(self) -> bool:
        return bool(self.needs)

    @property
    def needs_gradients(self) -> bool:
        return any(STATISTICS[n].source in GRADIENT_SOURCES for n in self.needs
                   if n in STATISTICS)

    def settings(self) -> dict[str, Any]:
        """The metric's settings (JSON-friendly), recorded in the report's meta."""
        try:
            return {k: v for k, v in asdict(self).items()
                    if k not in ("name", "needs", "fn", "description")}
        except TypeError:
            return {}


def _w(weight: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    dtype = like.dtype if like is not None else (
        torch.float64 if weight.dtype == torch.float64 else torch.float32)
    w = weight.detach().to(dtype)
    return w.to(like.device) if like is not None else w


def _abs_rows_cols(t: torch.Tensor) -> Scores:
    t = t.abs()
    return t.sum(-1), t.sum(-2)


# ------------------------------------------------------------------ weight-only
@dataclass(frozen=True)
class Magnitude(Metric):
    """``sum_j |w_ij|^p`` (``p=1``: l1; ``p=2``: l2, no square root, as the authors)."""

    p: int = 2

    @property
    def name(self) -> str:
        return f"l{self.p}"

    def __call__(self, weight, stats):
        w = _w(weight).abs().pow(self.p)
        return w.sum(1), w.sum(0)


@dataclass(frozen=True)
class Random(Metric):
    """Uniform in [0, 1), seeded per module (``stats.seed``)."""

    name: str = field(default="random", init=False)

    def __call__(self, weight, stats):
        g = torch.Generator().manual_seed(int(stats.seed))
        d_out, d_in = weight.shape
        return torch.rand(d_out, generator=g), torch.rand(d_in, generator=g)


# ------------------------------------------------------------------ gradient
@dataclass(frozen=True)
class Taylor(Metric):
    """First-order Taylor: ``sum_j |w_ij G_ij|`` (the paper's default), or
    ``|sum_j w_ij G_ij|`` with ``multivariable=True`` (the whole row moved at once).

    The default needs ``sum_b G`` for every target (a float32 buffer the size of the target
    weights); the multivariable form only two vectors per target.
    """

    multivariable: bool = False

    @property
    def name(self) -> str:
        return "taylor_multivariable" if self.multivariable else "taylor"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"wg_rows", "wg_cols"} if self.multivariable else {"grad_sum"})

    def __call__(self, weight, stats):
        if self.multivariable:
            return stats["wg_rows"].abs(), stats["wg_cols"].abs()
        g = stats["grad_sum"]
        return _abs_rows_cols(_w(weight, g) * g)


@dataclass(frozen=True)
class Fisher(Metric):
    """``sum_b (sum_j w_ij G^b_ij)^2`` over calibration batches (not in the authors' code)."""

    name: str = field(default="fisher", init=False)
    needs: frozenset[str] = field(default=frozenset({"wg_rows_sq", "wg_cols_sq"}), init=False)

    def __call__(self, weight, stats):
        return stats["wg_rows_sq"].clone(), stats["wg_cols_sq"].clone()


@dataclass(frozen=True)
class Hessian(Metric):
    """Optimal Brain Damage with the empirical Fisher diagonal:
    ``sum_j w_ij^2 * mean_e (g^e_ij)^2`` over calibration examples ``e``."""

    name: str = field(default="hessian", init=False)
    needs: frozenset[str] = field(default=frozenset({"grad_sq_mean"}), init=False)

    def __call__(self, weight, stats):
        h = stats["grad_sq_mean"]
        t = _w(weight, h).square() * h
        return t.sum(1), t.sum(0)


@dataclass(frozen=True)
class Wanda(Metric):
    """``sum_j |w_ij| ||X_j||_2`` (Sun et al.'s |W| * ||X|| summed over the row; columns:
    ``||X_j|| sum_i |w_ij|``). ``||X_j||`` over the unmasked calibration tokens."""

    name: str = field(default="wanda", init=False)
    needs: frozenset[str] = field(default=frozenset({"input_sq"}), init=False)

    def __call__(self, weight, stats):
        norms = stats["input_sq"].clamp_min(0).sqrt()
        w = _w(weight, norms).abs()
        return w @ norms, w.sum(0) * norms


@dataclass(frozen=True)
class ZerothOrderTaylor(Metric):
    """Taylor with the gradient estimated from forward passes only (SPSA, as the authors):
    ``n_estimate x data_split`` Gaussian directions ``z_k``, each evaluated on its own slice
    of the calibration data (batch ``b`` belongs to slice ``b mod data_split``; with fewer
    batches than ``data_split``, one batch per slice);
    ``Ghat = mean_k [(L_k(W + eps z_k) - L_k(W - eps z_k)) / (2 eps)] z_k``, ``L_k`` the mean
    batch loss of the slice. Score ``sum_j |w_ij Ghat_ij|`` (``|sum_j ...|`` if multivariable).
    Only the target weights are perturbed.
    """

    eps: float = 1e-3
    n_estimate: int = 2
    data_split: int = 256
    multivariable: bool = False

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"ZerothOrderTaylor: eps must be > 0, got {self.eps!r}")
        for k in ("n_estimate", "data_split"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ZerothOrderTaylor: {k} must be a positive int, got {v!r}")

    @property
    def name(self) -> str:
        return "zo_taylor"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"zo_grad"})

    def __call__(self, weight, stats):
        g = stats["zo_grad"]
        wg = _w(weight, g) * g
        if self.multivariable:
            return wg.sum(1).abs(), wg.sum(0).abs()
        return _abs_rows_cols(wg)


# ------------------------------------------------------------------ label-wise
AGGREGATES = ("max", "mean", "topk", "topk_mean", "quantiles", "upper_quantiles")


def aggregate_classes(per_class: torch.Tensor, how: str, k: int = 5) -> torch.Tensor:
    """Reduce ``[C, n]`` per-class scores over the classes (dim 0) as the authors'
    label aggregators do (see :data:`AGGREGATES`)."""
    x = per_class
    if how == "max":
        return x.max(0).values
    if how == "mean":
        return x.mean(0)
    if how in ("topk", "topk_mean"):
        top = x.topk(min(int(k), x.shape[0]), dim=0).values.mean(0)
        return top if how == "topk" else (top + x.mean(0)) / 2
    if how in ("quantiles", "upper_quantiles"):
        start = 0 if how == "quantiles" else 5
        q = torch.tensor([i / 10 for i in range(start, 11)], dtype=x.dtype, device=x.device)
        return torch.quantile(x, q, dim=0).mean(0)
    raise ValueError(f"Unknown class aggregate {how!r}; choose one of {AGGREGATES}")


@dataclass(frozen=True)
class ClassTaylor(Metric):
    """Label-wise Taylor: per class c, ``s_ci = sum_j |w_ij G^c_ij|`` (``G^c`` the mean
    gradient of the class-c examples), then an aggregate over the classes seen
    (``aggregate`` in :data:`AGGREGATES`, ``k`` for the top-k ones).

    Memory: one float32 [d_out, d_in] accumulator per class and target (C times the target
    weights): meant for classifiers with few classes.
    """

    aggregate: str = "max"
    k: int = 5
    multivariable: bool = False

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"Unknown class aggregate {self.aggregate!r}; choose one of "
                             f"{AGGREGATES}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")

    name = "class_taylor"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"class_grad"})

    def per_class(self, weight: torch.Tensor, stats: ModuleStats) -> torch.Tensor:
        g = stats["class_grad"]
        return _w(weight, g).unsqueeze(0) * g               # [C, d_out, d_in]

    def __call__(self, weight, stats):
        seen = _seen(stats)
        t = self.per_class(weight, stats)[seen]
        if self.multivariable:
            rows, cols = t.sum(2).abs(), t.sum(1).abs()
        else:
            t = t.abs()
            rows, cols = t.sum(2), t.sum(1)
        return (aggregate_classes(rows, self.aggregate, self.k),
                aggregate_classes(cols, self.aggregate, self.k))


@dataclass(frozen=True)
class SecondOrderClassTaylor(ClassTaylor):
    """The authors' ``SecondTaylorLabelImportance``: per class c,
    ``s_ci = sum_j |w_ij G^c_ij + w_ij^2 H^c_ij|`` (``H^c`` the mean squared per-example
    gradient of class c), then the class aggregate. Two per-class accumulators per target."""

    name = "taylor2_class"

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"class_grad", "class_grad_sq"})

    def per_class(self, weight, stats):
        g, h = stats["class_grad"], stats["class_grad_sq"]
        w = _w(weight, g).unsqueeze(0)
        return w * g + w.square() * h


def _seen(stats: ModuleStats) -> torch.Tensor:
    counts = stats.class_counts
    if counts is None or not bool((counts > 0).any()):
        raise ValueError("class metrics saw no labelled example")
    return torch.nonzero(counts > 0)[:, 0]


# ------------------------------------------------------------------ adapter for functions
@dataclass(frozen=True)
class FunctionMetric(Metric):
    """A metric from a plain function ``fn(weight, stats) -> (rows, cols)``."""

    name: str = ""
    fn: Callable[[torch.Tensor, ModuleStats], Scores] | None = None
    needs: frozenset[str] = frozenset()
    description: str = ""

    def __call__(self, weight, stats):
        return self.fn(weight, stats)


METRICS: dict[str, Metric] = {}
ALIASES: dict[str, tuple[str, str]] = {
    "taylor_abs": ("taylor", "metric 'taylor_abs' is now the default 'taylor' (sum_j |w_ij g_ij|, "
                             "the paper's); use metric='taylor'."),
}


def register_metric(name: str, fn: Metric | Callable[[torch.Tensor, ModuleStats], Scores],
                    needs: frozenset[str] | set[str] | tuple[str, ...] = (),
                    description: str = "") -> Metric:
    """Add a metric to :data:`METRICS`: a :class:`Metric` object, or a function
    ``fn(weight, stats)`` with the statistics it ``needs`` (names from ``STATISTICS``).

    >>> register_metric("l1_rows_only", lambda w, s: (w.abs().sum(1), None))
    """
    if isinstance(fn, Metric):
        METRICS[name] = fn
        return fn
    unknown = set(needs) - set(STATISTICS)
    if unknown:
        raise ValueError(f"Unknown statistics {sorted(unknown)}; choose from {sorted(STATISTICS)}")
    metric = FunctionMetric(name, fn, frozenset(needs), description)
    METRICS[name] = metric
    return metric


for _m in (Magnitude(1), Magnitude(2), Taylor(), Taylor(multivariable=True), Fisher(), Hessian(),
           Wanda(), ZerothOrderTaylor(), ClassTaylor(), SecondOrderClassTaylor(), Random()):
    register_metric(_m.name, _m)


def get_metric(metric: str | Metric) -> Metric:
    """The registered metric called ``metric`` (or ``metric`` itself if already one).
    Deprecated aliases (``taylor_abs``) warn and resolve to their new name."""
    if not isinstance(metric, str):
        if not callable(metric) or not hasattr(metric, "needs"):
            raise TypeError("metric must be a name from METRICS or a metric object with "
                            "`needs` and `__call__(weight, stats)`")
        return metric
    if metric in ALIASES:
        target, message = ALIASES[metric]
        warnings.warn(message, DeprecationWarning, stacklevel=3)
        metric = target
    try:
        return METRICS[metric]
    except KeyError:
        raise ValueError(f"Unknown metric {metric!r}; valid names: "
                         f"{', '.join(sorted(METRICS))}") from None
