"""Explorer state objects driven without a browser: every control changes the state as
expected, refused settings leave it unchanged with a message; views bind controls to state."""
import json
import math

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
    assert len(ex.conc.data) == 3                # one curve per layer
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
    with pytest.raises(ValueError, match="switch the unit first"):
        st.set_strategy("topk")
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
    with pytest.raises(ValueError, match="no head groups"):
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
    ex.strategy.value = "topk"                   # refused while the unit is rows
    assert ex.strategy.value == "uniform" and "switch the unit" in ex.message.value
    ex.unit.value = "params"
    ex.strategy.value = "topk"
    assert ex.state.settings.strategy == "topk" and not ex.normalizer.disabled
    assert all(w.disabled for w in ex.type_sliders.values())
    ex.export()
    assert RowPlan.load(tmp_path / "p.json").num_rows() == ex.plan.num_rows()


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
    assert [s for s, _ in st.eval_points] == [0, 6]      # before and after training
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
