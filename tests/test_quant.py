"""Quantized bases (rowsft_nb.quant, bitsandbytes on CPU): quantize, row adapters over 4-bit
layers, scoring on deq(Q), init="residual", the three merges, save/load refusal, and training
models that transformers marks as quantized (GGUF, BitsAndBytesConfig)."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import rowsft_nb as rs
from rowsft_nb import quant as Q
from rowsft_nb.adapter.io import read_adapter_config
from rowsft_nb.adapter.model import adapted_modules
from rowsft_nb.testing import _seeded, random_batches
from rowsft_nb.train import adapter_counts_as_peft

bnb = pytest.importorskip("bitsandbytes")  # the 'quant' extra; make install installs it
F = bnb.functional

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")


def llama64(seed: int = 0) -> nn.Module:
    """Tiny LLaMA whose every d_in (64, 128) is a multiple of the NF4 block size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return _seeded(lambda: LlamaForCausalLM(cfg), seed)


def quantized(model: nn.Module, **kw) -> nn.Module:
    kw = {"compute_dtype": torch.float32, **kw}
    return Q.quantize(copy.deepcopy(model), "nf4", **kw)


def reference_decode(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                     blocksize: int, shape) -> torch.Tensor:
    """bitsandbytes' reference NF4 decoding (two codes per byte, high nibble first)."""
    flat = packed.reshape(-1)
    idx = torch.stack([(flat >> 4).long(), (flat & 15).long()], 1).reshape(-1)
    n = shape[0] * shape[1]
    return (code[idx][:n] * absmax.repeat_interleave(blocksize)[:n]).reshape(shape)


def plan_for(model: nn.Module, ratio: float = 0.25, metric: str = "l2"):
    report = rs.score(model, None, metric=metric, progress=False)
    return rs.select(report, rs.Ratio(ratio))


def inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


# ------------------------------------------------------------------------------ quantize
def test_quantize_replaces_linears_keeps_head_and_decodes_like_bitsandbytes():
    fm = llama64()
    qm = quantized(fm, double_quant=False)
    up = qm.model.layers[0].mlp.up_proj
    assert type(up).__name__ == "Linear4bit" and isinstance(qm.lm_head, nn.Linear)
    assert not Q.is_quantized_layer(qm.lm_head)
    assert Q.quant_settings(qm) == {"method": "nf4", "blocksize": 64, "double_quant": False,
                                    "compute_dtype": "float32"}
    assert Q.quant_settings(fm) is None
    st = up.weight.quant_state
    ours = Q.dequantize_weight(up)
    assert torch.equal(ours, F.dequantize_4bit(up.weight.data, st))
    assert torch.equal(ours, reference_decode(up.weight.data, st.absmax, st.code, 64, (128, 64)))
    w = fm.model.layers[0].mlp.up_proj.weight.detach()
    assert 0 < float((ours - w).abs().max()) < float(w.abs().max()) / 4   # NF4 error, not junk
    # the 4-bit model computes with deq(Q): same logits as its dequantized float copy
    batch = random_batches(fm, n=1)[0]
    deq = Q.dequantize(copy.deepcopy(qm))
    assert Q.quant_settings(deq) is None
    torch.testing.assert_close(qm(**inputs(batch)).logits, deq(**inputs(batch)).logits,
                               atol=1e-4, rtol=1e-4)


def test_quantize_double_quant_int8_and_bad_input_leave_model_unchanged():
    fm = llama64()
    qm = quantized(fm)  # double quantization (default)
    up = qm.model.layers[0].mlp.up_proj
    assert up.weight.quant_state.nested
    assert torch.equal(Q.dequantize_weight(up), F.dequantize_4bit(up.weight.data,
                                                                   up.weight.quant_state))
    i8 = Q.quantize(copy.deepcopy(fm), "int8")
    w8 = Q.dequantize_weight(i8.model.layers[0].mlp.up_proj)
    w = fm.model.layers[0].mlp.up_proj.weight.detach()
    assert float((w8 - w).abs().max()) <= float(w.abs().amax(1).max()) / 127  # row-wise int8
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    for bad in (dict(method="nf3"), dict(method="nf4", blocksize=48)):
        with pytest.raises(ValueError, match="method|blocksize"):
            Q.quantize(fm, **bad)
    assert all(torch.equal(before[k], v) for k, v in fm.state_dict().items())
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize(qm)


def test_missing_bitsandbytes_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"rowsft-nb\[quant\]"):
        Q.quantize(llama64())


# ------------------------------------------------------------------------------ row layer
def test_row_layer_over_4bit_matches_float_reference_and_stores_no_dense_copy():
    fm = llama64()
    qm = quantized(fm)
    base = qm.model.layers[0].mlp.up_proj
    assert rs.RowSparseLinear(base, rows=[1], delta_dtype=torch.bfloat16).delta.dtype \
        == torch.bfloat16
    layer = rs.RowSparseLinear(base, rows=[1, 5, 9])
    assert layer.delta.shape == (3, 64) and layer.delta.dtype == torch.float32
    with torch.no_grad():
        layer.delta.copy_(torch.randn(3, 64) * 0.1)
    # nothing float of the weight's size is stored: the base stays packed 4-bit
    sizes = [t.numel() for t in layer.state_dict().values() if t.is_floating_point()]
    assert 128 * 64 not in sizes
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    w = Q.dequantize_weight(base)
    ref_w = w.clone()
    ref_w[[1, 5, 9]] += layer.delta.float()
    torch.testing.assert_close(y, x @ ref_w.t(), atol=1e-4, rtol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    expected = (g[..., [1, 5, 9]].reshape(-1, 3).t() @ x.detach().reshape(-1, 64))
    torch.testing.assert_close(layer.delta.grad, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, g @ ref_w, atol=1e-3, rtol=1e-3)
    assert not base.weight.requires_grad


def test_scoring_a_4bit_model_scores_the_dequantized_weights():
    fm = llama64()
    qm = quantized(fm)
    batches = random_batches(fm, n=2)
    deq = Q.dequantize(copy.deepcopy(qm))
    for metric in ("l2", "taylor"):
        rq = rs.score(qm, batches, metric=metric, progress=False)
        rd = rs.score(deq, batches, metric=metric, progress=False)
        for name in rq.scores:
            torch.testing.assert_close(rq.scores[name], rd.scores[name], atol=1e-5, rtol=1e-4)
    # L1/L2 rankings on 4-bit agree with the float model's up to quantization
    rq, rf = (rs.score(m, None, metric="l2", progress=False) for m in (qm, fm))
    for name in rq.scores:
        a, b = rq.scores[name], rf.scores[name]
        ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
        spearman = torch.corrcoef(torch.stack([ra, rb]))[0, 1]
        assert spearman > 0.9, (name, float(spearman))


# ------------------------------------------------------------------------------ residual init
def test_residual_init_reproduces_float_rows_and_reports_nuclear_ratio():
    fm = llama64()
    qm = quantized(fm)
    plan = plan_for(qm)
    m = rs.inject(copy.deepcopy(qm), plan, init="residual", reference=fm)
    # the fused row mode writes into the base weight: a 4-bit base takes the delta path
    assert {layer.mode for layer in adapted_modules(m).values()} == {"delta"}
    for name, layer in adapted_modules(m).items():
        ref = fm.get_submodule(name)
        xin = torch.randn(3, layer.in_features)
        with torch.no_grad():
            err = (layer(xin) - ref(xin))[:, layer.rows].abs().max()
        assert float(err) < 1e-5, name
    report = Q.nuclear_norm_report(m, fm)
    assert set(report["per_module"]) == set(plan.modules)
    assert all(0 < r < 1 for r in report["per_module"].values())
    # the same via the state_dict; all rows selected repairs everything (ratio 1)
    full = rs.select(rs.score(qm, None, metric="l2", progress=False), rs.Ratio(1.0))
    m_all = rs.inject(copy.deepcopy(qm), full, init="residual", reference=fm.state_dict())
    assert Q.nuclear_norm_report(m_all, fm)["overall"] == pytest.approx(1.0, abs=1e-6)
    batches = random_batches(fm, n=2)
    plain = Q.output_error(fm, qm, batches)
    resid = Q.output_error(fm, m, batches)
    assert resid["kl"] < plain["kl"] and resid["logit_mse"] < plain["logit_mse"]
    assert Q.output_error(fm, m_all, batches)["kl"] < 1e-8
    # a missing reference is refused before any change
    with pytest.raises(ValueError, match="reference"):
        rs.inject(qm, plan, init="residual")
    assert not adapted_modules(qm)


# ------------------------------------------------------------------------------ block requantization
@pytest.mark.parametrize("change", ["small", "large", "large-widen"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(6, 128), (7, 96)])
def test_requantize_rows_touches_only_their_blocks(shape, double_quant, change):
    d_out, d_in = shape
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out, bias=False)
    layer = Q._make_4bit(lin, lin.weight.detach(), None, "nf4", 64, double_quant, torch.float32)
    st = layer.weight.quant_state
    packed0, absmax0 = layer.weight.data.clone(), st.absmax.clone()
    before = Q.dequantize_weight(layer)
    rows = torch.tensor([1, 4])
    if change == "small":   # a fine-tuning-sized change: every absmax stays storable
        new = before[rows] * 0.8 + torch.randn(2, d_in) * 1e-3
    else:                   # rows grow far past every block's absmax
        new = before[rows] + torch.randn(2, d_in) * 0.3
    backup = Q.requantize_rows_(layer, rows, new, widen=change == "large-widen")
    widened = backup.get("nested_groups_reencoded", torch.empty(0)).numel() > 0
    short = backup.get("nested_groups_short", torch.empty(0)).numel() > 0
    assert widened == (double_quant and change == "large-widen")
    assert short == (double_quant and change != "small")
    # the touched blocks: every block holding an element of row 1 or 4 (flattened layout)
    touched = set()
    for r in rows.tolist():
        touched |= set(range(r * d_in // 64, ((r + 1) * d_in - 1) // 64 + 1))
    n_blocks = (d_out * d_in + 63) // 64
    codes0, codes1 = (torch.stack([(p.reshape(-1) >> 4), (p.reshape(-1) & 15)], 1).reshape(-1)
                      for p in (packed0, layer.weight.data))
    for b in range(n_blocks):
        if b not in touched:  # 4-bit codes always kept; absmax too unless its group widened
            assert torch.equal(codes0[b * 64:(b + 1) * 64], codes1[b * 64:(b + 1) * 64]), b
            assert widened or torch.equal(absmax0[b], st.absmax[b]), b
    after = Q.dequantize_weight(layer)
    if double_quant:   # decode through bitsandbytes itself too (nested absmax)
        am = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    else:
        am = st.absmax
    assert torch.equal(after, reference_decode(layer.weight.data, am, st.code, 64, shape))
    # rows outside the touched blocks are bit-identical; selected rows moved to the new values
    flat_touched = torch.zeros(d_out * d_in, dtype=torch.bool)
    for b in touched:
        flat_touched[b * 64:(b + 1) * 64] = True
    untouched = ~flat_touched.reshape(shape)
    if widened:   # re-encoded 8-bit absmax: the other blocks move by < 1% of their scale
        rel = (after[untouched] - before[untouched]).abs().max() / before.abs().max()
        assert float(rel) < 0.01
    else:
        assert torch.equal(after[untouched], before[untouched])
    scale = new.abs().max()
    target = new
    if short and not widened:   # kept the nested state: values past its ceiling are clipped
        ceiling = float(st.state2.absmax.max() + st.offset)
        target = new.clamp(-ceiling, ceiling)
        scale = torch.tensor(ceiling)
    assert float((after[rows] - target).abs().max()) < 0.25 * float(scale)  # NF4-sized
    # against bitsandbytes' own NF4 quantization of the whole expected matrix, from scratch
    full = before.clone()
    full[rows] = target
    fq, fst = F.quantize_4bit(full, blocksize=64, quant_type="nf4")
    fresh = reference_decode(fq, fst.absmax, fst.code, 64, shape)  # (bnb's CPU decode of
    if not double_quant:   # d_in=96 is wrong)  same blocks, same rule: identical everywhere
        assert torch.equal(after, fresh)
    else:   # absmax limited to the kept nested range [offset - s2, offset + s2]
        ours_err = float((after[rows] - target).abs().mean())
        assert ours_err <= 4 * float((fresh[rows] - target).abs().mean())
        assert ours_err < float((before[rows] - target).abs().mean())
    if d_in % 64:   # straddling blocks: the other row's share re-quantized, stays close
        other = flat_touched.reshape(shape).clone()
        other[rows] = False
        assert other.any()
        assert float((after[other] - before[other]).abs().max()) < 0.25 * float(scale)
    Q.restore_(layer, backup)
    assert torch.equal(layer.weight.data, packed0) and torch.equal(st.absmax, absmax0)
    assert torch.equal(Q.dequantize_weight(layer), before)


def test_int8_rows_requantize_only_those_rows():
    fm = llama64()
    i8 = Q.quantize(copy.deepcopy(fm), "int8")
    layer = i8.model.layers[0].mlp.up_proj
    cb0, scb0 = layer.weight.data.clone(), layer.weight.SCB.clone()
    before = Q.dequantize_weight(layer)
    rows = torch.tensor([0, 7])
    new = before[rows] * 1.5
    Q.requantize_rows_(layer, rows, new)
    keep = torch.ones(128, dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(layer.weight.data[keep], cb0[keep])
    assert torch.equal(layer.weight.SCB[keep], scb0[keep])
    torch.testing.assert_close(Q.dequantize_weight(layer)[rows], new, atol=2e-3, rtol=1e-2)


# ------------------------------------------------------------------------------ merges
def _trained(qm: nn.Module, fm: nn.Module, seed: int = 0) -> nn.Module:
    """qm with a residual-init row adapter whose deltas took a 'step' (seeded noise)."""
    m = rs.inject(copy.deepcopy(qm), plan_for(qm), init="residual", reference=fm)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_modules(m).values():
            layer.delta.add_(torch.randn(layer.delta.shape, generator=g) * 0.005)
    return m


@pytest.mark.parametrize("double_quant", [False, True])
def test_merge_into_4bit_changes_only_selected_rows_blocks_and_unmerges_exactly(double_quant):
    fm = llama64()
    qm = quantized(fm, double_quant=double_quant)
    m = _trained(qm, fm)
    layers = adapted_modules(m)
    snap = {n: (l.base_layer.weight.data.clone(), l.base_layer.weight.quant_state.absmax.clone())
            for n, l in layers.items()}
    batch = random_batches(fm, n=1)[0]
    with torch.no_grad():
        adapted = m(**inputs(batch)).logits
    rs.merge(m)
    for name, layer in layers.items():
        packed0, absmax0 = snap[name]
        blocks_per_row = layer.in_features // 64
        row_of_block = torch.arange(absmax0.numel()) // blocks_per_row
        selected = torch.isin(row_of_block, layer.rows.cpu())
        st = layer.base_layer.weight.quant_state
        assert torch.equal(st.absmax[~selected], absmax0[~selected]), name
        bytes_per_row = layer.in_features // 2
        rows_bytes = layer.base_layer.weight.data.reshape(-1, bytes_per_row)
        keep = torch.ones(layer.out_features, dtype=torch.bool)
        keep[layer.rows] = False
        assert torch.equal(rows_bytes[keep], packed0.reshape(-1, bytes_per_row)[keep]), name
        assert not torch.equal(rows_bytes[~keep], packed0.reshape(-1, bytes_per_row)[~keep])
    with torch.no_grad():
        merged = m(**inputs(batch)).logits
    assert 0 < float((merged - adapted).abs().max()) < 0.05
    rs.unmerge(m)
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight.data, snap[name][0])
        assert torch.equal(layer.base_layer.weight.quant_state.absmax, snap[name][1])
    with torch.no_grad():
        assert torch.equal(m(**inputs(batch)).logits, adapted)
    out = rs.merge_and_unload(m)  # default on a 4-bit base: into="4bit"
    assert type(out.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert not adapted_modules(out)


def test_merge_into_float_is_exact_and_requantize_changes_every_block():
    fm = llama64()
    qm = quantized(fm)
    m = _trained(qm, fm)
    batches = random_batches(fm, n=2)
    with torch.no_grad():
        adapted = m(**inputs(batches[0])).logits
    f = rs.merge_and_unload(copy.deepcopy(m), into="float")
    assert Q.quant_settings(f) is None and not adapted_modules(f)
    with torch.no_grad():
        torch.testing.assert_close(f(**inputs(batches[0])).logits, adapted, atol=1e-4, rtol=1e-4)
    names = list(adapted_modules(m))
    r4 = rs.merge_and_unload(copy.deepcopy(m), into="4bit")
    rq = rs.merge_and_unload(copy.deepcopy(m), into="requantize")
    changed_q = []
    for name in names:
        old = Q.dequantize_weight(qm.get_submodule(name))
        rows4 = (Q.dequantize_weight(r4.get_submodule(name)) != old).any(1)
        rowsq = (Q.dequantize_weight(rq.get_submodule(name)) != old).any(1)
        selected = torch.zeros_like(rows4)
        selected[adapted_modules(m)[name].rows] = True
        assert not (rows4 & ~selected).any(), name    # (b): only the selected rows move
        changed_q.append(rowsq.float().mean())
    assert float(torch.stack(changed_q).mean()) > 0.9   # (c): (nearly) every row moves
    e4, eq = (Q.output_error(m, x, batches)["kl"] for x in (r4, rq))
    assert e4 < eq
    with pytest.raises(ValueError, match="into"):
        rs.merge_and_unload(m, into="nf4")
    assert adapted_modules(m)  # a refused merge leaves the adapter in place


# ------------------------------------------------------------------------------ save / load
@pytest.mark.filterwarnings("ignore:bitsandbytes' 4-bit kernel")  # blocksize 128 > d_in 64
def test_adapter_records_quantization_and_refuses_a_differently_quantized_base(tmp_path):
    fm = llama64()
    qm = quantized(fm)
    m = _trained(qm, fm)
    rs.save_adapter(m, tmp_path / "a")
    cfg = read_adapter_config(tmp_path / "a")
    assert cfg["quantization"] == Q.quant_settings(qm) and cfg["init"] == "residual"
    same = rs.load_adapter(quantized(fm), tmp_path / "a")
    for name, layer in adapted_modules(m).items():
        assert torch.equal(adapted_modules(same)[name].delta, layer.delta)
    for other in (copy.deepcopy(fm), quantized(fm, blocksize=128),
                  quantized(fm, double_quant=False)):
        state = {k: v.clone() for k, v in other.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        with pytest.raises(ValueError, match="quantize"):
            rs.load_adapter(other, tmp_path / "a")
        assert not adapted_modules(other)
        assert all(torch.equal(state[k], v) for k, v in other.state_dict().items() if k in state)


# ------------------------------------------------------------------------------ training (part 8)
def _write_tiny_gguf(path) -> None:
    import gguf
    import numpy as np

    h, inter, kv, vocab = 64, 128, 2, 128
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64); w.add_embedding_length(h); w.add_block_count(1)
    w.add_feed_forward_length(inter); w.add_head_count(4); w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5); w.add_rope_dimension_count(h // 4); w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}".encode() for i in range(vocab)])
    w.add_token_scores([0.0] * vocab); w.add_token_types([1] * vocab)
    g = torch.Generator().manual_seed(0)

    def t(name, *shape):
        w.add_tensor(name, (torch.randn(*shape, generator=g) * 0.05).numpy().astype(np.float32))

    t("token_embd.weight", vocab, h); t("output.weight", vocab, h)
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    for name, shape in (("attn_q", (h, h)), ("attn_k", (32, h)), ("attn_v", (32, h)),
                        ("attn_output", (h, h)), ("ffn_gate", (inter, h)),
                        ("ffn_up", (inter, h)), ("ffn_down", (h, inter))):
        t(f"blk.0.{name}.weight", *shape)
    for name in ("attn_norm", "ffn_norm"):
        w.add_tensor(f"blk.0.{name}.weight", np.ones(h, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


def _bnb_loaded(tmp_path) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    llama64().save_pretrained(tmp_path / "float")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg,
                                                device_map="cpu")


@pytest.mark.parametrize("kind", ["gguf", "bnb", "rs"])
def test_models_transformers_marks_quantized_train_with_a_row_adapter(tmp_path, kind):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    if kind == "gguf":
        _write_tiny_gguf(tmp_path / "tiny.gguf")
        model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    elif kind == "bnb":
        model = _bnb_loaded(tmp_path)
    else:   # rs.quantize: transformers does not know; train() must simply work
        model = quantized(llama64())
    assert getattr(model, "is_quantized", False) == (kind != "rs")
    args = TrainingArguments(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", use_cpu=True,
                             learning_rate=1e-2)
    data = [dict(input_ids=b["input_ids"][i], attention_mask=b["attention_mask"][i],
                 labels=b["labels"][i]) for b in random_batches(model, n=1) for i in range(4)]
    if kind != "rs":  # no adapter: still refused, as transformers intends
        with pytest.raises(ValueError, match="purely quantized"):
            rs.RowTrainer(model=model, args=args, train_dataset=data)
    rs.inject(model, plan_for(model))
    if kind != "rs":  # an adapter with nothing trainable is still refused
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        with pytest.raises(ValueError, match="purely quantized"):
            rs.RowTrainer(model=model, args=args, train_dataset=data)
        for p, f in flags:
            p.requires_grad_(f)
    before = {n: l.delta.detach().clone() for n, l in adapted_modules(model).items()}
    trainer = rs.RowTrainer(model=model, args=args, train_dataset=data)
    assert not getattr(model, "_hf_peft_config_loaded", False)  # the mark is scoped
    trainer.train()
    assert any(not torch.equal(before[n], l.delta) for n, l in adapted_modules(model).items())
    ds = Dataset.from_list([{k: v.tolist() for k, v in row.items()} for row in data])
    result = rs.train(model, ds, eval_dataset=ds, lr=1e-2, max_steps=3, batch_size=2,
                      device="cpu", progress_bar=False)
    assert result.steps == 3 and result.metrics_after["loss"] < result.metrics_before["loss"]
    if kind != "rs":  # a plain Trainer script: the context manager does the same
        with adapter_counts_as_peft(model):
            Trainer(model=model, args=args, train_dataset=data)
        with pytest.raises(ValueError, match="purely quantized"):
            Trainer(model=model, args=args, train_dataset=data)


# ------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
def test_load_causal_lm_nf4_quantizes_every_linear_but_the_head():
    from rowsft_nb.assets import load_causal_lm

    model, tok = load_causal_lm(quantize="nf4")
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}
    assert kinds == {"Linear4bit"} and isinstance(model.lm_head, nn.Linear)
    assert Q.quant_settings(model) == {"method": "nf4", "blocksize": 64, "double_quant": True,
                                       "compute_dtype": "bfloat16"}
    n_bytes = sum(m.weight.data.numel() for m in model.modules() if Q.is_quantized_layer(m))
    assert n_bytes == sum(m.in_features * m.out_features
                          for m in model.modules() if Q.is_quantized_layer(m)) // 2
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    with pytest.raises(ValueError, match="quantize must be"):
        load_causal_lm(quantize="nf3")
