"""Labelled progress bars (``tqdm.auto``: a widget in notebooks, text in a terminal) for
``transformers.Trainer`` runs: ``training``, ``eval before``, ``eval at step N``,
``eval after``. Scoring labels its own bar ``scoring (<metric>)``.

Usage::

    trainer.remove_callback(transformers.ProgressCallback)
    trainer.add_callback(LabelledProgressCallback())
"""
from __future__ import annotations

from tqdm.auto import tqdm
from transformers import ProgressCallback
from transformers.trainer_utils import has_length

__all__ = ["LabelledProgressCallback", "format_logs"]


class LabelledProgressCallback(ProgressCallback):
    """Trainer's progress bars with a label: ``training`` for the optimizer steps, and for
    each evaluation ``eval before`` (before training starts), ``eval at step N`` (during) or
    ``eval after`` (after it ended). Only the main process draws bars.

    >>> trainer.add_callback(LabelledProgressCallback())
    """

    def __init__(self, max_str_len: int = 100):
        super().__init__(max_str_len=max_str_len)
        self.phase = "before"  # "before" | "during" | "after" training

    def eval_label(self, step: int) -> str:
        """The label of an evaluation bar at optimizer step ``step``."""
        return {"before": "eval before", "after": "eval after"}.get(self.phase,
                                                                    f"eval at step {step}")

    def on_train_begin(self, args, state, control, **kwargs):
        self.phase = "during"
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc="training")
        self.current_step = 0

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        self.phase = "after"

    def on_log(self, args, state, control, logs=None, **kwargs):
        """One readable line per log, numbers unquoted: ``step 10: loss 0.6819, ...``."""
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_logs(state.global_step, logs))

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and has_length(eval_dataloader):
            if self.prediction_bar is None:
                self.prediction_bar = tqdm(total=len(eval_dataloader), dynamic_ncols=True,
                                           leave=self.training_bar is None,
                                           desc=self.eval_label(state.global_step))
            self.prediction_bar.update(1)


def format_logs(step: int, logs: dict) -> str:
    """``step 10: loss 0.6819, grad_norm 0.5312, learning_rate 0.0001``; the end-of-training
    summary (``train_runtime`` ...) reads ``training done: 4 steps in 39.69 s, ...``.

    >>> format_logs(10, {"loss": 0.68191, "learning_rate": 1e-4})
    'step 10: loss 0.6819, learning_rate 0.0001'
    """
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    logs = {k: v for k, v in logs.items() if k != "total_flos"}
    if "train_runtime" in logs:
        head = f"training done: {step} steps in {fmt(logs.pop('train_runtime'))} s"
        logs = {k.removeprefix("train_"): v for k, v in logs.items()
                if k not in ("train_samples_per_second", "train_steps_per_second")}
        rest = ", ".join(f"{k} {fmt(v)}" for k, v in logs.items())
        return f"{head}, {rest}" if rest else head
    return f"step {step}: " + ", ".join(f"{k} {fmt(v)}" for k, v in logs.items())
