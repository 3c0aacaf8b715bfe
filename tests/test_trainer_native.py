"""Trainer-native use (issue 15, part 3): RowTrainer / ObserverCallback / NaNGuardCallback in a
plain transformers Trainer script, and train() taking args=TrainingArguments(...) or
Trainer's own argument names next to its short ones."""
import importlib

import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

import rowsft_nb as rs

# shared with tests/test_train.py (tests/ is on sys.path under pytest)
from test_train import NanAtStep, adapted_bert, assert_states_close, cls_dataset, trainable_state

train_module = importlib.import_module("rowsft_nb.train")  # rowsft_nb.train is the function
FAST = dict(device="cpu", progress_bar=False, logging_steps=1)


def script_args(tmp_path, **overrides):
    """TrainingArguments as a user's script writes them (seeded like train())."""
    kwargs = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                  learning_rate=1e-2, lr_scheduler_type="constant", use_cpu=True,
                  report_to="none", logging_steps=1, disable_tqdm=True, save_strategy="no",
                  seed=0, data_seed=0)
    return TrainingArguments(**{**kwargs, **overrides})


class Recorder(rs.TrainingObserver):
    def __init__(self):
        self.steps = []

    def on_log(self, step, logs):
        if "loss" in logs:
            self.steps.append(step)


# ------------------------------------------------------------------ a plain Trainer script
def test_script_with_row_trainer_trains_three_steps(tmp_path):
    ds = cls_dataset()
    model = adapted_bert()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k in frozen}
    obs = Recorder()
    trainer = rs.RowTrainer(model=model, args=script_args(tmp_path), train_dataset=ds,
                            data_collator=default_data_collator,
                            callbacks=[rs.ObserverCallback(obs)])
    out = trainer.train()
    assert out.global_step == 3 and obs.steps == [1, 2, 3] and trainer.stop_reason is None
    after = model.state_dict()  # base weights as stored (a fused layer restores its rows)
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    state = trainable_state(model)
    assert all(state[k].abs().sum() > 0 for k in state if k.endswith(".delta"))
    # the same run through rowsft_nb.train() ends at the same weights
    reference = adapted_bert()
    rs.train(reference, ds, lr=1e-2, max_steps=3, batch_size=8, lr_scheduler="constant", **FAST)
    assert_states_close(state, trainable_state(reference))


def test_row_trainer_nan_guard_restores_last_good_weights(tmp_path):
    ds = cls_dataset()
    model = adapted_bert()
    trainer = rs.RowTrainer(model=model, args=script_args(tmp_path, max_steps=10),
                            train_dataset=ds, data_collator=default_data_collator,
                            callbacks=[NanAtStep(model, 4)])
    trainer.train()  # returns: the guard stops training instead of raising
    assert "non-finite training loss" in trainer.stop_reason
    assert "after step 3" in trainer.stop_reason and trainer.state.global_step == 3
    reference = adapted_bert()
    rs.RowTrainer(model=reference, args=script_args(tmp_path), train_dataset=ds,
                  data_collator=default_data_collator).train()
    state = trainable_state(model)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert_states_close(state, trainable_state(reference))


def test_nan_guard_callback_protects_a_plain_transformers_trainer(tmp_path):
    ds = cls_dataset()
    model = adapted_bert()
    guard = rs.NaNGuardCallback()
    Trainer(model=model, args=script_args(tmp_path, max_steps=10), train_dataset=ds,
            data_collator=default_data_collator,
            callbacks=[NanAtStep(model, 4), guard]).train()
    # the NaN loss of step 5 turned the weights NaN; those after step 4 come back
    assert guard.restored_step == 4 and "after step 5" in guard.stop_reason
    reference = adapted_bert()
    Trainer(model=reference, args=script_args(tmp_path, max_steps=4), train_dataset=ds,
            data_collator=default_data_collator).train()
    state = trainable_state(model)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert_states_close(state, trainable_state(reference))


# ------------------------------------------------------------------ train() arguments
def test_trainer_names_train_like_the_short_names():
    ds = cls_dataset()
    a, b = adapted_bert(), adapted_bert()
    ra = rs.train(a, ds, learning_rate=1e-2, num_train_epochs=1, per_device_train_batch_size=8,
                  gradient_accumulation_steps=2, lr_scheduler_type="constant", **FAST)
    rb = rs.train(b, ds, lr=1e-2, epochs=1, batch_size=8, grad_accum=2,
                  lr_scheduler="constant", **FAST)
    assert ra.steps == rb.steps == 3  # 48 examples / (8 x 2)
    assert [h["learning_rate"] for h in ra.history if "loss" in h] == [1e-2] * 3
    assert_states_close(trainable_state(a), trainable_state(b))


def test_args_training_arguments_are_used_as_given(tmp_path):
    model = adapted_bert()
    result = rs.train(model, cls_dataset(), progress_bar=False,
                      args=script_args(tmp_path, max_steps=2, learning_rate=5e-3))
    assert result.steps == 2 and result.output_dir == str(tmp_path)
    assert [h["learning_rate"] for h in result.history if "loss" in h] == [5e-3] * 2
    with pytest.raises(ValueError, match=r"args=TrainingArguments\(...\) and the settings "
                                         r"\['lr', 'max_steps'\]"):
        rs.train(model, cls_dataset(), args=script_args(tmp_path), lr=1e-3, max_steps=2)
    with pytest.raises(ValueError, match=r"\['learning_rate'\]"):
        rs.train(model, cls_dataset(), args=script_args(tmp_path), learning_rate=1e-3)


@pytest.fixture
def captured(monkeypatch):
    """train() hands its TrainingArguments to the Trainer class and stops there."""
    seen = {}

    class Capture:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            raise RuntimeError("captured")

    monkeypatch.setattr(train_module, "_make_trainer_class", lambda: Capture)
    return seen


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": 1e-3, "learning_rate": 1e-2}, "lr=0.001 and learning_rate=0.01 both set learning_rate"),
    ({"batch_size": 4, "per_device_train_batch_size": 8},
     "batch_size=4 and per_device_train_batch_size=8"),
    ({"epochs": 2, "num_train_epochs": 3}, "epochs=2 and num_train_epochs=3"),
    ({"grad_accum": 2, "gradient_accumulation_steps": 4},
     "grad_accum=2 and gradient_accumulation_steps=4"),
    ({"lr_scheduler": "linear", "lr_scheduler_type": "cosine"},
     "lr_scheduler='linear' and lr_scheduler_type='cosine'"),
    ({"learning_rat": 1e-3}, "unknown argument(s) ['learning_rat']"),
    ({"learning_rate": -1.0}, "learning_rate must be a finite number > 0, got -1.0"),
])
def test_bad_or_contradicting_settings_are_refused_before_the_trainer(kwargs, message, captured):
    with pytest.raises(ValueError) as e:
        rs.train(adapted_bert(), cls_dataset(), **{**FAST, **kwargs})
    assert message in str(e.value)
    assert not captured  # refused before the Trainer was built
    if "learning_rat" in kwargs:
        assert "did you mean 'learning_rate'" in str(e.value)


def test_trainer_names_and_other_fields_reach_training_arguments(captured):
    with pytest.raises(RuntimeError, match="captured"):
        rs.train(adapted_bert(), cls_dataset(), lr=1e-3, learning_rate=1e-3,  # same value: ok
                 per_device_train_batch_size=4, num_train_epochs=2, warmup_steps=3,
                 weight_decay=0.1, max_grad_norm=0.5, data_seed=7, report_to="none",
                 eval_strategy="no", optim="adamw_torch", **FAST)
    args = captured["args"]
    assert (args.learning_rate, args.per_device_train_batch_size, args.num_train_epochs) == \
        (1e-3, 4, 2.0)
    assert (args.warmup_steps, args.weight_decay, args.max_grad_norm) == (3, 0.1, 0.5)
    assert args.data_seed == 7 and args.seed == 0  # a field train() also sets: caller's wins
    assert args.lr_scheduler_type == "linear" and args.gradient_accumulation_steps == 1


def test_recipe_overrides_take_either_spelling():
    """recipes pass their presets in short names; a Trainer-named override replaces them."""
    from rowsft_nb.recipes import spruft_encoder

    kwargs = spruft_encoder().train_kwargs(learning_rate=5e-4, num_train_epochs=2)
    assert kwargs["lr"] == 5e-4 and kwargs["epochs"] == 2
    assert "learning_rate" not in kwargs and "num_train_epochs" not in kwargs
