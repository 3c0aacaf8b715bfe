"""Recipes: the authors' defaults, the per-epoch schedules against torch's own schedulers,
and a tiny LLaMA / BERT run end to end."""
import copy
import dataclasses
import math

import pytest
import torch
from datasets import Dataset

from rowsft_nb import testing
from rowsft_nb.adapter import RowSparseLinear, inject, trainable_parameters, unload
from rowsft_nb.recipes import EpochLR, spruft_encoder, spruft_llm
from rowsft_nb.selection import FixedRows, Ratio, select
from rowsft_nb.targets import find_targets, row_weight

QUICK = dict(device="cpu", progress_bar=False, logging_steps=1)


def lm_dataset(n=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, testing.VOCAB, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n,
                              "labels": ids.tolist()})


def cls_dataset(n=8, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, testing.VOCAB, (n, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n,
                              "labels": (ids[:, 1] % 2).tolist()})


def mean_lm_loss(model, ds):
    with torch.no_grad():
        batch = {k: torch.tensor(ds[k]) for k in ds.column_names}
        return float(model(**batch).loss)


# ---------------------------------------------------------------------------- defaults
def test_llm_recipe_holds_the_authors_readme_setup():
    from rowsft_nb.scoring.metrics import ZerothOrderTaylor

    r = spruft_llm()
    assert r.budget == FixedRows(64)
    assert r.targets == "all-linear" and r.exclude == ()
    assert r.metric == ZerothOrderTaylor(eps=1e-3, n_estimate=2, data_split=256)
    assert r.n_samples is None and r.multiple_of == 1 and not r.per_head
    assert r.init == "zeros" and r.train_heads is True
    assert dict(r.training) == {"lr": 1e-4, "epochs": 3, "batch_size": 1, "weight_decay": 0.0,
                                "warmup_steps": 0, "max_grad_norm": 0.0,
                                "lr_scheduler": "constant", "optim": "adamw_torch"}
    assert r.lr_schedule == {"kind": "step", "gamma": 0.85}
    assert r.data == {"max_length": 512, "n_train": 1024}
    no_attn = spruft_llm(attention=False, metric="taylor", init="kaiming")
    assert no_attn.exclude == ("q_proj", "k_proj", "v_proj")
    assert no_attn.metric == "taylor" and no_attn.n_samples == 50 and no_attn.init == "kaiming"
    with pytest.raises(ValueError, match="rows"):
        spruft_llm(rows=0)


def test_encoder_recipe_holds_the_authors_vit_setup():
    r = spruft_encoder()
    assert r.budget == Ratio(0.05) and r.multiple_of == 2 and r.per_head
    assert r.metric == "taylor" and r.n_samples == 50 * 64 and r.train_heads
    assert dict(r.training) == {"lr": 1e-4, "epochs": 5, "batch_size": 64, "weight_decay": 0.0,
                                "warmup_steps": 0, "max_grad_norm": 0.0,
                                "lr_scheduler": "constant", "optim": "adamw_torch"}
    assert r.lr_schedule == {"kind": "cosine", "eta_min": 1e-9}
    cb = r.train_kwargs()["callbacks"][-1]
    assert isinstance(cb, EpochLR) and cb.kind == "cosine" and cb.epochs == 5
    assert r.train_kwargs(epochs=3)["callbacks"][-1].epochs == 3   # T_max follows epochs


def test_training_arguments_carry_the_recipe_into_a_plain_trainer(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                             **spruft_llm().training_arguments())
    assert args.learning_rate == 1e-4 and args.num_train_epochs == 3
    assert args.per_device_train_batch_size == 1 and args.weight_decay == 0.0
    assert args.max_grad_norm == 0.0 and args.warmup_steps == 0
    assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "constant"
    (cb,) = spruft_llm().callbacks()
    assert isinstance(cb, EpochLR) and cb.kind == "step" and cb.gamma == 0.85


def test_recipe_rejects_bad_fields():
    with pytest.raises(ValueError, match="init"):
        dataclasses.replace(spruft_encoder(), init="normal")
    with pytest.raises(ValueError, match="constant"):
        dataclasses.replace(spruft_encoder(), training={"lr_scheduler": "linear"})
    with pytest.raises(ValueError, match="kind"):
        dataclasses.replace(spruft_llm(), lr_schedule={"gamma": 0.85})
    with pytest.raises(ValueError, match="gamma"):
        EpochLR("step", gamma=1.5)
    with pytest.raises(ValueError, match="epochs"):
        EpochLR("cosine")


# ---------------------------------------------------------------------------- schedules
def _lrs_per_step(callback, epochs, steps_per_epoch, base=1e-4):
    """The learning rate used by every optimizer step when EpochLR drives a constant
    LambdaLR that is stepped after every optimizer step (as Trainer does)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    callback.install(sched)
    used = []
    for epoch in range(epochs):
        callback.set_epoch(epoch, sched)
        for _ in range(steps_per_epoch):
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return used


def _torch_per_epoch(make, epochs, steps_per_epoch, base=1e-4):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=base)
    sched = make(opt)
    used = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            used.append(opt.param_groups[0]["lr"])
            opt.step()
        sched.step()
    return used


def test_step_schedule_is_torch_steplr_per_epoch():
    got = _lrs_per_step(EpochLR("step", gamma=0.85), epochs=4, steps_per_epoch=3)
    ref = _torch_per_epoch(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.85),
                           epochs=4, steps_per_epoch=3)
    assert got == pytest.approx(ref, rel=1e-12)
    assert got[::3] == pytest.approx([1e-4 * 0.85 ** k for k in range(4)], rel=1e-12)


def test_cosine_schedule_is_torch_cosine_annealing_per_epoch():
    got = _lrs_per_step(EpochLR("cosine", epochs=5, eta_min=1e-9), epochs=5, steps_per_epoch=2)
    ref = _torch_per_epoch(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5, eta_min=1e-9),
        epochs=5, steps_per_epoch=2)
    assert got == pytest.approx(ref, rel=1e-9)


def test_epoch_lr_refuses_a_non_constant_trainer_schedule():
    model = testing.tiny_llama()
    inject(model, select(_report(model), FixedRows(2)))
    from rowsft_nb.train import train

    with pytest.raises(ValueError, match="constant"):
        train(model, lm_dataset(), max_steps=1, batch_size=2, lr_scheduler="linear",
              callbacks=[EpochLR("step")], **QUICK)


def test_epoch_lr_holds_within_an_epoch_under_trainer():
    model = testing.tiny_llama()
    inject(model, select(_report(model), FixedRows(2)))
    from rowsft_nb.train import train

    # 4 examples, batch 2, 3 epochs: 6 optimizer steps, 2 per epoch
    result = train(model, lm_dataset(n=4), epochs=3, batch_size=2, lr=1e-4,
                   lr_scheduler="constant", callbacks=[EpochLR("step", gamma=0.85)], **QUICK)
    lrs = [h["learning_rate"] for h in result.history if "learning_rate" in h]
    assert result.steps == 6
    assert lrs == pytest.approx([1e-4 * 0.85 ** (k // 2) for k in range(6)], rel=1e-9)


def _report(model):
    from rowsft_nb.scoring import score

    return score(model, None, metric="l2", progress=False)


# ---------------------------------------------------------------------------- end to end
def test_llm_recipe_runs_end_to_end_on_tiny_llama():
    model = testing.tiny_llama()
    base = copy.deepcopy(model)
    ds = lm_dataset(n=2)
    calib = testing.random_batches(model, n=3, batch_size=2, seq_len=12)
    recipe = spruft_llm(rows=8)                          # the default ZO-Taylor metric
    # 2 epochs of one batch = 2 optimizer steps, one per epoch.
    out = recipe.run(model, ds, calib, eval_dataset=ds, epochs=2, batch_size=2, **QUICK)

    assert out.result.steps == 2
    targets = find_targets(base)
    assert sorted(out.plan.rows) == sorted(targets)      # attention included
    assert all(len(r) == 8 for r in out.plan.rows.values())
    shapes = dict(out.plan.shapes)
    assert trainable_parameters(model)[0] == sum(8 * shapes[n][1] for n in targets)
    # zero init: the metrics before training are the base model's
    assert out.result.metrics_before["loss"] == pytest.approx(mean_lm_loss(base, ds), rel=1e-5)
    # StepLR(gamma=0.85) once per epoch
    lrs = [h["learning_rate"] for h in out.result.history if "learning_rate" in h]
    assert lrs == pytest.approx([1e-4, 1e-4 * 0.85], rel=1e-9)
    # only the selected rows moved
    from rowsft_nb.adapter import merge_and_unload

    base_mods = dict(base.named_modules())
    changed = 0
    merge_and_unload(model)
    mods = dict(model.named_modules())
    for name in targets:
        diff = (row_weight(mods[name]) - row_weight(base_mods[name])).abs().sum(1) > 0
        rows = set(out.plan.rows[name].tolist())
        assert set(torch.nonzero(diff)[:, 0].tolist()) <= rows, name
        changed += int(diff.sum())
    assert changed > 0


def test_llm_recipe_without_attention_leaves_qkv_out():
    model = testing.tiny_llama()
    calib = testing.random_batches(model, n=2, batch_size=2, seq_len=12)
    recipe = spruft_llm(rows=4, attention=False, metric="taylor")
    out = recipe.run(model, lm_dataset(n=2), calib, max_steps=1, batch_size=2, **QUICK)
    names = set(out.plan.rows)
    assert names and not any(n.endswith(("q_proj", "k_proj", "v_proj")) for n in names)
    assert any(n.endswith("o_proj") for n in names)


def test_kaiming_recipe_moves_the_model_at_step_0():
    model = testing.tiny_llama()
    base = copy.deepcopy(model)
    ds = lm_dataset(n=2)
    recipe = spruft_llm(rows=4, metric="l2", init="kaiming")
    out = recipe.run(model, ds, testing.random_batches(model, n=1), eval_dataset=ds,
                     max_steps=1, batch_size=2, **QUICK)
    assert out.result.metrics_before["loss"] != pytest.approx(mean_lm_loss(base, ds), rel=1e-6)


def test_encoder_recipe_runs_on_tiny_bert():
    model = testing.tiny_bert()
    ds = cls_dataset()
    calib = testing.random_batches(model, n=2, batch_size=4, seq_len=10)
    recipe = spruft_encoder()
    out = recipe.run(model, ds, calib, eval_dataset=ds, epochs=2, batch_size=8, **QUICK)
    assert out.result.steps == 2
    head_dims = out.report.head_dims
    for name, rows in out.plan.rows.items():
        d_out = out.plan.shapes[name][0]
        # rows come in multiples of 2 (round_to); with per_head, also an equal count per head
        step = math.lcm(2, d_out // head_dims[name]) if recipe.per_head and name in head_dims else 2
        assert len(rows) % step == 0 and len(rows) > 0, (name, len(rows), step)
        assert abs(len(rows) - 0.05 * d_out) <= step, (name, len(rows), d_out, step)
        if recipe.per_head and name in head_dims:
            per_head = torch.bincount(rows // head_dims[name], minlength=d_out // head_dims[name])
            assert len(set(per_head.tolist())) == 1, (name, per_head)
    # the classifier trains fully
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("classifier.") for n in trainable)
    lrs = [h["learning_rate"] for h in out.result.history if "learning_rate" in h]
    ref = [1e-9 + (1e-4 - 1e-9) * (1 + math.cos(math.pi * k / 2)) / 2 for k in range(2)]
    assert lrs == pytest.approx(ref, rel=1e-9)
    unload(model)
