"""Importance explorer: a heatmap of neuron scores per layer and module type, a drill-down
into one module's per-neuron profile (with a plan's rows marked), and how concentrated
importance is per layer.

All logic lives in :class:`ImportanceState` (plain Python, tested without a browser);
:class:`ImportanceExplorer` binds it to ipywidgets and plotly ``FigureWidget`` s.

Usage::

    from rowsft_nb.widgets import ImportanceExplorer
    ImportanceExplorer({"taylor": taylor_report, "wanda": wanda_report}, plan=plan)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..plan import RowPlan
from ..scoring.report import ImportanceReport
from ..targets import module_type
from ._common import (apply_or_message, explorer_box, figure_box, figure_widget, layer_key,
                      layer_label, types_in_order)

NORMALIZATIONS = ("none", "mean", "max", "rank")
ORDERS = ("index", "sorted")
CDF_POINTS = 101


@dataclass
class HeatmapData:
    """What the heatmap draws: ``z[row, col]`` (NaN where a layer lacks that module),
    row labels, per-column type and neuron range, hover text per cell."""

    z: np.ndarray
    rows: list[int]                     # layer keys (-1 = outside the blocks)
    row_labels: list[str]
    column_types: list[str]
    column_ranges: list[tuple[int, int]]   # [start, end) neuron indices (ranks when sorted)
    type_spans: list[tuple[str, int, int]]  # (type, first column, last column + 1)
    customdata: np.ndarray              # [rows, cols, 3]: module name, neuron range text,
                                        # raw (un-normalized, linear) score of the bin
    colorbar_title: str
    value_label: str = "score"          # what z is, e.g. "log10(score/mean)"
    hovertemplate: str = ""             # says what is plotted and shows the raw score


@dataclass
class ProfileData:
    """One module's full per-neuron scores with the plan's selected rows marked."""

    module: str
    scores: np.ndarray                  # [d_out], normalized as the heatmap
    selected: np.ndarray                # int64 row indices from the plan (may be empty)
    covered: float                      # share of the module's (non-negative) score mass selected
    raw: np.ndarray | None = None       # [d_out] un-normalized scores (hover)
    title: str = ""                     # two short lines: module, then selection summary
    marks_label: str = "selected rows"  # legend of the marks: which plan / metric they come from
    hovertemplate: str = ""             # says what is plotted and shows the raw score


@dataclass
class ConcentrationData:
    """Per layer: share of importance held by the top fraction of neurons (a Lorenz-style
    curve from 0 to 1) and the Gini coefficient."""

    fraction: np.ndarray                # [CDF_POINTS] fraction of neurons, 0..1
    curves: dict[int, np.ndarray]       # layer key -> [CDF_POINTS] share of score mass
    gini: dict[int, float]
    labels: dict[int, str] | None = None  # layer key -> legend label ("layer 3 (gini 0.41)")
    note: str = ""                      # one line when the curves need explaining (rank)


class ImportanceState:
    """Everything the importance explorer shows, computed from one or several reports.

    Usage::

        state = ImportanceState({"taylor": report}, plan=plan)
        state.set_normalization("rank"); state.set_types(["self_attn.q_proj"])
        module = state.select_cell(row=0, col=3)      # the module a heatmap cell belongs to
        state.profile().selected                       # the plan's rows of that module
    """

    def __init__(self, reports: ImportanceReport | Mapping[str, ImportanceReport],
                 plan: RowPlan | None = None, max_columns: int = 256, *,
                 metric: str | None = None, normalization: str = "none",
                 log_scale: bool = False, order: str = "index") -> None:
        if isinstance(reports, ImportanceReport):
            reports = {reports.metric: reports}
        reports = dict(reports)
        if not reports:
            raise ValueError("ImportanceState needs at least one ImportanceReport")
        for key, rep in reports.items():
            if not isinstance(rep, ImportanceReport):
                raise ValueError(f"reports[{key!r}] is a {type(rep).__name__}, not an "
                                 "ImportanceReport; pass rowsft_nb.score(...) results")
        if max_columns < 1:
            raise ValueError(f"max_columns must be >= 1, got {max_columns}")
        self.reports = reports
        self.max_columns = int(max_columns)
        # Open on the metric the plan was selected by, so its marks sit on the plotted peaks.
        plan_metric = _plan_metric(plan)
        if metric is None:
            metric = plan_metric if plan_metric in reports else next(iter(reports))
        if metric not in reports:
            raise ValueError(f"Unknown metric {metric!r}; available: {list(reports)}")
        self.metric = metric
        self.set_normalization(normalization)
        self.set_log_scale(log_scale)
        self.set_order(order)
        self.types = self.available_types()
        self.module: str | None = reports[self.metric].modules[0] if \
            reports[self.metric].modules else None
        self.plan: RowPlan | None = None
        self._normalized: dict[tuple[str, str], ImportanceReport] = {}
        if plan is not None:
            self.set_plan(plan)

    # ------------------------------------------------------------------ controls
    @property
    def report(self) -> ImportanceReport:
        """The current report, normalized as chosen."""
        key = (self.metric, self.normalization)
        if key not in self._normalized:
            base = self.reports[self.metric]
            self._normalized[key] = base if self.normalization == "none" else \
                base.normalized(self.normalization)
        return self._normalized[key]

    def available_types(self) -> list[str]:
        """Module types (``self_attn.q_proj``, ``mlp.up_proj``...) of the current report."""
        return types_in_order(self.reports[self.metric].modules)

    def set_metric(self, metric: str) -> None:
        if metric not in self.reports:
            raise ValueError(f"Unknown metric {metric!r}; available: {list(self.reports)}")
        self.metric = metric
        kept = [t for t in self.types if t in self.available_types()]
        self.types = kept or self.available_types()
        if self.module is not None and self.module not in self.reports[metric].scores:
            self.module = None

    def set_normalization(self, kind: str) -> None:
        if kind not in NORMALIZATIONS:
            raise ValueError(f"Unknown normalization {kind!r}; choose one of {NORMALIZATIONS}")
        self.normalization = kind

    def set_types(self, types: list[str] | tuple[str, ...]) -> None:
        """Show only these module types (at least one)."""
        available = self.available_types()
        unknown = [t for t in types if t not in available]
        if unknown:
            raise ValueError(f"Unknown module type(s) {unknown}; available: {available}")
        if not types:
            raise ValueError("Select at least one module type to show")
        self.types = [t for t in available if t in types]

    def set_log_scale(self, on: bool) -> None:
        self.log_scale = bool(on)

    def set_order(self, order: str) -> None:
        """``index``: neurons binned in index order; ``sorted``: by descending score."""
        if order not in ORDERS:
            raise ValueError(f"Unknown order {order!r}; choose one of {ORDERS}")
        self.order = order

    def set_plan(self, plan: RowPlan | None) -> None:
        """Mark this plan's rows in the profile (``None`` clears it)."""
        if plan is not None:
            shapes = self.reports[self.metric].shapes
            bad = [n for n in plan.rows if n in shapes and tuple(plan.shapes[n]) != shapes[n]]
            if bad:
                raise ValueError(f"Plan shapes differ from the report for {bad[:3]}: the plan "
                                 "was made for another model")
        self.plan = plan

    @property
    def plan_metric(self) -> str | None:
        """The metric the plan's rows were selected by (``plan.meta['metric']``), if known."""
        return _plan_metric(self.plan)

    def marks_label(self) -> str:
        """Legend of the profile's marks: which metric's plan they come from (and a warning
        when another metric is plotted: then the marks need not sit on the peaks)."""
        pm = self.plan_metric
        if pm is None:
            return "selected rows (plan)"
        if pm == self.metric:
            return f"rows selected by {pm}"
        return f"rows selected by {pm} (plotted: {self.metric})"

    def value_label(self) -> str:
        """What the heatmap and profile plot: ``score``, ``score/mean``, ``rank/n``...,
        wrapped in ``log10(...)`` when the log scale is on."""
        base = {"none": "score", "mean": "score/mean", "max": "score/max",
                "rank": "rank/n"}[self.normalization]
        return f"log10({base})" if self.log_scale else base

    def select_module(self, name: str) -> None:
        if name not in self.report.scores:
            raise ValueError(f"Module {name!r} is not in the {self.metric!r} report")
        self.module = name

    # ------------------------------------------------------------------ heatmap
    def _grid(self) -> tuple[list[int], dict[tuple[int, str], str]]:
        """Layer keys (sorted) and (layer, type) -> module name for the visible types."""
        grid: dict[tuple[int, str], str] = {}
        for name in self.report.modules:
            t = module_type(name)
            if t in self.types:
                grid[(layer_key(name), t)] = name
        rows = sorted({k for k, _ in grid})
        return rows, grid

    def _bins_per_type(self, grid: dict[tuple[int, str], str]) -> dict[str, int]:
        per_type = max(1, self.max_columns // max(1, len(self.types)))
        bins = {}
        for t in self.types:
            sizes = [self.report.shapes[n][0] for (_, tt), n in grid.items() if tt == t]
            bins[t] = max(1, min(per_type, min(sizes)))
        return bins

    def heatmap(self) -> HeatmapData:
        """Binned scores: one row per layer, at most ``max_columns`` columns in all."""
        rows, grid = self._grid()
        bins = self._bins_per_type(grid)
        n_cols = sum(bins.values())
        z = np.full((len(rows), n_cols), np.nan)
        custom = np.full((len(rows), n_cols, 3), "", dtype=object)
        base = self.reports[self.metric]
        column_types: list[str] = []
        column_ranges: list[tuple[int, int]] = []
        spans: list[tuple[str, int, int]] = []
        col0 = 0
        for t in self.types:
            b = bins[t]
            spans.append((t, col0, col0 + b))
            ranges_t = None
            for ri, layer in enumerate(rows):
                name = grid.get((layer, t))
                if name is None:
                    continue
                means, edges = bin_means(self.report.scores[name], b, self.order == "sorted")
                z[ri, col0:col0 + b] = means
                raw = means if self.normalization == "none" else \
                    bin_means(base.scores[name], b, self.order == "sorted")[0]
                ranges = list(zip(edges[:-1].tolist(), edges[1:].tolist()))
                ranges_t = ranges_t or ranges
                what = "ranks" if self.order == "sorted" else "neurons"
                for j, (a, e) in enumerate(ranges):
                    custom[ri, col0 + j, 0] = name
                    custom[ri, col0 + j, 1] = f"{what} {a}" if e - a == 1 else f"{what} {a}-{e - 1}"
                    custom[ri, col0 + j, 2] = float(raw[j])
            column_types += [t] * b
            column_ranges += ranges_t or [(0, 0)] * b
            col0 += b
        title = f"{self.metric} ({self.normalization})"
        if self.log_scale:
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(z > 0, np.log10(np.where(z > 0, z, 1.0)), np.nan)
            title = f"log10 {title}"
        label = self.value_label()
        hover = "%{customdata[0]}<br>%{customdata[1]}<br>"
        if label == "score":
            hover += f"{self.metric} score %{{z:.4g}}"
        else:   # say what is plotted, and show the raw score next to it
            hover += f"{label} %{{z:.4g}}<br>{self.metric} score %{{customdata[2]:.4g}}"
        return HeatmapData(z=z, rows=rows, row_labels=[layer_label(r) for r in rows],
                           column_types=column_types, column_ranges=column_ranges,
                           type_spans=spans, customdata=custom, colorbar_title=title,
                           value_label=label, hovertemplate=hover + "<extra></extra>")

    def cell_module(self, row: int, col: int) -> str | None:
        """Module drawn in heatmap cell (row, col), None where the layer lacks it."""
        rows, grid = self._grid()
        bins = self._bins_per_type(grid)
        if not (0 <= row < len(rows)) or not (0 <= col < sum(bins.values())):
            raise ValueError(f"Cell ({row}, {col}) is outside the heatmap "
                             f"({len(rows)} x {sum(bins.values())})")
        for t in self.types:
            if col < bins[t]:
                return grid.get((rows[row], t))
            col -= bins[t]
        return None  # pragma: no cover - col bounds checked above

    def select_cell(self, row: int, col: int) -> str:
        """Drill into the module of a heatmap cell (what a click does); returns its name."""
        name = self.cell_module(row, col)
        if name is None:
            raise ValueError(f"No module in cell ({row}, {col}): that layer has no such type")
        self.module = name
        return name

    # ------------------------------------------------------------------ side plots
    def profile(self, module: str | None = None) -> ProfileData | None:
        """Full per-neuron scores of ``module`` (default: the selected one)."""
        name = module or self.module
        if name is None:
            return None
        s = self.report.scores[name]
        selected = torch.empty(0, dtype=torch.int64)
        if self.plan is not None and name in self.plan.rows:
            selected = self.plan.rows[name]
        mass = s.clamp_min(0)
        total = float(mass.sum())
        covered = float(mass[selected].sum()) / total if total > 0 else 0.0
        raw = self.reports[self.metric].scores[name].numpy().copy()
        if self.plan is None:
            title = f"{name}<br><sup>no plan given: no rows marked</sup>"
        else:   # two short lines, so the title fits the narrow profile plot
            title = (f"{name}<br><sup>{selected.numel()} of {s.numel()} rows selected · "
                     f"{100 * covered:.1f}% of its importance</sup>")
        label = self.value_label()
        hover = (f"neuron %{{x}}<br>{label} %{{y:.4g}}" +
                 ("" if label == "score" else f"<br>{self.metric} score %{{customdata:.4g}}") +
                 "<extra></extra>")
        return ProfileData(module=name, scores=s.numpy().copy(), selected=selected.numpy(),
                           covered=covered, raw=raw, title=title, marks_label=self.marks_label(),
                           hovertemplate=hover)

    def concentration(self) -> ConcentrationData:
        """Per layer (visible types pooled): share of score mass in the top x of neurons."""
        rows, grid = self._grid()
        frac = np.linspace(0.0, 1.0, CDF_POINTS)
        curves, ginis = {}, {}
        for layer in rows:
            names = [n for (lk, _), n in grid.items() if lk == layer]
            s = torch.cat([self.report.scores[n] for n in names])
            curves[layer], ginis[layer] = top_share_curve(s, frac)
        labels = {k: f"{layer_label(k)} (gini {g:.2f})" for k, g in ginis.items()}
        note = ""
        if self.normalization == "rank":
            note = ("Rank normalization turns every module's scores into 1/n, 2/n, ..., 1, so "
                    "all layers draw the same curve (gini ≈ 1/3); choose none, mean or max "
                    "to compare layers.")
        return ConcentrationData(fraction=frac, curves=curves, gini=ginis, labels=labels,
                                 note=note)


def _plan_metric(plan: RowPlan | None) -> str | None:
    return (plan.meta or {}).get("metric") if plan is not None else None


def bin_means(scores: torch.Tensor, n_bins: int, sort: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``scores`` over ``n_bins`` contiguous bins (after a descending sort when
    ``sort``); returns (means, edges) with ``edges[j]:edges[j+1]`` the bin's indices."""
    s = scores.numpy().astype(np.float64)
    if sort:  # numpy: ~50x faster than torch.sort on CPU for these sizes
        s = np.sort(s)[::-1]
    n = s.size
    edges = (np.arange(n_bins + 1, dtype=np.int64) * n) // n_bins
    csum = np.concatenate([[0.0], np.cumsum(s)])
    means = (csum[edges[1:]] - csum[edges[:-1]]) / np.diff(edges)
    return means, edges


def top_share_curve(scores: torch.Tensor, fraction: np.ndarray) -> tuple[np.ndarray, float]:
    """Share of the total (non-negative) mass held by the top ``fraction`` of entries, and
    the Gini coefficient of those entries (0 = uniform, towards 1 = concentrated)."""
    asc = np.sort(np.clip(scores.numpy().astype(np.float64), 0, None))
    n = asc.size
    total = float(asc.sum())
    if n == 0 or total <= 0:
        return fraction.copy(), 0.0
    g = float(2 * np.dot(np.arange(1, n + 1), asc) / (n * total) - (n + 1) / n)
    csum = np.concatenate([[0.0], np.cumsum(asc[::-1])])
    k = np.round(fraction * n).astype(np.int64)
    return csum[k] / total, g


class ImportanceExplorer:
    """Heatmap + drill-down + concentration view over :class:`ImportanceState`.

    Usage: ``ImportanceExplorer(report, plan=plan)`` as the last line of a cell.
    ``explorer.state`` holds all logic; ``explorer.widget`` is the displayed box.
    It opens on the plan's metric, scores divided by each module's mean, log scale (what
    the notebooks' static heatmaps show); pass ``normalization``/``log_scale`` to change it.
    """

    def __init__(self, reports: ImportanceReport | Mapping[str, ImportanceReport],
                 plan: RowPlan | None = None, max_columns: int = 256, *,
                 metric: str | None = None, normalization: str = "mean",
                 log_scale: bool = True, order: str = "index") -> None:
        import ipywidgets as W
        import plotly.graph_objects as go

        self.state = ImportanceState(reports, plan=plan, max_columns=max_columns, metric=metric,
                                     normalization=normalization, log_scale=log_scale,
                                     order=order)
        st = self.state
        self.metric = W.Dropdown(options=list(st.reports), value=st.metric,
                                 description="metric",
                                 layout=W.Layout(display="" if len(st.reports) > 1 else "none"))
        self.normalization = W.ToggleButtons(options=list(NORMALIZATIONS),
                                             value=st.normalization, description="normalize",
                                             style={"button_width": "60px"})
        self.types = W.SelectMultiple(options=st.available_types(), value=tuple(st.types),
                                      description="types", rows=min(7, len(st.types)))
        self.log_scale = W.Checkbox(value=st.log_scale, description="log scale", indent=False)
        self.order = W.Dropdown(options=list(ORDERS), value=st.order, description="neurons")
        self.message = W.HTML()
        self.note = W.HTML().add_class("rowsft-concentration-note")
        self.heat = figure_widget(
            data=[go.Heatmap(colorscale="Viridis")],
            layout=dict(height=420, margin=dict(l=70, r=10, t=30, b=60),
                        title="neuron importance (click a cell)", xaxis=dict(showgrid=False),
                        yaxis=dict(autorange="reversed")))
        self.prof = figure_widget(
            data=[go.Scatter(mode="lines", name="score", line=dict(width=1)),
                  go.Scatter(mode="markers", name="selected rows",
                             marker=dict(color="crimson", size=5, symbol="line-ns-open"))],
            layout=dict(height=300, width=520, margin=dict(l=50, r=10, t=60, b=40),
                        legend=dict(orientation="h", y=-0.25), title_font_size=12,
                        title="click a heatmap cell for a module's profile",
                        xaxis_title="neuron", yaxis_title="score"))
        self.conc = figure_widget(layout=dict(
            height=300, width=460, margin=dict(l=50, r=10, t=60, b=40), showlegend=True,
            legend=dict(x=0.98, xanchor="right", y=0.02, yanchor="bottom", font_size=10,
                        bgcolor="rgba(255,255,255,0.7)"),
            title="importance concentration per layer", title_font_size=12,
            xaxis_title="top fraction of neurons", yaxis_title="share of importance"))
        self.heat.data[0].on_click(self._on_click)
        for w, setter in ((self.metric, st.set_metric), (self.normalization, st.set_normalization),
                          (self.log_scale, st.set_log_scale), (self.order, st.set_order),
                          (self.types, lambda v: st.set_types(list(v)))):
            w.observe(self._handler(w, setter), names="value")
        controls = W.HBox([W.VBox([self.metric, self.normalization, self.order, self.log_scale]),
                           self.types])
        self.widget = explorer_box([controls, self.message, figure_box(self.heat),
                                    W.HBox([figure_box(self.prof), figure_box(self.conc)]),
                                    self.note]).add_class("rowsft-importance")
        self.refresh()

    _syncing = False

    def _handler(self, widget, setter):
        def on_change(change):
            if self._syncing:
                return
            ok = apply_or_message(lambda: setter(change["new"]), self._show)
            self._syncing = True
            try:
                if not ok:  # put the control back to what the state holds
                    widget.value = change["old"]
                elif widget is self.metric:
                    self.types.options = self.state.available_types()
                    self.types.value = tuple(self.state.types)
            finally:
                self._syncing = False
            if ok:  # log scale and order only change how scores are drawn
                self.refresh(concentration=widget not in (self.log_scale, self.order))
        return on_change

    def _show(self, text: str) -> None:
        self.message.value = f"<span style='color:#b00'>{text}</span>" if text else ""

    def _on_click(self, trace, points, selector) -> None:
        if not points.point_inds:
            return
        ind = points.point_inds[0]
        row, col = (ind if isinstance(ind, (list, tuple)) else (points.ys[0], points.xs[0]))
        if isinstance(row, str):
            row = self.state.heatmap().row_labels.index(row)
        if apply_or_message(lambda: self.state.select_cell(int(row), int(col)), self._show):
            self._draw_profile()

    def refresh(self, concentration: bool = True) -> None:
        """Redraw the figures from the state (the concentration plot only when asked)."""
        hm = self.state.heatmap()
        centers = [(a + b - 1) / 2 for _, a, b in hm.type_spans]
        with self.heat.batch_update():
            tr = self.heat.data[0]
            # empty cells are NaN; plotly's widget sends 2-D arrays as JSON, where NaN is
            # invalid, so send them as None (drawn as gaps)
            tr.z = np.where(np.isnan(hm.z), None, hm.z).tolist()
            tr.x = list(range(hm.z.shape[1]))
            tr.y = hm.row_labels
            tr.customdata = hm.customdata
            tr.hovertemplate = hm.hovertemplate
            tr.colorbar = dict(title=dict(text=hm.colorbar_title, side="right"))
            self.heat.layout.xaxis.tickvals = centers
            self.heat.layout.xaxis.ticktext = [t for t, _, _ in hm.type_spans]
            self.heat.layout.shapes = [dict(type="line", x0=a - 0.5, x1=a - 0.5, y0=0, y1=1,
                                            yref="paper", line=dict(color="white", width=2))
                                       for _, a, _ in hm.type_spans[1:]]
        if concentration:
            self._draw_concentration()
        self._draw_profile()

    def _draw_concentration(self) -> None:
        """One labelled line per layer (coloured by depth) and the uniform diagonal."""
        from plotly.colors import sample_colorscale

        conc = self.state.concentration()
        names = [conc.labels[k] for k in conc.curves]
        n = len(names)
        with self.conc.batch_update():
            if len(self.conc.data) != n + 1:
                self.conc.data = []
                self.conc.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="uniform",
                                      line=dict(width=1, dash="dot", color="gray"))
                for i in range(n):
                    color = sample_colorscale("Viridis", i / max(1, n - 1))[0]
                    # a legend entry per layer up to 12 layers; beyond, first/middle/last
                    shown = n <= 12 or i in (0, n // 2, n - 1)
                    self.conc.add_scatter(x=conc.fraction, mode="lines", showlegend=shown,
                                          line=dict(width=1.2, color=color))
            for trace, name, curve in zip(self.conc.data[1:], names, conc.curves.values()):
                trace.y = curve
                trace.name = name
                trace.hovertemplate = (f"{name}<br>top %{{x:.0%}} of neurons hold "
                                       "%{y:.0%} of the importance<extra></extra>")
        self.note.value = f"<i>{conc.note}</i>" if conc.note else ""

    def _draw_profile(self) -> None:
        prof = self.state.profile()
        if prof is None:
            return
        y = prof.scores
        if self.state.log_scale:
            y = np.where(y > 0, np.log10(np.where(y > 0, y, 1.0)), np.nan)
        label = self.state.value_label()
        with self.prof.batch_update():
            self.prof.data[0].x = np.arange(y.size)
            self.prof.data[0].y = y
            self.prof.data[0].customdata = prof.raw
            self.prof.data[0].hovertemplate = prof.hovertemplate
            self.prof.data[0].name = label
            self.prof.data[1].x = prof.selected
            self.prof.data[1].y = y[prof.selected]
            self.prof.data[1].customdata = prof.raw[prof.selected]
            self.prof.data[1].hovertemplate = prof.hovertemplate
            self.prof.data[1].name = prof.marks_label
            self.prof.layout.title = prof.title
            self.prof.layout.yaxis.title = label

    def _ipython_display_(self) -> None:
        from .static import display_explorer

        display_explorer(self.widget)  # live widget + static PNG for readers who do not run it
