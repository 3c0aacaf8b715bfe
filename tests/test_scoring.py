"""scoring: every metric against a direct computation, hooks vs .grad, groups, state, errors."""
import math
import warnings

import pytest
import torch

from rowsft_nb import testing
from rowsft_nb.profiling import peak_memory
from rowsft_nb.scoring import METRICS, ImportanceReport, find_groups, group_scores, score
from rowsft_nb.scoring.calibration import ScoringDataError
from rowsft_nb.targets import find_targets, is_conv1d, row_weight

ARCHS = ["llama", "bert", "gpt2"]
# taylor is the paper's sum_j |w_ij G_ij| (it was |sum_j w_ij G_ij|, now taylor_multivariable);
# hessian uses per-example squared gradients (it squared per-batch gradients). The authors'
# formulas for every metric are tested in test_metrics_paper.py.
GRADIENT_METRICS = ["taylor", "taylor_multivariable", "fisher", "hessian"]


def tiny(arch, **kw):
    return getattr(testing, f"tiny_{arch}")(**kw)


def f64(arch):
    """A tiny model in float64 so references agree to ~1e-10."""
    return tiny(arch).double()


def run(model, batches, metric, **kw):
    kw.setdefault("progress", False)
    return score(model, batches, metric=metric, **kw)


# ------------------------------------------------------------------ direct references
def target_modules(model):
    named = dict(model.named_modules())
    return {n: named[n] for n in find_targets(model)}


def batch_gradients(model, batch):
    """dL/dW ([d_out, d_in]) of every target for one batch, by plain autograd."""
    modules = target_modules(model)
    weights = [m.weight for m in modules.values()]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    try:
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, weights)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return {n: (g.t() if is_conv1d(m) else g) for (n, m), g in zip(modules.items(), grads)}


def example_gradients(model, batches):
    """dL_e/dW of every example e run alone (a batch of one)."""
    out = []
    for b in batches:
        size = b["input_ids"].shape[0]
        out += [batch_gradients(model, {k: v[e:e + 1] for k, v in b.items()}) for e in range(size)]
    return out


def reference_gradient_metric(model, batches, metric):
    modules = target_modules(model)
    per_batch = [batch_gradients(model, b) for b in batches]
    per_example = example_gradients(model, batches) if metric == "hessian" else []
    out = {}
    for n, m in modules.items():
        w = row_weight(m).detach()
        gs = [g[n] for g in per_batch]
        total = sum(gs)
        if metric == "taylor":
            out[n] = ((w * total).abs().sum(1), (w * total).abs().sum(0))
        elif metric == "taylor_multivariable":
            out[n] = ((w * total).sum(1).abs(), (w * total).sum(0).abs())
        elif metric == "fisher":
            out[n] = (sum((w * g).sum(1) ** 2 for g in gs), sum((w * g).sum(0) ** 2 for g in gs))
        elif metric == "hessian":
            h = sum(g[n] ** 2 for g in per_example) / len(per_example)
            out[n] = ((w ** 2 * h).sum(1), (w ** 2 * h).sum(0))
    return out


def reference_wanda(model, batches):
    modules = target_modules(model)
    sq = {n: 0.0 for n in modules}
    handles = [m.register_forward_hook(
        lambda mod, args, out, n=n: sq.__setitem__(n, sq[n] + args[0].detach().reshape(
            -1, args[0].shape[-1]).pow(2).sum(0))) for n, m in modules.items()]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    out = {}
    for n, m in modules.items():
        w = row_weight(m).detach().abs()
        norms = sq[n].sqrt()
        out[n] = ((w * norms).sum(1), w.sum(0) * norms)
    return out


def assert_report_matches(report, reference, rtol=1e-7, atol=1e-12):
    assert set(report.scores) == set(reference)
    for n, (rows, cols) in reference.items():
        torch.testing.assert_close(report.scores[n].double(), rows.double().float().double(),
                                   rtol=max(rtol, 1e-6), atol=atol)
        torch.testing.assert_close(report.column_scores[n].double(),
                                   cols.double().float().double(), rtol=max(rtol, 1e-6), atol=atol)


# ------------------------------------------------------------------ metrics vs references
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("metric", GRADIENT_METRICS)
def test_gradient_metrics_match_autograd_reference(arch, metric):
    model = f64(arch)
    batches = testing.random_batches(model, n=2, batch_size=3, seq_len=8)
    report = run(model, batches, metric)
    assert_report_matches(report, reference_gradient_metric(model, batches, metric))
    assert report.meta["n_samples"] == 6 and report.meta["n_tokens"] == 48


@pytest.mark.parametrize("arch", ARCHS)
def test_magnitude_metrics_match_row_norms(arch):
    model = tiny(arch)
    l1 = run(model, None, "l1")
    l2 = run(model, None, "l2")
    for n, m in target_modules(model).items():
        w = row_weight(m).detach()
        torch.testing.assert_close(l1.scores[n], w.abs().sum(1))
        torch.testing.assert_close(l1.column_scores[n], w.abs().sum(0))
        # l2 is the authors' sum of squares (it was the norm: same ranking within a layer)
        torch.testing.assert_close(l2.scores[n], w.square().sum(1))
        torch.testing.assert_close(l2.column_scores[n], w.square().sum(0))
    assert l1.meta["n_samples"] == 0 and l1.meta["method"] == "weights"


@pytest.mark.parametrize("arch", ARCHS)
def test_wanda_matches_input_norm_reference(arch):
    model = f64(arch)
    batches = testing.random_batches(model, n=2, batch_size=3, seq_len=8)
    assert_report_matches(run(model, batches, "wanda"), reference_wanda(model, batches))


def test_wanda_ignores_padded_tokens():
    model = f64("llama")
    batches = testing.random_batches(model, n=1, batch_size=2, seq_len=8)
    padded = {k: v.clone() for k, v in batches[0].items()}
    padded["attention_mask"][:, 6:] = 0
    trimmed = {k: v[:, :6] for k, v in batches[0].items()}
    # with causal attention, the first 6 positions see the same context either way
    a = run(model, [padded], "wanda")
    b = run(model, [trimmed], "wanda")
    for n in a.scores:
        torch.testing.assert_close(a.scores[n], b.scores[n], rtol=1e-6, atol=1e-9)
    assert a.meta["n_tokens"] == 12


def test_random_is_seeded_uniform():
    model = tiny("llama")
    a, b, c = (run(model, None, "random", seed=s) for s in (5, 5, 6))
    for n in a.scores:
        assert torch.equal(a.scores[n], b.scores[n])
        assert not torch.equal(a.scores[n], c.scores[n])
        assert float(a.scores[n].min()) >= 0 and float(a.scores[n].max()) < 1
    flat = torch.cat(list(a.scores.values()))
    assert abs(float(flat.mean()) - 0.5) < 0.05


def test_registry_lists_every_metric():
    assert set(METRICS) == {"l1", "l2", "taylor", "taylor_multivariable", "fisher", "hessian",
                            "wanda", "zo_taylor", "class_taylor", "taylor2_class", "random"}


# ------------------------------------------------------------------ hooks vs naive
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("metric", GRADIENT_METRICS)
def test_hook_path_equals_naive_grad_path(arch, metric):
    model = tiny(arch)
    batches = testing.random_batches(model, n=2)
    hooks = run(model, batches, metric)
    naive = run(model, batches, metric, method="naive")
    assert naive.meta["method"] == "naive"
    for n in hooks.scores:
        scale = float(naive.scores[n].abs().max()) + 1e-30
        torch.testing.assert_close(hooks.scores[n] / scale, naive.scores[n] / scale,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_checkpointing_does_not_change_scores(arch):
    model = f64(arch)
    batches = testing.random_batches(model, n=2, batch_size=2, seq_len=8)
    for metric in ("taylor", "hessian"):
        a = run(model, batches, metric, checkpoint=True)
        b = run(model, batches, metric, checkpoint=False)
        assert a.meta["checkpoint"] and not b.meta["checkpoint"]
        for n in a.scores:
            torch.testing.assert_close(a.scores[n], b.scores[n], rtol=1e-9, atol=1e-12)
    from rowsft_nb.scoring.calibration import find_blocks
    assert len(find_blocks(model, find_targets(model))) == 2


def test_hook_path_allocates_less_than_naive():
    """Sanity bound (exact profiler bytes): no weight-gradient buffers on the hook path."""
    model = testing.tiny_llama(hidden=128, layers=2)
    batches = testing.random_batches(model, n=1, batch_size=2, seq_len=8)
    hooks = peak_memory(lambda: run(model, batches, "taylor"))
    naive = peak_memory(lambda: run(model, batches, "taylor", method="naive"))
    weights = sum(m.weight.numel() * 4 for m in target_modules(model).values())
    assert naive >= weights          # the naive path holds every target .grad at once
    assert hooks < naive


def test_hessian_never_holds_per_example_gradients_of_the_whole_model():
    """Per-example gradients are formed one layer at a time inside the backward tap: the peak
    stays far below B copies of the target weights (what whole-model per-example grads take)."""
    model = testing.tiny_llama(hidden=128, layers=2)
    batches = testing.random_batches(model, n=1, batch_size=8, seq_len=8)
    weights = sum(m.weight.numel() * 4 for m in target_modules(model).values())
    peak = peak_memory(lambda: run(model, batches, "hessian"))
    assert weights < peak < 4 * weights    # the float32 accumulator + one layer's chunk


# ------------------------------------------------------------------ groups
def test_groups_on_gqa_llama_aggregate_heads_and_mlp():
    model = tiny("llama")
    batches = testing.random_batches(model, n=1)
    plain = run(model, batches, "taylor")
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    pre = "model.layers.1."
    for reduce, fn in (("sum", lambda t, d: t.sum(d)), ("mean", lambda t, d: t.mean(d)),
                       ("max", lambda t, d: t.max(d).values)):
        grouped = run(model, batches, "taylor", groups="auto", group_reduce=reduce)
        q = plain.scores[pre + "self_attn.q_proj"].view(-1, head_dim)        # 4 heads
        torch.testing.assert_close(grouped.scores[pre + "self_attn.q_proj"],
                                   fn(q, 1).repeat_interleave(head_dim))
        k = plain.scores[pre + "self_attn.k_proj"].view(-1, head_dim)        # 2 KV heads
        v = plain.scores[pre + "self_attn.v_proj"].view(-1, head_dim)
        kv = fn(torch.cat([k, v], 1), 1).repeat_interleave(head_dim)
        torch.testing.assert_close(grouped.scores[pre + "self_attn.k_proj"], kv)
        torch.testing.assert_close(grouped.scores[pre + "self_attn.v_proj"], kv)
        mlp = fn(torch.stack([plain.scores[pre + "mlp.gate_proj"], plain.scores[pre + "mlp.up_proj"],
                              plain.column_scores[pre + "mlp.down_proj"]], 1), 1)
        torch.testing.assert_close(grouped.scores[pre + "mlp.gate_proj"], mlp)
        torch.testing.assert_close(grouped.scores[pre + "mlp.up_proj"], mlp)
        torch.testing.assert_close(grouped.column_scores[pre + "mlp.down_proj"], mlp)
        # ungrouped rows keep their own scores
        torch.testing.assert_close(grouped.scores[pre + "mlp.down_proj"],
                                   plain.scores[pre + "mlp.down_proj"])
    assert grouped.groups[pre + "self_attn.q_proj"] == head_dim
    assert grouped.groups[pre + "self_attn.k_proj"] == head_dim
    assert pre + "mlp.up_proj" not in grouped.groups
    assert len(group_scores(grouped, pre + "self_attn.k_proj")) == model.config.num_key_value_heads


def test_groups_bert_qkv_share_rows_and_gpt2_fused_qkv():
    bert = tiny("bert")
    plain = run(bert, None, "l2")
    grouped = run(bert, None, "l2", groups="auto")
    p = "bert.encoder.layer.0.attention.self."
    total = sum(plain.scores[p + k] for k in ("query", "key", "value"))
    for k in ("query", "key", "value"):
        torch.testing.assert_close(grouped.scores[p + k], total)
        assert grouped.groups[p + k] == 8
    f = "bert.encoder.layer.0."
    ffn = plain.scores[f + "intermediate.dense"] + plain.column_scores[f + "output.dense"]
    torch.testing.assert_close(grouped.column_scores[f + "output.dense"], ffn)

    gpt2 = tiny("gpt2")
    plain = run(gpt2, None, "l1")
    grouped = run(gpt2, None, "l1", groups="auto", group_reduce="max")
    s = plain.scores["transformer.h.0.attn.c_attn"].view(3, -1)
    torch.testing.assert_close(grouped.scores["transformer.h.0.attn.c_attn"],
                               s.max(0).values.repeat(3))


def test_find_groups_needs_no_tracing_and_respects_targets():
    model = tiny("llama")
    groups, head_dims = find_groups(model, ["model.layers.0.self_attn.q_proj",
                                            "model.layers.0.mlp.up_proj"])
    assert [g.kind for g in groups] == ["head"]
    assert head_dims == {"model.layers.0.self_attn.q_proj": 16}


# ------------------------------------------------------------------ reports
def test_report_save_load_round_trip(tmp_path):
    model = tiny("llama")
    report = run(model, testing.random_batches(model, n=1), "taylor", groups="auto")
    path = tmp_path / "taylor.safetensors"
    report.save(path)
    loaded = ImportanceReport.load(path)
    assert loaded.metric == "taylor" and loaded.meta == report.meta
    assert loaded.groups == report.groups and loaded.shapes == report.shapes
    for n in report.scores:
        assert torch.equal(loaded.scores[n], report.scores[n])
        assert torch.equal(loaded.column_scores[n], report.column_scores[n])


def test_report_metadata():
    model = tiny("gpt2")
    report = run(model, testing.random_batches(model, n=2, batch_size=4, seq_len=16), "fisher",
                 seed=7, n_samples=6)
    meta = report.meta
    assert meta["metric"] == "fisher" and meta["seed"] == 7 and meta["n_samples"] == 6
    assert meta["n_tokens"] == 6 * 16
    assert meta["model_class"] == "GPT2LMHeadModel"
    assert meta["model_parameters"] == sum(p.numel() for p in model.parameters())
    from rowsft_nb.targets import model_fingerprint
    assert meta["model_hash"] == model_fingerprint(model)
    assert meta["targets"] == "all-linear" and meta["seconds"] > 0
    assert report.shapes["transformer.h.0.attn.c_attn"] == (96, 32)    # Conv1D as (d_out, d_in)


def test_columns_false_leaves_column_scores_empty():
    model = tiny("llama")
    assert run(model, None, "l2", columns=False).column_scores == {}


@pytest.mark.parametrize("metric", ["taylor", "zo_taylor", "random", "hessian"])
def test_deterministic_for_a_seed(metric):
    model = tiny("llama")
    batches = testing.random_batches(model, n=2)
    a = run(model, batches, metric, seed=1)
    b = run(model, batches, metric, seed=1)
    for n in a.scores:
        assert torch.equal(a.scores[n], b.scores[n])


def test_n_samples_cuts_the_last_batch():
    model = f64("llama")
    batches = testing.random_batches(model, n=3, batch_size=4)
    report = run(model, batches, "taylor", n_samples=6)
    cut = [batches[0], {k: v[:2] for k, v in batches[1].items()}]
    reference = reference_gradient_metric(model, cut, "taylor")
    assert report.meta["n_samples"] == 6
    assert_report_matches(report, reference)


def test_dataloader_input_and_targets():
    model = tiny("llama")
    rows = [{k: v[i] for k, v in b.items()} for b in testing.random_batches(model, n=2)
            for i in range(4)]
    loader = torch.utils.data.DataLoader(rows, batch_size=3)
    report = run(model, loader, "taylor", targets=["q_proj", "v_proj"], exclude=r".*layers\.0\..*")
    assert report.modules == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert report.meta["n_samples"] == 8


def test_progress_bar_and_explicit_device_run():
    model = tiny("bert")
    report = score(model, testing.random_batches(model, n=1), metric="taylor", device="cpu",
                   progress=True)
    assert report.meta["device"] == "cpu"


def test_torch_pruning_backend_agrees_with_native_magnitude():
    pytest.importorskip("torch_pruning")
    model = tiny("llama")
    for metric in ("l1", "l2"):
        native = run(model, None, metric)
        tp = run(model, None, metric, backend="torch_pruning")
        assert tp.meta["backend"] == "torch_pruning"
        for n in native.scores:
            torch.testing.assert_close(tp.scores[n], native.scores[n], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(tp.column_scores[n], native.column_scores[n],
                                       rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Conv1D"):
        run(tiny("gpt2"), None, "l1", backend="torch_pruning")
    with pytest.raises(ValueError, match="supports metrics"):
        run(model, None, "taylor", backend="torch_pruning")


# ------------------------------------------------------------------ model left as found
def snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "forwards": [m.__dict__.get("forward") for m in model.modules()],
        "hooks": [sum(len(getattr(m, d)) for d in ("_forward_hooks", "_forward_pre_hooks",
                                                   "_backward_hooks", "_backward_pre_hooks"))
                  for m in model.modules()],
    }


def assert_same(model, before):
    after = snapshot(model)
    assert after["flags"] == before["flags"]
    assert after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"]
    assert after["forwards"] == before["forwards"]      # checkpoint wrappers removed
    for a, b in zip(after["grads"], before["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    for k, v in before["state"].items():
        torch.testing.assert_close(after["state"][k], v, rtol=0, atol=0, equal_nan=True)


def prepared_model():
    model = tiny("llama")
    model.train()
    model.model.layers[0].eval()                     # mixed modes
    model.model.embed_tokens.weight.requires_grad_(False)
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.5)        # an existing gradient
    return model


@pytest.mark.parametrize("metric", sorted(set(METRICS) - {"class_taylor", "taylor2_class"}))
def test_model_unchanged_after_scoring(metric):
    model = prepared_model()
    before = snapshot(model)
    run(model, testing.random_batches(model, n=1), metric)
    assert_same(model, before)


@pytest.mark.parametrize("method", ["hooks", "naive"])
def test_model_unchanged_after_an_exception_mid_calibration(method):
    model = prepared_model()
    before = snapshot(model)
    batches = testing.random_batches(model, n=2)
    del batches[1]["labels"]
    with pytest.raises(ValueError, match="labels"):
        run(model, batches, "taylor", method=method)
    assert_same(model, before)


def test_model_unchanged_after_nan_loss():
    model = tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match="NaN"):
        run(model, testing.random_batches(model, n=1), "taylor")
    with pytest.raises(FloatingPointError, match="NaN"):
        run(model, testing.random_batches(model, n=1), "zo_taylor")
    assert_same(model, before)


def test_non_finite_gradients_are_reported():
    model = tiny("llama")
    batch = testing.random_batches(model, n=1)
    handle = model.model.layers[1].mlp.register_full_backward_hook(
        lambda mod, gin, gout: (torch.full_like(gin[0], float("inf")),))
    try:
        with pytest.raises(FloatingPointError, match="Non-finite"):
            run(model, batch, "taylor")
    finally:
        handle.remove()


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    model = tiny("llama")
    batches = testing.random_batches(model, n=1)
    with pytest.raises(ScoringDataError, match="no batches"):
        run(model, [], "taylor")
    consumed = iter(batches)
    list(consumed)
    with pytest.raises(ScoringDataError, match="already"):
        run(model, consumed, "taylor")
    with pytest.raises(ScoringDataError, match="needs calibration data"):
        run(model, None, "wanda")
    for bad in (0, -3):
        with pytest.raises(ValueError, match="n_samples"):
            run(model, batches, "taylor", n_samples=bad)
    with pytest.raises(ValueError, match="No Linear/Conv1D module matches"):
        run(model, batches, "taylor", targets=["nope_proj"])
    with pytest.raises(ValueError, match="valid names: .*taylor"):
        run(model, batches, "tailor")
    no_labels = [{k: v for k, v in batches[0].items() if k != "labels"}]
    with pytest.raises(ScoringDataError, match="no 'labels'"):
        run(model, no_labels, "fisher")
    with pytest.raises(ValueError, match="class_taylor needs a classifier"):
        run(model, batches, "class_taylor")
    with pytest.raises(ScoringDataError, match="single batch"):
        run(model, batches[0], "taylor")
    with pytest.raises(ValueError, match="method"):
        run(model, batches, "taylor", method="fast")
    with pytest.raises(ValueError, match="hook-only"):
        run(model, batches, "wanda", method="naive")
    # labels of the wrong shape for class_taylor on a classifier
    bert = tiny("bert")
    bad = [{**testing.random_batches(bert, n=1)[0]}]
    bad[0]["labels"] = bad[0]["input_ids"].clone()
    with pytest.raises(ScoringDataError, match="one integer class id"):
        run(bert, bad, "class_taylor")


def test_fewer_examples_than_requested_warns():
    model = tiny("llama")
    with pytest.warns(UserWarning, match="ran out after 4"):
        report = run(model, testing.random_batches(model, n=1), "taylor", n_samples=100)
    assert report.meta["n_samples"] == 4


# ------------------------------------------------------------------ in-place outputs (Falcon)
class InPlaceToy(torch.nn.Module):
    """out = lin(x); out += 1: the model modifies a target's output in place."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(6, 5).double()
        self.head = torch.nn.Linear(5, 3).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))

    def forward(self, inputs, labels):
        out = self.lin(inputs)
        out += 1
        out.mul_(2)
        out = torch.tanh(out)
        return {"loss": ((self.head(out) - labels) ** 2).mean()}


def test_gradient_tap_survives_in_place_ops_on_outputs():
    model = InPlaceToy()
    g = torch.Generator().manual_seed(1)
    batches = [{"inputs": torch.randn(4, 3, 6, generator=g, dtype=torch.float64),
                "labels": torch.randn(4, 3, 3, generator=g, dtype=torch.float64)}
               for _ in range(2)]
    for metric in ("taylor", "fisher", "hessian"):
        report = run(model, batches, metric, targets=["lin", "head"])
        w = {n: getattr(model, n).weight.detach() for n in ("lin", "head")}
        grads = []
        for b in batches:
            loss = model(**b)["loss"]
            grads.append(dict(zip(w, torch.autograd.grad(loss, [model.lin.weight, model.head.weight]))))
        total = {n: sum(gr[n] for gr in grads) for n in w}
        if metric == "taylor":
            for n in w:
                torch.testing.assert_close(report.scores[n].double(),
                                           (w[n] * total[n]).abs().sum(1).float().double())
        assert all(bool(torch.isfinite(s).all()) for s in report.scores.values())


def test_falcon_gradient_metrics_with_in_place_residual():
    model = testing.tiny_model("falcon").double()     # parallel_attn: mlp_output += attention_output
    batches = testing.random_batches(model, n=1, batch_size=2, seq_len=8)
    for metric in ("taylor", "fisher"):
        assert_report_matches(run(model, batches, metric),
                              reference_gradient_metric(model, batches, metric))


# ------------------------------------------------------------------ adapted models
def test_score_on_injected_model_scores_base_layers_under_base_names():
    from rowsft_nb.adapter import inject
    from rowsft_nb.selection import Ratio, select

    model = f64("llama")
    batches = testing.random_batches(model, n=1, batch_size=2, seq_len=8)
    plain = run(model, batches, "taylor")
    inject(model, select(plain, Ratio(0.25)))
    adapted = run(model, batches, "taylor")
    assert not any(n.endswith(".base_layer") for n in adapted.scores)
    assert set(adapted.scores) == set(plain.scores)
    for n in plain.scores:      # zero deltas: the same function, the same scores
        torch.testing.assert_close(adapted.scores[n], plain.scores[n], rtol=1e-6, atol=0)
    only_q = run(model, batches, "l2", targets=["q_proj"])
    assert only_q.modules == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert not any(n.endswith(".base_layer") for n in run(model, None, "l2", groups="auto").scores)


# ------------------------------------------------------------------ transactional
class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["forward", "backward", "metric"])
@pytest.mark.parametrize("method", ["hooks", "naive"])
def test_model_exactly_as_before_after_a_forced_failure(where, method):
    model = prepared_model()
    batches = testing.random_batches(model, n=3)
    target = model.model.layers[1].mlp
    calls = {"n": 0}

    def explode_forward(mod, args, out):
        calls["n"] += 1
        if calls["n"] == 2:                        # mid-calibration, second batch
            raise Boom("forced")

    def explode_backward(mod, gin, gout):
        raise Boom("forced")

    handle = None
    if where == "forward":
        handle = target.register_forward_hook(explode_forward)
    elif where == "backward":
        handle = target.register_full_backward_hook(explode_backward)
    before = snapshot(model)
    metric = "hessian"
    if where == "metric":
        from rowsft_nb.scoring import Taylor

        class Failing(Taylor):
            def __call__(self, weight, stats):
                raise Boom("forced")

        metric = Failing()
    try:
        with pytest.raises(Boom):
            run(model, batches, metric, method=method)
        assert_same(model, before)
    finally:
        if handle is not None:
            handle.remove()


def test_meta_device_model_gets_a_clear_error():
    import transformers

    cfg = testing.tiny_llama().config
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    for metric in ("l2", "taylor"):
        with pytest.raises(ValueError, match="meta device.*real weights"):
            run(model, [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], metric)
