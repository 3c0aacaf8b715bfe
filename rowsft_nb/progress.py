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

__all__ = ["LabelledProgressCallback"]


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

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and has_length(eval_dataloader):
            if self.prediction_bar is None:
                self.prediction_bar = tqdm(total=len(eval_dataloader), dynamic_ncols=True,
                                           leave=self.training_bar is None,
                                           desc=self.eval_label(state.global_step))
            self.prediction_bar.update(1)
