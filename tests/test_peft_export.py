"""Exact PEFT LoRA export / import (issue 15, part 2): a row adapter written by export_peft
loads with peft.PeftModel.from_pretrained to the row-adapted outputs (1e-5) on LLaMA-,
BERT- (classifier head via modules_to_save, bias deltas via lora_bias) and GPT-2-shaped
(Conv1D) tiny models; import_peft reads it back bit-exactly."""
import json
import warnings

import peft
import pytest
import torch

import rowsft_nb as rs
from rowsft_nb import testing
from rowsft_nb.adapter import adapted_modules, export_peft, import_peft, inject, merge, save_adapter
from rowsft_nb.plan import RowPlan
from rowsft_nb.targets import find_targets, linear_shape, row_weight


BUILDERS = {"llama": testing.tiny_llama, "bert": testing.tiny_bert, "gpt2": testing.tiny_gpt2}


def make_plan(model, seed=0):
    """Different rows per module (different ranks), columns on every third module."""
    g = torch.Generator().manual_seed(seed)
    names = find_targets(model, "all-linear")
    rows, columns, shapes = {}, {}, {}
    for i, name in enumerate(names):
        d_out, d_in = linear_shape(model.get_submodule(name))
        shapes[name] = (d_out, d_in)
        rows[name] = torch.randperm(d_out, generator=g)[: 1 + i % 4]
        if i % 3 == 0:
            columns[name] = torch.randperm(d_in, generator=g)[:2]
    return RowPlan(rows=rows, shapes=shapes, columns=columns)


def adapted(arch, bias=False, seed=0):
    """A tiny model with a row adapter whose deltas (and head) hold random values."""
    model = inject(BUILDERS[arch](), make_plan(BUILDERS[arch]()), bias=bias)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def outputs(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("arch, bias", [("llama", False), ("llama", True), ("bert", True),
                                        ("gpt2", False)])
def test_peft_loads_the_export_to_the_row_adapted_outputs(arch, bias, tmp_path):
    model = adapted(arch, bias=bias)
    batch = testing.random_batches(model, n=1)[0]
    want = outputs(model, batch)
    base_out = outputs(BUILDERS[arch](), batch)
    assert (want - base_out).abs().max() > 1e-3  # the adapter changes the outputs

    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    layers = adapted_modules(model)
    ranks = {n: m.rows.numel() + m.columns.numel() for n, m in layers.items()}
    assert config["peft_type"] == "LORA" and config.get("lora_bias", False) is bias
    assert len(set(ranks.values())) > 1 and config["rank_pattern"]  # per-module ranks
    if arch == "bert":
        assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    if arch == "gpt2":
        assert config["fan_in_fan_out"] is True

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: lora_bias on bias-free layers, 1-D bias tensors
        peft_model = peft.PeftModel.from_pretrained(BUILDERS[arch](), str(tmp_path)).eval()
    for name, layer in layers.items():  # PEFT built the rank we exported, with scaling 1
        lora = peft_model.base_model.model.get_submodule(name)
        assert lora.r["default"] == ranks[name] and lora.scaling["default"] == 1.0
    got = outputs(peft_model, batch)
    diff = (got - want).abs().max().item()
    print(f"{arch}: max |PEFT - row adapter| = {diff:.3g}")
    assert diff < 1e-5

    if arch == "gpt2":  # Conv1D layout: PEFT's merge (fan_in_fan_out transpose) is exact too
        merged = peft_model.merge_and_unload()
        assert (outputs(merged, batch) - want).abs().max() < 1e-5


@pytest.mark.parametrize("arch, bias", [("llama", False), ("bert", True), ("gpt2", False)])
def test_import_peft_reads_the_export_back_bit_exactly(arch, bias, tmp_path):
    model = adapted(arch, bias=bias)
    export_peft(model, tmp_path)
    back = import_peft(BUILDERS[arch](), tmp_path)
    want, got = adapted_modules(model), adapted_modules(back)
    assert want.keys() == got.keys()
    for name, layer in want.items():
        assert torch.equal(layer.rows, got[name].rows)
        assert torch.equal(layer.columns, got[name].columns)
        for attr, value in layer.delta_parameters().items():
            assert torch.equal(value, getattr(got[name], attr)), (name, attr)
    assert back._rowsft_adapter.plan.to_dict() == model._rowsft_adapter.plan.to_dict()
    heads = dict(model.named_parameters())
    for key, value in back.named_parameters():
        if value.requires_grad and not key.endswith(("delta", "delta_bias")):
            assert torch.equal(value, heads[key])  # trained classifier head
    batch = testing.random_batches(model, n=1)[0]
    assert torch.equal(outputs(back, batch), outputs(model, batch))


def test_lora_resaved_by_peft_still_imports_exactly(tmp_path):
    """Without our record (PEFT re-saves the adapter), the one-hot structure is decoded."""
    model = adapted("bert", bias=True)
    export_peft(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(testing.tiny_bert(), str(tmp_path / "ours"))
        peft_model.save_pretrained(str(tmp_path / "resaved"))
    back = import_peft(testing.tiny_bert(), tmp_path / "resaved")
    for name, layer in adapted_modules(model).items():
        other = adapted_modules(back)[name]
        assert torch.equal(layer.rows, other.rows) and torch.equal(layer.columns, other.columns)
        for attr, value in layer.delta_parameters().items():
            assert torch.equal(value, getattr(other, attr))
    assert torch.equal(back.classifier.weight, model.classifier.weight)


def test_uniform_rank_pads_with_zero_components(tmp_path):
    model = adapted("llama")
    rs.export_peft(model, tmp_path, uniform_rank=True)  # the top-level names
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    top = max(m.rows.numel() + m.columns.numel() for m in adapted_modules(model).values())
    assert config["r"] == config["lora_alpha"] == top and not config["rank_pattern"]
    batch = testing.random_batches(model, n=1)[0]
    peft_model = peft.PeftModel.from_pretrained(testing.tiny_llama(), str(tmp_path)).eval()
    assert (outputs(peft_model, batch) - outputs(model, batch)).abs().max() < 1e-5
    back = rs.import_peft(testing.tiny_llama(), tmp_path)
    for name, layer in adapted_modules(model).items():
        assert torch.equal(layer.delta, adapted_modules(back)[name].delta)


def test_lora_factors_multiply_to_the_merged_weight_change():
    """Independent reference: B @ A equals W_merged - W0 of rowsft's own merge."""
    from rowsft_nb.adapter.peft_io import lora_factors

    model = adapted("gpt2")
    name, layer = next((n, m) for n, m in adapted_modules(model).items() if m.columns.numel())
    a, b, _ = lora_factors(layer)
    w0 = row_weight(testing.tiny_gpt2().get_submodule(name))  # the untouched base weight
    merge(model)
    assert torch.allclose(b @ a, row_weight(layer.base_layer) - w0, atol=1e-6)


def test_export_refusals(tmp_path):
    model = adapted("llama")
    save_adapter(model, tmp_path / "rowsft")
    with pytest.raises(ValueError, match="holds a rowsft_nb adapter"):
        export_peft(model, tmp_path / "rowsft")
    merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        export_peft(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ValueError, match="no row-sparse adapter"):
        export_peft(testing.tiny_llama(), tmp_path / "plain")


def test_a_dense_lora_is_refused_and_the_model_left_unchanged(tmp_path):
    base = testing.tiny_llama()
    cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False)
    peft.get_peft_model(base, cfg).save_pretrained(str(tmp_path))
    fresh = testing.tiny_llama()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"q_proj' rank component 0 is not row-sparse"):
        import_peft(fresh, tmp_path)
    assert not adapted_modules(fresh) and not hasattr(fresh, "_rowsft_adapter")
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_row_deltas_on_the_classifier_itself_export_without_task_type(tmp_path):
    """PEFT's SEQ_CLS would train `classifier` as a whole module: the export says no task."""
    model = testing.tiny_bert()
    names = ["bert.encoder.layer.0.attention.self.query", "classifier"]
    plan = RowPlan(rows={n: [1] for n in names},
                   shapes={n: linear_shape(model.get_submodule(n)) for n in names})
    inject(model, plan)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    with pytest.warns(UserWarning, match="'classifier' has row deltas"):
        export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None
    batch = testing.random_batches(model, n=1)[0]
    peft_model = peft.PeftModel.from_pretrained(testing.tiny_bert(), str(tmp_path)).eval()
    assert (outputs(peft_model, batch) - outputs(model, batch)).abs().max() < 1e-5
