"""rowsft_nb.bench: memory accounting against direct arithmetic, baselines against the adapter."""
import copy

import pytest
import torch

from rowsft_nb import bench, inject
from rowsft_nb.plan import RowPlan
from rowsft_nb.targets import find_targets, linear_shape
from rowsft_nb.testing import random_batches, synthetic_report

# synthetic reports carry a placeholder model hash: inject() warns about it, as it should
pytestmark = pytest.mark.filterwarnings("ignore:the plan was selected on weights")


def _report(model, seed=0):
    names = find_targets(model)
    modules = dict(model.named_modules())
    return synthetic_report({n: linear_shape(modules[n]) for n in names}, seed=seed)


@pytest.fixture
def llama_setup(tiny_llama):
    report = _report(tiny_llama)
    plan, column_plan = bench.matched_plans(report, lora_rank=2)
    batch = random_batches(tiny_llama, n=1, batch_size=2, seq_len=16)[0]
    return tiny_llama, plan, column_plan, batch


def test_matched_plans_equal_budget_and_lora_count(llama_setup):
    model, plan, column_plan, _ = llama_setup
    denom = sum(d_out + d_in for d_out, d_in in plan.shapes.values())
    assert plan.trainable_parameters() <= 2 * denom
    assert column_plan.trainable_parameters() <= 2 * denom
    assert plan.trainable_parameters() > 0.9 * 2 * denom
    assert set(plan.modules) == set(plan.shapes)  # min_rows=1: every module has rows
    assert round(plan.equivalent_lora_rank()) == 2
    lora = bench.apply_lora(copy.deepcopy(model), plan)
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert n_lora == 2 * denom  # r * (d_in + d_out) per module, exactly


def test_memory_components_match_arithmetic(llama_setup):
    model, plan, _, batch = llama_setup
    adapted = inject(copy.deepcopy(model), plan, train_heads=False)
    mem = bench.measure_memory(adapted, batch, "rowsft")
    n = plan.trainable_parameters()
    assert mem.trainable_parameters == n
    assert mem.trainable == 4 * n           # fp32 deltas
    assert mem.gradients == 4 * n           # one gradient per delta
    # AdamW: exp_avg + exp_avg_sq per parameter, plus a float32 step scalar per tensor
    assert mem.optimizer == 2 * 4 * n + 4 * len(plan.modules)
    base_bytes = sum(p.numel() * 4 for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # frozen base + its buffers + the adapter's int64 row indices
    assert mem.weights == base_bytes + buffers + 8 * plan.num_rows()
    assert mem.step_peak > 0 and mem.saved > 0
    assert mem.total == mem.weights + mem.trainable + mem.optimizer + mem.step_peak


def test_floor_has_nothing_trainable_and_full_counts_everything(llama_setup):
    model, plan, _, batch = llama_setup
    floor = bench.measure_memory(copy.deepcopy(model), batch, "floor")
    assert floor.trainable == floor.gradients == floor.optimizer == 0
    assert floor.trainable_parameters == 0
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert floor.weights == sum(p.numel() * 4 for p in model.parameters()) + buffers
    full = bench.measure_memory(bench.apply_full(copy.deepcopy(model)), batch, "full")
    n_all = sum(p.numel() for p in model.parameters())
    assert full.weights == buffers and full.trainable == full.gradients == 4 * n_all
    assert full.saved >= floor.saved - 4 * batch["input_ids"].numel() * model.config.hidden_size


def test_dense_mask_gradients_zero_outside_rows(llama_setup):
    model, plan, _, batch = llama_setup
    masked = bench.apply_dense_mask(copy.deepcopy(model), plan)
    masked(**batch).loss.backward()
    modules = dict(masked.named_modules())
    checked = 0
    for name, rows in plan.rows.items():
        g = modules[name].weight.grad
        assert g is not None and g.shape == modules[name].weight.shape  # full size
        off = torch.ones(g.shape[0], dtype=torch.bool)
        off[rows] = False
        assert torch.count_nonzero(g[off]) == 0
        assert torch.count_nonzero(g[rows]) > 0
        checked += 1
    assert checked == len(plan.modules)
    # the masked full-size gradient on the rows equals the row adapter's delta gradient
    adapted = inject(copy.deepcopy(model), plan, train_heads=False)
    adapted(**batch).loss.backward()
    name = plan.modules[0]
    torch.testing.assert_close(modules[name].weight.grad[plan.rows[name]],
                               dict(adapted.named_modules())[name].delta.grad)


def test_onehot_equals_row_adapter(llama_setup):
    model, plan, _, batch = llama_setup
    onehot = bench.apply_onehot(copy.deepcopy(model), plan)
    adapted = inject(copy.deepcopy(model), plan, train_heads=False)
    with torch.no_grad():
        base_logits = model(**batch).logits
        torch.testing.assert_close(onehot(**batch).logits, base_logits)  # zero init
        g = torch.Generator().manual_seed(1)
        for name in plan.modules:
            d = torch.randn(dict(onehot.named_modules())[name].delta.shape, generator=g)
            dict(onehot.named_modules())[name].delta.copy_(d)
            dict(adapted.named_modules())[name].delta.copy_(d)
        torch.testing.assert_close(onehot(**batch).logits, adapted(**batch).logits,
                                   rtol=1e-4, atol=1e-5)
    mem = bench.measure_memory(onehot, batch, "onehot")
    assert mem.trainable == 4 * plan.trainable_parameters()
    onehot_bytes = sum(4 * r.numel() * plan.shapes[n][0] for n, r in plan.rows.items())
    base_bytes = sum(p.numel() * 4 for p in model.parameters())
    base_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    assert mem.weights == base_bytes + onehot_bytes  # the one-hot matrices are extra memory


def test_every_method_on_tiny_bert_and_step_time():
    from rowsft_nb.testing import tiny_bert

    model = tiny_bert()
    plan, column_plan = bench.matched_plans(_report(model), lora_rank=2)
    batch = random_batches(model, n=1, batch_size=2, seq_len=12)[0]
    cfg = bench.BenchConfig(lora_rank=2, time_repeats=2)
    res = bench.memory_and_speed("tiny-bert", model, batch, plan, column_plan, cfg)
    rows = res["methods"]
    assert set(rows) == set(bench.METHODS)
    assert rows["floor"]["overhead"] == 0
    assert rows["columns"]["trainable_parameters"] == column_plan.trainable_parameters()
    assert rows["rowsft"]["trainable_parameters"] == plan.trainable_parameters()
    n_all = sum(p.numel() for p in model.parameters())
    assert rows["full"]["trainable_parameters"] == n_all
    # dense mask keeps full-size gradients + AdamW state for every planned weight
    planned = sum(o * i for o, i in plan.shapes.values())
    assert rows["dense_mask"]["optimizer"] >= 2 * 4 * planned
    for r in rows.values():
        assert r["step"]["median_s"] > 0
    assert res["ratios"]["rowsft_overhead_over_lora"] == pytest.approx(
        rows["rowsft"]["overhead"] / rows["lora"]["overhead"])
    full = {"memory": {"tiny": res}}
    full["goals"] = bench.goals(full)
    assert len(full["goals"]) == 5
    text = bench.to_markdown(full)
    assert text.count("\n| ") >= len(bench.METHODS) + 5  # one table row per method + goals
    assert f"| rowsft | {plan.trainable_parameters():,} |" in text


def test_prepare_method_errors(llama_setup):
    model, plan, _, _ = llama_setup
    with pytest.raises(ValueError, match="unknown method"):
        bench.prepare_method(copy.deepcopy(model), "bogus", plan)
    with pytest.raises(ValueError, match="column_plan"):
        bench.prepare_method(copy.deepcopy(model), "columns", plan)
    with pytest.raises(ValueError, match="no trainable"):
        bench.measure_memory(bench.apply_floor(copy.deepcopy(model)),
                             random_batches(model, n=1)[0], "rowsft")
    with pytest.raises(ValueError, match="unknown benchmark parts"):
        bench.run(parts=["nope"])


def test_goals_compare_against_limits():
    res = {"memory": {"m": {"ratios": {
        "rowsft_overhead_over_lora": 0.8, "columns_overhead_over_lora": 0.7,
        "rowsft_total_over_dense_mask": 0.4, "rowsft_step_over_lora": 1.0,
        "rowsft_step_over_floor": 1.1}}},
        "accuracy": {"summary": {"rowsft_taylor": {"mean": 0.80}, "lora": {"mean": 0.805},
                                 "rowsft_random": {"mean": 0.81}}}}
    met = {g["goal"]: g["met"] for g in bench.goals(res)}
    assert met["row overhead above floor <= 1.0x LoRA's"]
    assert not met["column overhead above floor <= 0.5x LoRA's"]
    assert met["row total <= 0.5x dense-mask total"]
    assert not met["row step time <= 0.9x LoRA"]
    assert met["row step time <= 1.2x frozen floor"]
    assert met["row (Taylor) accuracy within 1 point of LoRA (LoRA - row, points)"]
    assert not met["importance rows above random rows (Taylor - random, points)"]
