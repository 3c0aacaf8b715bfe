"""The authors' training setups as one call: score -> select -> inject -> train.

Usage::

    recipe = rowsft_nb.recipes.spruft_llm(attention=True)     # Llama-style causal LM
    out = recipe.run(model, data.train, calib, eval_dataset=data.validation, tokenizer=tok)
    out.plan.summary(); out.result.metrics_after

    recipe = rowsft_nb.recipes.spruft_encoder()               # BERT / ViT classifier
    recipe = dataclasses.replace(recipe, per_head=False)       # any field can be changed

Every default is the value in the authors' code (``CenjhihLi/sparsity_finetuning``); where
their README command and their argparse disagree, the README command wins (it is what they
document as "our method") and the docstring says so. ``docs/paper.md`` maps every option of
their scripts to rowsft_nb. One deliberate difference: the deltas start at zero
(``init="zeros"``, the model is unchanged at step 0); pass ``init="kaiming"`` for the
authors' LLM initialisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from transformers import TrainerCallback

from .selection import Budget, FixedRows, Ratio

__all__ = ["Recipe", "RecipeResult", "EpochLR", "spruft_llm", "spruft_encoder",
           "ATTENTION_QKV"]

#: The query/key/value projections the authors leave out without ``--finetune_attn_as_linear``
#: (the output projection still trains; see ``finetune_text_generation_model_ours.py``).
ATTENTION_QKV = ("q_proj", "k_proj", "v_proj")
INITS = ("zeros", "kaiming")
# rowsft_nb.train() keyword -> transformers.TrainingArguments field
_TRAINING_ARGUMENT_NAMES = {"lr": "learning_rate", "epochs": "num_train_epochs",
                            "batch_size": "per_device_train_batch_size",
                            "lr_scheduler": "lr_scheduler_type",
                            "grad_accum": "gradient_accumulation_steps"}


# ---------------------------------------------------------------------------- schedule
class EpochLR(TrainerCallback):
    """A learning rate that is constant within an epoch and changes between epochs, as
    the authors' ``scheduler.step()`` once per epoch:

    - ``kind="step"``: ``lr_k = lr * gamma**k`` (``torch.optim.lr_scheduler.StepLR``,
      ``step_size=1``);
    - ``kind="cosine"``: ``lr_k = eta_min + (lr - eta_min) * (1 + cos(pi k / epochs)) / 2``
      (``CosineAnnealingLR(T_max=epochs, eta_min)``).

    ``k`` is the 0-based epoch. Trainer steps its scheduler every optimizer step and has
    neither schedule, so this callback drives Trainer's ``"constant"`` scheduler: use it
    with ``train(..., lr_scheduler="constant", warmup_steps=0, callbacks=[EpochLR(...)])``.

    >>> EpochLR("step", gamma=0.85).lr_at(2, 1e-4)     # 1e-4 * 0.85**2
    """

    def __init__(self, kind: str = "step", *, gamma: float = 0.85, epochs: int | None = None,
                 eta_min: float = 0.0):
        if kind not in ("step", "cosine"):
            raise ValueError(f"EpochLR kind must be 'step' or 'cosine', got {kind!r}")
        if kind == "step" and not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
            raise ValueError(f"EpochLR: gamma must be in (0, 1], got {gamma!r}")
        if kind == "cosine" and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"EpochLR('cosine') needs epochs = T_max, a positive int; got {epochs!r}")
        if not (isinstance(eta_min, (int, float)) and eta_min >= 0):
            raise ValueError(f"EpochLR: eta_min must be >= 0, got {eta_min!r}")
        self.kind, self.gamma, self.epochs, self.eta_min = kind, float(gamma), epochs, float(eta_min)
        self.epoch = 0

    def lr_at(self, epoch: int, base_lr: float) -> float:
        """The learning rate during 0-based ``epoch`` for a base rate ``base_lr``."""
        if self.kind == "step":
            return base_lr * self.gamma ** epoch
        cos = (1.0 + math.cos(math.pi * epoch / self.epochs)) / 2.0
        return self.eta_min + (base_lr - self.eta_min) * cos

    def _factor(self, base_lr: float) -> float:
        return self.lr_at(self.epoch, base_lr) / base_lr if base_lr else 0.0

    @staticmethod
    def _scheduler(lr_scheduler: Any) -> Any:
        from torch.optim.lr_scheduler import LambdaLR

        sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper
        if not isinstance(sched, LambdaLR):
            raise ValueError("EpochLR drives Trainer's 'constant' scheduler; got "
                             f"{type(sched).__name__}. Pass lr_scheduler='constant' to train().")
        return sched

    def install(self, lr_scheduler: Any) -> None:
        """Make ``lr_scheduler`` (a ``LambdaLR``) follow this schedule from ``self.epoch``."""
        sched = self._scheduler(lr_scheduler)
        sched.lr_lambdas = [(lambda _step, b=b: self._factor(b)) for b in sched.base_lrs]
        self.set_epoch(self.epoch, sched)

    def set_epoch(self, epoch: int, lr_scheduler: Any) -> None:
        """Enter 0-based ``epoch``: the optimizer's rates become ``lr_at(epoch, base)``."""
        sched = self._scheduler(lr_scheduler)
        self.epoch = int(epoch)
        for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
            group["lr"] = self.lr_at(self.epoch, base)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]

    # Trainer events
    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        if kind != "constant" or args.get_warmup_steps(max(state.max_steps, 1)) > 0:
            raise ValueError(f"EpochLR needs lr_scheduler='constant' and warmup_steps=0 in "
                             f"train(), got lr_scheduler={kind!r}")
        self.epoch = int(math.floor(state.epoch + 1e-6)) if state.epoch else 0
        self.install(lr_scheduler)

    def on_epoch_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)), lr_scheduler)


# ---------------------------------------------------------------------------- recipe
@dataclass
class RecipeResult:
    """What :meth:`Recipe.run` did: the importance ``report``, the ``plan`` injected and
    ``train()``'s ``result`` (:class:`rowsft_nb.train.TrainResult`)."""

    report: Any
    plan: Any
    result: Any


@dataclass(frozen=True)
class Recipe:
    """A complete SPruFT setup. Fields (see :func:`spruft_llm` / :func:`spruft_encoder` for
    the values and where each comes from):

    - ``budget``: rows per module (``FixedRows(64)``, ``Ratio(0.05)``, any selection budget);
    - ``targets`` / ``exclude``: which Linear modules are scored and adapted
      (:func:`rowsft_nb.find_targets` forms);
    - ``metric``: an importance metric name or object; ``n_samples``: calibration examples
      scored (None = every batch passed to :meth:`run`);
    - ``per_head``: equal rows in every attention head (the authors' allocation);
      ``multiple_of``: rows per module rounded to this multiple (their ``round_to``);
    - ``init``: ``"zeros"`` (model unchanged at step 0) or ``"kaiming"`` (the authors');
    - ``train_heads``: classifier heads train fully (never ``lm_head``);
    - ``training``: keyword arguments of :func:`rowsft_nb.train` (TrainingArguments names
      pass through); ``lr_schedule``: an :class:`EpochLR` spec (``{"kind": "step", "gamma":
      0.85}``), None for Trainer's own ``lr_scheduler``;
    - ``data``: the authors' data sizes (``max_length``, ``n_train``), for ``prepare_task``;
    - ``source``: the authors' script these values come from.

    >>> recipe = spruft_llm(); recipe.training["lr"]          # 1e-4
    """

    name: str
    budget: Budget
    metric: Any = "taylor"
    targets: Any = "all-linear"
    exclude: tuple[str, ...] = ()
    n_samples: int | None = None
    per_head: bool = False
    multiple_of: int = 1
    init: str = "zeros"
    train_heads: bool = True
    training: Mapping[str, Any] = field(default_factory=dict)
    lr_schedule: Mapping[str, Any] | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"Recipe init must be one of {INITS}, got {self.init!r}")
        if self.n_samples is not None and (not isinstance(self.n_samples, int) or self.n_samples < 1):
            raise ValueError(f"Recipe n_samples must be a positive int or None, got {self.n_samples!r}")
        if not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ValueError(f"Recipe multiple_of must be a positive int, got {self.multiple_of!r}")
        if self.lr_schedule is not None and "lr_scheduler" in self.training \
                and self.training["lr_scheduler"] != "constant":
            raise ValueError("Recipe: lr_schedule (EpochLR) needs training['lr_scheduler'] == "
                             "'constant'; set lr_schedule=None to use Trainer's scheduler")
        if self.lr_schedule is not None:  # fail here, not at train time
            spec = dict(self.lr_schedule)
            if spec.get("kind") == "cosine" and spec.get("epochs") is None:
                spec["epochs"] = 1
            EpochLR(spec.pop("kind", None), **spec)

    # -- the pieces, for readers who run the steps themselves
    def train_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """``train()`` keyword arguments: ``training`` with ``overrides`` on top, plus the
        :class:`EpochLR` callback when ``lr_schedule`` is set. Overrides may use either
        spelling (``lr=`` or ``learning_rate=``)."""
        short = {v: k for k, v in _TRAINING_ARGUMENT_NAMES.items()}
        kwargs = {**self.training, **{short.get(k, k): v for k, v in overrides.items()}}
        if self.lr_schedule is not None:
            spec = dict(self.lr_schedule)
            if spec.get("kind") == "cosine" and spec.get("epochs") is None:
                spec["epochs"] = int(math.ceil(kwargs.get("epochs") or 1))
            kind = spec.pop("kind")
            kwargs.setdefault("lr_scheduler", "constant")
            kwargs["callbacks"] = [*kwargs.get("callbacks", ()), EpochLR(kind, **spec)]
        return kwargs

    def training_arguments(self, **overrides: Any) -> dict[str, Any]:
        """The same settings under ``transformers.TrainingArguments`` names, for a
        hand-written ``Trainer`` (add ``callbacks=self.callbacks()`` to the Trainer).

        >>> TrainingArguments(output_dir="out", **spruft_llm().training_arguments())
        """
        kwargs = {**self.training, **overrides}
        return {_TRAINING_ARGUMENT_NAMES.get(k, k): v for k, v in kwargs.items()
                if k not in ("callbacks",)}

    def callbacks(self, epochs: int | None = None) -> list[TrainerCallback]:
        """The :class:`EpochLR` callback for ``lr_schedule`` (empty list when None)."""
        extra = {} if epochs is None else {"epochs": epochs}
        return list(self.train_kwargs(**extra).get("callbacks", [])) if self.lr_schedule else []

    def select_kwargs(self) -> dict[str, Any]:
        """``select()`` keyword arguments (``per_head`` only when set)."""
        kwargs: dict[str, Any] = {"multiple_of": self.multiple_of}
        if self.per_head:
            kwargs["per_head"] = True
        return kwargs

    def inject_kwargs(self) -> dict[str, Any]:
        """``inject()`` keyword arguments (only those that differ from its defaults)."""
        kwargs: dict[str, Any] = {}
        if self.init != "zeros":
            kwargs["init"] = self.init
        if not self.train_heads:
            kwargs["train_heads"] = False
        return kwargs

    def run(self, model, train_dataset, calibration: Iterable[Mapping[str, Any]], *,
            eval_dataset=None, tokenizer=None, **train_overrides: Any) -> RecipeResult:
        """Score ``model`` on ``calibration`` (batches, e.g. ``rowsft_nb.calibration_batches``),
        select the rows, inject the deltas and train on ``train_dataset``. Keyword
        arguments override ``training`` (``max_steps=2``, ``device="cpu"`` ...).

        Everything is checked before scoring; if training fails the adapters are removed
        and the model is left as it was.

        >>> out = spruft_llm().run(model, data.train, calib, tokenizer=tok)
        """
        from .adapter import inject, unload
        from .scoring import score
        from .selection import select
        from .train import train

        if calibration is None:
            raise ValueError("run() needs calibration batches for scoring, e.g. "
                             "rowsft_nb.calibration_batches(data.train, 8, 64, data.collator)")
        kwargs = self.train_kwargs(**train_overrides)
        report = score(model, calibration, metric=self.metric, n_samples=self.n_samples,
                       targets=self.targets, exclude=list(self.exclude) or None)
        plan = select(report, self.budget, **self.select_kwargs())
        inject(model, plan, **self.inject_kwargs())
        try:
            result = train(model, train_dataset, eval_dataset=eval_dataset,
                           tokenizer=tokenizer, **kwargs)
        except BaseException:
            unload(model)
            raise
        return RecipeResult(report=report, plan=plan, result=result)

    def summary(self) -> str:
        """One line per setting, for notebooks."""
        lines = [f"{self.name}  (from {self.source})", f"  rows: {self.budget}",
                 f"  targets: {self.targets}, exclude: {list(self.exclude) or 'none'}",
                 f"  metric: {self.metric}, n_samples: {self.n_samples or 'all'}",
                 f"  per_head: {self.per_head}, multiple_of: {self.multiple_of}, "
                 f"init: {self.init}, train_heads: {self.train_heads}",
                 f"  training: {dict(self.training)}", f"  lr schedule: {self.lr_schedule}",
                 f"  data: {dict(self.data)}"]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- presets
def spruft_llm(*, rows: int = 64, attention: bool = True, metric: Any = "zo_taylor",
               n_estimate: int = 2, init: str = "zeros") -> Recipe:
    """The authors' LLM setup (README "Fine-tuning with our method" command, run by
    ``finetune_text_generation_model_ours.py``):

    - ``rows=64`` rows in every targeted Linear (``--finetuning_rank 64``; no rounding);
    - ``attention=True``: q/k/v projections are adapted (``--finetune_attn_as_linear``);
      False leaves q/k/v out (o_proj, gate/up/down still train), as their script does;
    - ``metric="zo_taylor"`` with ``n_estimate=2`` (``--finetuning_type ZOtaylor
      --n_estimate 2``): SPSA Taylor, eps 1e-3, 2 x 256 perturbations, scored on every
      calibration batch given (they use the whole training set); ``n_estimate`` applies to
      zo_taylor only; any other metric name or object is used as given, gradient metrics on
      50 examples (``taylor_batchs=50`` x batch size 1);
    - training: AdamW, lr 1e-4, weight decay 0, 3 epochs, batch size 1, no warmup, no
      gradient clipping, StepLR gamma 0.85 stepped once per epoch (:class:`EpochLR`);
    - data: ``max_length=512``, ``n_train=1024`` examples;
    - ``init="zeros"`` (library default); ``init="kaiming"`` is the authors' (their deltas
      start at ``kaiming_uniform_(a=sqrt(5))``).

    Their argparse defaults differ from the README command: lr 2e-5, 10 epochs,
    ``finetuning_ratio=0.024`` (no fixed rank), ``finetuning_type=l2``, ``n_estimate=5``.

    >>> recipe = spruft_llm(attention=False); recipe.exclude   # ('q_proj', 'k_proj', 'v_proj')
    """
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"spruft_llm: rows must be a positive int (rows per module), got {rows!r}")
    metric_obj, n_samples = metric, 50
    if metric == "zo_taylor":
        from .scoring.metrics import ZerothOrderTaylor

        metric_obj = ZerothOrderTaylor(eps=1e-3, n_estimate=n_estimate, data_split=256)
        n_samples = None
    return Recipe(
        name="spruft_llm", budget=FixedRows(rows), metric=metric_obj, targets="all-linear",
        exclude=() if attention else ATTENTION_QKV, n_samples=n_samples, per_head=False,
        multiple_of=1, init=init, train_heads=True,   # lm_head never trains (inject)
        training={"lr": 1e-4, "epochs": 3, "batch_size": 1, "weight_decay": 0.0,
                  "warmup_steps": 0, "max_grad_norm": 0.0, "lr_scheduler": "constant",
                  "optim": "adamw_torch"},
        lr_schedule={"kind": "step", "gamma": 0.85},
        data={"max_length": 512, "n_train": 1024},
        source="finetune_text_generation_model_ours.py + README command")


def spruft_encoder(*, ratio: float = 0.05, metric: Any = "taylor", per_head: bool = True,
                   init: str = "zeros") -> Recipe:
    """The authors' encoder/ViT classification setup (``finetune_imagemodels.py``):

    - ``ratio=0.05``: ``int(0.05 * d_out)`` rows in every Linear, rounded to a multiple of 2
      (``--finetuning_ratio 0.05``, ``round_to=2``);
    - ``per_head=True``: attention rows split equally over the heads (their ``num_heads``
      channel groups);
    - ``metric="taylor"`` (``--finetuning_type taylor``: ``sum_j |w_ij G_ij|``) on 3,200
      examples (``taylor_batchs=50`` x batch size 64);
    - the classifier head trains fully (kept out of the finetuner, ``requires_grad=True``);
    - training: Adam (= AdamW with weight decay 0), lr 1e-4, 5 epochs, batch size 64, no
      gradient clipping, cosine decay stepped once per epoch (``CosineAnnealingLR(T_max=5,
      eta_min=1e-9)``, :class:`EpochLR`).

    Their GLUE script (``finetune_language_classification_model.py``) trains differently:
    AdamW lr 2e-5, weight decay 0.01, linear decay per epoch, 15 epochs, batch size 32
    (see docs/paper.md).

    >>> recipe = spruft_encoder(); recipe.budget              # Ratio(ratio=0.05)
    """
    return Recipe(
        name="spruft_encoder", budget=Ratio(ratio), metric=metric, targets="all-linear",
        n_samples=50 * 64, per_head=per_head, multiple_of=2, init=init, train_heads=True,
        training={"lr": 1e-4, "epochs": 5, "batch_size": 64, "weight_decay": 0.0,
                  "warmup_steps": 0, "max_grad_norm": 0.0, "lr_scheduler": "constant",
                  "optim": "adamw_torch"},
        lr_schedule={"kind": "cosine", "eta_min": 1e-9},
        data={}, source="finetune_imagemodels.py")
