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
        state = ImportanceState(reports[name], max_columns=240)
        state.set_normalization("mean"); state.set_log_scale(True)
        hm = state.heatmap()
        np.testing.assert_array_equal(np.asarray(trace.z, dtype=float), hm.z.astype(np.float32))
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


def test_training_logs_read_as_numbers_not_quoted_strings():
    from rowsft_nb.progress import format_logs

    assert format_logs(10, {"loss": 0.681912, "grad_norm": 0.5, "learning_rate": 1e-4,
                            "epoch": 0.5, "total_flos": 123.0}) == \
        "step 10: loss 0.6819, grad_norm 0.5, learning_rate 0.0001, epoch 0.5"
    line = format_logs(4, {"train_runtime": 39.6912, "train_samples_per_second": 1.6,
                           "train_steps_per_second": 0.1, "train_loss": 0.68861, "epoch": 1.0})
    assert line == "training done: 4 steps in 39.69 s, loss 0.6886, epoch 1"
    assert "'" not in line
