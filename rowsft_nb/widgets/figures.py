"""Static plotly figures of importance reports, for notebooks and docs (no widgets).

The heatmap is the one the ImportanceExplorer draws (one row per layer, each block of columns
a module type, each cell the mean score of a bin of neurons), with two things a printed page
needs: white separators between the module blocks, and a colour range per metric taken from
robust percentiles, so that each metric's own contrast shows (one shared range makes
near-flat metrics look uniform) and a few bright neurons stand out.

Usage::

    from rowsft_nb.widgets.figures import heatmap_figure
    heatmap_figure(report).show()                                  # one metric
    heatmap_figure({"taylor": rt, "l2": rl}).show()                # stacked, one scale each
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..scoring.report import ImportanceReport
from .importance import ImportanceState

__all__ = ["heatmap_figure", "color_range"]


def color_range(z: np.ndarray, low: float = 1.0, high: float = 99.5) -> tuple[float, float]:
    """``(zmin, zmax)`` from the ``low``/``high`` percentiles of the finite cells of ``z``.

    >>> color_range(np.array([[0.0, 1.0], [np.nan, 2.0]]), 0, 100)
    (0.0, 2.0)
    """
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [low, high]))
    if hi <= lo:
        hi = lo + 1e-12
    return lo, hi


def heatmap_figure(reports: ImportanceReport | Mapping[str, ImportanceReport], *,
                   normalization: str = "mean", log: bool = True, order: str = "index",
                   max_columns: int = 240, title: str | None = None,
                   row_height: int = 26):
    """A static heatmap of one report, or of several stacked (one colour scale per metric).

    ``normalization``/``log``/``order`` are the explorer's settings (scores divided by each
    module's mean, log10, neurons in index order by default). Returns a ``go.Figure``.

    >>> heatmap_figure(report, title="Taylor importance").show()
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if isinstance(reports, ImportanceReport):
        reports = {reports.metric: reports}
    if not reports:
        raise ValueError("heatmap_figure needs at least one ImportanceReport")
    names = list(reports)
    maps = []
    for name in names:
        state = ImportanceState(reports[name], max_columns=max_columns)
        state.set_normalization(normalization)
        state.set_order(order)
        state.set_log_scale(log)
        maps.append(state.heatmap())
    n = len(names)
    gap = 0.06 if n > 1 else 0.0
    fig = make_subplots(rows=n, cols=1, vertical_spacing=gap,
                        subplot_titles=names if n > 1 else None)
    height_each = max(120, row_height * len(maps[0].row_labels) + 40)
    for i, (name, hm) in enumerate(zip(names, maps), start=1):
        zmin, zmax = color_range(hm.z)
        # this subplot's vertical extent, for its own colour bar
        top = 1 - (i - 1) * (1 + gap) / n if n > 1 else 1.0
        span = (1 - gap * (n - 1)) / n
        # no per-cell hover text: it would store a string per cell in the notebook (MBs);
        # the interactive explorer has the full hover
        fig.add_trace(go.Heatmap(
            z=hm.z.astype(np.float32), y=hm.row_labels,
            hovertemplate=f"%{{y}}, column %{{x}}<br>{hm.value_label} %{{z:.3g}}<extra></extra>",
            coloraxis=f"coloraxis{i if i > 1 else ''}"), row=i, col=1)
        fig.update_layout({f"coloraxis{i if i > 1 else ''}": dict(
            colorscale="Viridis", cmin=zmin, cmax=zmax,
            colorbar=dict(title=dict(text=hm.value_label, side="right"), len=span * 0.95,
                          y=top - span / 2, yanchor="middle", thickness=12))})
        centers = [(a + b - 1) / 2 for _, a, b in hm.type_spans]
        labels = [t.replace("attention.", "attn.") for t, _, _ in hm.type_spans]
        fig.update_xaxes(tickvals=centers, ticktext=labels if i == n else [""] * len(labels),
                         row=i, col=1)
        fig.update_yaxes(autorange="reversed", row=i, col=1)
        xref = "x" if i == 1 else f"x{i}"
        yref = "y domain" if i == 1 else f"y{i} domain"
        for _, a, _ in hm.type_spans[1:]:
            fig.add_shape(type="line", x0=a - 0.5, x1=a - 0.5, y0=0, y1=1, xref=xref, yref=yref,
                          line=dict(color="white", width=2))
    fig.update_layout(height=height_each * n + 60, margin=dict(l=60, r=20, t=50, b=40),
                      title=title)
    return fig
