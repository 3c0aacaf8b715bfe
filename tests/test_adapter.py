"""RowSparseLinear, inject / merge / unload, save / load against independent references:
the base model's outputs, a dense copy trained on the same rows, direct weight arithmetic."""
import copy
import json

import pytest
import torch
from torch import nn

from rowsft_nb import testing
from rowsft_nb.adapter import (RowSparseLinear, adapted_modules, inject, load_adapter, merge,
                               merge_and_unload, save_adapter, trainable_parameters, unload,
                               unmerge)
from rowsft_nb.plan import RowPlan
from rowsft_nb.profiling import saved_tensor_bytes
from rowsft_nb.targets import find_targets, linear_shape, model_fingerprint, row_weight

ARCHS = ["llama", "bert", "gpt2", "vit"]


def make_plan(model, r=3, cols=0, every_other_cols=True, seed=0):
    """r random rows for every target (and cols random columns on every other target)."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    names = find_targets(model)
    shapes = {n: linear_shape(modules[n]) for n in names}
    rows = {n: torch.randperm(shapes[n][0], generator=g)[:r] for n in names}
    columns = {}
    if cols:
        picked = names[::2] if every_other_cols else names
        columns = {n: torch.randperm(shapes[n][1], generator=g)[:cols] for n in picked}
    return RowPlan(rows=rows, shapes=shapes, columns=columns)


def build(arch, **kw):
    return getattr(testing, f"tiny_{arch}")(**kw)


def outputs(model, batch):
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def randomize_deltas(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_modules(model).values():
            for p in layer.delta_parameters().values():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def dense_reference(base, model):
    """A dense copy of ``base`` with W0[rows] += dW, b0[rows] += db, W0[:, cols] += dC."""
    dense = copy.deepcopy(base)
    dmods = dict(dense.named_modules())
    with torch.no_grad():
        for name, layer in adapted_modules(model).items():
            w = row_weight(dmods[name])
            if layer.delta is not None:
                w[layer.rows] += layer.delta.to(w.dtype)
            if layer.delta_bias is not None:
                dmods[name].bias[layer.rows] += layer.delta_bias.to(w.dtype)
            if layer.column_delta is not None:
                w[:, layer.columns] += layer.column_delta.to(w.dtype)
    return dense


# ---------------------------------------------------------------- forward at init
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_init_equals_base_exactly(arch):
    base = build(arch)
    model = inject(copy.deepcopy(base), make_plan(base, r=4, cols=2), bias=True)
    batch = testing.random_batches(base, n=1)[0]
    assert torch.equal(outputs(model, batch), outputs(base, batch))
    assert len(adapted_modules(model)) == len(find_targets(base))
    # module names of the base model still resolve; the original sits at .base_layer
    name = find_targets(base)[0]
    layer = model.get_submodule(name)
    assert isinstance(layer, RowSparseLinear)
    assert torch.equal(layer.base_layer.weight, base.get_submodule(name).weight)


def test_never_builds_dense_weight_or_one_hot():
    """Forward + backward allocate nothing of size d_out x d_in or r x d_out."""
    layer = RowSparseLinear(nn.Linear(96, 80), rows=[1, 5, 9])
    x = torch.randn(2, 96)
    existing = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    sizes = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in existing:
                    sizes.append(t.untyped_storage().nbytes() // t.element_size())
            return out

    with Spy():
        layer(x).sum().backward()
    assert sizes and max(sizes) <= 3 * 96  # the delta's own gradient is the largest tensor
    assert 96 * 80 not in sizes and 3 * 80 not in sizes


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("arch", ARCHS)
def test_after_backward_only_deltas_and_heads_have_gradients(arch):
    base = build(arch)
    model = inject(copy.deepcopy(base), make_plan(base))
    model.train()
    batch = testing.random_batches(base, n=1)[0]
    model(**batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    deltas = {n for n, _ in model.named_parameters() if n.endswith(".delta")}
    heads = {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    assert deltas and deltas <= with_grad
    assert with_grad == deltas | heads
    if arch in ("llama", "gpt2"):  # never the LM head / tied embeddings of a causal LM
        assert not heads and not any("lm_head" in n or "wte" in n for n in with_grad)
    else:
        assert heads  # the sequence/image classifier head trains fully


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_delta_gradients_equal_dense_reference(arch):
    """Grad of dW / db / dC equals the grad of the same entries of a dense copy holding
    W0 + the deltas (nonzero deltas, so grad_x through the delta path is tested too)."""
    base = build(arch)
    model = inject(copy.deepcopy(base), make_plan(base, r=3, cols=2), bias=arch != "llama",
                   train_heads=False)
    randomize_deltas(model)
    dense = dense_reference(base, model)
    for p in dense.parameters():
        p.requires_grad_(False)
    dmods = dict(dense.named_modules())
    for name in adapted_modules(model):
        for p in dmods[name].parameters():
            p.requires_grad_(True)
    batch = testing.random_batches(base, n=1, seed=3)[0]
    model(**batch).loss.backward()
    dense(**batch).loss.backward()
    checked = 0
    for name, layer in adapted_modules(model).items():
        dm = dmods[name]
        gw = dm.weight.grad.t() if layer.is_conv1d else dm.weight.grad
        if layer.delta is not None:
            torch.testing.assert_close(layer.delta.grad, gw[layer.rows], rtol=1e-4, atol=1e-6)
            checked += 1
        if layer.delta_bias is not None:
            torch.testing.assert_close(layer.delta_bias.grad, dm.bias.grad[layer.rows],
                                       rtol=1e-4, atol=1e-6)
        if layer.column_delta is not None:
            torch.testing.assert_close(layer.column_delta.grad, gw[:, layer.columns],
                                       rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked > len(adapted_modules(model))


def test_column_mode_matches_dense_reference():
    base = testing.tiny_llama()
    plan = make_plan(base, r=0, cols=5, every_other_cols=False)
    assert plan.num_rows() == 0
    model = inject(copy.deepcopy(base), plan, train_heads=False)
    batch = testing.random_batches(base, n=1)[0]
    assert torch.equal(outputs(model, batch), outputs(base, batch))
    randomize_deltas(model, scale=0.1)
    dense = dense_reference(base, model)
    torch.testing.assert_close(outputs(model, batch), outputs(dense, batch), rtol=1e-5, atol=1e-5)
    layer = next(iter(adapted_modules(model).values()))
    assert layer.delta is None and layer.column_delta.shape == (layer.out_features, 5)


def test_standalone_layer_gradients_match_autograd_reference():
    """Row + column + bias deltas on one Linear vs the same math in plain autograd."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    layer = RowSparseLinear(lin, rows=[1, 4, 7], columns=[0, 3], bias=True)
    randomize_deltas(nn.ModuleDict({"l": layer}))
    x = torch.randn(2, 5, 12, requires_grad=True)
    g = torch.randn(2, 5, 10)
    (layer(x) * g).sum().backward()
    dw, db, dc = (p.detach().clone().requires_grad_(True)
                  for p in (layer.delta, layer.delta_bias, layer.column_delta))
    x2 = x.detach().clone().requires_grad_(True)
    w = lin.weight.detach().clone()
    w[[1, 4, 7]] += dw
    w[:, [0, 3]] += dc
    b = lin.bias.detach().clone()
    b[[1, 4, 7]] += db
    (torch.nn.functional.linear(x2, w, b) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.delta.grad, dw.grad)
    torch.testing.assert_close(layer.delta_bias.grad, db.grad)
    torch.testing.assert_close(layer.column_delta.grad, dc.grad)
    assert lin.weight.grad is None and lin.bias.grad is None


# ---------------------------------------------------------------- counts
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bias", [False, True])
def test_trainable_count_is_rows_times_d_in_plus_heads(arch, bias):
    base = build(arch)
    plan = make_plan(base, r=3, cols=2)
    model = inject(copy.deepcopy(base), plan, bias=bias)
    expected = 0
    for name in plan.modules:
        d_out, d_in = plan.shapes[name]
        expected += len(plan.rows.get(name, [])) * (d_in + int(bias))
        expected += len(plan.columns.get(name, [])) * d_out
    heads = sum(p.numel() for n, p in base.named_parameters() if n.startswith("classifier."))
    trainable, total = trainable_parameters(model)
    assert trainable == expected + heads
    assert total == sum(p.numel() for p in base.parameters()) + expected


# ---------------------------------------------------------------- merge / unmerge / unload
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_equals_adapted_outputs(arch):
    base = build(arch)
    model = inject(copy.deepcopy(base), make_plan(base, r=4, cols=2), bias=arch != "llama")
    randomize_deltas(model)
    batch = testing.random_batches(base, n=1)[0]
    adapted = outputs(model, batch).detach()
    assert not torch.allclose(adapted, outputs(base, batch), atol=1e-4)  # deltas do something
    ref = dense_reference(base, model)
    merged = merge_and_unload(model)
    assert not adapted_modules(merged)
    assert not any(isinstance(m, RowSparseLinear) for m in merged.modules())
    torch.testing.assert_close(outputs(merged, batch), adapted, rtol=1e-5, atol=1e-5)
    # W0[idx] += dW exactly (the dense reference does the same arithmetic)
    for (n1, p1), (n2, p2) in zip(merged.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_merge_then_unmerge_restores_bit_exact():
    base = testing.tiny_gpt2()
    model = inject(copy.deepcopy(base), make_plan(base, r=4, cols=3), bias=True)
    randomize_deltas(model)
    batch = testing.random_batches(base, n=1)[0]
    adapted = outputs(model, batch).detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge(model)
    assert all(layer.merged for layer in adapted_modules(model).values())
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-5, atol=1e-5)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith("base_layer.weight") or k.endswith("base_layer.bias")
                           for k in changed)
    unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(outputs(model, batch), adapted)


def test_merge_bias_delta_into_layer_without_bias_then_unmerge():
    lin = nn.Linear(8, 6, bias=False)
    layer = RowSparseLinear(lin, rows=[2, 3], bias=True)
    with torch.no_grad():
        layer.delta_bias.fill_(0.5)
    x = torch.randn(3, 8)
    adapted = layer(x).detach()
    layer.merge()
    assert lin.bias is not None and torch.equal(lin.bias[[2, 3]], torch.full((2,), 0.5))
    torch.testing.assert_close(layer(x), adapted)
    layer.unmerge()
    assert lin.bias is None


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_unload_restores_base_bit_exact(arch):
    base = build(arch)
    model = copy.deepcopy(base)
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    inject(model, make_plan(base, r=4, cols=2), bias=True)
    randomize_deltas(model)
    with torch.no_grad():  # pretend the head trained too
        for n, p in model.named_parameters():
            if n.startswith("classifier."):
                p.add_(1.0)
    merge(model)  # unload must also undo an in-place merge
    out = unload(model)
    assert out is model and not adapted_modules(model)
    base_sd, sd = base.state_dict(), model.state_dict()
    assert base_sd.keys() == sd.keys()
    for k in base_sd:
        assert torch.equal(base_sd[k], sd[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    inject(model, make_plan(base))  # can be injected again after unload


def test_merge_refuses_nan_naming_the_module():
    base = testing.tiny_llama()
    model = inject(copy.deepcopy(base), make_plan(base))
    name = find_targets(base)[2]
    with torch.no_grad():
        model.get_submodule(name).delta[0, 0] = float("nan")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"{name}.delta.*NaN"):
        merge_and_unload(model)
    with pytest.raises(ValueError, match=name):
        merge(model)
    assert adapted_modules(model)  # nothing unloaded, nothing merged
    for k, v in model.state_dict().items():
        assert torch.allclose(v, weights[k], equal_nan=True, rtol=0, atol=0), k


# ---------------------------------------------------------------- refusals
def test_empty_plan_refused():
    base = testing.tiny_llama()
    plan = make_plan(base, r=0)
    with pytest.raises(ValueError, match="the plan selects no rows: raise the budget"):
        inject(base, plan)
    assert not adapted_modules(base) and all(p.requires_grad for p in base.parameters())


def test_double_injection_refused():
    base = testing.tiny_llama()
    inject(base, make_plan(base))
    with pytest.raises(ValueError, match="already has a row-sparse adapter"):
        inject(base, make_plan(base))


def test_plan_for_another_model_refused_naming_module_and_shapes():
    plan = make_plan(testing.tiny_llama(hidden=64))
    other = testing.tiny_llama(hidden=32)
    with pytest.raises(ValueError, match=r"module 'model\.layers\.\d\.[\w.]+'.*\(\d+, 64\)"
                                         r".*\(\d+, 32\)"):
        inject(other, plan)


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_save_load_round_trip_bit_exact(arch, tmp_path):
    base = build(arch)
    model = inject(copy.deepcopy(base), make_plan(base, r=3, cols=2), bias=True, dropout=0.1)
    randomize_deltas(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("classifier."):
                p.mul_(-2.0)
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # + card
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_class"] == type(base).__name__
    assert config["base_model_hash"] == model_fingerprint(base)
    assert config["delta_dtype"] == "float32" and config["bias"] and config["dropout"] == 0.1
    assert RowPlan.from_dict(config["plan"]).to_dict() == adapter_plan_dict(model)
    assert config["library_version"]

    loaded = load_adapter(build(arch), tmp_path / "adapter").eval()
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    for name, layer in adapted_modules(model).items():
        other = loaded.get_submodule(name)
        assert torch.equal(layer.rows, other.rows) and torch.equal(layer.columns, other.columns)
        assert other.dropout.p == 0.1
    batch = testing.random_batches(base, n=1)[0]
    assert torch.equal(outputs(model, batch), outputs(loaded, batch))
    assert trainable_parameters(loaded) == trainable_parameters(model)


def adapter_plan_dict(model):
    from rowsft_nb.adapter import adapter_state
    return adapter_state(model).plan.to_dict()


def test_load_onto_wrong_model_names_module_and_shapes(tmp_path):
    base = testing.tiny_llama(hidden=64)
    save_adapter(inject(base, make_plan(base)), tmp_path)
    other = testing.tiny_llama(hidden=32)
    with pytest.raises(ValueError, match=r"module 'model\.layers\.\d\.[\w.]+'.*\(\d+, 64\)"
                                         r".*\(\d+, 32\)"):
        load_adapter(other, tmp_path)
    assert not adapted_modules(other)


def test_load_head_with_other_label_count_fails(tmp_path):
    base = testing.tiny_bert(num_labels=2)
    save_adapter(inject(base, make_plan(base)), tmp_path)
    other = testing.tiny_bert(num_labels=3)
    with pytest.raises(ValueError, match=r"classifier.*\(3, 32\).*\(2, 32\)"):
        load_adapter(other, tmp_path)
    assert not adapted_modules(other)


def test_load_onto_different_weights_warns(tmp_path):
    base = testing.tiny_llama(seed=0)
    save_adapter(inject(base, make_plan(base)), tmp_path)
    with pytest.warns(UserWarning, match="hash"):
        load_adapter(testing.tiny_llama(seed=1), tmp_path)


# ---------------------------------------------------------------- dtypes, dropout, memory
def test_bf16_base_with_fp32_delta():
    base = testing.tiny_llama().to(torch.bfloat16)
    model = inject(copy.deepcopy(base), make_plan(base), train_heads=False)
    layer = next(iter(adapted_modules(model).values()))
    assert layer.delta.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    batch = testing.random_batches(base, n=1)[0]
    out = model(**batch)
    assert out.logits.dtype == torch.bfloat16
    assert torch.equal(out.logits, outputs(base, batch))
    out.loss.backward()
    grads = [layer.delta.grad for layer in adapted_modules(model).values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
               for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # the fp32 grads agree with a fp32 dense reference run on the same (bf16-valued) weights
    ref = dense_reference(base.float(), model)
    for p in ref.parameters():
        p.requires_grad_(False)
    rmods = dict(ref.named_modules())
    name, layer = list(adapted_modules(model).items())[-1]
    rmods[name].weight.requires_grad_(True)
    ref(**batch).loss.backward()
    torch.testing.assert_close(layer.delta.grad, rmods[name].weight.grad[layer.rows],
                               rtol=0.1, atol=2e-3)


def test_autocast_bf16_on_cpu_trains_fp32_deltas():
    base = testing.tiny_llama()
    model = inject(copy.deepcopy(base), make_plan(base), train_heads=False)
    batch = testing.random_batches(base, n=1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    layer = next(iter(adapted_modules(model).values()))
    assert layer.delta.grad.dtype == torch.float32 and layer.delta.grad.abs().sum() > 0


def test_dropout_applies_to_delta_path_only_in_training():
    torch.manual_seed(0)
    layer = RowSparseLinear(nn.Linear(16, 8), rows=[0, 1], dropout=0.5)
    x = torch.randn(4, 16)
    base_out = layer.base_layer(x)
    layer.train()
    assert torch.equal(layer(x), base_out)  # zero delta: dropout cannot change the output
    with torch.no_grad():
        layer.delta.fill_(1.0)
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)  # stochastic delta path
    assert torch.equal(a[:, 2:], base_out[:, 2:])  # untouched rows never see dropout
    layer.eval()
    expected = base_out.clone()
    expected[:, :2] += x.sum(-1, keepdim=True)
    torch.testing.assert_close(layer(x), expected)


class NaiveRowDelta(nn.Module):
    """The obvious version: cast x to the delta dtype, linear, index_add (plain autograd)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        lay = self.layer
        y = lay.base_layer(x)
        d = torch.nn.functional.linear(x.to(lay.delta.dtype), lay.delta)
        return y.index_add(-1, lay.rows, d.to(y.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_function_saves_less_than_naive_index_add(dtype):
    torch.manual_seed(0)
    layer = RowSparseLinear(nn.Linear(64, 48).to(dtype), rows=torch.arange(0, 48, 4))
    naive = NaiveRowDelta(layer)
    x = torch.randn(8, 32, 64, dtype=dtype, requires_grad=True)
    ours = saved_tensor_bytes(lambda: layer(x).float().sum(), layer)
    theirs = saved_tensor_bytes(lambda: naive(x).float().sum(), layer)
    torch.testing.assert_close(layer(x), naive(x))
    assert ours <= theirs
    if dtype == torch.bfloat16:  # naive keeps an fp32 copy of x; we keep x itself
        assert ours < theirs
        assert theirs - ours >= x.numel() * 2


def test_fingerprint_of_adapted_model_is_the_base_fingerprint():
    base = testing.tiny_gpt2()
    model = inject(copy.deepcopy(base), make_plan(base))
    assert model_fingerprint(model) == model_fingerprint(base)
    randomize_deltas(model)
    merge(model)  # merged weights are different weights
    assert model_fingerprint(model) != model_fingerprint(base)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_delta_gradients(reentrant):
    base = testing.tiny_llama()
    batch = testing.random_batches(base, n=1)[0]
    plain = inject(copy.deepcopy(base), make_plan(base)).train()
    plain(**batch).loss.backward()
    ckpt = inject(copy.deepcopy(base), make_plan(base)).train()
    kwargs = {"use_reentrant": reentrant}
    if hasattr(ckpt, "activation_checkpointing_enable"):  # transformers >= 5 name
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())
    ckpt(**batch).loss.backward()
    for a, b in zip(adapted_modules(plain).values(), adapted_modules(ckpt).values()):
        assert b.delta.grad is not None
        torch.testing.assert_close(b.delta.grad, a.delta.grad)


def test_head_in_the_plan_gets_rows_not_full_training():
    base = testing.tiny_bert()
    modules = dict(base.named_modules())
    names = find_targets(base, include_heads=True)
    assert "classifier" in names
    plan = RowPlan(rows={n: [0] for n in names},
                   shapes={n: linear_shape(modules[n]) for n in names})
    model = inject(copy.deepcopy(base), plan)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.delta" in trainable and "classifier.base_layer.weight" not in trainable
    assert trainable_parameters(model)[0] == plan.trainable_parameters()


def test_save_through_a_ddp_style_wrapper(tmp_path):
    class Wrapper(nn.Module):  # what DDP / accelerate put around the model: ``.module``
        def __init__(self, module):
            super().__init__()
            self.module = module

    base = testing.tiny_llama()
    model = inject(copy.deepcopy(base), make_plan(base))
    randomize_deltas(model)
    save_adapter(Wrapper(model), tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    for name, layer in adapted_modules(model).items():
        assert torch.equal(loaded.get_submodule(name).delta, layer.delta)
    assert trainable_parameters(Wrapper(model)) == trainable_parameters(model)


# ---------------------------------------------------------------- base weight/bias views
@pytest.mark.parametrize("conv1d", [False, True])
def test_wrapper_exposes_base_weight_and_bias_without_duplicating_them(conv1d):
    model = build("gpt2" if conv1d else "bert")
    plan = make_plan(model)
    n_params = len(list(model.parameters()))
    keys = set(model.state_dict())
    inject(model, plan, bias=True)
    for name, layer in adapted_modules(model).items():
        assert layer.weight is layer.base_layer.weight      # as model code reads it (T5)
        assert layer.bias is layer.base_layer.bias
        assert layer.weight.dtype == torch.float32 and not layer.weight.requires_grad
        own = {k for k, _ in layer.named_parameters(recurse=False)}
        assert own == {"delta", "delta_bias"}
        with pytest.raises((AttributeError, KeyError)):
            layer.weight = nn.Parameter(torch.zeros(1))     # read-only
    deltas = sum(len(m.delta_parameters()) for m in adapted_modules(model).values())
    assert len(list(model.parameters())) == n_params + deltas
    after = set(model.state_dict())
    assert not any(k.endswith(".weight") and ".base_layer." not in k and k.replace(
        ".weight", ".base_layer.weight") in after for k in after)
    assert {k.replace(".base_layer", "") for k in after if "delta" not in k} == keys
