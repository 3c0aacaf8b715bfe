"""Static heatmaps for notebooks: one colour scale per metric, module blocks separated."""
import numpy as np
import pytest

from rowsft_nb import testing
from rowsft_nb.scoring import score
from rowsft_nb.widgets import ImportanceState
from rowsft_nb.widgets.figures import color_range, heatmap_figure


def test_color_range_is_the_percentiles_of_the_finite_cells():
    z = np.array([[np.nan, 0.0, 1.0], [2.0, 3.0, -np.inf]])
    assert color_range(z, 0, 100) == (0.0, 3.0)
    lo, hi = color_range(z, 25, 75)
    assert (lo, hi) == pytest.approx(tuple(np.percentile([0.0, 1.0, 2.0, 3.0], [25, 75])))
    assert color_range(np.full((2, 2), np.nan)) == (0.0, 1.0)
    lo, hi = color_range(np.ones((2, 2)))
    assert hi > lo                                    # a flat map still gets a valid range


def test_heatmap_figure_gives_each_metric_its_own_scale_and_separates_blocks():
    model = testing.tiny_llama()
    reports = {m: score(model, metric=m, seed=0, progress=False) for m in ("l2", "random")}
    fig = heatmap_figure(reports)
    assert len(fig.data) == 2
    for i, (name, trace) in enumerate(zip(reports, fig.data), start=1):
        state = ImportanceState(reports[name], max_columns=420)
        state.set_normalization("mean"); state.set_log_scale(True)
        hm = state.heatmap()
        np.testing.assert_array_equal(np.asarray(trace.z, dtype=float), hm.z)
        axis = fig.layout[f"coloraxis{i if i > 1 else ''}"]
        assert trace.coloraxis == f"coloraxis{i if i > 1 else ''}"
        assert (axis.cmin, axis.cmax) == pytest.approx(color_range(hm.z))
        assert axis.colorbar.title.text == "log10(score/mean)"
    # the two metrics' ranges differ: no shared scale flattening one of them
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) != \
        (fig.layout.coloraxis2.cmin, fig.layout.coloraxis2.cmax)
    # one white separator per block boundary in each subplot
    n_types = len(ImportanceState(reports["l2"]).heatmap().type_spans)
    assert len(fig.layout.shapes) == 2 * (n_types - 1)
    assert {s.line.color for s in fig.layout.shapes} == {"white"}


def test_heatmap_figure_of_one_report_and_bad_input():
    model = testing.tiny_bert()
    fig = heatmap_figure(score(model, metric="l1", progress=False), title="L1")
    assert len(fig.data) == 1 and fig.layout.title.text == "L1"
    with pytest.raises(ValueError, match="at least one"):
        heatmap_figure({})
