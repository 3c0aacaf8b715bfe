"""The methods a benchmark compares, each built at one trainable-parameter budget (a
:class:`RowPlan`):

- ``floor``: nothing trains; forward + backward through the frozen model with
  ``inputs_embeds`` requiring grad. The memory and time no adapter can avoid.
- ``rowsft``: this library's row-sparse adapter (``inject(model, plan)``).
- ``columns``: the input-column (neuron-centric) mode, ``inject`` with a column plan.
- ``lora``: PEFT LoRA on the plan's modules at ``round(plan.equivalent_lora_rank())``
  (needs ``peft``: ``pip install "rowsft-nb[bench]"``).
- ``full``: every parameter trains.
- ``dense_mask``: the plan's weights train in full size, their gradient multiplied by a
  row mask in a hook (mask-based sparse fine-tuning): full-size gradients and optimizer state.
- ``onehot``: the same row update computed as the paper's public code does it,
  ``y = base(x) + (x @ dW^T) @ onehot[r, d_out]``.

Usage::

    plan, column_plan = matched_plans(report, lora_rank=4)
    models = build_methods(lambda: copy.deepcopy(base), plan, column_plan)   # {method: model}
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..adapter.model import _set_module
from ..plan import RowPlan
from ..targets import is_conv1d, linear_shape

__all__ = ["METHODS", "PEFT_MISSING", "require_peft", "OneHotRowLinear", "apply_onehot",
           "apply_dense_mask", "apply_lora", "apply_full", "apply_floor", "prepare_method",
           "build_methods", "matched_plans"]

METHODS = ("floor", "rowsft", "columns", "lora", "full", "dense_mask", "onehot")

PEFT_MISSING = ("the LoRA baseline needs peft, which is an optional extra of rowsft-nb: "
                "pip install 'rowsft-nb[bench]' (or leave 'lora' out of the methods)")


def require_peft() -> None:
    """Raise one clear ``ImportError`` naming ``pip install 'rowsft-nb[bench]'`` when
    ``peft`` is not installed. ``>>> require_peft()``"""
    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise ImportError(PEFT_MISSING) from err


class OneHotRowLinear(nn.Module):
    """The paper's public-code form of a row update: ``base(x) + (x @ dW^T) @ onehot``,
    with ``onehot`` a dense [r, d_out] buffer (``onehot[i, rows[i]] = 1``). A benchmark
    baseline, numerically the same as :class:`rowsft_nb.RowSparseLinear` rows.

    >>> layer = OneHotRowLinear(nn.Linear(8, 6), rows=[1, 4])   # layer(x) == base(x) at init
    """

    def __init__(self, base_layer: nn.Module, rows: Iterable[int] | torch.Tensor) -> None:
        super().__init__()
        d_out, d_in = linear_shape(base_layer)
        weight = base_layer.weight
        rows = torch.as_tensor(rows, dtype=torch.int64).flatten()
        if rows.numel() == 0:
            raise ValueError("OneHotRowLinear needs at least one row")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        onehot = torch.zeros(rows.numel(), d_out, dtype=weight.dtype, device=weight.device)
        onehot[torch.arange(rows.numel()), rows.to(weight.device)] = 1.0
        self.register_buffer("onehot", onehot, persistent=False)
        self.delta = nn.Parameter(torch.zeros(rows.numel(), d_in, dtype=weight.dtype,
                                              device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (x @ self.delta.t()) @ self.onehot


def freeze(model: nn.Module) -> None:
    """``requires_grad_(False)`` on every parameter. ``>>> freeze(model)``"""
    for p in model.parameters():
        p.requires_grad_(False)


def apply_onehot(model: nn.Module, plan: RowPlan) -> nn.Module:
    """Freeze ``model`` and wrap each planned module in :class:`OneHotRowLinear` (in place).

    >>> apply_onehot(model, plan)
    """
    plan.validate(model)
    freeze(model)
    modules = dict(model.named_modules())
    for name, rows in plan.rows.items():
        if rows.numel():
            _set_module(model, name, OneHotRowLinear(modules[name], rows))
    return model


def apply_dense_mask(model: nn.Module, plan: RowPlan) -> nn.Module:
    """Freeze ``model``, make every planned module's full weight trainable and mask its
    gradient to the planned rows with a hook (mask-based sparse fine-tuning; in place).
    Use with ``weight_decay=0`` so masked entries never move.

    >>> apply_dense_mask(model, plan); model(**batch).loss.backward()   # grads 0 off the rows
    """
    plan.validate(model)
    freeze(model)
    modules = dict(model.named_modules())
    handles = []
    for name, rows in plan.rows.items():
        if not rows.numel():
            continue
        m = modules[name]
        d_out, _ = linear_shape(m)
        mask = torch.zeros(d_out, dtype=m.weight.dtype, device=m.weight.device)
        mask[rows.to(mask.device)] = 1.0
        mask = mask.view(1, d_out) if is_conv1d(m) else mask.view(d_out, 1)
        m.register_buffer("row_mask", mask, persistent=False)
        m.weight.requires_grad_(True)
        handles.append(m.weight.register_hook(lambda g, mask=mask: g * mask))
    model._dense_mask_hooks = handles
    return model


def apply_lora(model: nn.Module, plan: RowPlan, rank: int | None = None,
               heads: Iterable[str] = ()) -> nn.Module:
    """PEFT LoRA (``lora_alpha = 2 * rank``, no dropout) on the plan's modules; ``rank``
    defaults to ``round(plan.equivalent_lora_rank())`` (at least 1). ``heads`` train fully
    (``modules_to_save``). Returns the ``PeftModel``. Needs ``peft`` (the ``bench`` extra).

    >>> lora = apply_lora(model, plan)          # ~ plan.trainable_parameters() parameters
    """
    k = int(rank) if rank is not None else max(1, round(plan.equivalent_lora_rank()))
    if k < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {k}")
    require_peft()
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=k, lora_alpha=2 * k, lora_dropout=0.0, target_modules=list(plan.modules),
                     modules_to_save=list(heads) or None)
    return get_peft_model(model, cfg)


def apply_full(model: nn.Module) -> nn.Module:
    """Every parameter trainable. ``>>> apply_full(model)``"""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def apply_floor(model: nn.Module) -> nn.Module:
    """Nothing trainable (the frozen floor). ``>>> apply_floor(model)``"""
    freeze(model)
    return model


def _head_names(model: nn.Module, plan: RowPlan) -> list[str]:
    from ..adapter.model import trainable_head_names

    return trainable_head_names(model, plan)


def prepare_method(model: nn.Module, method: str, plan: RowPlan,
                   column_plan: RowPlan | None = None, *, train_heads: bool = False,
                   lora_rank: int | None = None) -> nn.Module:
    """Make ``model`` (in place, or wrapped for LoRA) train as ``method`` (one of
    :data:`METHODS`, plus ``"head"``: only the classifier head) at the budget of ``plan``.
    ``train_heads``: also train classifier heads fully (never lm_head). Returns the model to
    train.

    >>> lora = prepare_method(model, "lora", plan)
    """
    from ..adapter import inject

    if method not in METHODS + ("head",):
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS + ('head',)}")
    if method == "columns" and (column_plan is None or not column_plan.columns):
        raise ValueError("method 'columns' needs a column_plan (select(..., columns=True))")
    if method == "lora":
        require_peft()
    heads = _head_names(model, plan) if train_heads or method == "head" else []
    if method == "head" and not heads:
        raise ValueError("method 'head' needs a model with a classifier head")
    if method == "floor":
        return apply_floor(model)
    if method == "rowsft":
        return inject(model, plan, train_heads=train_heads)
    if method == "columns":
        return inject(model, column_plan, train_heads=train_heads)
    if method == "lora":
        return apply_lora(model, plan, lora_rank, heads=[h.rsplit(".", 1)[-1] for h in heads])
    if method == "full":
        return apply_full(model)
    if method == "dense_mask":
        apply_dense_mask(model, plan)
    elif method == "onehot":
        apply_onehot(model, plan)
    else:
        freeze(model)
    modules = dict(model.named_modules())
    for h in heads:
        for p in modules[h].parameters():
            p.requires_grad_(True)
    return model


def build_methods(make_model: Callable[[], nn.Module], plan: RowPlan,
                  column_plan: RowPlan | None = None, methods: Iterable[str] = METHODS,
                  **kw: Any) -> dict[str, nn.Module]:
    """``{method: model prepared for it}``, each from a fresh ``make_model()``.

    >>> models = build_methods(lambda: copy.deepcopy(base), plan, column_plan)
    """
    methods = list(methods)
    if "lora" in methods:
        require_peft()  # before building anything
    return {m: prepare_method(make_model(), m, plan, column_plan, **kw) for m in methods}


def matched_plans(report, lora_rank: int, *, min_rows: int = 1) -> tuple[RowPlan, RowPlan]:
    """A row plan and a column plan from ``report`` whose trainable parameters are (at
    most) those of LoRA at ``lora_rank`` on every module of the report, every module getting
    at least ``min_rows`` rows/columns (so the equivalent LoRA rank is ``~lora_rank``).

    >>> plan, column_plan = matched_plans(report, lora_rank=4)
    """
    from ..selection import ParamBudget, select

    budget = lora_rank * sum(d_out + d_in for d_out, d_in in report.shapes.values())
    plan = select(report, ParamBudget(int(budget)), min_rows=min_rows)
    column_plan = select(report, ParamBudget(int(budget)), min_rows=min_rows, columns=True)
    return plan, column_plan
