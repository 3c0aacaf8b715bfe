"""The whole pipeline on 13 architectures (tiny random models from configs, offline):
score (taylor, l2) -> select (plain, head-aligned) -> inject -> step-0 equality -> 3 training
steps -> merge equality -> save/load onto a fresh base. Plus: head groups of every attention
layout map to the heads the model really computes, MLP groups to the right down-projection
columns, and seq2seq models train on their own loss."""
import math
import warnings

import pytest
import torch

import rowsft_nb as rs
from rowsft_nb import testing
from rowsft_nb.adapter import adapted_modules, inject, load_adapter, merge_and_unload, save_adapter
from rowsft_nb.scoring.groups import ATTENTION_INPUTS, find_groups
from rowsft_nb.selection import FixedRows, Ratio, SelectionWarning, select
from rowsft_nb.targets import find_targets, linear_shape, row_weight, short_type
from rowsft_nb.train import infer_task_kind, train

ARCHS = testing.ARCHITECTURES

# layer-0 attention: (prefix of its q/k/v projections, name of its output projection)
ATTENTION = {
    "gpt2": ("transformer.h.0.attn.", "transformer.h.0.attn.c_proj"),
    "gpt_neox": ("gpt_neox.layers.0.attention.", "gpt_neox.layers.0.attention.dense"),
    "phi3": ("model.layers.0.self_attn.", "model.layers.0.self_attn.o_proj"),
    "qwen2": ("model.layers.0.self_attn.", "model.layers.0.self_attn.o_proj"),
    "mistral": ("model.layers.0.self_attn.", "model.layers.0.self_attn.o_proj"),
    "gemma3": ("model.layers.0.self_attn.", "model.layers.0.self_attn.o_proj"),
    "llama": ("model.layers.0.self_attn.", "model.layers.0.self_attn.o_proj"),
    "opt": ("model.decoder.layers.0.self_attn.", "model.decoder.layers.0.self_attn.out_proj"),
    "falcon": ("transformer.h.0.self_attention.", "transformer.h.0.self_attention.dense"),
    "t5": ("encoder.block.0.layer.0.SelfAttention.", "encoder.block.0.layer.0.SelfAttention.o"),
    "roberta": ("roberta.encoder.layer.0.attention.self.",
                "roberta.encoder.layer.0.attention.output.dense"),
    "distilbert": ("distilbert.transformer.layer.0.attention.",
                   "distilbert.transformer.layer.0.attention.out_lin"),
    "vit": ("vit.layers.0.attention.", "vit.layers.0.attention.o_proj"),
}


def _batches(model, n=2):
    return testing.random_batches(model, n=n, batch_size=2, seq_len=8)


def _examples(batches):
    """Per-example dicts (what train() takes as a dataset)."""
    out = []
    for b in batches:
        for i in range(next(iter(b.values())).shape[0]):
            out.append({k: v[i] if v.is_floating_point() else v[i].tolist()
                        for k, v in b.items()})
    return out


@torch.no_grad()
def _outputs(model, batch):
    model.eval()
    return model(**batch).logits


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_whole_pipeline(arch, tmp_path):
    torch.manual_seed(0)
    model = testing.tiny_model(arch)
    batches = _batches(model)
    targets = find_targets(model)

    reports = {m: rs.score(model, batches, metric=m, progress=False, groups="auto")
               for m in ("taylor", "l2")}
    for rep in reports.values():
        assert rep.modules == targets
        assert all(bool(torch.isfinite(s).all()) for s in rep.scores.values())
    report = reports["taylor"]
    heads = [n for n in targets if short_type(n) in ATTENTION_INPUTS]
    missing = [n for n in heads if n not in report.head_dims]
    assert heads and not missing, f"attention projections without head groups: {missing}"

    plan = select(report, Ratio(0.25))
    aligned = select(report, FixedRows(16), head_aligned=True)
    for name in heads:
        hd = report.head_dims[name]
        rows = aligned.rows[name]
        blocks = set((rows // hd).tolist())
        assert sorted(rows.tolist()) == sorted(b * hd + j for b in blocks for j in range(hd))

    base_out = _outputs(model, batches[0])
    inject(model, plan)
    assert torch.equal(_outputs(model, batches[0]), base_out), "step-0 output differs from base"

    result = train(model, _examples(batches), max_steps=3, batch_size=2, lr=1e-2,
                   logging_steps=1, progress_bar=False, seed=0)
    assert result.steps == 3
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    moved = [n for n, m in adapted_modules(model).items()
             if float(m.delta.detach().abs().max()) > 0]
    assert len(moved) == len(plan.modules), "some deltas did not move"

    adapted_out = _outputs(model, batches[0])
    assert not torch.equal(adapted_out, base_out)
    save_adapter(model, tmp_path / "adapter")

    fresh = load_adapter(testing.tiny_model(arch), tmp_path / "adapter")
    assert torch.allclose(_outputs(fresh, batches[0]), adapted_out, atol=1e-6, rtol=0)

    merged = merge_and_unload(model)
    assert not adapted_modules(merged)
    assert torch.allclose(_outputs(merged, batches[0]), adapted_out, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ head groups vs the model
def _capture_input(model, name, batch):
    store = {}
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda m, args, out: store.__setitem__("x", args[0].detach().clone()))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return store["x"]


def _changed_heads(model, module_name, rows, out_name, batch, hd):
    """Heads (hd-wide blocks of the output projection's input) that change when the given
    rows of ``module_name`` are perturbed."""
    before = _capture_input(model, out_name, batch)
    w = row_weight(dict(model.named_modules())[module_name])
    saved = w.detach().clone()
    with torch.no_grad():
        w[rows] += torch.randn(len(rows), w.shape[1], generator=torch.Generator().manual_seed(3))
    after = _capture_input(model, out_name, batch)
    with torch.no_grad():
        w.copy_(saved)
    diff = (after - before).abs().reshape(-1, before.shape[-1] // hd, hd).amax(dim=(0, 2))
    return set(torch.nonzero(diff > 1e-5).flatten().tolist())


FALCON_LAYOUTS = {"falcon_new_arch": dict(new_decoder_architecture=True, num_kv_heads=2),
                  "falcon_classic": dict(multi_query=False)}


@pytest.mark.parametrize("arch", ARCHS + tuple(FALCON_LAYOUTS))
def test_head_groups_map_to_the_heads_the_model_computes(arch):
    model = (testing.tiny_model("falcon", **FALCON_LAYOUTS[arch]) if arch in FALCON_LAYOUTS
             else testing.tiny_model(arch))
    prefix, out_name = ATTENTION["falcon" if arch in FALCON_LAYOUTS else arch]
    batch = _batches(model, n=1)[0]
    names = [n for n in find_targets(model) if n.startswith(prefix) and n != out_name]
    groups, head_dims = find_groups(model, names)
    assert names and set(names) == set(head_dims), (names, head_dims)
    width = linear_shape(dict(model.named_modules())[out_name])[1]  # n_heads * head_dim
    checked = 0
    for group in groups:
        if group.kind not in ("head", "kv_head"):
            continue
        n_groups = group.n_groups
        for g in range(n_groups):
            for name, axis, idx in group.members:
                hd = head_dims[name]
                heads = _changed_heads(model, name, idx[g], out_name, batch, hd)
                total = width // hd
                per = total // n_groups  # q heads served by one (KV) head
                assert heads == set(range(g * per, (g + 1) * per)), (name, group.kind, g, heads)
                checked += 1
    if not checked:  # separate q/k/v modules or GPT-2's c_attn: block j of q, k, v -> head j
        for name in names:
            hd = head_dims[name]
            d_out = row_weight(dict(model.named_modules())[name]).shape[0]
            total = width // hd
            for j in range(d_out // hd):
                heads = _changed_heads(model, name, torch.arange(j * hd, (j + 1) * hd),
                                       out_name, batch, hd)
                assert heads == {j % total}, (name, j, heads)
                checked += 1
    assert checked


@pytest.mark.parametrize("arch", ["phi3", "llama", "gpt_neox", "opt", "falcon", "t5", "roberta",
                                  "distilbert", "gpt2"])
def test_mlp_groups_couple_up_rows_with_their_down_column(arch):
    model = testing.tiny_model(arch)
    batch = _batches(model, n=1)[0]
    names = find_targets(model)
    groups, _ = find_groups(model, names)
    mlp = [g for g in groups if g.kind == "mlp"]
    assert mlp, f"no MLP groups among {names}"
    group = mlp[0]
    down = [n for n, axis, _ in group.members if axis == "cols"]
    ups = [(n, idx) for n, axis, idx in group.members if axis == "rows"]
    assert len(down) == 1 and ups
    for g in (0, group.n_groups // 2, group.n_groups - 1):
        before = _capture_input(model, down[0], batch)
        modules = dict(model.named_modules())
        saved = {n: row_weight(modules[n]).detach().clone() for n, _ in ups}
        with torch.no_grad():
            for n, idx in ups:
                w = row_weight(modules[n])  # random, not constant: LayerNorm outputs sum to 0
                w[idx[g]] += torch.randn(len(idx[g]), w.shape[1],
                                         generator=torch.Generator().manual_seed(g))
        after = _capture_input(model, down[0], batch)
        with torch.no_grad():
            for n, _ in ups:
                row_weight(modules[n]).copy_(saved[n])
        changed = torch.nonzero((after - before).abs().reshape(-1, before.shape[-1])
                                .amax(0) > 1e-6).flatten().tolist()
        assert changed == [g], (arch, g, changed)


def test_head_aligned_warns_once_naming_attention_modules_without_heads():
    report = testing.synthetic_report({"layers.0.attn.q_proj": (16, 8), "layers.0.mlp.fc1": (8, 8),
                                       "layers.0.attn.qkv": (24, 8)},
                                      groups={"layers.0.attn.q_proj": 4})
    with pytest.warns(SelectionWarning,
                      match=r"head_aligned=True cannot apply to 1 module.*attn\.qkv"):
        select(report, FixedRows(4), head_aligned=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelectionWarning)
        select(report, FixedRows(8), head_aligned=True)  # once per report
        select(report, FixedRows(4), head_aligned=False)


# ------------------------------------------------------------------ seq2seq task kind
def test_seq2seq_task_kind_and_the_models_own_loss():
    model = testing.tiny_model("t5")
    assert infer_task_kind(model) == "seq2seq"
    assert infer_task_kind(testing.tiny_llama()) == "causal_lm"
    batches = _batches(model, n=1)
    batch = dict(batches[0])
    batch["labels"] = batch["labels"][:, :5].clone()  # decoder targets shorter than the input
    with torch.no_grad():
        expected = float(model(**batch).loss)  # T5 shifts labels into decoder inputs itself
    plan = select(rs.score(model, metric="l2", progress=False), Ratio(0.25))
    inject(model, plan)
    result = train(model, _examples([batch]), eval_dataset=_examples([batch]), max_steps=1,
                   batch_size=2, lr=1e-3, logging_steps=1, progress_bar=False)
    assert result.task == "seq2seq"
    assert result.metrics_before["loss"] == pytest.approx(expected, rel=1e-5)
    first = [h["loss"] for h in result.history if "loss" in h][0]
    assert first == pytest.approx(expected, rel=1e-4)
