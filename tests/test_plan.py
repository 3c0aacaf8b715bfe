"""RowPlan: validate, save/load, overlap, LoRA-equivalent rank and the memory estimate."""
import pytest
import torch

from rowsft_nb.memory import MemoryEstimate, estimate_memory, input_key
from rowsft_nb.plan import RowPlan
from rowsft_nb.selection import FixedRows, ParamBudget, select
from rowsft_nb.targets import find_targets, linear_shape
from rowsft_nb.testing import synthetic_report


def plan_for(model, r=2) -> RowPlan:
    modules = dict(model.named_modules())
    shapes = {n: linear_shape(modules[n]) for n in find_targets(model)}
    return RowPlan(rows={n: list(range(r)) for n in shapes}, shapes=shapes)


# ---------------------------------------------------------------- validate / files
def test_validate_accepts_matching_model_and_names_the_module_otherwise(tiny_llama):
    plan = plan_for(tiny_llama)
    plan.validate(tiny_llama)
    name = "model.layers.1.self_attn.k_proj"
    wrong_shape = RowPlan(rows={name: [0]}, shapes={name: (7, 64)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj.*\(7, 64\)"):
        wrong_shape.validate(tiny_llama)
    missing = RowPlan(rows={"model.layers.9.mlp.up_proj": [0]},
                      shapes={"model.layers.9.mlp.up_proj": (4, 4)})
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj.*does not exist"):
        missing.validate(tiny_llama)
    not_linear = RowPlan(rows={"model.norm": [0]}, shapes={"model.norm": (64, 64)})
    with pytest.raises(ValueError, match=r"model\.norm.*not nn\.Linear"):
        not_linear.validate(tiny_llama)
    with pytest.raises(ValueError, match=r"out of range for 'x\.q'"):
        RowPlan(rows={"x.q": [0, 8]}, shapes={"x.q": (8, 2)})


def test_select_on_real_model_report_validates(tiny_gpt2):
    modules = dict(tiny_gpt2.named_modules())
    shapes = {n: linear_shape(modules[n]) for n in find_targets(tiny_gpt2)}
    plan = select(synthetic_report(shapes, seed=1), ParamBudget(0.05))
    plan.validate(tiny_gpt2)
    assert 0 < plan.trainable_parameters() <= plan.meta["budget_params"]


def test_save_load_round_trip_keeps_rows_columns_and_meta(tmp_path):
    plan = RowPlan(rows={"a.0.q": [5, 1, 3, 3]}, shapes={"a.0.q": (8, 4), "a.0.k": (6, 2)},
                   columns={"a.0.k": [1]}, meta={"budget": {"kind": "fixed_rows", "r": 3}})
    assert plan.rows["a.0.q"].tolist() == [1, 3, 5] and plan.rows["a.0.q"].dtype == torch.int64
    plan.save(tmp_path / "p.json")
    back = RowPlan.load(tmp_path / "p.json")
    assert back.meta == plan.meta and back.shapes == plan.shapes
    assert back.rows["a.0.q"].tolist() == [1, 3, 5] and back.columns["a.0.k"].tolist() == [1]
    assert back.trainable_parameters() == 3 * 4 + 1 * 6


# ---------------------------------------------------------------- overlap
def test_overlap_self_is_one_disjoint_is_zero_and_partial_is_jaccard():
    shapes = {"l.0.a": (10, 2), "l.0.b": (10, 2)}
    p = RowPlan(rows={"l.0.a": [0, 1], "l.0.b": [5]}, shapes=shapes)
    q = RowPlan(rows={"l.0.a": [2, 3], "l.0.b": [6]}, shapes=shapes)
    r = RowPlan(rows={"l.0.a": [1, 2]}, shapes=shapes)
    assert p.overlap(p) == {"overall": 1.0, "per_module": {"l.0.a": 1.0, "l.0.b": 1.0}}
    assert p.overlap(q)["overall"] == 0.0
    ov = p.overlap(r)  # a: {0,1} vs {1,2} -> 1/3; b: {5} vs {} -> 0; overall 1/4
    assert ov["per_module"] == {"l.0.a": pytest.approx(1 / 3), "l.0.b": 0.0}
    assert ov["overall"] == pytest.approx(1 / 4)
    other = RowPlan(rows={"l.0.a": [0]}, shapes={"l.0.a": (9, 2)})
    with pytest.raises(ValueError, match="l.0.a"):
        p.overlap(other)


def test_overlap_of_two_metrics_on_a_7b_like_report_is_between():
    shapes = {f"m.{i}.p": (200, 8) for i in range(3)}
    a = select(synthetic_report(shapes, seed=0), FixedRows(100))
    b = select(synthetic_report(shapes, seed=1), FixedRows(100))
    ov = a.overlap(b)
    inter = sum(len(set(a.rows[n].tolist()) & set(b.rows[n].tolist())) for n in shapes)
    assert ov["overall"] == pytest.approx(inter / (600 - inter))


# ---------------------------------------------------------------- LoRA rank and memory
def test_equivalent_lora_rank():
    plan = RowPlan(rows={"l.0.q": list(range(64))}, shapes={"l.0.q": (4096, 4096),
                                                             "l.0.unused": (10, 10)})
    assert plan.equivalent_lora_rank() == pytest.approx(32.0)  # 64*4096 = 32*(4096+4096)
    assert RowPlan(rows={}, shapes={"x": (2, 2)}).equivalent_lora_rank() == 0.0


def test_memory_estimate_one_module_against_direct_arithmetic():
    name = "model.layers.0.mlp.down_proj"
    plan = RowPlan(rows={name: [0, 1]}, shapes={name: (8, 32)}, meta={"model_parameters": 1000})
    est = plan.memory_estimate(batch_size=2, seq_len=3, dtype=torch.float32, optimizer="adamw")
    assert isinstance(est, MemoryEstimate)
    b, tokens, n = 4, 6, 2 * 32
    k = n / (8 + 32)
    assert est.lora_rank == pytest.approx(1.6)
    assert est.methods["rowsft"] == {"weights": 1000 * b, "trainable": n * b,
                                     "gradients": n * b, "optimizer": 2 * n * b,
                                     "activations": tokens * 32 * b}
    assert est.methods["lora"] == {"weights": 1000 * b, "trainable": n * b, "gradients": n * b,
                                   "optimizer": 2 * n * b,
                                   "activations": round(tokens * 32 * b + tokens * k * b)}
    assert est.methods["full"] == {"weights": 0, "trainable": 1000 * b, "gradients": 1000 * b,
                                   "optimizer": 2 * 1000 * b, "activations": tokens * 32 * b}
    assert est.total("full") == 4 * 1000 * b + tokens * 32 * b
    frame = est.to_frame()
    assert list(frame.index) == ["rowsft", "lora", "full"]
    assert frame.loc["rowsft", "total"] == est.total("rowsft")
    assert est.to_frame("KiB").loc["full", "trainable"] == pytest.approx(4000 / 1024)
    half = plan.memory_estimate(2, 3, dtype=torch.bfloat16, optimizer="sgd")
    assert half.methods["rowsft"]["trainable"] == n * 2 and half.methods["rowsft"]["optimizer"] == 0


def test_memory_shared_inputs_counted_once_and_fallback_note():
    shapes = {f"m.layers.0.self_attn.{p}": (16, 16) for p in ("q_proj", "k_proj", "v_proj")}
    shapes["m.layers.0.self_attn.o_proj"] = (16, 16)
    plan = RowPlan(rows={n: [0] for n in list(shapes)[:3]}, shapes=shapes)
    assert input_key("m.layers.0.self_attn.q_proj") == input_key("m.layers.0.self_attn.v_proj")
    est = estimate_memory(plan, 1, 10)
    assert est.methods["rowsft"]["activations"] == 10 * 16 * 4  # q/k/v: one saved input
    assert est.methods["full"]["activations"] == 2 * 10 * 16 * 4  # + o_proj's input
    assert est.model_parameters == 4 * 256 and "model_parameters" in est.notes[0]
    with pytest.raises(ValueError, match="optimizer"):
        plan.memory_estimate(1, 1, optimizer="lion")


def test_memory_estimate_at_7b_shapes_rowsft_below_full():
    from rowsft_nb.testing import llama2_7b_report

    plan = select(llama2_7b_report(), FixedRows(64))
    est = plan.memory_estimate(1, 512, torch.bfloat16)
    assert est.model_parameters == 6_738_415_616
    assert est.lora_rank == pytest.approx(plan.equivalent_lora_rank())
    assert est.total("rowsft") < est.total("full")
    assert est.methods["rowsft"]["trainable"] == plan.trainable_parameters() * 2
