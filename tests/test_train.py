"""train(): metrics, observer, resume, NaN stop, interrupt, LoRA/full models (tiny models)."""
import copy
import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from rowsft_nb import testing
from rowsft_nb.adapter import inject
from rowsft_nb.plan import RowPlan
from rowsft_nb.targets import find_targets, linear_shape
from rowsft_nb.train import (TrainingObserver, infer_task_kind, list_devices, pick_device,
                             train)

FAST = dict(device="cpu", progress_bar=False, batch_size=8, logging_steps=1)


def cls_dataset(n=48, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, testing.VOCAB, (n, seq), generator=g)
    labels = (ids[:, 1] % 2).tolist()  # learnable from one token
    return Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist(), "labels": labels})


def lm_dataset(n=24, seed=0):
    """Variable-length sequences, so token-weighted and batch-mean losses differ."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 4 + (i * 5) % 13
        ids = torch.randint(0, testing.VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length,
                     "labels": [-100, -100] + ids[2:]})
    return Dataset.from_list(rows)


def first_rows_plan(model, r=3):
    names = find_targets(model, "all-linear")
    shapes = {n: linear_shape(model.get_submodule(n)) for n in names}
    return RowPlan(rows={n: list(range(r)) for n in names}, shapes=shapes)


def adapted_bert(seed=0):
    model = testing.tiny_bert(seed=seed)
    return inject(model, first_rows_plan(model))


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_states_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


@torch.no_grad()
def direct_accuracy(model, ds):
    model.eval()
    batch = {k: torch.tensor(ds[k]) for k in ("input_ids", "attention_mask")}
    preds = model(**batch).logits.argmax(-1)
    return (preds == torch.tensor(ds["labels"])).float().mean().item()


@torch.no_grad()
def direct_token_loss(model, ds):
    model.eval()
    total, count = 0.0, 0
    for ex in ds:
        ids = torch.tensor([ex["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        target = torch.tensor(ex["labels"][1:])
        keep = target != -100
        total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


def test_classification_accuracy_matches_direct_computation():
    model, ds, ev = adapted_bert(), cls_dataset(), cls_dataset(n=40, seed=1)
    before = direct_accuracy(copy.deepcopy(model), ev)
    result = train(model, ds, eval_dataset=ev, lr=2e-2, max_steps=24, **FAST)
    assert result.task == "classification" and result.steps == 24 and not result.stopped_early
    assert result.metrics_before["accuracy"] == pytest.approx(before)
    assert result.metrics_after["accuracy"] == pytest.approx(direct_accuracy(model, ev))
    assert [h["step"] for h in result.history if "loss" in h] == list(range(1, 25))
    # only the deltas and the classifier moved; frozen weights are the base model's
    base = testing.tiny_bert()
    layer = model.bert.encoder.layer[0].attention.self.query
    # (fused mode: the live weight holds W0[rows] + dW; state_dict shows the base weights)
    key = "bert.encoder.layer.0.attention.self.query.base_layer.weight"
    assert torch.equal(model.state_dict()[key], base.bert.encoder.layer[0].attention.self.query.weight)
    assert layer.delta.abs().sum() > 0
    assert result.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_causal_lm_loss_and_perplexity_are_token_weighted():
    model = testing.tiny_llama()
    inject(model, first_rows_plan(model, r=4))
    ds = lm_dataset()
    before = direct_token_loss(copy.deepcopy(model), ds)
    result = train(model, ds, eval_dataset=ds, lr=1e-2, max_steps=6, batch_size=4,
                   device="cpu", progress_bar=False)
    assert result.task == "causal_lm"
    assert result.metrics_before["loss"] == pytest.approx(before, rel=1e-5)
    assert result.metrics_before["perplexity"] == pytest.approx(math.exp(before), rel=1e-5)
    after = direct_token_loss(model, ds)
    assert result.metrics_after["loss"] == pytest.approx(after, rel=1e-5)
    assert after < before


class Recorder(TrainingObserver):
    def __init__(self, stop_at=None):
        self.logs, self.evals, self.total, self.ended, self.stop_at = [], [], None, None, stop_at
        self.polls = 0

    def on_begin(self, total_steps):
        self.total = total_steps

    def on_log(self, step, logs):
        self.logs.append((step, logs))

    def on_evaluate(self, step, metrics):
        self.evals.append((step, metrics))

    def should_stop(self):
        self.polls += 1  # polled once after every optimizer step
        return self.stop_at is not None and self.polls >= self.stop_at

    def on_end(self, result):
        self.ended = result


def test_observer_streams_logs_and_stops():
    obs = Recorder(stop_at=3)
    model = adapted_bert()
    result = train(model, cls_dataset(), eval_dataset=cls_dataset(n=16, seed=1), lr=1e-2,
                   max_steps=20, observer=obs, **FAST)
    assert obs.total == 20
    assert [s for s, logs in obs.logs if "loss" in logs] == [1, 2, 3]
    assert all("learning_rate" in logs for _, logs in obs.logs if "loss" in logs)
    assert "train_runtime" in obs.logs[-1][1]  # Trainer's closing summary
    assert [s for s, _ in obs.evals] == [0, 3] and "accuracy" in obs.evals[-1][1]
    assert result.steps == 3 and result.stopped_early
    assert result.stop_reason == "stopped by the observer at step 3"
    assert obs.ended is result


def test_resume_ends_where_uninterrupted_run_ends(tmp_path):
    ds = cls_dataset()
    full = adapted_bert()
    train(full, ds, lr=1e-2, max_steps=6, output_dir=tmp_path / "a", save_steps=3, **FAST)
    assert (tmp_path / "a" / "checkpoint-3" / "model.safetensors").exists()
    resumed = adapted_bert()
    result = train(resumed, ds, lr=1e-2, max_steps=6, output_dir=tmp_path / "b",
                   resume_from=str(tmp_path / "a" / "checkpoint-3"), **FAST)
    assert result.steps == 6
    assert_states_close(trainable_state(resumed), trainable_state(full))
    # and resuming really loaded the checkpoint: 3 steps from scratch end elsewhere
    fresh = adapted_bert()
    train(fresh, ds, lr=1e-2, max_steps=3, **FAST)
    delta = "bert.encoder.layer.0.attention.self.query.delta"
    assert not torch.allclose(trainable_state(fresh)[delta], trainable_state(full)[delta])


class NanAtStep(TrainerCallback):
    """Makes the classifier output NaN (training only) from optimizer step ``step`` on."""

    def __init__(self, model, step):
        self.step, self.active = step, False
        model.classifier.register_forward_hook(
            lambda mod, inp, out: out * float("nan") if (self.active and mod.training) else out)

    def on_step_begin(self, args, state, control, **kw):
        self.active = state.global_step >= self.step


def test_nan_loss_stops_and_restores_last_good_state():
    ds = cls_dataset()
    model = adapted_bert()
    result = train(model, ds, lr=1e-2, max_steps=10, lr_scheduler="constant",
                   callbacks=[NanAtStep(model, 4)], **FAST)
    assert result.stopped_early and "non-finite training loss" in result.stop_reason
    assert "after step 3" in result.stop_reason and result.steps == 3
    reference = adapted_bert()
    train(reference, ds, lr=1e-2, max_steps=3, lr_scheduler="constant", **FAST)
    state = trainable_state(model)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert_states_close(state, trainable_state(reference))


class InterruptAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_keyboard_interrupt_keeps_trained_deltas():
    ds = cls_dataset()
    model = adapted_bert()
    result = train(model, ds, eval_dataset=ds, lr=1e-2, max_steps=10,
                   callbacks=[InterruptAt(4)], **FAST)
    assert result.stopped_early and result.stop_reason == "interrupted at step 4"
    assert result.steps == 4 and "accuracy" in result.metrics_after
    # same schedule, stopped cleanly at step 4 by an observer: same weights
    reference = adapted_bert()
    train(reference, ds, lr=1e-2, max_steps=10, observer=Recorder(stop_at=4), **FAST)
    state = trainable_state(model)
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("delta"))
    assert_states_close(state, trainable_state(reference))


@pytest.mark.slow
def test_rows_lora_and_full_models_train_through_the_same_function():
    """Each kind of model learns (training-set loss falls) and is evaluated the same way."""
    from peft import LoraConfig, get_peft_model

    ds = cls_dataset()
    rows = adapted_bert()
    r_rows = train(rows, ds, eval_dataset=ds, lr=2e-2, max_steps=24, **FAST)

    lora = get_peft_model(testing.tiny_bert(), LoraConfig(
        r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    q = lora.base_model.model.bert.encoder.layer[0].attention.self.query
    base_q = q.base_layer.weight.clone()
    r_lora = train(lora, ds, eval_dataset=ds, lr=2e-2, max_steps=24, **FAST)
    assert torch.equal(q.base_layer.weight, base_q)
    assert q.lora_B["default"].weight.abs().sum() > 0  # B starts at zero
    assert r_lora.task == "classification"

    full = testing.tiny_bert()
    before = {n: p.detach().clone() for n, p in full.named_parameters()}
    r_full = train(full, ds, eval_dataset=ds, lr=5e-3, max_steps=24, **FAST)
    moved = [n for n, p in full.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > 0.9 * len(before)
    assert r_full.trainable_parameters == sum(p.numel() for p in full.parameters())

    for model, r in ((rows, r_rows), (lora, r_lora), (full, r_full)):
        assert r.metrics_after["loss"] < r.metrics_before["loss"] - 0.01
        assert r.metrics_after["accuracy"] == pytest.approx(direct_accuracy(model, ds))


def test_devices_and_task_inference():
    assert pick_device() == ("cuda" if torch.cuda.is_available() else
                             "mps" if torch.backends.mps.is_available() else "cpu")
    devices = list_devices()
    assert devices[-1][0] == "cpu" and devices[-1][1].startswith("cpu")
    assert infer_task_kind(testing.tiny_bert()) == "classification"
    assert infer_task_kind(testing.tiny_gpt2()) == "causal_lm"


def test_bad_arguments_name_the_fix():
    frozen = testing.tiny_bert()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, cls_dataset(), **FAST)
    with pytest.raises(ValueError, match="save_steps needs output_dir"):
        train(adapted_bert(), cls_dataset(), save_steps=2, **FAST)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        train(adapted_bert(), cls_dataset(), **{**FAST, "device": "cuda:1"})
    with pytest.raises(ValueError, match="task must be"):
        train(adapted_bert(), cls_dataset(), task="regression", **FAST)


def test_gradient_accumulation_equals_the_larger_batch():
    """batch 4 x 2 accumulation steps == batch 8 (Trainer would otherwise not divide a
    classifier's mean loss by the accumulation steps)."""
    ds = cls_dataset()
    kw = {**FAST, "train_sampling_strategy": "sequential", "max_grad_norm": 1.0}
    accumulated, big = adapted_bert(), adapted_bert()
    train(accumulated, ds, lr=1e-2, max_steps=4, **{**kw, "batch_size": 4}, grad_accum=2)
    train(big, ds, lr=1e-2, max_steps=4, **{**kw, "batch_size": 8})
    assert_states_close(trainable_state(accumulated), trainable_state(big), atol=1e-5)
