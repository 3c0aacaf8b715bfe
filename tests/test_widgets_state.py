"""Explorer state objects driven without a browser: every control changes the state as
expected, refused settings leave it unchanged with a message; views bind controls to state."""
import json
import math
import re

import numpy as np
import pytest
import torch
from datasets import Dataset

from rowsft_nb import testing
from rowsft_nb.adapter import adapter_state, load_adapter
from rowsft_nb.plan import RowPlan
from rowsft_nb.scoring.report import gini, normalize_scores
from rowsft_nb.selection import ParamBudget, Ratio, TypeRatios, select
from rowsft_nb.targets import find_targets, linear_shape, module_type
from rowsft_nb.widgets import (BudgetExplorer, BudgetState, ImportanceExplorer,
                               ImportanceState, LaunchState, TrainingLauncher)
from rowsft_nb.widgets._common import layer_label
from rowsft_nb.widgets.launcher import EvalPoint

LLAMA_TYPES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def small_report(seed=0, groups=True):
    """3 layers x (q 16x8, k 8x8, up 24x8) + one module outside the blocks."""
    shapes, grp = {}, {}
    for i in range(3):
        shapes[f"model.layers.{i}.self_attn.q_proj"] = (16, 8)
        shapes[f"model.layers.{i}.self_attn.k_proj"] = (8, 8)
        shapes[f"model.layers.{i}.mlp.up_proj"] = (24, 8)
        grp[f"model.layers.{i}.self_attn.q_proj"] = 4
        grp[f"model.layers.{i}.self_attn.k_proj"] = 4
    shapes["pooler.dense"] = (8, 8)
    return testing.synthetic_report(shapes, seed=seed, groups=grp if groups else None,
                                    model_parameters=10_000)


# ---------------------------------------------------------------------------- importance
def test_heatmap_bins_are_means_of_neuron_ranges():
    rep = small_report()
    st = ImportanceState(rep, max_columns=12)     # 4 types -> 3 columns each
    hm = st.heatmap()
    assert hm.row_labels == ["other", "layer 0", "layer 1", "layer 2"]
    assert [t for t, _, _ in hm.type_spans] == ["self_attn.q_proj", "self_attn.k_proj",
                                                "mlp.up_proj", "pooler.dense"]
    assert hm.z.shape == (4, 12)
    s = rep.scores["model.layers.1.mlp.up_proj"]
    _, a, b = hm.type_spans[2]
    expected = [float(s[j * 8:(j + 1) * 8].mean()) for j in range(3)]
    np.testing.assert_allclose(hm.z[2, a:b], expected, rtol=1e-6)
    assert hm.column_ranges[a:b] == [(0, 8), (8, 16), (16, 24)]
    assert hm.customdata[2, a, 0] == "model.layers.1.mlp.up_proj"
    assert hm.customdata[2, a + 1, 1] == "neurons 8-15"
    # pooler only exists in the "other" row; the other rows are empty there
    _, pa, pb = hm.type_spans[3]
    assert np.isnan(hm.z[1:, pa:pb]).all() and not np.isnan(hm.z[0, pa:pb]).any()
    assert np.isnan(hm.z[0, :pa]).all()


def test_sorted_order_bins_descending_scores():
    rep = small_report()
    st = ImportanceState(rep, max_columns=12)
    st.set_order("sorted")
    hm = st.heatmap()
    s = torch.sort(rep.scores["model.layers.0.self_attn.q_proj"], descending=True).values
    _, a, b = hm.type_spans[0]
    edges = [0, 5, 10, 16]   # 16 rows into 3 bins: (i * 16) // 3
    expected = [float(s[edges[j]:edges[j + 1]].mean()) for j in range(3)]
    np.testing.assert_allclose(hm.z[1, a:b], expected, rtol=1e-6)
    assert np.all(np.diff(hm.z[1, a:b]) <= 0)
    assert hm.customdata[1, a, 1] == "ranks 0-4"
    with pytest.raises(ValueError, match="Unknown order"):
        st.set_order("random")


def test_7b_heatmap_stays_within_column_budget():
    st = ImportanceState(testing.llama2_7b_report())
    hm = st.heatmap()
    assert hm.z.shape[0] == 32 and hm.z.shape[1] <= 256
    assert [t for t, _, _ in hm.type_spans] == LLAMA_TYPES
    assert not np.isnan(hm.z).any()


def test_normalization_log_scale_and_type_filter():
    rep = small_report()
    st = ImportanceState(rep, max_columns=400)     # enough columns: one per neuron
    st.set_types(["mlp.up_proj"])
    hm = st.heatmap()
    assert hm.z.shape == (3, 24) and hm.row_labels == ["layer 0", "layer 1", "layer 2"]
    np.testing.assert_allclose(hm.z[0], rep.scores["model.layers.0.mlp.up_proj"].numpy(),
                               rtol=1e-6)
    for kind in ("mean", "max", "rank"):
        st.set_normalization(kind)
        ref = normalize_scores(rep.scores["model.layers.2.mlp.up_proj"], kind).numpy()
        np.testing.assert_allclose(st.heatmap().z[2], ref, rtol=1e-6)
    st.set_log_scale(True)
    ref = np.log10(normalize_scores(rep.scores["model.layers.2.mlp.up_proj"], "rank").numpy())
    np.testing.assert_allclose(st.heatmap().z[2], ref, rtol=1e-6)
    assert st.heatmap().colorbar_title.startswith("log10")
    with pytest.raises(ValueError, match="at least one module type"):
        st.set_types([])
    with pytest.raises(ValueError, match="Unknown module type"):
        st.set_types(["mlp.nope"])
    with pytest.raises(ValueError, match="Unknown normalization"):
        st.set_normalization("zscore")
    assert st.types == ["mlp.up_proj"] and st.normalization == "rank"


def test_log_scale_blanks_non_positive_scores():
    rep = small_report()
    rep.scores["model.layers.0.self_attn.k_proj"][:] = 0.0
    st = ImportanceState(rep, max_columns=400)
    st.set_log_scale(True)
    hm = st.heatmap()
    _, a, b = hm.type_spans[1]
    assert np.isnan(hm.z[1, a:b]).all()
    assert np.isfinite(hm.z[2, a:b]).all()


def test_metric_switch_between_reports():
    a, b = small_report(seed=0), small_report(seed=1)
    st = ImportanceState({"taylor": a, "wanda": b}, max_columns=400)
    st.set_types(["self_attn.k_proj"])
    st.set_metric("wanda")
    assert st.types == ["self_attn.k_proj"]
    assert st.heatmap().row_labels[0] == "layer 0"
    np.testing.assert_allclose(st.heatmap().z[0],
                               b.scores["model.layers.0.self_attn.k_proj"].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown metric 'l1'"):
        st.set_metric("l1")
    with pytest.raises(ValueError, match="not an ImportanceReport"):
        ImportanceState({"x": {"a": 1}})


def test_click_drills_into_module_with_plan_rows_marked():
    rep = small_report()
    plan = select(rep, Ratio(0.25))
    st = ImportanceState(rep, plan=plan, max_columns=12)
    hm = st.heatmap()
    _, a, _ = hm.type_spans[2]                  # up_proj columns
    name = st.select_cell(3, a + 1)             # layer 2
    assert name == "model.layers.2.mlp.up_proj" and st.module == name
    prof = st.profile()
    np.testing.assert_array_equal(prof.selected, plan.rows[name].numpy())
    np.testing.assert_allclose(prof.scores, rep.scores[name].numpy())
    s = rep.scores[name]
    assert prof.covered == pytest.approx(float(s[plan.rows[name]].sum() / s.sum()), rel=1e-6)
    with pytest.raises(ValueError, match="No module in cell"):
        st.select_cell(1, hm.type_spans[3][1])  # pooler column in layer 0
    with pytest.raises(ValueError, match="outside the heatmap"):
        st.select_cell(99, 0)


def test_plan_for_another_model_is_refused():
    rep = small_report()
    other = RowPlan(rows={"model.layers.0.mlp.up_proj": [0]},
                    shapes={"model.layers.0.mlp.up_proj": (32, 8)})
    with pytest.raises(ValueError, match="another model"):
        ImportanceState(rep, plan=other)


def test_concentration_curves_match_direct_computation():
    rep = small_report()
    st = ImportanceState(rep)
    st.set_types(["self_attn.q_proj", "mlp.up_proj"])
    conc = st.concentration()
    assert set(conc.curves) == {0, 1, 2}
    pooled = torch.cat([rep.scores["model.layers.1.self_attn.q_proj"],
                        rep.scores["model.layers.1.mlp.up_proj"]])
    top = torch.sort(pooled, descending=True).values
    k = round(0.25 * pooled.numel())                      # 10 of 40 neurons
    i = int(np.argmin(np.abs(conc.fraction - 0.25)))
    assert conc.curves[1][i] == pytest.approx(float(top[:k].sum() / top.sum()), rel=1e-6)
    assert conc.curves[1][-1] == pytest.approx(1.0) and conc.curves[1][0] == 0.0
    assert np.all(np.diff(conc.curves[1]) >= -1e-12)
    assert conc.gini[1] == pytest.approx(gini(pooled), abs=1e-9)


def test_importance_explorer_controls_drive_state():
    rep = small_report()
    ex = ImportanceExplorer({"a": rep, "b": small_report(seed=3)}, plan=select(rep, Ratio(0.5)))
    ex.normalization.value = "rank"
    ex.log_scale.value = True
    assert ex.state.normalization == "rank" and ex.state.log_scale
    ex.types.value = ("mlp.up_proj",)
    assert ex.state.types == ["mlp.up_proj"]
    assert list(ex.heat.data[0].y) == ["layer 0", "layer 1", "layer 2"]
    ex.types.value = ()                          # refused: state keeps its types
    assert ex.state.types == ["mlp.up_proj"] and "at least one" in ex.message.value
    assert ex.types.value == ("mlp.up_proj",)
    ex.metric.value = "b"
    assert ex.state.metric == "b"
    assert len(ex.conc.data) == 4                # the uniform diagonal + one curve per layer
    from plotly.callbacks import Points
    # plotly.js reports a heatmap click as pointNumber [row, col]
    ex._on_click(ex.heat.data[0], Points(point_inds=[[2, 5]], xs=[5], ys=["layer 2"],
                                         trace_name="", trace_index=0), None)
    assert ex.state.module == "model.layers.2.mlp.up_proj"
    assert len(ex.prof.data[0].y) == 24 and "rows selected" in ex.prof.layout.title.text
    marked = ex.state.plan.rows["model.layers.2.mlp.up_proj"].tolist()
    assert list(ex.prof.data[1].x) == marked


def test_heatmap_sent_to_the_browser_is_valid_json():
    """Empty cells (pooler row has no block columns) must not reach the page as NaN."""
    ex = ImportanceExplorer(small_report())
    z = ex.heat.data[0].z
    assert any(v is None for row in z for v in row)          # the gaps are there...
    json.dumps(ex.heat.to_plotly_json()["data"][0]["z"], allow_nan=False)  # ...as null
    hm = ex.state.heatmap()
    finite = ~np.isnan(hm.z)
    assert np.allclose(np.array(z, dtype=float)[finite], hm.z[finite])


def test_explorer_opens_like_the_static_figure_on_the_plans_metric():
    """01: the explorer opens normalised by the module mean, log scale (the static figure's
    settings); 02: on the metric the plan was selected by, and says so next to the marks."""
    rep = small_report()
    ex = ImportanceExplorer(rep, plan=select(rep, Ratio(0.25)))
    assert (ex.state.normalization, ex.state.log_scale) == ("mean", True)
    assert (ex.normalization.value, ex.log_scale.value) == ("mean", True)
    name = "model.layers.1.mlp.up_proj"
    s = rep.scores[name].numpy()
    st = ImportanceState(rep, max_columns=400, normalization="mean", log_scale=True)
    st.set_types(["mlp.up_proj"])
    np.testing.assert_allclose(st.heatmap().z[1], np.log10(s / s.mean()), rtol=1e-5)
    assert st.heatmap().colorbar_title == f"log10 {rep.metric} (mean)"

    taylor = small_report(seed=0)
    taylor.metric = "taylor"
    l2 = small_report(seed=1)
    plan = select(taylor, Ratio(0.25))
    assert plan.meta["metric"] == "taylor"
    ex = ImportanceExplorer({"l2": l2, "taylor": taylor}, plan=plan)   # l2 listed first
    assert ex.state.metric == "taylor" and ex.metric.value == "taylor"
    ex.state.select_module(name)
    ex.refresh()
    assert ex.prof.data[1].name == "rows selected by taylor"
    ex.metric.value = "l2"                       # marks stay taylor's, and it says so
    assert ex.prof.data[1].name == "rows selected by taylor (plotted: l2)"
    assert list(ex.prof.data[1].x) == plan.rows[name].tolist()
    assert ImportanceState({"l2": l2, "taylor": taylor}).metric == "l2"   # no plan: first
    with pytest.raises(ValueError, match="Unknown metric 'x'"):
        ImportanceState(rep, metric="x")


def test_hover_says_what_is_plotted_and_shows_the_raw_score():
    rep = small_report()
    st = ImportanceState(rep, max_columns=12)
    hm = st.heatmap()
    assert hm.value_label == "score"
    assert hm.hovertemplate.endswith(f"<br>{rep.metric} score %{{z:.4g}}<extra></extra>")
    st.set_normalization("mean")
    st.set_log_scale(True)
    hm = st.heatmap()
    assert hm.value_label == "log10(score/mean)"
    assert "log10(score/mean) %{z:.4g}" in hm.hovertemplate
    assert f"{st.metric} score %{{customdata[2]:.4g}}" in hm.hovertemplate
    name = "model.layers.2.mlp.up_proj"          # row 3 of the heatmap, 3 bins of 8 neurons
    _, a, b = hm.type_spans[2]
    s = rep.scores[name]
    raw = [float(s[j * 8:(j + 1) * 8].mean()) for j in range(3)]   # un-normalised bin means
    np.testing.assert_allclose(hm.customdata[3, a:b, 2].astype(float), raw, rtol=1e-6)
    np.testing.assert_allclose(hm.z[3, a:b], np.log10(np.array(raw) / float(s.mean())),
                               rtol=1e-5)
    st.set_normalization("rank")
    assert st.heatmap().value_label == "log10(rank/n)"
    ex = ImportanceExplorer(rep)                 # the view sends both to the browser
    assert ex.heat.data[0].hovertemplate == ex.state.heatmap().hovertemplate
    ex.state.select_module(name)
    ex.refresh()
    assert ex.prof.layout.yaxis.title.text == "log10(score/mean)"
    np.testing.assert_allclose(ex.prof.data[0].customdata, s.numpy())
    assert "customdata" in ex.prof.data[0].hovertemplate


def test_profile_title_fits_the_plot():
    """Two short lines (module, then the selection) instead of one line cut off at 520 px."""
    rep = testing.llama2_7b_report()
    plan = select(rep, Ratio(0.05))
    st = ImportanceState(rep, plan=plan)
    name = "model.layers.31.self_attn.q_proj"
    st.select_module(name)
    prof = st.profile()
    lines = [re.sub("<[^>]+>", "", part) for part in prof.title.split("<br>")]
    assert lines[0] == name and len(lines) == 2
    assert all(len(line) <= 64 for line in lines), lines
    assert lines[1].startswith(f"{len(plan.rows[name])} of 4096 rows selected")
    assert f"{100 * prof.covered:.1f}% of its importance" in lines[1]


def test_concentration_lines_are_labelled_and_rank_is_explained():
    rep = small_report()
    ex = ImportanceExplorer(rep, normalization="none", log_scale=False)
    conc = ex.state.concentration()
    assert ex.conc.layout.showlegend
    names = [t.name for t in ex.conc.data]
    assert names[0] == "uniform"
    assert names[1:] == [f"{layer_label(k)} (gini {conc.gini[k]:.2f})" for k in conc.curves]
    assert names[1].startswith("other (gini") and names[2].startswith("layer 0 (gini")
    assert conc.note == "" and ex.note.value == ""
    assert not np.allclose(conc.curves[0], conc.curves[1])
    ex.normalization.value = "rank"
    conc = ex.state.concentration()
    # rank-normalised scores are 1/n..1 in every module: layers made of the same module
    # shapes draw exactly the same curve, whatever their scores
    np.testing.assert_allclose(conc.curves[0], conc.curves[1])
    np.testing.assert_allclose(conc.curves[0], conc.curves[2])
    assert "same curve" in conc.note and "rank" in ex.note.value.lower()
    big = ImportanceExplorer(testing.llama2_7b_report())     # 32 layers: 3 legend entries
    assert sum(1 for t in big.conc.data[1:] if t.showlegend is not False) == 3


# ---------------------------------------------------------------------------- budget
def test_uniform_budget_matches_select_and_direct_counts():
    rep = small_report()
    st = BudgetState(rep, percent=25)
    ref = select(rep, Ratio(0.25))
    for name, idx in ref.rows.items():
        assert torch.equal(st.plan.rows[name], idx)
    r = st.readout
    direct = sum(len(st.plan.rows[n]) * rep.shapes[n][1] for n in rep.shapes)
    assert r.trainable == direct
    assert r.percent_of_model == pytest.approx(100 * direct / 10_000)
    assert r.rows == sum(len(v) for v in st.plan.rows.values())
    assert r.percent_of_rows == pytest.approx(100 * r.rows / rep.total_rows())
    assert set(r.memory) == {"rowsft", "lora", "full"}
    st.set_percent(50)
    assert st.readout.trainable > direct
    assert st.settings.percent == 50


def test_coverage_per_layer_is_selected_share_of_mean_normalized_mass():
    rep = small_report()
    st = BudgetState(rep, percent=30)
    plan = st.plan
    for layer in (0, 1, 2):
        names = [n for n in rep.shapes if n.startswith(f"model.layers.{layer}.")]
        sel = sum(float((rep.scores[n] / rep.scores[n].mean())[plan.rows[n]].sum()) for n in names)
        tot = sum(float((rep.scores[n] / rep.scores[n].mean()).sum()) for n in names)
        assert st.readout.coverage[layer] == pytest.approx(sel / tot, rel=1e-6)
    assert 0 < st.readout.coverage_total < 1


def test_per_type_sliders_and_strategy_rules():
    rep = small_report()
    st = BudgetState(rep, percent=10)
    with pytest.raises(ValueError, match="'per-type' strategy"):
        st.set_type_percent("mlp.up_proj", 50)
    st.set_strategy("per-type")
    st.set_percent(25)                           # sets every type
    assert all(st.type_percent(t) == 25 for t in st.types)
    st.set_type_percent("mlp.up_proj", 50)
    st.set_type_percent("self_attn.k_proj", 0)
    ref = select(rep, TypeRatios({"self_attn.q_proj": .25, "self_attn.k_proj": 0.0,
                                  "mlp.up_proj": .5, "pooler.dense": .25}))
    assert {n: v.tolist() for n, v in st.plan.rows.items() if len(v)} == \
        {n: v.tolist() for n, v in ref.rows.items() if len(v)}
    assert all(len(st.plan.rows.get(f"model.layers.{i}.self_attn.k_proj", [])) == 0
               for i in range(3))
    assert len(st.plan.rows["model.layers.0.mlp.up_proj"]) == 12
    with pytest.raises(ValueError, match="Unknown module type"):
        st.set_type_percent("mlp.nope", 5)
    before = st.settings
    for t in ("self_attn.q_proj", "mlp.up_proj"):
        st.set_type_percent(t, 0)
    with pytest.raises(ValueError, match="train nothing"):
        st.set_type_percent("pooler.dense", 0)
    assert st.type_percent("pooler.dense") == 25 and st.settings != before
    with pytest.raises(ValueError, match="pick another strategy first"):
        st.set_unit("params")
    assert st.settings.strategy == "per-type" and st.settings.unit == "rows"


def test_param_budget_strategies_respect_the_budget():
    rep = small_report()
    st = BudgetState(rep, percent=10)
    st.set_unit("params")
    target = sum(o * i for o, i in rep.shapes.values())
    for strategy in ("topk", "coverage"):
        st.set_strategy(strategy)
        st.set_percent(20)
        assert 0 < st.readout.trainable <= 0.2 * target
        ref = select(rep, ParamBudget(0.2, allocator=strategy, normalizer="rank"))
        assert st.readout.trainable == ref.trainable_parameters()
    st.set_normalizer("max")
    assert st.plan.meta["budget"]["normalizer"] == "max"
    with pytest.raises(ValueError, match="Unknown normalizer"):
        st.set_normalizer("gauss")


def test_row_limits_head_alignment_and_refusals_leave_state_unchanged():
    rep = small_report()
    st = BudgetState(rep, percent=10)
    st.set_min_rows(4)
    assert all(len(v) >= 4 for v in st.plan.rows.values())
    st.set_max_rows(5)
    assert all(4 <= len(v) <= 5 for v in st.plan.rows.values())
    snapshot = (st.settings, st.readout)
    with pytest.raises(ValueError, match="above max rows"):
        st.set_min_rows(6)
    with pytest.raises(ValueError, match="below min rows"):
        st.set_max_rows(3)
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        st.set_percent(0)
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        st.set_percent(120)
    with pytest.raises(ValueError, match="smallest module"):
        st.set_max_rows(None)
        st.set_min_rows(9)
    st.set_max_rows(5)
    assert (st.settings, st.readout) == snapshot
    st.set_max_rows(0)                           # 0 = no cap
    st.set_min_rows(0)
    st.set_percent(40)
    st.set_head_aligned(True)
    for i in range(3):
        q = st.plan.rows[f"model.layers.{i}.self_attn.q_proj"]
        assert len(q) % 4 == 0 and len(q) > 0
        heads = set((q // 4).tolist())
        assert sorted(q.tolist()) == sorted(h * 4 + j for h in heads for j in range(4))
    no_groups = BudgetState(small_report(groups=False))
    with pytest.raises(ValueError, match="no attention heads"):
        no_groups.set_head_aligned(True)
    with pytest.raises(ValueError, match=">= 1"):
        st.set_memory_shape(0, 128)


def test_memory_shape_changes_activation_estimate_and_export(tmp_path):
    st = BudgetState(small_report(), percent=10, batch_size=2, seq_len=64)
    act = st.readout.memory["rowsft"]["activations"]
    st.set_memory_shape(4, 64)
    assert st.readout.memory["rowsft"]["activations"] > act
    path = st.export(str(tmp_path / "plan.json"))
    loaded = RowPlan.load(path)
    assert {k: v.tolist() for k, v in loaded.rows.items()} == \
        {k: v.tolist() for k, v in st.plan.rows.items()}
    assert json.loads((tmp_path / "plan.json").read_text())["format"] == "rowsft_nb.RowPlan"
    with pytest.raises(ValueError, match="file name"):
        st.export("  ")


def test_budget_explorer_slider_updates_readouts_and_reverts_refusals(tmp_path):
    ex = BudgetExplorer(small_report(), percent=10, plan_path=str(tmp_path / "p.json"))
    before = ex.trainable.value
    ex.percent.value = 40
    assert ex.state.settings.percent == 40 and ex.plan is ex.state.plan
    assert ex.trainable.value != before and f"{ex.state.readout.trainable:,}" in ex.trainable.value
    assert list(ex.coverage.data[0].y) == pytest.approx(
        [100 * ex.state.readout.coverage[k] for k in ex.state.layers])
    rowsft = ex._methods.index("rowsft")
    scale = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "bytes": 1}[ex.memory.layout.yaxis.title.text]
    assert ex.memory.data[0].y[rowsft] == pytest.approx(
        ex.state.readout.memory["rowsft"][ex._components[0]] / scale)
    total = sum(ex.state.readout.memory["full"].values())
    assert 1 <= total / scale < 1024                 # the unit fits the numbers
    ex.strategy.value = "topk"                   # switches the unit for the user, says so
    assert ex.state.settings.strategy == "topk" and ex.state.settings.unit == "params"
    assert ex.unit.value == "params" and "Switched the unit to % of params" in ex.message.value
    assert "#b00" not in ex.message.value        # a notice, not an error
    assert not ex.normalizer.disabled
    assert all(w.disabled for w in ex.type_sliders.values())
    ex.export()
    assert RowPlan.load(tmp_path / "p.json").num_rows() == ex.plan.num_rows()


def test_strategy_switches_the_unit_and_says_so():
    rep = small_report()
    st = BudgetState(rep, percent=5)
    st.set_strategy("coverage")                  # unit was % of rows
    assert st.settings.unit == "params" and st.settings.percent == 5
    assert st.notice.startswith("Switched the unit to % of params")
    ref = select(rep, ParamBudget(0.05, allocator="coverage", normalizer="rank"))
    assert st.readout.trainable == ref.trainable_parameters()
    st.set_normalizer("max")                     # the notice was about that one change
    assert st.notice == ""
    st.set_strategy("per-type")                  # back to a rows-only strategy
    assert st.settings.unit == "rows" and "% of rows" in st.notice
    assert all(st.type_percent(t) == 5 for t in st.types)
    with pytest.raises(ValueError, match="Unknown strategy"):
        st.set_strategy("greedy")


def test_per_type_budget_slider_is_disabled_and_shows_the_plans_share():
    rep = small_report()
    ex = BudgetExplorer(rep, percent=40)
    assert not ex.percent.disabled and ex.percent.value == pytest.approx(40)
    ex.strategy.value = "per-type"
    ex.type_sliders["mlp.up_proj"].value = 0.0
    ex.type_sliders["self_attn.q_proj"].value = 5.0
    st = ex.state
    assert st.percent_follows_plan and ex.percent.disabled
    rows = sum(len(v) for v in st.plan.rows.values())
    direct = 100 * rows / rep.total_rows()
    assert st.display_percent == pytest.approx(direct)
    assert ex.percent.value == pytest.approx(direct, rel=1e-3)
    assert ex.percent.value != pytest.approx(40)
    ex.strategy.value = "uniform"
    assert not ex.percent.disabled and ex.percent.value == pytest.approx(40)


def test_budget_slider_is_logarithmic_and_fits_practice():
    ex = BudgetExplorer(small_report(), percent=5)
    lo, hi = 10 ** ex.percent.min, 10 ** ex.percent.max
    assert lo <= 0.1 and hi == pytest.approx(100)
    share = (np.log10(10) - np.log10(0.5)) / (ex.percent.max - ex.percent.min)
    assert share > 0.4                           # 0.5-10 % get over 40% of the track
    ex.percent.value = 0.7
    assert ex.state.settings.percent == pytest.approx(0.7)


def test_trainable_count_is_printed_once():
    ex = BudgetExplorer(small_report(), percent=10)
    count = f"{ex.state.readout.trainable:,}"
    text = ex.trainable.value + " " + ex.readout.value
    assert text.count(count) == 1 and "trainable" not in ex.readout.value
    assert count in ex.trainable.value


# ---------------------------------------------------------------------------- launcher
def lm_dataset(n=32, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, testing.VOCAB, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def llama_plan(model, r=4):
    names = find_targets(model, "all-linear")
    return RowPlan(rows={n: list(range(r)) for n in names},
                   shapes={n: linear_shape(model.get_submodule(n)) for n in names})


def test_launch_refused_with_reasons():
    model = testing.tiny_llama()
    empty = RowPlan(rows={}, shapes={})
    st = LaunchState(model, empty, lm_dataset(), device="cpu")
    assert "selects no rows" in st.launch_problem()
    with pytest.raises(ValueError, match="selects no rows"):
        st.launch()
    st.set_plan(llama_plan(model))
    assert st.launch_problem() is None
    budget = BudgetState(testing.synthetic_report(
        {n: linear_shape(model.get_submodule(n)) for n in find_targets(model)}), percent=1)
    st.set_plan(budget)                          # follows the budget's current plan
    assert st.plan is budget.plan
    budget.set_percent(30)
    assert st.plan is budget.plan and st.plan.num_rows() > 0
    with pytest.raises(ValueError, match="RowPlan or a BudgetExplorer"):
        st.set_plan({"rows": {}})
    gone = LaunchState(model, llama_plan(model), lm_dataset(), device="cuda:7")
    assert "missing on this machine" in gone.launch_problem()
    with pytest.raises(ValueError, match="not available here"):
        st.set_device("cuda:7")
    for bad, setter in ((0, st.set_lr), (2.0, st.set_lr), (0, st.set_steps),
                        (1.5, st.set_steps), (0, st.set_batch_size), (-1, st.set_epochs)):
        with pytest.raises(ValueError):
            setter(bad)
    with pytest.raises(ValueError, match="Unknown mode"):
        st.set_mode("minutes")
    assert (st.lr, st.steps, st.batch_size) == (1e-4, 100, 8)
    assert st.save_problem() == "Nothing trained yet: launch a run first"
    with pytest.raises(ValueError, match="Nothing to stop"):
        st.stop()
    assert adapter_state(model) is None          # nothing was injected by refused launches


def test_launch_trains_in_background_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = testing.tiny_llama()
    plan = llama_plan(model)
    events = []
    st = LaunchState(model, plan, lm_dataset(), eval_dataset=lm_dataset(),
                     lr=1e-2, steps=6, batch_size=8, device="cpu")
    st.subscribe(events.append)
    st.launch()
    with pytest.raises(ValueError, match="while training runs"):
        st.set_lr(1e-3)
    assert st.wait(timeout=120)
    assert st.status == "finished", st.error
    assert [s for s, _ in st.loss_points] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for _, v in st.loss_points)
    assert st.progress == 1.0 and st.total_steps == 6
    assert events[:2] == ["evaluate", "begin"] and events[-1] == "end" and "log" in events
    assert [(p.step, p.phase) for p in st.eval_points] == [(0, "before"), (6, "after")]
    s = st.summary()
    assert s["metric"] == "loss" and s["after"] < s["before"]
    assert s["trainable_parameters"] == plan.trainable_parameters()
    assert adapter_state(model) is not None      # the adapter stays in the model
    out = st.save(str(tmp_path / "adapter"))
    reloaded = load_adapter(testing.tiny_llama(), out)
    batch = testing.random_batches(model, n=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch["input_ids"]).logits,
                                   model(input_ids=batch["input_ids"]).logits)
    other = llama_plan(testing.tiny_llama(), r=2)
    st.set_plan(other)
    assert "another plan" in st.launch_problem()


def test_stop_ends_a_long_run_midway():
    model = testing.tiny_llama()
    st = LaunchState(model, llama_plan(model), lm_dataset(), steps=100_000, batch_size=4,
                     device="cpu")
    st.launch()
    for _ in range(600):
        if len(st.loss_points) >= 2:
            break
        st._thread.join(0.05)
    assert len(st.loss_points) >= 2
    st.stop()
    assert st.status == "stopping"
    assert st.wait(timeout=60)
    assert st.status == "stopped"
    assert st.result.steps < 100_000 and "stopped by the observer" in st.result.stop_reason
    assert st.summary()["stop_reason"] == f"stopped by you at step {st.result.steps}"
    assert f"stopped by you at step {st.result.steps}" in st.summary_text()
    assert 0 < st.progress < 1
    assert st.save_problem() is None


def test_training_launcher_buttons_drive_state():
    model = testing.tiny_llama()
    ui = TrainingLauncher(model, RowPlan(rows={}, shapes={}), lm_dataset(), device="cpu",
                          steps=3, batch_size=8)
    assert ui.launch_button.disabled and "selects no rows" in ui.reason.value
    ui.state.set_plan(llama_plan(model))
    ui.update_view()
    assert not ui.launch_button.disabled
    ui.steps.value = 0 if False else 4
    ui.lr.value = 1e-3
    assert ui.state.steps == 4 and ui.state.lr == pytest.approx(1e-3)
    ui.launch_button.click()
    assert ui.state.wait(timeout=120) and ui.state.status == "finished", ui.state.error
    ui.update_view()
    assert list(ui.curves.data[0].x) == [1, 2, 3, 4]
    assert ui.progress.value == 1.0 and not ui.save_button.disabled
    assert "4 steps" in ui.summary.value
    assert not ui.launch_button.disabled and ui.reason.value == ""   # may train on


def cls_dataset(n=32, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, testing.VOCAB, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n,
                              "labels": torch.randint(0, 2, (n,), generator=g).tolist()})


def test_eval_every_marks_before_during_after_on_an_accuracy_axis():
    torch.manual_seed(0)
    model = testing.tiny_bert()
    plan = llama_plan(model, r=2)
    st = LaunchState(model, plan, cls_dataset(), eval_dataset=cls_dataset(16, seed=1),
                     lr=1e-3, steps=6, batch_size=8, device="cpu", eval_every=2)
    st.launch()
    assert st.wait(timeout=120) and st.status == "finished", st.error
    # every 2 steps, and the final evaluation at step 6 counted once, as "after"
    assert [(p.step, p.phase) for p in st.eval_points] == \
        [(0, "before"), (2, "during"), (4, "during"), (6, "after")]
    assert st.eval_points[0].metrics["accuracy"] == pytest.approx(
        st.result.metrics_before["accuracy"])
    assert st.eval_points[-1].metrics["accuracy"] == pytest.approx(
        st.result.metrics_after["accuracy"])
    c = st.chart()
    assert c.eval_key == "accuracy" and c.eval_range == (0.0, 1.0)
    assert c.eval_phases == ["before", "during", "during", "after"]
    assert c.eval_steps == [0, 2, 4, 6]
    assert c.loss_steps == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match=">= 1"):
        st.set_eval_every(1.5)
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        LaunchState(model, plan, cls_dataset(), device="cpu", eval_every=5)


def test_launcher_chart_axis_legend_and_stop_by_you():
    """Accuracy axis fixed to [0, 1] even with one point; the legend sits above the plot
    (not over the right axis); Launch is disabled while a run goes; Stop says who stopped."""
    model = testing.tiny_llama()
    ui = TrainingLauncher(model, llama_plan(model), lm_dataset(), device="cpu",
                          steps=100_000, batch_size=4)
    lay = ui.curves.layout
    assert lay.legend.orientation == "h" and lay.legend.y >= 1 and lay.legend.yanchor == "bottom"
    ui.state.eval_points = [EvalPoint(0, {"accuracy": 0.5, "loss": 0.7}, "before")]
    ui.update_view()
    assert tuple(lay.yaxis2.range) == (0, 1) and lay.yaxis2.visible
    assert lay.yaxis2.tickmode == "auto"         # its own ticks, not the loss axis's grid
    names = [t.name for t in ui.curves.data]
    assert names == ["train loss", "eval accuracy", "before training", "after training"]
    assert list(ui.curves.data[2].x) == [0] and list(ui.curves.data[3].x) == []
    assert ui.curves.data[2].showlegend and not ui.curves.data[3].showlegend
    ui.state.eval_points = [EvalPoint(0, {"loss": 2.0}, "before")]
    ui.update_view()
    assert lay.yaxis2.range is None and lay.yaxis2.autorange is True
    ui.state.eval_points = []
    assert ui.eval_every.disabled                # no eval_dataset: nothing to evaluate
    ui.launch_button.click()
    try:
        assert ui.state.running and ui.launch_button.disabled and not ui.stop_button.disabled
        assert "in progress" in ui.launch_button.tooltip
        for _ in range(600):
            if ui.state.loss_points:
                break
            ui.state._thread.join(0.05)
    finally:
        ui.stop_button.click()
        assert ui.state.wait(timeout=60)
    ui.update_view()
    assert ui.state.status == "stopped" and not ui.launch_button.disabled
    assert f"stopped by you at step {ui.state.result.steps}" in ui.summary.value
    assert "observer" not in ui.summary.value


# ---------------------------------------------------------------------------- page reload
def test_reconnecting_page_gets_the_current_figures_and_a_rerun_hint():
    """After a browser refresh JupyterLab asks the kernel for each widget's state; plotly
    keeps its synced data at the first draw, so the heatmap came back empty. Our figures
    answer with what they show now, in one full-state message."""
    ex = ImportanceExplorer(small_report())
    ex.normalization.value = "rank"              # edits after the first draw
    sent = []
    ex.heat.comm.send = lambda *args, **kwargs: sent.append(kwargs.get("data", args[0] if args
                                                                        else None))
    ex.heat._handle_msg({"content": {"data": {"method": "request_state"}}})   # one widget
    assert len(sent) == 1 and sent[0]["method"] == "update"
    state = sent[0]["state"]
    assert ex.prof.get_state()["_widget_data"][0]["y"] is not None   # what request_states sends
    z = np.array(state["_widget_data"][0]["z"], dtype=float)
    hm = ex.state.heatmap()
    finite = ~np.isnan(hm.z)
    np.testing.assert_allclose(z[finite], hm.z[finite])
    assert state["_widget_data"][0]["colorbar"]["title"]["text"] == hm.colorbar_title
    assert hm.colorbar_title.endswith("(rank)")
    # plotly.js is imported once per page, not once per figure
    esm = state["_esm"]
    assert esm.count("globalThis[KEY] ??= import(") == 1 and len(esm) > 1_000_000
    # every explorer carries the (CSS-triggered) re-run hint and marks its figure boxes
    for widget in (ex.widget, BudgetExplorer(small_report()).widget):
        assert "rowsft-explorer" in widget._dom_classes
        assert "re-run this cell" in widget.children[0].value
        boxes = [b for b in _walk(widget) if "rowsft-figure" in getattr(b, "_dom_classes", ())]
        assert boxes and all(len(b.children) == 1 for b in boxes)


def _walk(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _walk(child)


def test_budget_explorer_offers_rows_per_head_and_whole_neurons():
    """The paper's per-head allocation and whole-neuron mode are budget-explorer settings: the
    plan equals select() called directly, the readout counts the coupled columns, and the two
    head options exclude each other with a notice."""
    from rowsft_nb.scoring import score

    model = testing.tiny_llama()
    report = score(model, testing.random_batches(model, n=1), metric="taylor", groups="auto",
                   progress=False)
    st = BudgetState(report, percent=10)
    st.set_per_head(True)
    direct = select(report, Ratio(0.10), per_head=True)
    assert st.plan.to_dict()["rows"] == direct.to_dict()["rows"]
    st.set_head_aligned(True)
    assert st.settings.per_head is False and "rows per head" in st.notice
    st.set_per_head(True)
    assert st.settings.head_aligned is False and "whole heads" in st.notice
    st.set_per_head(False)
    st.set_couple(True)
    coupled = select(report, Ratio(0.10), couple="neurons")
    assert st.plan.to_dict()["rows"] == coupled.to_dict()["rows"]
    assert st.plan.to_dict()["columns"] == coupled.to_dict()["columns"] and coupled.columns
    assert st.readout.trainable == coupled.trainable_parameters()
    assert coupled.trainable_parameters() > select(report, Ratio(0.10)).trainable_parameters() \
        or coupled.num_rows() != select(report, Ratio(0.10)).num_rows()
    # the view's checkboxes drive the same setters
    ex = BudgetExplorer(report, percent=10)
    ex.couple.value = True
    assert ex.state.settings.couple == "neurons" and ex.couple.value is True
    ex.per_head.value = True
    assert ex.state.settings.per_head is True
    ex.head_aligned.value = True
    assert ex.per_head.value is False and ex.state.settings.head_aligned is True
    no_heads = BudgetState(small_report(groups=False), percent=10)
    with pytest.raises(ValueError, match="no attention heads"):
        no_heads.set_per_head(True)
    assert no_heads.settings.per_head is False


def test_format_logs_prints_numbers_unquoted():
    from rowsft_nb.progress import format_logs

    assert format_logs(10, {"loss": 0.68191, "grad_norm": 0.53124, "learning_rate": 1e-4,
                            "epoch": 1}) == \
        "step 10: loss 0.6819, grad_norm 0.5312, learning_rate 0.0001, epoch 1"
    end = {"train_runtime": 39.6912, "train_samples_per_second": 3.2,
           "train_steps_per_second": 0.1, "total_flos": 1234.0, "train_loss": 0.65432,
           "epoch": 2.0}
    assert format_logs(4, end) == "training done: 4 steps in 39.69 s, loss 0.6543, epoch 2"
    assert format_logs(4, {"train_runtime": 1.0}) == "training done: 4 steps in 1 s"
