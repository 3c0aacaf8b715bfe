"""Every metric against an independent implementation of the authors' formula
(CenjhihLi/sparsity_finetuning, methods/finetuner_importance.py), written here with plain
autograd: whole-batch and per-example (batch of one) losses, real weight perturbations for
SPSA. Float64 tiny models, compared to 1e-5 (relative)."""
import dataclasses

import numpy as np
import pytest
import torch

from rowsft_nb import testing
from rowsft_nb.scoring import (AGGREGATES, ClassTaylor, Metric, SecondOrderClassTaylor, Taylor,
                               ZerothOrderTaylor, score)
from rowsft_nb.scoring.calibration import zo_direction, zo_seed
from rowsft_nb.targets import find_targets, is_conv1d, row_weight

RTOL = 1e-5


def run(model, batches, metric, **kw):
    return score(model, batches, metric=metric, progress=False, **kw)


def modules_of(model):
    named = dict(model.named_modules())
    return {n: named[n] for n in find_targets(model)}


def weight_grads(model, batch):
    """dL/dW ([d_out, d_in]) of every target for the model's loss on ``batch``."""
    mods = modules_of(model)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [m.weight for m in mods.values()]
    for w in weights:
        w.requires_grad_(True)
    try:
        grads = torch.autograd.grad(model(**batch).loss, weights)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return {n: (g.t() if is_conv1d(m) else g) for (n, m), g in zip(mods.items(), grads)}


def examples(batches):
    """Every example as its own batch of one."""
    for b in batches:
        size = next(v for v in b.values() if isinstance(v, torch.Tensor)).shape[0]
        for e in range(size):
            yield {k: v[e:e + 1] for k, v in b.items()}


def W(model):
    return {n: row_weight(m).detach() for n, m in modules_of(model).items()}


def check(report, expected):
    assert set(report.scores) == set(expected)
    for n, (rows, cols) in expected.items():
        torch.testing.assert_close(report.scores[n].double(), rows.double(), rtol=RTOL, atol=1e-30)
        torch.testing.assert_close(report.column_scores[n].double(), cols.double(), rtol=RTOL,
                                   atol=1e-30)


def rows_cols_abs(t):
    return t.abs().sum(1), t.abs().sum(0)


# ------------------------------------------------------------------ taylor (both forms)
@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_taylor_is_sum_of_abs_w_times_summed_gradient(arch):
    model = testing.tiny_model(arch).double()
    batches = testing.random_batches(model, n=2, batch_size=3, seq_len=8)
    per_batch = [weight_grads(model, b) for b in batches]
    w = W(model)
    G = {n: sum(g[n] for g in per_batch) for n in w}
    check(run(model, batches, "taylor"), {n: rows_cols_abs(w[n] * G[n]) for n in w})
    check(run(model, batches, Taylor()), {n: rows_cols_abs(w[n] * G[n]) for n in w})
    multi = {n: ((w[n] * G[n]).sum(1).abs(), (w[n] * G[n]).sum(0).abs()) for n in w}
    check(run(model, batches, "taylor_multivariable"), multi)
    check(run(model, batches, Taylor(multivariable=True)), multi)


def test_taylor_abs_is_a_deprecated_alias_of_taylor():
    model = testing.tiny_llama().double()
    batches = testing.random_batches(model, n=1, batch_size=2, seq_len=8)
    with pytest.warns(DeprecationWarning, match="taylor_abs"):
        old = run(model, batches, "taylor_abs")
    new = run(model, batches, "taylor")
    assert old.metric == "taylor"
    for n in new.scores:
        assert torch.equal(old.scores[n], new.scores[n])


# ------------------------------------------------------------------ hessian (OBD)
@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_hessian_uses_mean_of_per_example_squared_gradients(arch):
    model = testing.tiny_model(arch).double()
    batches = testing.random_batches(model, n=2, batch_size=3, seq_len=8)
    if arch == "llama":  # padding: the per-example loss counts only the example's tokens
        batches[0]["attention_mask"][0, 5:] = 0
        batches[0]["labels"][0, 5:] = -100
        batches[1]["labels"][2, :3] = -100
    w = W(model)
    sq = {n: 0.0 for n in w}
    count = 0
    for one in examples(batches):
        g = weight_grads(model, one)
        count += 1
        for n in w:
            sq[n] = sq[n] + g[n] ** 2
    expected = {n: ((w[n] ** 2 * sq[n] / count).sum(1), (w[n] ** 2 * sq[n] / count).sum(0))
                for n in w}
    check(run(model, batches, "hessian"), expected)
    check(run(model, batches, "hessian", method="naive"), expected)


# ------------------------------------------------------------------ magnitude
def test_l1_and_l2_are_the_authors_p_norm_sums():
    model = testing.tiny_gpt2()
    w = W(model)
    check(run(model, None, "l2"), {n: ((w[n] ** 2).sum(1), (w[n] ** 2).sum(0)) for n in w})
    check(run(model, None, "l1"), {n: (w[n].abs().sum(1), w[n].abs().sum(0)) for n in w})


# ------------------------------------------------------------------ zeroth order (SPSA)
def spsa_reference(model, batches, seed, eps, n_estimate, data_split):
    """Authors' SPSA with real weight perturbations W +- eps z (all targets at once), each
    (estimate, slice) on its own slice of the batches (batch b -> slice b mod data_split)."""
    mods = modules_of(model)
    names = list(mods)
    original = {n: m.weight.detach().clone() for n, m in mods.items()}
    slices = {}
    for b, batch in enumerate(batches):
        slices.setdefault(b % data_split, []).append(batch)
    ghat = {n: torch.zeros_like(row_weight(mods[n])) for n in names}
    terms = 0
    with torch.no_grad():
        for e in range(n_estimate):
            for s, slice_batches in sorted(slices.items()):
                zs = {n: zo_direction(row_weight(mods[n]), zo_seed(seed, e, s), i)
                      for i, n in enumerate(names)}
                losses = []
                for sign in (1, -1):
                    for n, m in mods.items():
                        z = zs[n].t() if is_conv1d(m) else zs[n]
                        m.weight.copy_(original[n] + sign * eps * z)
                    losses.append(sum(float(model(**b).loss) for b in slice_batches)
                                  / len(slice_batches))
                for n, m in mods.items():
                    m.weight.copy_(original[n])
                coeff = (losses[0] - losses[1]) / (2 * eps)
                for n in names:
                    ghat[n] += coeff * zs[n]
                terms += 1
    return {n: g / terms for n, g in ghat.items()}


@pytest.mark.parametrize("data_split", [2, 256])
def test_zo_taylor_matches_weight_perturbation_spsa(data_split):
    model = testing.tiny_gpt2().double()
    batches = testing.random_batches(model, n=3, batch_size=2, seq_len=8)
    metric = ZerothOrderTaylor(eps=1e-3, n_estimate=2, data_split=data_split)
    ghat = spsa_reference(model, batches, seed=4, eps=1e-3, n_estimate=2, data_split=data_split)
    w = W(model)
    check(run(model, batches, metric, seed=4), {n: rows_cols_abs(w[n] * ghat[n]) for n in w})
    report = run(model, batches, "zo_taylor", seed=4)          # defaults: eps 1e-3, 2 x 256
    assert report.meta["metric_settings"] == {"eps": 1e-3, "n_estimate": 2, "data_split": 256,
                                              "multivariable": False}


def test_zo_taylor_settings_are_validated():
    for bad in (dict(eps=0), dict(n_estimate=0), dict(data_split=1.5)):
        with pytest.raises(ValueError, match="ZerothOrderTaylor"):
            ZerothOrderTaylor(**bad)


# ------------------------------------------------------------------ label-wise
def aggregate_reference(per_class, how, k):
    """The authors' label aggregators, written with numpy over [C, n]."""
    x = per_class.numpy()
    if how == "max":
        return x.max(0)
    if how == "mean":
        return x.mean(0)
    top = -np.sort(-x, axis=0)[:min(k, x.shape[0])].mean(0)
    if how == "topk":
        return top
    if how == "topk_mean":
        return (top + x.mean(0)) / 2
    qs = np.arange(0, 11) / 10 if how == "quantiles" else np.arange(5, 11) / 10
    return np.quantile(x, qs, axis=0).mean(0)


def class_reference(model, batches, second_order=False):
    """Per class c: G^c, H^c = mean over class-c examples of g, g^2 (batch of one each);
    returns per-class [C_seen, d_out] and [C_seen, d_in] scores per module."""
    w = W(model)
    sums, sqs, counts = {}, {}, {}
    for one in examples(batches):
        c = int(one["labels"][0])
        g = weight_grads(model, one)
        counts[c] = counts.get(c, 0) + 1
        for n in w:
            sums[(n, c)] = sums.get((n, c), 0.0) + g[n]
            sqs[(n, c)] = sqs.get((n, c), 0.0) + g[n] ** 2
    out = {}
    for n in w:
        rows, cols = [], []
        for c in sorted(counts):
            Gc, Hc = sums[(n, c)] / counts[c], sqs[(n, c)] / counts[c]
            t = (w[n] * Gc + w[n] ** 2 * Hc) if second_order else w[n] * Gc
            rows.append(t.abs().sum(1))
            cols.append(t.abs().sum(0))
        out[n] = (torch.stack(rows), torch.stack(cols))
    return out


@pytest.fixture(scope="module")
def classifier():
    model = testing.tiny_bert(num_labels=4).double()
    batches = testing.random_batches(model, n=2, batch_size=5, seq_len=6)
    batches[0]["labels"] = torch.tensor([0, 0, 1, 3, 3])      # class 2 never seen
    batches[1]["labels"] = torch.tensor([1, 0, 3, 3, 3])
    return model, batches


@pytest.mark.parametrize("second_order", [False, True])
def test_class_taylor_every_aggregate(classifier, second_order):
    model, batches = classifier
    ref = class_reference(model, batches, second_order)
    cls = SecondOrderClassTaylor if second_order else ClassTaylor
    for how in AGGREGATES:
        metric = cls(aggregate=how, k=2)
        expected = {n: tuple(torch.from_numpy(np.asarray(aggregate_reference(t, how, 2)))
                             for t in pair) for n, pair in ref.items()}
        check(run(model, batches, metric), expected)
    default = run(model, batches, "taylor2_class" if second_order else "class_taylor")
    assert default.meta["metric_settings"]["aggregate"] == "max"
    expected = {n: tuple(t.max(0).values for t in pair) for n, pair in ref.items()}
    check(default, expected)
    check(run(model, batches, cls(), method="naive"), expected)


def test_class_taylor_rejects_bad_settings():
    with pytest.raises(ValueError, match="aggregate"):
        ClassTaylor(aggregate="median")
    with pytest.raises(ValueError, match="k must"):
        ClassTaylor(aggregate="topk", k=0)


# ------------------------------------------------------------------ a new metric = one object
@dataclasses.dataclass(frozen=True)
class GradientMagnitude(Metric):
    """Example of adding a metric: sum_j |G_ij|^p from the registered ``grad_sum``."""

    p: int = 1
    name = "grad_magnitude"
    needs = frozenset({"grad_sum"})

    def __call__(self, weight, stats):
        g = stats["grad_sum"].abs().pow(self.p)
        return g.sum(1), g.sum(0)


def test_a_new_metric_is_one_object():
    model = testing.tiny_llama().double()
    batches = testing.random_batches(model, n=2, batch_size=2, seq_len=8)
    per_batch = [weight_grads(model, b) for b in batches]
    G = {n: sum(g[n] for g in per_batch) for n in W(model)}
    report = run(model, batches, GradientMagnitude(p=2))
    assert report.metric == "grad_magnitude" and report.meta["metric_settings"] == {"p": 2}
    check(report, {n: ((g ** 2).sum(1), (g ** 2).sum(0)) for n, g in G.items()})
    naive = run(model, batches, GradientMagnitude(p=2), method="naive")
    check(naive, {n: ((g ** 2).sum(1), (g ** 2).sum(0)) for n, g in G.items()})


@pytest.mark.parametrize("arch", ["opt", "t5", "falcon"])
def test_hessian_per_example_on_other_layouts(arch):
    """OPT flattens [B, T, d] to [B*T, d] before its MLP; T5 is seq2seq (unshifted token
    labels); Falcon fuses q/k/v. Hooks agree with the per-example .grad reference."""
    model = testing.tiny_model(arch).double()
    batches = testing.random_batches(model, n=1, batch_size=3, seq_len=6)
    batches[0]["labels"][0, 4:] = -100
    w = W(model)
    per = [weight_grads(model, one) for one in examples(batches)]
    expected = {n: ((w[n] ** 2 * sum(g[n] ** 2 for g in per) / len(per)).sum(1),
                    (w[n] ** 2 * sum(g[n] ** 2 for g in per) / len(per)).sum(0)) for n in w}
    check(run(model, batches, "hessian"), expected)


def test_class_taylor_multivariable(classifier):
    model, batches = classifier
    w = W(model)
    sums, counts = {}, {}
    for one in examples(batches):
        c = int(one["labels"][0])
        counts[c] = counts.get(c, 0) + 1
        g = weight_grads(model, one)
        for n in w:
            sums[(n, c)] = sums.get((n, c), 0.0) + g[n]
    expected = {}
    for n in w:
        t = torch.stack([w[n] * sums[(n, c)] / counts[c] for c in sorted(counts)])
        expected[n] = (t.sum(2).abs().mean(0), t.sum(1).abs().mean(0))
    check(run(model, batches, ClassTaylor(aggregate="mean", multivariable=True)), expected)
