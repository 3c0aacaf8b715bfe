"""Training on ``transformers.Trainer``: one code path for row-sparse adapters, PEFT LoRA
models and fully trainable models.

Usage::

    data = prepare_task("movie_sentiment", tokenizer, max_length=64, n_train=800)
    result = train(model, data.train, eval_dataset=data.validation, tokenizer=tokenizer,
                   lr=1e-3, epochs=1, batch_size=16)
    result.metrics_before["accuracy"], result.metrics_after["accuracy"], result.stop_reason

``train`` takes Trainer's own argument names too (``learning_rate=``,
``num_train_epochs=``, ... or ``args=TrainingArguments(...)``). In a hand-written Trainer
script, use :class:`RowTrainer` (a ``transformers.Trainer`` with the NaN guard) and
:class:`ObserverCallback`; :class:`NaNGuardCallback` guards a plain ``Trainer``::

    trainer = RowTrainer(model=inject(model, plan), args=TrainingArguments("out"),
                         train_dataset=ds, data_collator=collator)
    trainer.train(); trainer.stop_reason

Because the loop is Trainer's, Accelerate, DDP/FSDP (``torchrun``/``accelerate launch``),
gradient accumulation, mixed precision, gradient checkpointing and ``TrainerCallback`` s
work as they do in Hugging Face. Added here: evaluation before and after, a
:class:`TrainingObserver` for live views (stream logs, request a stop), a stop on
non-finite loss that restores the last good trainable weights, and Ctrl-C/kernel interrupt
that keeps what was trained and reports the step reached.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .data import (CAUSAL_LM, CLASSIFICATION, IGNORE_INDEX, SEQ2SEQ, check_label_range,
                   check_tokenized, make_collator)

__all__ = ["train", "TrainResult", "TrainingObserver", "RowTrainer", "ObserverCallback",
           "NaNGuardCallback", "NonFiniteLossError", "pick_device",
           "list_devices", "infer_task_kind", "resolve_device", "output_path_problem"]

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- devices
def pick_device() -> str:
    """The best available device: ``"cuda"``, then ``"mps"``, then ``"cpu"``.

    >>> pick_device()   # 'cpu' on a machine without an accelerator
    """
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def list_devices() -> list[tuple[str, str]]:
    """Every usable device as ``(id, label)``, best first, e.g.
    ``("cuda:0", "cuda:0 — NVIDIA H100 80GB HBM3, 79 GB")``, ending with ``("cpu", "cpu — N cores")``.

    >>> [d for d, _ in list_devices()]   # ['cpu']
    """
    out: list[tuple[str, str]] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append((f"cuda:{i}", f"cuda:{i} — {p.name}, {p.total_memory / 1e9:.0f} GB"))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append(("mps", "mps — Apple GPU"))
    out.append(("cpu", f"cpu — {os.cpu_count()} cores"))
    return out


def resolve_device(device: str | torch.device | None) -> str:
    """``"cuda"``, ``"mps"`` or ``"cpu"`` for a ``device`` argument, or a ValueError saying
    why it cannot be used here (no CUDA, no such GPU, unknown name).

    >>> resolve_device("auto")   # 'cpu' on a machine without an accelerator
    """
    d = "auto" if device is None else str(device)
    if d == "auto":
        return pick_device()
    if d in ("cpu", "mps", "cuda", "cuda:0"):
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={d!r} but CUDA is not available here; use device='cpu' or 'auto'")
        if d == "mps" and not (torch.backends.mps.is_available()):
            raise ValueError("device='mps' but MPS is not available here; use device='cpu' or 'auto'")
        return "cuda" if d.startswith("cuda") else d
    if d.startswith("cuda:"):
        pick = "pick a GPU with CUDA_VISIBLE_DEVICES=N and device='cuda'"
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = d.split(":", 1)[1]
        if n == 0:
            raise ValueError(f"device={d!r} but CUDA is not available here; use device='cpu' or "
                             f"'auto' (on a GPU machine, {pick})")
        if not index.isdigit() or int(index) >= n:
            raise ValueError(f"device={d!r} but this machine has {n} CUDA device(s) "
                             f"(cuda:0..cuda:{n - 1}); {pick}")
        raise ValueError(f"device={d!r}: Trainer places the model on the visible GPUs itself; "
                         f"{pick}")
    raise ValueError(f"Unknown device {d!r}; use 'auto', 'cuda', 'mps' or 'cpu'")


def output_path_problem(path: str | os.PathLike, *, folder: bool = True) -> str | None:
    """Why ``path`` cannot be written (an existing file where a folder is wanted or the
    reverse, a regular file on the way, no write permission), or None when it can.

    >>> output_path_problem("outputs/adapter")   # None
    """
    p = Path(path).expanduser()
    if p.exists():
        if folder and not p.is_dir():
            return f"{p} is a file, not a folder"
        if not folder and p.is_dir():
            return f"{p} is a folder; give a file name"
    ancestor = p if (folder and p.exists()) else p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {p} cannot be created under it"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def _whole(name: str, value: Any, *, optional: bool = False) -> None:
    """``value`` must be a whole number >= 1 (None allowed when ``optional``)."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, np.integer, float, np.floating)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and float(value).is_integer() and value >= 1):
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}"
                         + (" (None for the default)" if optional else ""))


def _positive(name: str, value: Any, *, optional: bool = False) -> None:
    """``value`` must be a finite number > 0 (None allowed when ``optional``)."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, np.integer, float, np.floating)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_model(model: nn.Module) -> None:
    """Refuse models train() cannot use: weights on the meta device, a merged adapter."""
    from .adapter.layer import RowSparseLinear

    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.device.type == "meta"]
    if meta:
        raise ValueError(f"{len(meta)} parameters/buffers of the model are on the meta device "
                         f"(e.g. {meta[0]!r}): it has no weights to train. Load it with real "
                         "weights (from_pretrained without device_map='meta' or "
                         "init_empty_weights), or model.to_empty(device='cpu') and load a "
                         "state_dict")
    merged = [n for n, m in model.named_modules() if isinstance(m, RowSparseLinear) and m.merged]
    if merged:
        raise ValueError(f"The row-sparse adapter is merged into the base weights ({len(merged)} "
                         f"layers, e.g. {merged[0]!r}), so training would not reach the deltas: "
                         "call rowsft_nb.unmerge(model) first (and merge again after training)")


def _num_labels(model: nn.Module) -> int | None:
    """``config.num_labels`` of a single-label classifier, else None (regression, multi-label)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    n = getattr(config, "num_labels", None)
    if not isinstance(n, int) or n < 2 or getattr(config, "problem_type", None) in (
            "regression", "multi_label_classification"):
        return None
    return n


# ---------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    """What :func:`train` did. ``metrics_*`` hold ``accuracy`` (classification) or ``loss``
    (token-weighted) and ``perplexity`` (causal LM; Trainer's own batch-mean loss is
    ``batch_mean_loss``). ``peak_memory_kind`` says what ``peak_memory_bytes`` measures:
    ``"cuda_max_allocated"`` (training only) or ``"process_peak_rss"`` (CPU: the
    process's peak resident size so far, not training alone)."""

    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    history: list[dict[str, Any]]
    steps: int
    seconds: float
    peak_memory_bytes: int | None
    stopped_early: bool = False
    stop_reason: str | None = None
    peak_memory_kind: str = ""
    device: str = "cpu"
    task: str = ""
    trainable_parameters: int = 0
    output_dir: str | None = None

    def summary(self) -> str:
        key = "accuracy" if "accuracy" in self.metrics_after else "loss"
        before, after = self.metrics_before.get(key), self.metrics_after.get(key)
        text = f"{self.steps} steps in {self.seconds:.1f} s on {self.device}"
        if before is not None and after is not None:
            text += f"; {key} {before:.4f} -> {after:.4f}"
        if self.stop_reason:
            text += f" ({self.stop_reason})"
        return text


class TrainingObserver:
    """Base class for live views of a run (the widgets subclass it). Every method is
    optional; ``should_stop()`` returning True ends training after the current step.

    >>> class Printer(TrainingObserver):
    ...     def on_log(self, step, logs): print(step, logs.get("loss"))
    """

    def on_begin(self, total_steps: int) -> None:
        """Training starts; ``total_steps`` optimizer steps are planned."""

    def on_log(self, step: int, logs: dict[str, float]) -> None:
        """Trainer logged ``logs`` (``loss``, ``learning_rate``, ``grad_norm``...) at ``step``."""

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """Evaluation finished at ``step`` (0 = before training)."""

    def should_stop(self) -> bool:
        """Polled after every optimizer step; True stops the run."""
        return False

    def on_end(self, result: TrainResult) -> None:
        """The run is over (finished, stopped, interrupted or stopped on a non-finite loss)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; :func:`train` catches it and restores the last
    good trainable weights."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"non-finite training loss ({loss}) at step {step}")
        self.step, self.loss = step, loss


def _clean_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Trainer's ``eval_*`` metrics without the prefix and timing keys. For causal LM,
    ``loss`` is the token-weighted loss and ``batch_mean_loss`` is Trainer's own."""
    out = {}
    for key, value in metrics.items():
        name = key.removeprefix("eval_")
        if name not in ("runtime", "samples_per_second", "steps_per_second", "epoch",
                        "model_preparation_time"):
            out[name] = float(value)
    if "token_loss" in out:
        out["batch_mean_loss"] = out.pop("loss", float("nan"))
        out["loss"] = out.pop("token_loss")
    return out


# ---------------------------------------------------------------------------- metrics
def infer_task_kind(model: nn.Module, dataset=None) -> str:
    """``"classification"``, ``"causal_lm"`` or ``"seq2seq"`` (encoder-decoder LMs such as
    T5) from the model class (PEFT models are unwrapped), falling back to the shape of the
    dataset's ``labels``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if _is_seq2seq_lm(base):
        return SEQ2SEQ
    if name.endswith(("ForSequenceClassification", "ForImageClassification",
                      "ForAudioClassification")):
        return CLASSIFICATION
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return CAUSAL_LM
    if dataset is not None and len(dataset) and "labels" in dataset.column_names:
        return CAUSAL_LM if isinstance(dataset[0]["labels"], (list, tuple)) else CLASSIFICATION
    raise ValueError(f"Cannot tell the task kind of {name}; pass task='classification' "
                     "or task='causal_lm'")


def _is_seq2seq_lm(model: nn.Module) -> bool:
    """True for AutoModelForSeq2SeqLM-type models (encoder-decoder with an LM head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    return name in set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values()) or (
        bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        and name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")))


def _first_logits(logits):
    return logits[0] if isinstance(logits, (tuple, list)) else logits


def _argmax_logits(logits, labels):
    return _first_logits(logits).argmax(-1)


def _accuracy(pred) -> dict[str, float]:
    preds = np.asarray(pred.predictions).reshape(-1)
    labels = np.asarray(pred.label_ids).reshape(-1)
    return {"accuracy": float((preds == labels).mean())}


def _token_nll(logits, labels):
    """Per example: summed next-token NLL and the number of predicted tokens, [B, 2]."""
    logits = _first_logits(logits)[:, :-1].float()
    target = labels[:, 1:]
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp_min(0),
                                      reduction="none")
    mask = (target != IGNORE_INDEX).float()
    return torch.stack([(nll * mask).sum(1), mask.sum(1)], dim=1)


def _token_nll_seq2seq(logits, labels):
    """As :func:`_token_nll` for encoder-decoder models: logits[:, t] predicts labels[:, t]
    (the model feeds the shifted labels to its decoder), so nothing is shifted here."""
    logits = _first_logits(logits).float()
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0),
                                      reduction="none")
    mask = (labels != IGNORE_INDEX).float()
    return torch.stack([(nll * mask).sum(1), mask.sum(1)], dim=1)


def _perplexity(pred) -> dict[str, float]:
    sums = np.asarray(pred.predictions).reshape(-1, 2).sum(0)
    loss = float(sums[0] / max(sums[1], 1.0))
    return {"token_loss": loss, "perplexity": float(math.exp(min(loss, 700.0)))}


# ---------------------------------------------------------------------------- trainer parts
def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` OR-ed over the processes of an initialised torch.distributed group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class ObserverCallback(TrainerCallback):
    """Streams a Trainer's logs and evaluations to a :class:`TrainingObserver` and stops the
    run when ``observer.should_stop()`` says so (``stop_reason`` then says when). Works with
    any ``transformers.Trainer``.

    >>> trainer = RowTrainer(model=model, args=args, callbacks=[ObserverCallback(observer)])
    """

    def __init__(self, observer: TrainingObserver) -> None:
        self.observer = observer
        self.stop_reason: str | None = None

    def on_train_begin(self, args, state, control, **kw):
        self.stop_reason = None
        self.observer.on_begin(int(state.max_steps))

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and not any(k.startswith("eval_") for k in logs):
            self.observer.on_log(int(state.global_step), dict(logs))

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.observer.on_evaluate(int(state.global_step), _clean_metrics(metrics or {}))

    def on_step_end(self, args, state, control, **kw):
        if self.observer.should_stop():
            control.should_training_stop = True
            self.stop_reason = f"stopped by the observer at step {state.global_step}"


class NaNGuardCallback(TrainerCallback):
    """NaN guard for a plain ``transformers.Trainer``: after every optimizer step, if a
    trainable parameter holds NaN/inf, copy back the trainable weights of the last good step
    and stop training (``stop_reason``, ``restored_step`` say what happened). Keeps one copy
    of the trainable parameters (small for a row adapter). :class:`RowTrainer` has a stricter
    guard built in (it checks the loss before backward), so it does not need this one.

    >>> trainer = transformers.Trainer(model=model, args=args, callbacks=[NaNGuardCallback()])
    """

    def __init__(self) -> None:
        self.snapshot: list[torch.Tensor] | None = None
        self.snapshot_step = -1
        self.stop_reason: str | None = None
        self.restored_step: int | None = None

    @torch.no_grad()
    def _take(self, params: list[torch.Tensor], step: int) -> None:
        if self.snapshot is None or len(self.snapshot) != len(params):
            self.snapshot = [p.detach().clone() for p in params]
        else:
            for s, p in zip(self.snapshot, params):
                s.copy_(p)
        self.snapshot_step = step

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.stop_reason = self.restored_step = None
        self.snapshot = None
        if model is not None:
            self._take(_trainable(model), int(state.global_step))

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kw):
        params = _trainable(model) if model is not None else []
        if not params:
            return
        bad = torch.stack([(~torch.isfinite(p)).any() for p in params]).any()
        if not _any_rank(bool(bad), params[0].device):
            self._take(params, int(state.global_step))
            return
        for s, p in zip(self.snapshot or [], params):
            p.copy_(s)
        self.restored_step = self.snapshot_step
        control.should_training_stop = True
        self.stop_reason = (f"non-finite trainable weights after step {state.global_step}; "
                            f"restored the weights after step {self.snapshot_step} and stopped "
                            "(try a lower learning rate or bf16=False)")
        _log.warning(self.stop_reason)


def _single_label_classifier(model: nn.Module) -> bool:
    try:
        return infer_task_kind(model) == CLASSIFICATION
    except ValueError:
        return False


class adapter_counts_as_peft:
    """Context manager: while it is active, a model that transformers marks as quantized
    (``is_quantized``: GGUF-loaded, ``BitsAndBytesConfig``-loaded) and that carries a row
    adapter with trainable parameters is marked the way transformers marks a model with
    adapters loaded through its PEFT integration (``_hf_peft_config_loaded = True``), so
    ``Trainer.__init__``'s "You cannot perform fine-tuning on purely quantized models" check
    accepts it. Anything else (no adapter, nothing trainable, not quantized) is left alone and
    fails that check as before. The previous value is restored on exit.

    >>> with adapter_counts_as_peft(model): trainer = transformers.Trainer(model=model, ...)
    """

    _ATTR = "_hf_peft_config_loaded"

    def __init__(self, model: nn.Module | None) -> None:
        self.model = model
        self._had: tuple[bool, Any] | None = None

    def __enter__(self) -> "adapter_counts_as_peft":
        from .adapter.model import adapter_state

        m = self.model
        if (isinstance(m, nn.Module) and getattr(m, "is_quantized", False)
                and not getattr(m, self._ATTR, False) and adapter_state(m) is not None
                and any(p.requires_grad for p in m.parameters())):
            self._had = (self._ATTR in vars(m), vars(m).get(self._ATTR))
            setattr(m, self._ATTR, True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._had is not None:
            had, value = self._had
            if had:
                setattr(self.model, self._ATTR, value)
            else:
                delattr(self.model, self._ATTR)
            self._had = None


class RowTrainer(Trainer):
    """``transformers.Trainer`` for row-sparse adapters (any model with trainable
    parameters), usable directly in a Trainer script. Adds:

    - a NaN guard (``nan_guard=True``): a NaN/inf loss is caught before backward, the
      trainable weights of the last finite step are copied back and training stops
      (``trainer.stop_reason`` says so; ``train()`` returns normally);
    - correct loss scaling for classifiers under gradient accumulation / several processes
      (their heads return a batch mean and ignore ``num_items_in_batch``);
    - crash-safe checkpoints: ``checkpoint-N`` is written in a hidden staging folder and
      renamed into place (single process).

    >>> trainer = RowTrainer(model=inject(model, plan), args=TrainingArguments("out"),
    ...                      train_dataset=ds, data_collator=collator); trainer.train()
    """

    nan_guard = True
    stop_reason: str | None = None
    _snapshot: list[torch.Tensor] | None = None
    _snapshot_step = -1
    _staging: str | None = None

    def __init__(self, *args: Any, nan_guard: bool = True, **kwargs: Any) -> None:
        with adapter_counts_as_peft(kwargs.get("model", args[0] if args else None)):
            super().__init__(*args, **kwargs)
        self.nan_guard = bool(nan_guard)
        self.stop_reason: str | None = None
        self.non_finite: NonFiniteLossError | None = None
        self._snapshot: list[torch.Tensor] | None = None
        self._snapshot_step = -1
        self._staging: str | None = None
        if _single_label_classifier(self.model):
            # Classification heads return a plain batch mean and ignore num_items_in_batch,
            # yet Trainer (models whose forward takes **kwargs) then skips the 1/grad_accum
            # scaling and multiplies the loss by the number of processes: gradients
            # grad_accum or world_size times too large. Tell it the loss takes no such kwargs.
            self.model_accepts_loss_kwargs = False

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; on a non-finite loss (``nan_guard``) restores the last good
        trainable weights, sets ``stop_reason`` and returns instead of raising."""
        from transformers.trainer_utils import TrainOutput

        self.stop_reason, self.non_finite = None, None
        self._snapshot, self._snapshot_step = None, -1
        try:
            return super().train(*args, **kwargs)
        except NonFiniteLossError as err:
            good = self.restore_last_good()
            self.non_finite = err
            if good is None:
                self.stop_reason = (f"{err}; the starting weights already give a non-finite "
                                    "loss: check the data (labels, lengths) and the model's "
                                    "dtype")
            else:
                self.stop_reason = (f"{err}; restored the trainable weights after step {good}, "
                                    "the last that gave a finite loss (try a lower learning "
                                    "rate or bf16=False)")
                self.state.global_step = good
            _log.warning(self.stop_reason)
            return TrainOutput(self.state.global_step, float("nan"),
                               {"stopped": self.stop_reason})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        if self.nan_guard and model.training:
            self._check_loss(out[0] if return_outputs else out)
        return out

    def _trainable(self) -> list[torch.Tensor]:
        return _trainable(self.model)

    def _check_loss(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if self.args.world_size > 1:  # every rank must stop together
            bad = self.accelerator.reduce(bad, reduction="sum")
        step = self.state.global_step
        if bool(bad.item()):
            raise NonFiniteLossError(step + 1, float(loss.detach().float().mean()))
        if step != self._snapshot_step:
            with torch.no_grad():
                params = self._trainable()
                if self._snapshot is None:
                    self._snapshot = [p.detach().clone() for p in params]
                else:
                    for s, p in zip(self._snapshot, params):
                        s.copy_(p)
            self._snapshot_step = step

    def restore_last_good(self) -> int | None:
        """Copy the snapshot back; returns the step it was taken at (None if none)."""
        if self._snapshot is None:
            return None
        with torch.no_grad():
            for s, p in zip(self._snapshot, self._trainable()):
                p.copy_(s)
        return self._snapshot_step

    # Checkpoints (issue 11): Trainer writes checkpoint-N in place, so a run killed
    # mid-save leaves a partial folder that resume_from=True would pick. Single-process
    # runs write it in a hidden staging folder and rename it into place (rowsft_nb._io).
    def _get_output_dir(self, trial):
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        from transformers.trainer import TRAINER_STATE_NAME

        from ._io import publish_dir, staging_dir

        if self.args.world_size > 1:  # ranks write in parallel: Trainer's own way
            return super()._save_checkpoint(model, trial)
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        with staging_dir(os.path.join(run_dir, name)) as staging:
            self._staging = str(staging)
            try:
                super()._save_checkpoint(model, trial)  # rotates nothing: one folder
            finally:
                self._staging = None
            best = getattr(self.state, "best_global_step", None)
            if best:  # Trainer looked for the best checkpoint in the staging folder
                best_dir = os.path.join(run_dir, f"checkpoint-{best}")
                if best == self.state.global_step or os.path.isdir(best_dir):
                    self.state.best_model_checkpoint = best_dir
                    self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
            publish_dir(staging / name, os.path.join(run_dir, name))
        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:  # transformers < 5
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        else:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint,
                               use_mtime=True)


def _make_trainer_class() -> type[RowTrainer]:
    """The Trainer class :func:`train` builds (a seam for tests)."""
    return RowTrainer


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing without reentrant autograd (works with a frozen embedding);
    transformers 5 renamed the option to ``activation_checkpointing``."""
    if not enabled:
        return {}
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    return {f"{prefix}_checkpointing": True,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def _count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peak_memory(device: str) -> tuple[int | None, str]:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    if device == "mps":
        return int(torch.mps.driver_allocated_memory()), "mps_driver_allocated_at_end"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"


# ---------------------------------------------------------------------------- arguments
#: train()'s short names -> the ``transformers.TrainingArguments`` (or ``Trainer.train``)
#: names of the same settings; train() accepts either spelling.
TRAINER_NAMES = {"lr": "learning_rate", "epochs": "num_train_epochs",
                 "batch_size": "per_device_train_batch_size",
                 "eval_batch_size": "per_device_eval_batch_size",
                 "grad_accum": "gradient_accumulation_steps", "lr_scheduler": "lr_scheduler_type",
                 "resume_from": "resume_from_checkpoint"}
#: train()'s defaults for the settings it passes to TrainingArguments.
DEFAULTS = {"lr": 1e-4, "batch_size": 8, "grad_accum": 1, "seed": 0, "weight_decay": 0.0,
            "warmup_steps": 0, "lr_scheduler": "linear", "max_grad_norm": 1.0,
            "logging_steps": 10}


def _merge_spellings(short: dict[str, Any], extra: dict[str, Any]) -> dict[str, str]:
    """Move Trainer spellings (``learning_rate``...) from ``extra`` into ``short`` (in
    place); ``ValueError`` naming both when both spellings are given with different values.
    Returns ``{short name: the spelling the caller used}`` for error messages."""
    spelled = {k: k for k in short}
    for name, long in TRAINER_NAMES.items():
        if long not in extra:
            continue
        value = extra.pop(long)
        if short[name] is not None and short[name] != value:
            raise ValueError(f"{name}={short[name]!r} and {long}={value!r} both set "
                             f"{long}; pass only one of them")
        short[name] = value
        spelled[name] = long
    return spelled


def _check_training_names(extra: dict[str, Any]) -> None:
    """Every extra keyword must be a ``TrainingArguments`` field (else one ValueError)."""
    import difflib

    from transformers import TrainingArguments

    fields = {k for k, f in TrainingArguments.__dataclass_fields__.items() if f.init}
    unknown = sorted(k for k in extra if k not in fields)
    if unknown:
        known = sorted(fields | set(TRAINER_NAMES) | set(DEFAULTS))
        close = difflib.get_close_matches(unknown[0], known, n=1)
        raise ValueError(f"train() got unknown argument(s) {unknown}: neither a train() "
                         "keyword nor a transformers.TrainingArguments field"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))


# ---------------------------------------------------------------------------- train
def train(model: nn.Module, dataset, *, eval_dataset=None, tokenizer=None, task: str | None = None,
          data_collator=None, args: Any = None, lr: float | None = None,
          epochs: float | None = None, max_steps: int | None = None,
          batch_size: int | None = None, eval_batch_size: int | None = None,
          grad_accum: int | None = None, device: str | None = "auto", bf16: bool | str = "auto",
          seed: int | None = None, weight_decay: float | None = None,
          warmup_steps: float | None = None, lr_scheduler: str | None = None,
          max_grad_norm: float | None = None,
          callbacks: Iterable[Any] = (), observer: TrainingObserver | None = None,
          output_dir: str | os.PathLike | None = None, save_steps: int | None = None,
          save_total_limit: int | None = None, resume_from: str | bool | None = None,
          gradient_checkpointing: bool = False, eval_steps: int | None = None,
          logging_steps: int | None = None, evaluate_before: bool = True, nan_guard: bool = True,
          progress_bar: bool = True, **training_args: Any) -> TrainResult:
    """Train whatever parameters of ``model`` require grad (a row-sparse adapter after
    ``inject``, a PEFT model, or a full model) with :class:`RowTrainer` (a
    ``transformers.Trainer``).

    Settings come either as ``args=TrainingArguments(...)`` (used as given; then no
    setting keywords below) or as keywords, in train()'s short names or Trainer's own:
    ``lr``/``learning_rate`` (default 1e-4), ``epochs``/``num_train_epochs`` (default 1;
    ``max_steps`` overrides it), ``batch_size``/``per_device_train_batch_size`` (8),
    ``eval_batch_size``/``per_device_eval_batch_size``,
    ``grad_accum``/``gradient_accumulation_steps`` (1), ``lr_scheduler``/``lr_scheduler_type``
    ("linear"), ``resume_from``/``resume_from_checkpoint``, ``weight_decay`` (0),
    ``warmup_steps`` (0), ``max_grad_norm`` (1.0), ``seed`` (0), ``logging_steps`` (10); any
    other ``TrainingArguments`` field passes through (``optim=``, ``report_to=``...). Both
    spellings of one setting with different values raise a ValueError naming both.

    ``task``: ``"classification"`` (accuracy), ``"causal_lm"`` or ``"seq2seq"`` (loss as
    the model computes it, perplexity); inferred from the model class when None.
    ``device``: ``"auto"`` (CUDA, then MPS, then CPU), ``"cuda"``, ``"mps"`` or ``"cpu"``.
    ``bf16="auto"``: bf16 autocast on GPUs that support it. With ``output_dir`` +
    ``save_steps`` Trainer writes checkpoints; ``resume_from`` (a checkpoint folder, or True
    for the latest in ``output_dir``) continues one. ``nan_guard``: stop on a NaN/inf loss
    and restore the trainable weights of the last finite step (keeps one copy of the
    trainable parameters). Before anything runs, bad input raises one ValueError naming the
    fix: ``max_steps``/``batch_size`` not whole numbers >= 1, ``epochs``/``lr`` not finite
    > 0, unknown keywords, an ``output_dir`` that cannot be a folder, untokenised or missing
    columns, labels outside ``[0, num_labels)``, a merged adapter, a model on the meta device.

    >>> result = train(model, data.train, eval_dataset=data.validation, tokenizer=tok, max_steps=50)
    >>> result = train(model, data.train, learning_rate=1e-3, num_train_epochs=2)
    >>> result = train(model, data.train, args=TrainingArguments("out", max_steps=50))
    """
    from transformers import PrinterCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    short = {"lr": lr, "epochs": epochs, "batch_size": batch_size,
             "eval_batch_size": eval_batch_size, "grad_accum": grad_accum,
             "lr_scheduler": lr_scheduler, "resume_from": resume_from}
    spelled = _merge_spellings(short, training_args)
    _check_training_names(training_args)
    lr, epochs, batch_size = short["lr"], short["epochs"], short["batch_size"]
    eval_batch_size, grad_accum = short["eval_batch_size"], short["grad_accum"]
    lr_scheduler, resume_from = short["lr_scheduler"], short["resume_from"]
    if args is not None:
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"args must be a transformers.TrainingArguments, got "
                            f"{type(args).__name__}")
        keywords = {spelled[k]: v for k, v in short.items() if k != "resume_from"}
        keywords.update(max_steps=max_steps, seed=seed, weight_decay=weight_decay,
                        warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                        output_dir=output_dir, save_steps=save_steps,
                        save_total_limit=save_total_limit, eval_steps=eval_steps,
                        logging_steps=logging_steps, **training_args)
        given = [k for k, v in keywords.items() if v is not None]
        given += ["bf16"] * (bf16 != "auto") + ["gradient_checkpointing"] * bool(
            gradient_checkpointing) + ["device"] * (device not in (None, "auto"))
        if given:
            raise ValueError(f"train() got args=TrainingArguments(...) and the settings "
                             f"{given}: set them on the TrainingArguments instead (e.g. "
                             "dataclasses.replace(args, learning_rate=...)) or pass no args")
    else:
        _whole("max_steps", max_steps, optional=True)
        _positive(spelled["epochs"], epochs, optional=True)
        _positive(spelled["lr"], lr, optional=True)
        _whole(spelled["batch_size"], batch_size, optional=True)
        _whole(spelled["eval_batch_size"], eval_batch_size, optional=True)
        _whole(spelled["grad_accum"], grad_accum, optional=True)
        if output_dir is not None and (problem := output_path_problem(output_dir)):
            raise ValueError(f"output_dir: {problem}")
    if len(dataset) == 0:
        raise ValueError("The training dataset is empty")
    _check_model(model)
    n_trainable = _count_trainable(model)
    if n_trainable == 0:
        raise ValueError("The model has no trainable parameters: call rowsft_nb.inject(model, plan), "
                         "wrap it with PEFT, or set requires_grad on the parameters to train")
    if save_steps is not None and output_dir is None:
        raise ValueError("save_steps needs output_dir (where the checkpoints go)")
    if resume_from is True and output_dir is None and args is None:
        raise ValueError("resume_from=True resumes the latest checkpoint in output_dir; pass output_dir")
    if resume_from not in (None, True, False) and not os.path.isdir(resume_from):
        raise ValueError(f"resume_from={str(resume_from)!r} is not a checkpoint folder")
    kind = task or infer_task_kind(model, dataset)
    if kind not in (CLASSIFICATION, CAUSAL_LM, SEQ2SEQ):
        raise ValueError(f"task must be 'classification', 'causal_lm' or 'seq2seq', got {kind!r}")
    main_input = getattr(model, "main_input_name", None) or "input_ids"
    n_labels = _num_labels(model) if kind == CLASSIFICATION else None
    for split, ds in (("train", dataset), ("eval", eval_dataset)):
        if ds is not None:
            check_tokenized(ds, kind, main_input=main_input, split=split, collator=data_collator)
            if n_labels is not None:
                check_label_range(ds, n_labels, split=split)
    collator = data_collator or make_collator(kind, tokenizer)
    tmp = None
    if args is not None:  # the caller's TrainingArguments, as given
        dev = args.device.type
        out_dir = str(args.output_dir)
    else:
        use_cpu = training_args.get("use_cpu")
        if use_cpu and device not in (None, "auto", "cpu"):
            raise ValueError(f"device={device!r} and use_cpu=True contradict; pass one of them")
        dev = "cpu" if use_cpu else resolve_device(device)
        use_bf16 = (dev == "cuda" and torch.cuda.is_bf16_supported()
                    and not training_args.get("fp16")) if bf16 == "auto" else bool(bf16)
        if output_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="rowsft-train-")
            out_dir = tmp.name
        else:
            out_dir = str(output_dir)
        if epochs is None and max_steps is None:
            epochs = 1
        batch_size = batch_size or DEFAULTS["batch_size"]
        seed = DEFAULTS["seed"] if seed is None else seed
        settings = dict(
            output_dir=out_dir, per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=eval_batch_size or batch_size,
            gradient_accumulation_steps=grad_accum or DEFAULTS["grad_accum"],
            learning_rate=DEFAULTS["lr"] if lr is None else lr,
            num_train_epochs=float(epochs or 1),
            max_steps=int(max_steps) if max_steps is not None else -1,
            weight_decay=DEFAULTS["weight_decay"] if weight_decay is None else weight_decay,
            warmup_steps=DEFAULTS["warmup_steps"] if warmup_steps is None else warmup_steps,
            lr_scheduler_type=lr_scheduler or DEFAULTS["lr_scheduler"],
            max_grad_norm=DEFAULTS["max_grad_norm"] if max_grad_norm is None else max_grad_norm,
            seed=seed, data_seed=seed, use_cpu=(dev == "cpu"), bf16=use_bf16,
            logging_steps=logging_steps or DEFAULTS["logging_steps"], logging_strategy="steps",
            eval_strategy="steps" if (eval_steps and eval_dataset is not None) else "no",
            eval_steps=eval_steps, save_strategy="steps" if save_steps else "no",
            save_steps=save_steps or 500, save_total_limit=save_total_limit,
            report_to="none", disable_tqdm=not progress_bar, remove_unused_columns=False,
            label_names=["labels"], dataloader_pin_memory=(dev == "cuda"), log_level="warning",
            **_checkpointing_args(gradient_checkpointing))
        settings.update(training_args)  # any other TrainingArguments field, as given
        args = TrainingArguments(**settings)

    all_callbacks = list(callbacks)
    if observer is not None:
        all_callbacks.append(ObserverCallback(observer))
    is_cls = kind == CLASSIFICATION
    trainer_cls = _make_trainer_class()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        trainer = trainer_cls(
            model=model, args=args, data_collator=collator, train_dataset=dataset,
            eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=all_callbacks,
            compute_metrics=_accuracy if is_cls else _perplexity,
            preprocess_logits_for_metrics=_argmax_logits if is_cls else
            (_token_nll_seq2seq if kind == SEQ2SEQ else _token_nll), nan_guard=nan_guard)
    finally:
        hf_logging.set_verbosity(verbosity)
    if is_cls:  # RowTrainer does this for classifier classes; task= may say so explicitly
        trainer.model_accepts_loss_kwargs = False
    if not progress_bar:  # no per-log prints either: observers and history carry the logs
        trainer.remove_callback(PrinterCallback)
    else:  # Trainer's bars, labelled "training" / "eval before" / "eval after" (issue 15)
        from .progress import LabelledProgressCallback, ProgressCallback

        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(LabelledProgressCallback())

    metrics_before: dict[str, float] = {}
    if eval_dataset is not None and evaluate_before:
        metrics_before = _clean_metrics(trainer.evaluate())
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reason = None
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume_from if resume_from else None)
        reason = getattr(trainer, "stop_reason", None) or next(
            (cb.stop_reason for cb in all_callbacks if getattr(cb, "stop_reason", None)), None)
    except KeyboardInterrupt:
        reason = f"interrupted at step {trainer.state.global_step}"
    stopped_early = reason is not None
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    peak, peak_kind = _peak_memory(dev)
    metrics_after: dict[str, float] = {}
    if eval_dataset is not None:
        metrics_after = _clean_metrics(trainer.evaluate())
    result = TrainResult(
        metrics_before=metrics_before, metrics_after=metrics_after,
        history=list(trainer.state.log_history), steps=int(trainer.state.global_step),
        seconds=seconds, peak_memory_bytes=peak, peak_memory_kind=peak_kind,
        stopped_early=stopped_early, stop_reason=reason, device=dev, task=kind,
        trainable_parameters=n_trainable, output_dir=None if tmp else out_dir)
    if tmp is not None:
        tmp.cleanup()
    model.eval()
    from .adapter.card import note_training

    note_training(model, result)  # save_adapter's model card shows these metrics
    if observer is not None:
        observer.on_end(result)
    return result
