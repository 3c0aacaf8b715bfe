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
from typing import Mapping, Sequence

import torch
from torch import nn

from ..plan import RowPlan
from ..targets import TRAINABLE_HEADS, embeddings, head_module_names, model_fingerprint
from .fused import FusedRowLinear, choose_modes
from .sharing import share_activations, unshare_activations
from .layer import (RowSparseLinear, check_dropout, check_init, check_not_meta, init_generator,
                    resolve_delta_dtype)

__all__ = ["AdapterState", "inject", "adapted_modules", "adapter_modes", "adapter_state", "trainable_parameters",
           "merge", "unmerge", "merge_and_unload", "unload", "TRAINABLE_HEADS"]

# TRAINABLE_HEADS (from rowsft_nb.targets.HEADS, the one list of head names): heads trained
# fully by inject(modules_to_save="auto"): task heads of classifiers / QA models. Never
# lm_head or (tied) output embeddings of a causal LM.

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
    init: str = "zeros"   # delta initialisation ("zeros" | "kaiming") and its seed
    seed: int = 0
    # inject(mode=...) and, per module, None (fused) or why it takes the delta path
    mode: str = "auto"
    modes: dict[str, str | None] = field(default_factory=dict)
    shared: list[str] = field(default_factory=list)  # producers sharing activations


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


def adapter_modes(model: nn.Module) -> dict[str, str]:
    """``{module name: "fused" | "delta: <why>"}`` of an adapted model (see ``inject(mode=)``).

    >>> adapter_modes(model)["model.layers.0.mlp.down_proj"]      # 'fused'
    """
    out = {}
    for name, layer in adapted_modules(model).items():
        reason = getattr(layer, "mode_reason", None)
        out[name] = layer.mode if layer.mode == "fused" or not reason else f"delta: {reason}"
    return out


def trainable_head_names(model: nn.Module, plan: RowPlan) -> list[str]:
    """Classifier-style heads (classifier / score / qa_outputs) not in ``plan``: the ones
    ``inject(modules_to_save="auto")`` trains fully. Never the output embedding / lm_head."""
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


def resolve_modules_to_save(model: nn.Module, plan: RowPlan,
                            modules_to_save: str | Sequence[str] | None = "auto",
                            train_heads: bool | None = None) -> list[str]:
    """The modules ``inject`` trains fully: ``"auto"`` = the classifier-style heads
    (:func:`trainable_head_names`), ``None``/``[]`` = none, a list = those modules (names or
    ``.``-suffixes, as PEFT's ``modules_to_save``; each must match a module with parameters
    that is not in the plan and holds no planned module). ``train_heads`` is the older
    spelling: True = "auto", False = none. ``ValueError`` naming the problem otherwise.

    >>> resolve_modules_to_save(model, plan, ["classifier"])     # ['classifier']
    """
    if train_heads is not None:
        if not isinstance(train_heads, bool):
            raise TypeError(f"train_heads must be True or False, got {train_heads!r}")
        if modules_to_save != "auto":
            raise ValueError("pass modules_to_save=... or train_heads=... (its older spelling), "
                             "not both")
        modules_to_save = "auto" if train_heads else None
    if modules_to_save == "auto":
        return trainable_head_names(model, plan)
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str) or not all(isinstance(s, str) for s in modules_to_save):
        raise ValueError(f"modules_to_save must be 'auto', None or a list of module names, got "
                         f"{modules_to_save!r} (e.g. modules_to_save=['classifier'])")
    modules = dict(model.named_modules())
    planned = set(plan.modules)
    out: list[str] = []
    for spec in modules_to_save:
        hits = [n for n in modules if n and (n == spec or n.endswith("." + spec))]
        if not hits:
            heads = head_module_names(model)
            raise ValueError(f"modules_to_save: no module named {spec!r} in "
                             f"{type(model).__name__} (its heads: {heads or 'none'})")
        for name in hits:
            if name in planned or any(p.startswith(name + ".") for p in planned):
                raise ValueError(f"modules_to_save: {name!r} is (or holds) a module of the plan, "
                                 "whose selected rows already train; leave it out of one of them")
            if not any(True for _ in modules[name].parameters()):
                raise ValueError(f"modules_to_save: {name!r} has no parameters to train")
            if name not in out:
                out.append(name)
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _check_inject_args(model: nn.Module, plan: RowPlan, bias: bool, dropout: float,
                       delta_dtype: torch.dtype | None) -> None:
    """Every check inject() needs, before anything changes (raises ``ValueError``/``TypeError``)."""
    if not isinstance(plan, RowPlan):
        raise TypeError(f"inject() needs a RowPlan, got {type(plan).__name__}; "
                        "make one with rowsft_nb.select(report, budget)")
    if getattr(model, _STATE_ATTR, None) is not None or any(
            isinstance(m, RowSparseLinear) for m in model.modules()):
        raise ValueError("the model already has a row-sparse adapter (double injection); "
                         "call rowsft_nb.unload(model) or merge_and_unload(model) first")
    if plan.is_empty():
        raise ValueError("the plan selects no rows: raise the budget (e.g. Ratio(0.05) or "
                         "FixedRows(8)), lower min_rows/exclude filters, or widen the targets, "
                         "then select() again")
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be True or False, got {bias!r}")
    check_dropout(dropout)
    resolve_delta_dtype(torch.float32, delta_dtype)
    check_not_meta(model, type(model).__name__)
    plan.validate(model)


def inject(model: nn.Module, plan: RowPlan, *, bias: bool = False, dropout: float = 0.0,
           delta_dtype: torch.dtype | None = None, init: str = "zeros", seed: int = 0,
           modules_to_save: str | Sequence[str] | None = "auto",
           train_heads: bool | None = None,
           reference: nn.Module | Mapping[str, torch.Tensor] | None = None,
           mode: str = "auto", sharing: bool = True) -> nn.Module:
    """Wrap every module of ``plan`` in a :class:`RowSparseLinear` (in place) and freeze
    everything else; returns ``model``.

    ``bias``: also train a bias delta per selected row. ``dropout``: on the delta path.
    ``delta_dtype``: default float32 for bf16/fp16 bases, else the base dtype.
    ``init``: ``"zeros"`` (default; adapted outputs == base outputs at step 0) or
    ``"kaiming"`` (the authors' LLM start: row and column deltas ~ U(+-1/sqrt(d_in)), as
    torch's nn.Linear default; bias deltas zero), drawn per module from ``seed`` and the
    module name. ``"residual"`` (quantized bases, the authors' ``ours_loftq``): row deltas
    start at ``(W_ref - deq(Q))[rows]`` so the selected rows equal the float ``reference``
    (the float model or its state_dict, same module names) at step 0.
    ``modules_to_save``: which extra modules train fully, as PEFT's option: ``"auto"``
    (classifier/score/qa_outputs heads, never lm_head), ``None`` (none) or a list of module
    names. ``train_heads`` is its older spelling (True = "auto", False = None), still accepted.
    ``mode``: ``"auto"`` (default) uses :class:`~rowsft_nb.adapter.fused.FusedRowLinear`
    (W0[rows] + dW written into the base weight, one F.linear; the MLP output projection of
    known families recomputes its input in backward) wherever that is exact: plain
    Linear/Conv1D float bases, rows only, no bias deltas, no dropout, weights not tied; other
    modules take the delta path (:class:`RowSparseLinear`). ``"fused"`` requires it for every
    module; ``"delta"`` never uses it. Each layer's ``.mode`` / ``.mode_reason`` and
    :func:`adapter_modes` say which.
    ``sharing``: fused layers whose input the frozen model can recompute (the MLP output
    projection's ``act(gate) * up`` / ``GELU(z)``, normalised hidden states feeding q/k/v and
    gate/up; :mod:`~rowsft_nb.adapter.sharing`) recompute it in backward instead of saving it
    (default ``True``: far less activation memory, ~2-3 % more step time on CPU);
    ``False`` saves it as the delta path does. Outputs and gradients are the same either way.
    Every argument is checked before the model changes; if anything fails part-way, the
    model is left exactly as it was (modules, ``requires_grad`` flags, weights).

    >>> model = inject(model, plan)              # adapted outputs == base outputs at step 0
    """
    if isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "config"):
        model = _unwrap(model)
    _check_inject_args(model, plan, bias, dropout, delta_dtype)
    if not isinstance(sharing, bool):
        raise TypeError(f"sharing must be True or False, got {sharing!r}")
    check_init(init, seed)
    residual: dict[str, torch.Tensor] = {}
    if init == "residual":
        if reference is None:
            raise ValueError("init='residual' needs reference=<the float model or its "
                             "state_dict> (the weights the selected rows should start at)")
        from ..quant import residual_deltas
        residual = residual_deltas(model, reference, [n for n in plan.modules if n in plan.rows],
                                   plan.rows)
    elif reference is not None:
        raise ValueError("reference= is only used with init='residual'")
    heads = resolve_modules_to_save(model, plan, modules_to_save, train_heads)
    dropout = float(dropout)
    reasons = choose_modes(model, plan, mode, bias=bool(bias), dropout=dropout)

    base_hash = model_fingerprint(model)
    planned_hash = plan.meta.get("model_hash")
    if isinstance(planned_hash, str) and planned_hash and planned_hash != base_hash:
        warnings.warn(f"the plan was selected on weights with hash {planned_hash} but this "
                      f"model has {base_hash}: rows were ranked on a different checkpoint",
                      stacklevel=2)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modules = dict(model.named_modules())
    replaced: list[str] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in plan.modules:
            layer_cls = FusedRowLinear if reasons[name] is None else RowSparseLinear
            layer = layer_cls(modules[name], rows=plan.rows.get(name),
                                    columns=plan.columns.get(name), bias=bias, dropout=dropout,
                                    delta_dtype=delta_dtype, init=init,
                                    generator=init_generator(seed, name))
            if name in residual and layer.delta is not None:
                with torch.no_grad():
                    layer.delta.copy_(residual[name])
            layer.mode_reason = reasons[name]
            _set_module(model, name, layer)
            replaced.append(name)
        shared = share_activations(model, [n for n in replaced if reasons[n] is None]) \
            if sharing else []
        backup: dict[str, torch.Tensor] = {}
        for name in heads:
            for pname, p in modules[name].named_parameters():
                backup[f"{name}.{pname}"] = p.detach().clone()
                p.requires_grad_(True)
        setattr(model, _STATE_ATTR, AdapterState(
            plan=plan, bias=bool(bias), dropout=dropout, delta_dtype=delta_dtype,
            heads=heads, base_hash=base_hash, base_class=type(model).__name__,
            requires_grad=flags, head_backup=backup, init=init, seed=int(seed),
            mode=mode, modes=reasons, shared=shared))
    except BaseException:
        unshare_activations(model, [n for n, _ in model.named_modules()])
        for name in reversed(replaced):
            _set_module(model, name, modules[name])
        for p, flag in flags:
            p.requires_grad_(flag)
        if _STATE_ATTR in vars(model):
            delattr(model, _STATE_ATTR)
        raise
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


def _merge_all(layers: dict[str, RowSparseLinear]) -> None:
    """Merge every layer, or none: on an error, the layers merged so far are unmerged."""
    for name, layer in layers.items():
        layer.check_finite(name)
    done: list[RowSparseLinear] = []
    try:
        for layer in layers.values():
            if not layer.merged:
                layer.merge()
                done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise


def _unmerge_all(layers: dict[str, RowSparseLinear]) -> None:
    """Unmerge every layer, or none: on an error, the layers unmerged so far are merged
    again (bit-exactly: merge recomputes the same W0 + dW from the restored W0)."""
    done: list[RowSparseLinear] = []
    try:
        for layer in layers.values():
            if layer.merged:
                layer.unmerge()
                done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.merge()
        raise


def merge(model: nn.Module) -> nn.Module:
    """Fold every delta into its base weight in place, keeping the adapters (see
    :func:`unmerge`). Refuses NaN/inf deltas, naming the module, before changing anything;
    all layers merge or none do.

    >>> merge(model); ...; unmerge(model)
    """
    inner, _ = _require_state(model, "merge")
    _merge_all(adapted_modules(inner))
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: base weights bit-exactly as before, deltas active again (all
    layers or none).

    >>> unmerge(model)
    """
    inner, _ = _require_state(model, "unmerge")
    _unmerge_all(adapted_modules(inner))
    return model


def _remove(inner: nn.Module, state: AdapterState) -> None:
    """Put the base layers back and restore the flags; on an error part-way, put the
    adapters back as they were."""
    layers = adapted_modules(inner)
    flags = [(p, p.requires_grad) for p in inner.parameters()]
    done: list[str] = []
    try:
        for layer in layers.values():  # fused layers: base rows back to W0 (bit-exact)
            layer.restore_base_weight()
        unshare_activations(inner, state.shared)
        for name, layer in layers.items():
            _set_module(inner, name, layer.base_layer)
            done.append(name)
        for p, flag in state.requires_grad:
            p.requires_grad_(flag)
        delattr(inner, _STATE_ATTR)
    except BaseException:
        for name in reversed(done):
            _set_module(inner, name, layers[name])
        if state.shared:
            share_activations(inner, [n for n, m in layers.items() if m.mode == "fused"])
        for p, flag in flags:
            p.requires_grad_(flag)
        setattr(inner, _STATE_ATTR, state)
        raise


def merge_and_unload(model: nn.Module, *, into: str | None = None) -> nn.Module:
    """Merge the deltas into the base weights (W0[rows] += dW exactly, Conv1D in its
    transposed layout) and put the plain layers back; trained heads keep their values.
    Returns the plain model. Refuses NaN/inf deltas, naming the module; on any error the
    model is left as it was. On a 4-bit base (``rowsft_nb.quant``), ``into="4bit"`` (default:
    only the blocks holding selected rows are re-quantized), ``"float"`` (the authors':
    dequantize, then deq(Q) + S^T A exactly) or ``"requantize"`` (QLoRA's: every block).

    >>> merged = merge_and_unload(model)        # outputs == adapted outputs (1e-5, fp32)
    """
    if into is not None and into != "4bit":
        from ..quant import merge_into
        return merge_into(model, into)
    inner, state = _require_state(model, "merge_and_unload")
    layers = adapted_modules(inner)
    was_merged = {name: layer.merged for name, layer in layers.items()}
    _merge_all(layers)
    try:
        _remove(inner, state)
    except BaseException:
        _unmerge_all({n: m for n, m in layers.items() if not was_merged[n]})
        raise
    created = [name for name, layer in layers.items() if layer._created_bias]
    for layer in layers.values():
        layer._merge_backup = None
    if created:
        warnings.warn(f"bias deltas were merged into layers that had no bias ({len(created)}, "
                      f"e.g. {created[0]!r}): the merged model now has bias parameters its "
                      "config does not declare", stacklevel=2)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters and give back the base model untouched: base weights as before
    inject (a merge is undone), trained heads restored, ``requires_grad`` flags restored.
    On any error the model is left as it was.

    >>> base = unload(model)
    """
    inner, state = _require_state(model, "unload")
    layers = adapted_modules(inner)
    was_merged = {name: layer.merged for name, layer in layers.items()}
    params = dict(inner.named_parameters(remove_duplicate=False))
    current = {key: params[key].detach().clone() for key in state.head_backup}
    _unmerge_all(layers)
    try:
        with torch.no_grad():
            for key, value in state.head_backup.items():
                params[key].copy_(value)
        _remove(inner, state)
    except BaseException:
        with torch.no_grad():
            for key, value in current.items():
                params[key].copy_(value)
        _merge_all({n: m for n, m in layers.items() if was_merged[n]})
        raise
    return model
