"""Put row-sparse adapters into a model, count, merge, unmerge and remove them.

Usage::

    inject(model, plan)                      # in place; only the deltas (+ classifier head) train
    trainable, total = trainable_parameters(model)
    merge(model); unmerge(model)             # fold deltas into the base weights and back
    merge_and_unload(model)                  # plain model with W0[idx] += dW
    unload(model)                            # plain base model, untouched
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
import torch
from torch import nn

from ..plan import RowPlan
from ..targets import embeddings, head_module_names, model_fingerprint
from .layer import RowSparseLinear

__all__ = ["AdapterState", "inject", "adapted_modules", "adapter_state", "trainable_parameters",
           "merge", "unmerge", "merge_and_unload", "unload", "TRAINABLE_HEADS"]

# Heads trained fully by inject(train_heads=True): task heads of classifiers / QA models.
# Never lm_head or (tied) output embeddings of a causal LM.
TRAINABLE_HEADS = ("classifier", "score", "qa_outputs")

_STATE_ATTR = "_rowsft_adapter"


@dataclass
class AdapterState:
    """What inject() did, kept on the model (``model._rowsft_adapter``) for save/unload."""

    plan: RowPlan
    bias: bool
    dropout: float
    delta_dtype: torch.dtype | None
    heads: list[str]
    base_hash: str
    base_class: str
    # every parameter's requires_grad before inject (restored by unload/merge_and_unload)
    requires_grad: list[tuple[nn.Parameter, bool]] = field(default_factory=list, repr=False)
    # original head tensors (restored by unload)
    head_backup: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP/FSDP/accelerate wrappers (``.module``)."""
    while getattr(model, _STATE_ATTR, None) is None and isinstance(
            getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def adapter_state(model: nn.Module) -> AdapterState | None:
    """The :class:`AdapterState` of an injected model, else ``None``."""
    return getattr(_unwrap(model), _STATE_ATTR, None)


def _require_state(model: nn.Module, action: str) -> tuple[nn.Module, AdapterState]:
    inner = _unwrap(model)
    state = getattr(inner, _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"cannot {action}: the model has no row-sparse adapter; "
                         "call rowsft_nb.inject(model, plan) first")
    return inner, state


def adapted_modules(model: nn.Module) -> dict[str, RowSparseLinear]:
    """``{base module name: RowSparseLinear}`` of an adapted model.

    >>> adapted_modules(model)["model.layers.0.self_attn.q_proj"].delta.shape
    """
    return {n: m for n, m in _unwrap(model).named_modules() if isinstance(m, RowSparseLinear)}


def trainable_head_names(model: nn.Module, plan: RowPlan) -> list[str]:
    """Classifier-style heads (classifier / score / qa_outputs) not in ``plan``: the ones
    ``inject(train_heads=True)`` trains fully. Never the output embedding / lm_head."""
    out_emb = embeddings(model, "output")
    in_w = getattr(embeddings(model, "input"), "weight", None)
    modules = dict(model.named_modules())
    planned = set(plan.modules)
    heads = []
    for name in head_module_names(model):
        parts = name.split(".")
        if not (parts[0] in TRAINABLE_HEADS or parts[-1] in TRAINABLE_HEADS):
            continue
        m = modules[name]
        if name in planned or m is out_emb:
            continue
        if in_w is not None and getattr(m, "weight", None) is in_w:  # tied to embeddings
            continue
        heads.append(name)
    return heads


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, plan: RowPlan, *, bias: bool = False, dropout: float = 0.0,
           delta_dtype: torch.dtype | None = None, train_heads: bool = True) -> nn.Module:
    """Wrap every module of ``plan`` in a :class:`RowSparseLinear` (in place) and freeze
    everything else; returns ``model``.

    ``bias``: also train a bias delta per selected row. ``dropout``: on the delta path.
    ``delta_dtype``: default float32 for bf16/fp16 bases, else the base dtype.
    ``train_heads``: train classifier/score/qa_outputs heads fully (never lm_head).

    >>> model = inject(model, plan)              # adapted outputs == base outputs at step 0
    """
    if not isinstance(plan, RowPlan):
        raise TypeError(f"inject() needs a RowPlan, got {type(plan).__name__}; "
                        "make one with rowsft_nb.select(report, budget)")
    if isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "config"):
        model = _unwrap(model)
    if getattr(model, _STATE_ATTR, None) is not None or any(
            isinstance(m, RowSparseLinear) for m in model.modules()):
        raise ValueError("the model already has a row-sparse adapter (double injection); "
                         "call rowsft_nb.unload(model) or merge_and_unload(model) first")
    if plan.is_empty():
        raise ValueError("the plan selects no rows: raise the budget (e.g. Ratio(0.05) or "
                         "FixedRows(8)), lower min_rows/exclude filters, or widen the targets, "
                         "then select() again")
    plan.validate(model)
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    base_hash = model_fingerprint(model)
    planned_hash = plan.meta.get("model_hash")
    if isinstance(planned_hash, str) and planned_hash and planned_hash != base_hash:
        warnings.warn(f"the plan was selected on weights with hash {planned_hash} but this "
                      f"model has {base_hash}: rows were ranked on a different checkpoint",
                      stacklevel=2)
    heads = trainable_head_names(model, plan) if train_heads else []
    flags = [(p, p.requires_grad) for p in model.parameters()]

    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in plan.modules:
        layer = RowSparseLinear(modules[name], rows=plan.rows.get(name),
                                columns=plan.columns.get(name), bias=bias, dropout=dropout,
                                delta_dtype=delta_dtype)
        _set_module(model, name, layer)
    backup: dict[str, torch.Tensor] = {}
    for name in heads:
        for pname, p in modules[name].named_parameters():
            backup[f"{name}.{pname}"] = p.detach().clone()
            p.requires_grad_(True)
    setattr(model, _STATE_ATTR, AdapterState(
        plan=plan, bias=bool(bias), dropout=float(dropout), delta_dtype=delta_dtype,
        heads=heads, base_hash=base_hash, base_class=type(model).__name__,
        requires_grad=flags, head_backup=backup))
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each shared tensor counted once.

    >>> trainable, total = trainable_parameters(model); print(f"{trainable / total:.2%}")
    """
    trainable = total = 0
    for p in model.parameters():  # parameters() already yields shared tensors once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def merge(model: nn.Module) -> nn.Module:
    """Fold every delta into its base weight in place, keeping the adapters (see
    :func:`unmerge`). Refuses NaN/inf deltas, naming the module, before changing anything.

    >>> merge(model); ...; unmerge(model)
    """
    inner, _ = _require_state(model, "merge")
    layers = adapted_modules(inner)
    for name, layer in layers.items():
        layer.check_finite(name)
    for layer in layers.values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: base weights bit-exactly as before, deltas active again.

    >>> unmerge(model)
    """
    inner, _ = _require_state(model, "unmerge")
    for layer in adapted_modules(inner).values():
        layer.unmerge()
    return model


def _remove(inner: nn.Module, state: AdapterState) -> None:
    for name, layer in adapted_modules(inner).items():
        _set_module(inner, name, layer.base_layer)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    delattr(inner, _STATE_ATTR)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the deltas into the base weights (W0[rows] += dW exactly, Conv1D in its
    transposed layout) and put the plain layers back; trained heads keep their values.
    Returns the plain model. Refuses NaN/inf deltas, naming the module.

    >>> merged = merge_and_unload(model)        # outputs == adapted outputs (1e-5, fp32)
    """
    inner, state = _require_state(model, "merge_and_unload")
    layers = adapted_modules(inner)
    for name, layer in layers.items():
        layer.check_finite(name)
    created = []
    for name, layer in layers.items():
        layer.merge()
        if layer._created_bias:
            created.append(name)
        layer._merge_backup = None
    if created:
        warnings.warn(f"bias deltas were merged into layers that had no bias ({len(created)}, "
                      f"e.g. {created[0]!r}): the merged model now has bias parameters its "
                      "config does not declare", stacklevel=2)
    _remove(inner, state)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters and give back the base model untouched: base weights as before
    inject (a merge is undone), trained heads restored, ``requires_grad`` flags restored.

    >>> base = unload(model)
    """
    inner, state = _require_state(model, "unload")
    for layer in adapted_modules(inner).values():
        layer.unmerge()
    params = dict(inner.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, value in state.head_backup.items():
            params[key].copy_(value)
    _remove(inner, state)
    return model

