"""Issue 12 parts 3-6 and 10: per-head allocation, the authors' row budget, whole-neuron mode,
kaiming init, modules_to_save and the selection/naming tidy-ups, each against a direct
computation written here."""
import copy
import gc
import math
import warnings
import weakref

import numpy as np
import pytest
import torch

from rowsft_nb import testing
from rowsft_nb._io import write_safetensors
from rowsft_nb.adapter import adapted_modules, inject, load_adapter, save_adapter
from rowsft_nb.adapter.io import read_adapter_config
from rowsft_nb.adapter.model import TRAINABLE_HEADS, adapter_state, trainable_parameters
from rowsft_nb.scoring.report import ImportanceReport, normalize_scores
from rowsft_nb.selection import (FixedRows, ParamBudget, Ratio, RowBudget, SelectionWarning,
                                 TypeRatios, budget_from_dict, select)
from rowsft_nb.targets import HEADS, linear_shape
from rowsft_nb import targets as targets_module


def report_of(shapes, head_dims=None, seed=0, scales=None, column_scores=True):
    """Random scores (module i scaled by scales[i], so raw scores are not comparable)."""
    rep = testing.synthetic_report(shapes, seed=seed, groups=head_dims)
    for (name, s), k in zip(list(rep.scores.items()), scales or [1.0] * len(shapes)):
        rep.scores[name] = s * k
    if not column_scores:
        rep.column_scores.clear()
    return rep


def top(s: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-s, kind="stable")[:k].tolist())


# ------------------------------------------------------------------ 12.4 per_head
def test_per_head_fixed_rows_is_the_top_rows_of_every_head():
    shapes = {"l.0.attn.q_proj": (32, 16), "l.0.attn.k_proj": (16, 16), "l.0.mlp.up": (20, 16)}
    rep = report_of(shapes, head_dims={"l.0.attn.q_proj": 8, "l.0.attn.k_proj": 8}, seed=3)
    plan = select(rep, FixedRows(8), per_head=True)
    for name, hd in (("l.0.attn.q_proj", 8), ("l.0.attn.k_proj", 8)):
        s = rep.scores[name].numpy()
        n_heads = shapes[name][0] // hd
        per = round(8 / n_heads)
        expected = set()
        for h in range(n_heads):  # direct: each head's own best rows
            expected |= {h * hd + i for i in top(s[h * hd:(h + 1) * hd], per)}
        got = plan.rows[name].tolist()
        assert set(got) == expected and len(got) == per * n_heads
        assert np.bincount(np.array(got) // hd, minlength=n_heads).tolist() == [per] * n_heads
    # a module without heads: its 8 best rows, as without per_head
    assert set(plan.rows["l.0.mlp.up"].tolist()) == top(rep.scores["l.0.mlp.up"].numpy(), 8)
    assert plan.meta["options"]["per_head"] is True
    # today's whole-head selection still picks whole heads
    whole = select(rep, FixedRows(8), head_aligned=True)
    assert len(set((whole.rows["l.0.attn.q_proj"] // 8).tolist())) == 1


def test_per_head_global_budgets_keep_heads_equal():
    shapes = {f"l.{i}.attn.q_proj": (24, 12) for i in range(3)}
    shapes.update({f"l.{i}.mlp.fc1": (30, 12) for i in range(3)})
    heads = {f"l.{i}.attn.q_proj": 6 for i in range(3)}
    rep = report_of(shapes, head_dims=heads, seed=1, scales=[1, 3, 0.5, 2, 1, 4])
    for budget in (ParamBudget(0.2), RowBudget(40), ParamBudget(0.3, allocator="coverage")):
        plan = select(rep, budget, per_head=True)
        for name, hd in heads.items():
            rows = plan.rows.get(name, torch.zeros(0, dtype=torch.long)).numpy()
            counts = np.bincount(rows // hd, minlength=4)
            assert (counts == counts[0]).all(), (budget, name, counts)
            s = rep.scores[name].numpy()
            for h in range(4):  # the rows of each head are that head's best
                assert set(rows[rows // hd == h].tolist()) == \
                    {h * hd + i for i in top(s[h * hd:(h + 1) * hd], counts[0])}
    with pytest.raises(ValueError, match="per_head=True .* head_aligned"):
        select(rep, FixedRows(4), per_head=True, head_aligned=True)


def test_per_head_on_a_scored_tiny_llama():
    from rowsft_nb.scoring import score

    model = testing.tiny_llama()
    rep = score(model, testing.random_batches(model, n=1, batch_size=2, seq_len=8),
                metric="l2", progress=False)
    q = "model.layers.0.self_attn.q_proj"
    hd = rep.head_dims[q]
    plan = select(rep, Ratio(0.25), per_head=True)
    rows = plan.rows[q].numpy()
    n_heads = linear_shape(model.get_submodule(q))[0] // hd
    assert np.bincount(rows // hd, minlength=n_heads).tolist() == [hd // 4] * n_heads


# ------------------------------------------------------------------ 12.5 RowBudget
def authors_global_rows(rep, n_train):
    """Their set_finetune_global: each layer's scores / their mean, concatenated; the
    n_freezed = total - n_train smallest are frozen (imp <= thres), the rest train."""
    names = list(rep.scores)
    imps = [rep.scores[n].double().numpy() for n in names]
    imps = [s / s.mean() for s in imps]
    concat = np.concatenate(imps)
    n_freezed = concat.size - n_train
    thres = np.sort(concat)[n_freezed - 1]
    return {n: set(np.flatnonzero(s > thres).tolist()) for n, s in zip(names, imps)}


def test_row_budget_is_the_authors_global_threshold():
    shapes = {"l.0.q": (40, 8), "l.0.up": (64, 8), "l.1.q": (40, 8), "l.1.down": (16, 64)}
    rep = report_of(shapes, seed=7, scales=[1.0, 50.0, 0.01, 3.0])
    total = sum(s[0] for s in shapes.values())
    for budget, n in ((RowBudget(23), 23), (RowBudget(0.1), int(0.1 * total))):
        plan = select(rep, budget)
        expected = authors_global_rows(rep, n)
        assert {k: set(v.tolist()) for k, v in plan.rows.items()} == \
            {k: v for k, v in expected.items() if v}
        assert plan.num_rows() == n and plan.meta["budget_rows"] == n
        assert plan.meta["strategy"] == "row_budget/mean"
        assert budget_from_dict(plan.meta["budget"]) == budget
    # a top-k of the raw scores would differ (the modules' scales differ): normalising matters
    raw = sorted(((float(v), k, i) for k in shapes for i, v in enumerate(rep.scores[k])),
                 reverse=True)[:23]
    assert {(k, i) for _, k, i in raw} != \
        {(k, i) for k, v in select(rep, RowBudget(23)).rows.items() for i in v.tolist()}


def test_row_budget_validation_and_clip():
    for bad in (-1, 1.5, True, float("nan")):
        with pytest.raises(ValueError, match="RowBudget"):
            RowBudget(bad)
    with pytest.raises(ValueError, match="normalizer"):
        RowBudget(3, normalizer="median")
    rep = report_of({"l.0.a": (5, 2)})
    with pytest.warns(SelectionWarning, match="RowBudget of 9 rows is more than the 5"):
        assert select(rep, RowBudget(9)).num_rows() == 5


# ------------------------------------------------------------------ 12.3 whole neurons
def llama_report(model, seed=0):
    from rowsft_nb.scoring import score

    return score(model, testing.random_batches(model, n=1, batch_size=2, seq_len=8, seed=seed),
                 metric="taylor", progress=False)


def direct_trainable(model, rows, cols):
    """Trainable parameters from the model's own shapes: r * d_in per row module, c * d_out
    per column module."""
    total = 0
    for name, r in rows.items():
        total += r * linear_shape(model.get_submodule(name))[1]
    for name, c in cols.items():
        total += c * linear_shape(model.get_submodule(name))[0]
    return total


def test_couple_neurons_tiny_llama_rows_and_coupled_columns():
    model = testing.tiny_llama()
    rep = llama_report(model)
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    plan = select(rep, FixedRows(6), couple="neurons")
    rows_count, cols_count = {}, {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        gate, up, down = (plan.rows[p + "mlp.gate_proj"], plan.rows[p + "mlp.up_proj"],
                          plan.columns[p + "mlp.down_proj"])
        # the neurons: best 6 by the mean of gate/up row scores and down column scores
        unit = (rep.scores[p + "mlp.gate_proj"].double() + rep.scores[p + "mlp.up_proj"].double()
                + rep.column_scores[p + "mlp.down_proj"].double()) / 3
        assert set(gate.tolist()) == top(unit.numpy(), 6)
        assert torch.equal(gate, up) and torch.equal(down, gate)
        assert p + "mlp.down_proj" not in plan.rows
        # value rows -> every o_proj column that reads them (grouped-query attention)
        v = plan.rows[p + "self_attn.v_proj"].tolist()
        expected = sorted((j // hd * group + k) * hd + j % hd for j in v for k in range(group))
        assert plan.columns[p + "self_attn.o_proj"].tolist() == expected
        assert p + "self_attn.o_proj" not in plan.rows
        assert len(plan.rows[p + "self_attn.q_proj"]) == 6   # q/k: rows alone
        for n in ("mlp.gate_proj", "mlp.up_proj", "self_attn.v_proj", "self_attn.q_proj",
                  "self_attn.k_proj"):
            rows_count[p + n] = 6
        cols_count[p + "mlp.down_proj"] = 6
        cols_count[p + "self_attn.o_proj"] = 6 * group
    direct = direct_trainable(model, rows_count, cols_count)
    assert plan.trainable_parameters() == direct
    inject(model, plan, modules_to_save=None)
    assert trainable_parameters(model)[0] == direct
    # the coupled columns learn: down_proj's column delta gets a gradient
    batch = testing.random_batches(model, n=1, batch_size=2, seq_len=8)[0]
    model(**batch).loss.backward()
    down = adapted_modules(model)["model.layers.0.mlp.down_proj"]
    assert down.delta is None and down.column_delta.grad.abs().sum() > 0


def test_couple_neurons_tiny_bert_and_budgets_count_columns():
    model = testing.tiny_bert()
    rep = llama_report(model)
    p = "bert.encoder.layer.0."
    plan = select(rep, Ratio(0.25), couple="neurons")
    inter = plan.rows[p + "intermediate.dense"]
    assert torch.equal(plan.columns[p + "output.dense"], inter) and len(inter) == 16
    assert torch.equal(plan.columns[p + "attention.output.dense"],
                       plan.rows[p + "attention.self.value"])
    for budget in (ParamBudget(8_000), RowBudget(150)):
        plan = select(rep, budget, couple="neurons")
        rows = {k: v.numel() for k, v in plan.rows.items()}
        cols = {k: v.numel() for k, v in plan.columns.items()}
        counted = direct_trainable(model, rows, cols)
        assert plan.trainable_parameters() == counted
        if isinstance(budget, ParamBudget):   # columns count: the budget holds
            assert 8_000 - 2 * 32 < counted <= 8_000   # less than one neuron (64) left over
        else:                                  # every row and coupled column is one row
            assert sum(rows.values()) + sum(cols.values()) == 150
    with pytest.warns(SelectionWarning, match="found no MLP or value/output pair"):
        select(rep, FixedRows(2), couple="neurons", exclude=["output.dense"])
    with pytest.raises(ValueError, match="couple must be None or 'neurons'"):
        select(rep, FixedRows(2), couple="heads")


# ------------------------------------------------------------------ 12.6 init
def torch_linear_bound(d_in: int) -> float:
    """Bound of torch's nn.Linear default init, kaiming_uniform_(a=sqrt(5)), from its formula."""
    gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    return math.sqrt(3.0) * gain / math.sqrt(d_in)


def test_kaiming_init_bounds_seed_and_round_trip(tmp_path):
    base = testing.tiny_llama()
    rep = llama_report(base)
    plan = select(rep, FixedRows(8))
    batch = testing.random_batches(base, n=1, batch_size=2, seq_len=8)[0]
    with torch.no_grad():
        ref = base(**batch).logits
    zeros = inject(copy.deepcopy(base), plan)
    with torch.no_grad():
        assert torch.equal(zeros(**batch).logits, ref)        # zeros: unchanged at step 0
    model = inject(copy.deepcopy(base), plan, init="kaiming", seed=3, bias=True)
    for name, layer in adapted_modules(model).items():
        bound = torch_linear_bound(layer.in_features)
        d = layer.delta.detach()
        assert d.abs().max() <= bound and d.abs().max() > 0.9 * bound, name
        assert abs(d.std().item() - bound / math.sqrt(3)) < 0.15 * bound
        assert torch.count_nonzero(layer.delta_bias) == 0    # bias deltas start at zero
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, ref)
    again = inject(copy.deepcopy(base), plan, init="kaiming", seed=3, bias=True)
    other = inject(copy.deepcopy(base), plan, init="kaiming", seed=4, bias=True)
    name = next(iter(plan.rows))
    assert torch.equal(adapted_modules(again)[name].delta, adapted_modules(model)[name].delta)
    assert not torch.equal(adapted_modules(other)[name].delta, adapted_modules(model)[name].delta)
    save_adapter(model, tmp_path / "a")
    config = read_adapter_config(tmp_path / "a")
    assert config["init"] == "kaiming" and config["seed"] == 3
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert adapter_state(loaded).init == "kaiming" and adapter_state(loaded).seed == 3
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    with pytest.raises(ValueError, match="init must be one of"):
        inject(copy.deepcopy(base), plan, init="normal")


# ------------------------------------------------------------------ 12.10 modules_to_save
def test_modules_to_save_auto_none_and_names(tmp_path):
    base = testing.tiny_bert()
    plan = select(llama_report(base), FixedRows(4), exclude=["pooler.dense"])
    n_plan = plan.trainable_parameters()
    cls_params = sum(p.numel() for p in base.classifier.parameters())
    pooler = sum(p.numel() for p in base.bert.pooler.dense.parameters())
    for kwargs, expected in (({}, n_plan + cls_params),
                             ({"modules_to_save": "auto"}, n_plan + cls_params),
                             ({"train_heads": True}, n_plan + cls_params),
                             ({"modules_to_save": None}, n_plan),
                             ({"train_heads": False}, n_plan),
                             ({"modules_to_save": ["pooler.dense", "classifier"]},
                              n_plan + cls_params + pooler)):
        model = inject(copy.deepcopy(base), plan, **kwargs)
        assert trainable_parameters(model)[0] == expected, kwargs
    model = inject(copy.deepcopy(base), plan, modules_to_save=["pooler.dense"])
    assert adapter_state(model).heads == ["bert.pooler.dense"]
    with torch.no_grad():
        model.bert.pooler.dense.weight.add_(1.0)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(loaded.bert.pooler.dense.weight, model.bert.pooler.dense.weight)
    assert trainable_parameters(loaded)[0] == n_plan + pooler
    fresh = copy.deepcopy(base)
    flags = [p.requires_grad for p in fresh.parameters()]
    planned = next(iter(plan.rows))
    for bad, match in ((["nope"], "no module named 'nope'"), ([planned], "is .* a module of the plan"),
                       ("classifier", "list of module names")):
        with pytest.raises(ValueError, match=match):
            inject(fresh, plan, modules_to_save=bad)
        assert [p.requires_grad for p in fresh.parameters()] == flags and not adapted_modules(fresh)
    with pytest.raises(ValueError, match="not both"):
        inject(fresh, plan, modules_to_save=None, train_heads=True)


def test_one_list_of_head_names():
    assert TRAINABLE_HEADS is targets_module.TRAINABLE_HEADS
    assert set(TRAINABLE_HEADS) == {k for k, v in HEADS.items() if v}
    assert "lm_head" in targets_module.HEAD_NAMES and "lm_head" not in TRAINABLE_HEADS


# ------------------------------------------------------------------ 12.10 tidy-ups
def test_select_cache_dies_with_its_report():
    rep = report_of({"l.0.a": (64, 8), "l.1.a": (64, 8)})
    select(rep, ParamBudget(0.1))
    cached = vars(rep)["_rowsft_selector"][1]
    select(rep, ParamBudget(0.2))
    assert vars(rep)["_rowsft_selector"][1] is cached        # reused for a new budget
    ref, sel_ref = weakref.ref(rep), weakref.ref(cached)
    del rep, cached
    gc.collect()
    assert ref() is None and sel_ref() is None
    # only the last few reports keep a cache (bounded memory)
    reports = [report_of({"l.0.a": (8, 2)}, seed=i) for i in range(6)]
    for r in reports:
        select(r, FixedRows(1))
    assert "_rowsft_selector" not in vars(reports[0])
    assert "_rowsft_selector" in vars(reports[-1])


def test_normalize_scores_one_function_for_tensors_and_arrays():
    s = np.array([0.5, 2.0, 1.0, 4.0, 2.5])
    for kind in ("none", "mean", "max", "sum", "rank"):
        a = normalize_scores(s, kind)
        t = normalize_scores(torch.tensor(s, dtype=torch.float32), kind)
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, t.numpy(), rtol=1e-6)
    np.testing.assert_allclose(normalize_scores(s, "mean"), s / s.mean())
    np.testing.assert_allclose(normalize_scores(s, "rank"), [1, 3, 2, 5, 4] / np.float64(5))
    with pytest.raises(ValueError, match="Unknown normalizer"):
        normalize_scores(s, "median")


def test_head_dims_rename_keeps_groups_readable_and_loads_old_files(tmp_path):
    scores = {"l.0.q": torch.rand(8)}
    rep = ImportanceReport(scores=scores, shapes={"l.0.q": (8, 4)}, metric="x",
                           groups={"l.0.q": 4})             # old keyword
    assert rep.head_dims == {"l.0.q": 4}
    with pytest.warns(DeprecationWarning, match="head_dims"):
        assert rep.groups is rep.head_dims
    rep.save(tmp_path / "new.safetensors")
    assert ImportanceReport.load(tmp_path / "new.safetensors").head_dims == {"l.0.q": 4}
    # a report saved before the rename stores the head sizes under "groups"
    write_safetensors(tmp_path / "old.safetensors", {"rows/l.0.q": scores["l.0.q"]}, {
        "format": "rowsft_nb.ImportanceReport", "version": 1, "metric": "x",
        "shapes": {"l.0.q": [8, 4]}, "order": ["l.0.q"], "groups": {"l.0.q": 4}, "meta": {}})
    old = ImportanceReport.load(tmp_path / "old.safetensors")
    assert old.head_dims == {"l.0.q": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select(old, FixedRows(4), head_aligned=True)         # selection reads head_dims
    with pytest.raises(TypeError, match="head_dims"):
        ImportanceReport(scores=scores, shapes={"l.0.q": (8, 4)}, metric="x",
                         groups={"l.0.q": 4}, head_dims={"l.0.q": 4})


def test_couple_with_per_head_and_type_ratios():
    model = testing.tiny_llama()
    rep = llama_report(model, seed=1)
    hd = rep.head_dims["model.layers.0.self_attn.v_proj"]
    plan = select(rep, FixedRows(4), couple="neurons", per_head=True)
    v = plan.rows["model.layers.0.self_attn.v_proj"].numpy()
    assert np.bincount(v // hd, minlength=2).tolist() == [2, 2]        # 2 KV heads, 2 rows each
    assert plan.columns["model.layers.0.self_attn.o_proj"].numel() == 8  # x 2 query heads
    # TypeRatios keyed by any producer reaches the neuron (up_proj is not the first producer)
    plan = select(rep, TypeRatios({"up_proj": 0.25}), couple="neurons")
    p = "model.layers.0.mlp."
    n = rep.shapes[p + "up_proj"][0]
    assert plan.rows[p + "gate_proj"].numel() == plan.rows[p + "up_proj"].numel() == round(n / 4)
    assert torch.equal(plan.columns[p + "down_proj"], plan.rows[p + "up_proj"])
