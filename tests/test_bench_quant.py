"""rowsft_nb.bench.quant (LoftQ start, step-0 errors, merges, update survival, changed blocks)
and benchmarks/bench_quant.py (the quantized-base benchmark, --tiny end to end)."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

import rowsft_nb as rs
from rowsft_nb import quant as Q
from rowsft_nb.bench import apply_lora
from rowsft_nb.bench import quant as BQ
from rowsft_nb.testing import random_batches

bnb = pytest.importorskip("bitsandbytes")  # the 'quant' extra; make install installs it
pytest.importorskip("peft")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the runner's modules (not part of the package)

import bench_all  # noqa: E402
import bench_goals  # noqa: E402
import bench_quant  # noqa: E402
import bench_report  # noqa: E402

# rows are ranked on the float copy and injected into the 4-bit one, as the authors do
pytestmark = [pytest.mark.filterwarnings("ignore:the plan was selected on weights"),
              pytest.mark.filterwarnings("ignore:MatMul8bitLt")]

LAYER = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def setup():
    fm = bench_quant.llama64()
    qm = Q.quantize(copy.deepcopy(fm), "nf4", compute_dtype=torch.float32)
    plan = rs.select(rs.score(fm, None, metric="l2", progress=False), rs.FixedRows(8))
    return fm, qm, plan


def _svals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


def test_loftq_init_is_the_truncated_svd_of_the_quantization_residual(setup):
    fm, qm, plan = setup
    lora = apply_lora(copy.deepcopy(qm), plan, rank=3)   # lora_alpha = 2r: scaling 2
    BQ.loftq_init(lora, fm, plan.modules, 3)
    layer = BQ.lora_layers(lora, [LAYER])[LAYER]
    assert float(layer.scaling["default"]) == 2.0
    R = (fm.get_submodule(LAYER).weight.detach().double()
         - Q.dequantize_weight(qm.get_submodule(LAYER)).double())
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    best = (U[:, :3] * S[:3]) @ Vh[:3]                       # Eckart-Young, rank 3
    got = 2.0 * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-4)
    # the nuclear ratio of a rank-r truncation: the share of singular values it keeps
    num = den = 0.0
    for name in plan.modules:
        s = _svals(fm.get_submodule(name).weight.detach().float()
                   - Q.dequantize_weight(qm.get_submodule(name)))
        num, den = num + float(s[:3].sum()), den + float(s.sum())
    assert BQ.lora_nuclear_ratio(lora, fm, plan.modules) == pytest.approx(num / den, rel=1e-4)
    with pytest.raises(ValueError, match="LoRA rank is 3, not 4"):
        BQ.loftq_init(lora, fm, plan.modules, 4)


def test_step0_errors_qlora_equals_plain_and_rows_repair_their_residual(setup):
    fm, qm, plan = setup
    batches = random_batches(fm, n=2, batch_size=4, seq_len=16)
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    res = BQ.step0_errors(fm, qm, plan, batches, lora_rank=4)
    assert all(torch.equal(before[k], v) for k, v in qm.state_dict().items())  # untouched
    plain = Q.output_error(fm, qm, batches)
    assert res["plain_4bit"]["kl"] == plain["kl"] and res["plain_4bit"]["trainable"] == 0
    # QLoRA starts at B = 0: exactly the plain 4-bit model, repairs nothing
    assert res["qlora"]["kl"] == plain["kl"] and res["qlora"]["logit_mse"] == plain["logit_mse"]
    assert res["qlora"]["nuclear_ratio"] == 0.0
    assert res["residual_rows"]["trainable"] == plan.trainable_parameters()
    shapes = {n: fm.get_submodule(n).weight.shape for n in plan.modules}
    assert res["loftq"]["trainable"] == sum(4 * (o + i) for o, i in shapes.values())
    # residual rows: the selected rows of W - deq(Q) become zero, computed directly
    num = den = 0.0
    for name in plan.modules:
        R = fm.get_submodule(name).weight.detach().float() - Q.dequantize_weight(
            qm.get_submodule(name))
        after = R.clone()
        after[plan.rows[name]] = 0
        num, den = num + float(_svals(after).sum()), den + float(_svals(R).sum())
    assert res["residual_rows"]["nuclear_ratio"] == pytest.approx(1 - num / den, rel=1e-6)
    assert 0 < res["residual_rows"]["nuclear_ratio"] < res["loftq"]["nuclear_ratio"] < 1
    assert res["residual_rows"]["kl"] < plain["kl"] and res["loftq"]["kl"] < plain["kl"]
    with pytest.raises(ValueError, match="no quantized layers"):
        BQ.step0_errors(fm, fm, plan, batches)


def _shift_codes(layer, idx: torch.Tensor) -> torch.Tensor:
    """Move elements ``idx`` of a 4-bit layer one code up (in value) in place; returns the
    exact weight change, computed from the code table and the block absmax."""
    st = Q._state(layer)
    code = st.code.float()
    order = torch.argsort(code)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(16)
    codes = Q._codes(layer).clone()
    old = codes[idx].long()
    new = order[(rank[old] + 1).clamp(max=15)]
    codes[idx] = new.to(torch.uint8)
    layer.weight.data.view(torch.uint8).copy_(Q._pack(codes).reshape(layer.weight.data.shape))
    absmax = Q._absmax(layer).repeat_interleave(int(st.blocksize))[idx]
    change = torch.zeros(codes.numel())
    change[idx] = (code[new] - code[old]) * absmax
    return change.reshape(tuple(st.shape)), (rank[old] < 15)


def test_update_survival_of_known_updates(setup):
    _, qm, _ = setup
    after = copy.deepcopy(qm)
    layer = after.get_submodule(LAYER)
    idx = torch.arange(0, 128 * 64, 7)
    U, movable = _shift_codes(layer, idx)
    idx = idx[movable]                    # elements already at the top code cannot move up
    U = U.reshape(-1)
    mask = torch.zeros_like(U, dtype=torch.bool)
    mask[idx] = True
    U = torch.where(mask, U, torch.zeros_like(U)).reshape(128, 64)
    # the merge carried U exactly: kept 1, no error, every support code changed, one full
    # code gap = two half steps
    s = BQ.update_survival(qm, after, {LAYER: U})["overall"]
    assert s["kept"] == pytest.approx(1.0, abs=1e-6) and s["rel_error"] < 1e-6
    assert s["codes_changed_support"] == 1.0
    assert s["codes_changed"] == pytest.approx(idx.numel() / U.numel())
    assert s["step_ratio_median"] == pytest.approx(2.0, rel=1e-5) and s["above_half_step"] == 1.0
    # twice that update: half of it survived
    s = BQ.update_survival(qm, after, {LAYER: 2 * U})["overall"]
    assert s["kept"] == pytest.approx(0.5, abs=1e-6) and s["rel_error"] == pytest.approx(0.5)
    # a merge that changed nothing erased the update
    s = BQ.update_survival(qm, copy.deepcopy(qm), {LAYER: U})["overall"]
    assert s["kept"] == 0.0 and s["codes_changed"] == 0.0 and s["rel_error"] == 1.0


def test_merges_task_loss_and_changed_blocks(setup):
    fm, qm, plan = setup
    batch = random_batches(fm, n=1, batch_size=4, seq_len=16)[0]
    # task_loss = the model's own mean token cross-entropy (one batch, no padding)
    assert BQ.task_loss(fm, [batch]) == pytest.approx(float(fm(**batch).loss.detach()), rel=1e-5)
    rows = rs.inject(copy.deepcopy(qm), plan)
    lora = apply_lora(copy.deepcopy(qm), plan, rank=2)
    with torch.no_grad():
        for l in rows.modules():
            if hasattr(l, "delta") and l.delta is not None:
                l.delta.normal_(0, 0.05)
        for l in BQ.lora_layers(lora, plan.modules).values():
            l.lora_B["default"].weight.normal_(0, 0.05)
    res = BQ.merge_errors(rows, lora, [batch])
    assert res["rows"]["float"]["kl"] < 1e-6 and res["qlora"]["float"]["kl"] < 1e-6
    assert res["qlora"]["float"]["task_loss"] == pytest.approx(res["qlora"]["unmerged_task_loss"],
                                                               rel=1e-5)
    assert res["rows"]["4bit"]["kl"] > 1e-6 and res["qlora"]["requantize"]["kl"] > 1e-6
    # QLoRA's merge = bitsandbytes' quantization of deq(Q) + scaling B A, every block
    merged = BQ.qlora_merge(copy.deepcopy(lora))
    layer = BQ.lora_layers(lora, [LAYER])[LAYER]
    W = Q.dequantize_weight(layer.base_layer) + layer.get_delta_weight("default").float()
    F = bnb.functional
    ref = F.dequantize_4bit(*F.quantize_4bit(W.contiguous(), blocksize=64,
                                             compress_statistics=True, quant_type="nf4"))
    torch.testing.assert_close(Q.dequantize_weight(merged.get_submodule(LAYER)), ref)
    # a 4-bit row merge changes only the selected rows' blocks; QLoRA's changes the rest too
    m4 = rs.merge_and_unload(copy.deepcopy(rows), into="4bit")
    b = BQ.blocks_changed_outside(qm, m4, plan)
    assert b["outside"] == 0 and 0 < b["inside"] <= b["inside_total"]
    # every d_in (64, 128) is a multiple of the block size 64: d_in / 64 blocks per row
    assert b["inside_total"] == sum(r.numel() * plan.shapes[n][1] // 64
                                    for n, r in plan.rows.items())
    assert BQ.blocks_changed_outside(qm, merged, plan)["outside"] > 0
    assert BQ.blocks_changed_outside(qm, copy.deepcopy(qm), plan) == {
        "inside": 0, "outside": 0, "inside_total": b["inside_total"]}


@pytest.mark.slow
def test_bench_quant_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "q.json"
    assert bench_quant.main(["--tiny", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    s0 = res["step0"]
    assert s0["qlora"]["kl"] == s0["plain_4bit"]["kl"]
    assert s0["residual_rows"]["trainable"] == s0["qlora"]["trainable"] == res["plan"]["trainable"]
    assert set(res["merges"]) == {"rows", "qlora_lr0.002", "qlora_lr0.001"}
    assert res["merges"]["rows"]["float"]["kl"] < 1e-6
    assert res["survival"]["rows"]["4bit"]["blocks_changed"]["outside"] == 0
    assert res["survival"]["qlora_lr0.002"]["requantize"]["blocks_changed"]["outside"] > 0
    assert set(res["memory"]["methods"]) == {"4bit_floor", "4bit_rows", "qlora", "float_rows"}
    assert res["memory"]["methods"]["4bit_floor"]["overhead"] == 0
    assert res["memory"]["timing"]["rounds"] == 3
    goals = {g["goal"]: g for g in res["goals"]}
    assert goals["NF4 blocks changed outside the selected rows (rows->4bit merge)"]["met"]
    assert len(res["goals"]) == 6   # KL and task-loss ratio per QLoRA lr, blocks, memory
    md = out.with_suffix(".md").read_text()
    assert "| qlora_lr0.002 | requantize |" in md and "counterfactual_from_float" in md
    # wired into rowsft-nb bench: a part, its goals, its tables
    assert "quant" in bench_all.check_parts(["quant"])
    assert bench_goals.goals({"quant": res}) == res["goals"]
    assert "**Quantized base**" in bench_report.to_markdown({"quant": res})
    assert "rows->4bit merge KL" in capsys.readouterr().out
