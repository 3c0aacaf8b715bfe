"""A failed inject / merge / unmerge / merge_and_unload / unload leaves the model exactly as it
was: state_dict bit-exact, requires_grad flags and module types unchanged, and the next call
works. Failures are forced with monkeypatch part-way through."""
import pytest
import torch

from rowsft_nb import testing
from rowsft_nb.adapter import (RowSparseLinear, adapted_modules, adapter_state, inject, merge,
                               merge_and_unload, unload, unmerge)
from rowsft_nb.adapter import model as adapter_model
from rowsft_nb.plan import RowPlan
from rowsft_nb.targets import find_targets, linear_shape


def _plan(model, r=3, columns=0):
    modules = dict(model.named_modules())
    names = find_targets(model)
    shapes = {n: linear_shape(modules[n]) for n in names}
    rows = {n: list(range(1, 1 + 2 * r, 2)) for n in names}
    cols = {n: list(range(columns)) for n in names} if columns else {}
    return RowPlan(rows=rows, shapes=shapes, columns=cols)


def _snapshot(model):
    """Everything a failed call must not change, compared bit-exactly."""
    state = {k: (v.dtype, tuple(v.shape), v.detach().cpu().clone().contiguous().view(torch.uint8))
             for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    types = {k: type(m).__name__ for k, m in model.named_modules()}
    merged = {k: m.merged for k, m in adapted_modules(model).items()}
    return state, flags, types, merged, adapter_state(model) is not None


def _assert_same(before, after):
    (s0, f0, t0, m0, a0), (s1, f1, t1, m1, a1) = before, after
    assert s0.keys() == s1.keys()
    for k in s0:
        assert s0[k][:2] == s1[k][:2], k
        assert torch.equal(s0[k][2], s1[k][2]), f"{k} changed"
    assert f0 == f1
    assert t0 == t1
    assert m0 == m1
    assert a0 == a1


def _trained(model, plan, **kw):
    """Inject and give every delta random values (as after training)."""
    inject(model, plan, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            for p in layer.delta_parameters().values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _fail_on_call(monkeypatch, owner, attr, n):
    """Make ``owner.attr`` raise RuntimeError on its n-th call (earlier calls run normally)."""
    original = getattr(owner, attr)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(f"forced failure in {attr} (call {n})")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)
    return calls


# ------------------------------------------------------------------ inject: validation first
@pytest.mark.parametrize("kwargs, match", [
    (dict(delta_dtype=torch.int32), "delta_dtype must be a floating"),
    (dict(delta_dtype="float32"), "delta_dtype must be a floating"),
    (dict(dropout=1.5), "dropout must be a number in"),
    (dict(dropout=-0.1), "dropout must be a number in"),
    (dict(dropout=float("nan")), "dropout must be a number in"),
    (dict(dropout="0.1x"), "dropout must be a number in"),
    (dict(bias="yes"), "bias must be True or False"),
])
def test_inject_bad_arguments_refused_before_any_change(kwargs, match):
    model = testing.tiny_llama()
    plan = _plan(model)
    for p in model.model.layers[0].parameters():  # a mix of flags to restore
        p.requires_grad_(False)
    before = _snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        inject(model, plan, **kwargs)
    _assert_same(before, _snapshot(model))
    inject(model, plan)  # the retry is not "double injection"
    assert len(adapted_modules(model)) == len(plan.modules)


def test_inject_plan_for_another_model_leaves_model_unchanged():
    model = testing.tiny_llama()
    plan = _plan(testing.tiny_llama(hidden=32))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="plan shape"):
        inject(model, plan)
    _assert_same(before, _snapshot(model))
    with pytest.raises(TypeError, match="needs a RowPlan"):
        inject(model, {"rows": {}})
    _assert_same(before, _snapshot(model))


def test_inject_meta_device_model_names_the_problem():
    with torch.device("meta"):
        model = testing.tiny_llama()
    plan = _plan(testing.tiny_llama())
    with pytest.raises(ValueError, match="meta device.*load_state_dict") as err:
        inject(model, plan)
    assert "Cannot copy out of meta" not in str(err.value)
    assert not any(isinstance(m, RowSparseLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_inject_failing_on_third_module_restores_everything(arch, monkeypatch):
    model = getattr(testing, f"tiny_{arch}")()
    plan = _plan(model)
    before = _snapshot(model)
    calls = _fail_on_call(monkeypatch, RowSparseLinear, "__init__", 3)
    with pytest.raises(RuntimeError, match="forced failure"):
        inject(model, plan, bias=True)
    assert calls["n"] == 3
    _assert_same(before, _snapshot(model))
    assert not hasattr(model, "_rowsft_adapter")
    monkeypatch.undo()
    inject(model, plan, bias=True)  # a retry works
    assert len(adapted_modules(model)) == len(plan.modules)


def test_inject_failing_while_setting_up_heads_restores_everything(monkeypatch):
    model = testing.tiny_bert()  # has a classifier head that inject trains fully
    plan = _plan(model)
    before = _snapshot(model)
    _fail_on_call(monkeypatch, adapter_model, "AdapterState", 1)
    with pytest.raises(RuntimeError, match="forced failure"):
        inject(model, plan)
    _assert_same(before, _snapshot(model))


# ------------------------------------------------------------------ merge / unmerge
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_failing_mid_way_unmerges_what_it_merged(arch, monkeypatch):
    model = getattr(testing, f"tiny_{arch}")()
    _trained(model, _plan(model, columns=2), bias=True)
    before = _snapshot(model)
    _fail_on_call(monkeypatch, RowSparseLinear, "merge", 3)
    with pytest.raises(RuntimeError, match="forced failure"):
        merge(model)
    _assert_same(before, _snapshot(model))
    monkeypatch.undo()
    merge(model)
    assert all(m.merged for m in adapted_modules(model).values())


def test_layer_merge_failing_inside_restores_its_rows():
    base = torch.nn.Linear(8, 6, bias=False)
    layer = RowSparseLinear(base, rows=[1, 4], columns=[0, 2], bias=True)
    with torch.no_grad():
        layer.delta.fill_(0.5)
        layer.delta_bias.fill_(0.25)
    # a column delta of the wrong shape fails after the rows and the (new) bias were written
    layer.column_delta = torch.nn.Parameter(torch.ones(5, 2))
    w0 = base.weight.detach().clone()
    with pytest.raises(RuntimeError):
        layer.merge()
    assert torch.equal(base.weight, w0)
    assert base.bias is None and not layer.merged and layer._merge_backup is None


def test_unmerge_failing_mid_way_merges_back(monkeypatch):
    model = testing.tiny_llama()
    _trained(model, _plan(model, columns=2), bias=True)
    merge(model)
    before = _snapshot(model)
    _fail_on_call(monkeypatch, RowSparseLinear, "unmerge", 4)
    with pytest.raises(RuntimeError, match="forced failure"):
        unmerge(model)
    _assert_same(before, _snapshot(model))
    monkeypatch.undo()
    unmerge(model)
    assert not any(m.merged for m in adapted_modules(model).values())


@pytest.mark.parametrize("call", [merge, merge_and_unload])
def test_merge_refusing_nan_changes_nothing(call):
    model = _trained(testing.tiny_llama(), _plan(testing.tiny_llama()))
    layer = list(adapted_modules(model).values())[-1]
    with torch.no_grad():
        layer.delta[0, 0] = float("nan")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"mlp\.down_proj\.delta has 1 NaN/inf"):
        call(model)
    _assert_same(before, _snapshot(model))


# ------------------------------------------------------------------ merge_and_unload / unload
@pytest.mark.parametrize("merged_first", [False, True])
def test_merge_and_unload_failing_while_removing_restores_adapted_model(merged_first,
                                                                        monkeypatch):
    model = _trained(testing.tiny_bert(), _plan(testing.tiny_bert()), bias=True)
    if merged_first:
        merge(model)
    before = _snapshot(model)
    _fail_on_call(monkeypatch, adapter_model, "_set_module", 3)
    with pytest.raises(RuntimeError, match="forced failure"):
        merge_and_unload(model)
    _assert_same(before, _snapshot(model))
    monkeypatch.undo()
    merge_and_unload(model)
    assert not any(isinstance(m, RowSparseLinear) for m in model.modules())


@pytest.mark.parametrize("merged_first", [False, True])
def test_unload_failing_while_removing_restores_adapted_model(merged_first, monkeypatch):
    base = testing.tiny_bert()
    reference = _snapshot(base)
    model = _trained(base, _plan(testing.tiny_bert()))
    with torch.no_grad():  # a trained classifier head, restored by a successful unload
        model.classifier.weight.add_(1.0)
    if merged_first:
        merge(model)
    before = _snapshot(model)
    _fail_on_call(monkeypatch, adapter_model, "_set_module", 5)
    with pytest.raises(RuntimeError, match="forced failure"):
        unload(model)
    _assert_same(before, _snapshot(model))
    monkeypatch.undo()
    unload(model)
    _assert_same(reference, _snapshot(model))
