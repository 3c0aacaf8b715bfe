"""``score()``: model + calibration data -> ImportanceReport.

Usage::

    from rowsft_nb.scoring import score
    report = score(model, loader, metric="taylor", n_samples=256)
    report = score(model, metric="l2")                          # data-free metrics
    report = score(model, loader, metric="wanda", groups="auto")
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..targets import (TargetSpec, find_targets, is_linear_like, linear_shape,
                       model_fingerprint, name_matches, row_weight)
from .calibration import StatsCollector, find_blocks, iter_batches
from .groups import DependencyGroup, apply_groups, find_groups
from .metrics import Metric, ModuleStats, get_metric
from .naive import NaiveGradientCollector
from .statistics import STATISTICS, get_statistics
from .report import ImportanceReport

METHODS = ("hooks", "naive")
BACKENDS = ("native", "torch_pruning")


def score(model: nn.Module, data: Iterable[Mapping[str, Any]] | None = None,
          metric: str | Metric = "taylor", *, n_samples: int | None = None,
          targets: TargetSpec = "all-linear", exclude: TargetSpec = None,
          groups: str | Sequence[DependencyGroup] | None = None, group_reduce: str = "sum",
          seed: int = 0, device: str | torch.device | None = None, progress: bool = True,
          columns: bool = True, method: str = "hooks", backend: str = "native",
          checkpoint: bool = True) -> ImportanceReport:
    """Score every output neuron (row) of the target Linear/Conv1D modules.

    ``data``: iterable of batch dicts (a DataLoader or a list); gradient metrics need
    ``labels``. ``metric``: a name from ``METRICS`` (l1, l2, taylor, taylor_multivariable,
    fisher, hessian, wanda, zo_taylor, class_taylor, taylor2_class, random) or a metric object
    with its settings, e.g. ``ClassTaylor(aggregate="quantiles")`` or
    ``ZerothOrderTaylor(eps=1e-3, n_estimate=2, data_split=256)``. Options are keyword-only:
    ``n_samples`` caps the examples used (the last batch is cut to fit). ``groups="auto"``:
    coupled rows (heads, q/k/v, gate/up + down columns) share their aggregated
    (``group_reduce``) score. ``device``: where to score (the model is moved there and back);
    default: the model's. ``method="naive"``: the ``.grad``-based reference for gradient
    metrics. ``backend="torch_pruning"``: Torch-Pruning's magnitude importance for l1/l2.
    ``checkpoint``: on the hook path, recompute each transformer block's activations in
    backward instead of keeping them (less memory, about one extra forward pass).
    On a model with row-sparse adapters injected, the frozen base layers are scored under
    their base names. The model is left as found (weights, requires_grad, train/eval, hooks,
    .grad), also on error.

    >>> report = score(model, batches, metric="taylor", n_samples=64)
    """
    start = time.perf_counter()
    m = get_metric(metric)
    metric_name = getattr(m, "name", None) or str(metric)
    needs = frozenset(getattr(m, "needs", frozenset()))
    get_statistics(needs)
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}")
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {BACKENDS}")
    if group_reduce not in ("sum", "mean", "max"):
        raise ValueError(f"Unknown group_reduce {group_reduce!r}; choose sum, mean or max")
    if n_samples is not None and (not isinstance(n_samples, int) or n_samples <= 0):
        raise ValueError(f"n_samples must be a positive int (examples), got {n_samples!r}; "
                         "pass None to use all of the data.")
    if groups is not None and groups != "auto" and isinstance(groups, str):
        raise ValueError(f"groups must be None, 'auto' or a list of DependencyGroup, not {groups!r}")
    _check_not_meta(model)
    located = _target_names(model, targets, exclude)       # {report name: module name}
    names = list(located)
    named = dict(model.named_modules())
    modules = {n: named[located[n]] for n in names}
    num_classes = _num_classes(model, needs)
    model_device = _model_device(model)
    run_device = torch.device(device) if device is not None else model_device

    n_seen = n_tok = 0
    with preserved_state(model, model_device, run_device):
        model.eval()
        if backend == "torch_pruning":
            from .tp_backend import torch_pruning_scores

            computed = torch_pruning_scores(modules, metric_name)
        else:
            collector = None
            if needs:
                collector = _collector(model, modules, needs, m, seed, method, checkpoint,
                                       num_classes)
                _calibrate(model, data, collector, n_samples, run_device, progress, metric_name)
                n_seen, n_tok = collector.n_samples, collector.n_tokens
            computed = {}
            with torch.no_grad():
                for i, (name, module) in enumerate(modules.items()):
                    stats = (collector.module_stats(name) if collector is not None
                             else ModuleStats(seed=_module_seed(seed, i)))
                    computed[name] = m(row_weight(module).detach(), stats)
                    del stats  # free accumulators as we go
        scores = {n: r for n, (r, _) in computed.items()}
        column_scores = ({n: c for n, (_, c) in computed.items() if c is not None}
                         if columns else {})
        group_list, head_dims = find_groups(model, names)
        fingerprint = model_fingerprint(model)
    if groups is not None and groups != "auto":
        group_list = list(groups)
    settings = m.settings() if hasattr(m, "settings") else {}
    report = ImportanceReport(
        scores=scores, shapes={n: linear_shape(modules[n]) for n in names},
        metric=metric_name, column_scores=column_scores, groups=head_dims,
        meta={"metric": metric_name, "metric_settings": settings, "n_samples": n_seen,
              "n_tokens": n_tok, "seconds": 0.0, "model_class": type(model).__name__,
              "model_hash": fingerprint,
              "model_parameters": sum(p.numel() for p in model.parameters()),
              "seed": seed, "targets": targets if isinstance(targets, str) or targets is None
              else list(targets), "exclude": exclude if isinstance(exclude, str) or exclude is None
              else list(exclude), "method": method if needs else "weights", "backend": backend,
              "checkpoint": bool(checkpoint and method == "hooks" and _needs_gradients(needs)),
              "device": str(run_device), "groups": "auto" if groups == "auto" else
              ("custom" if groups is not None else None)})
    for name, s in report.scores.items():
        if not bool(torch.isfinite(s).all()):
            raise FloatingPointError(f"Scores of {name!r} are not finite; check the weights "
                                     "and the calibration data for NaN/inf.")
    if groups is not None:
        report = apply_groups(report, group_list, group_reduce)
    report.meta["seconds"] = round(time.perf_counter() - start, 4)
    return report


def _needs_gradients(needs: Iterable[str]) -> bool:
    return any(STATISTICS[n].source in ("gradient", "example_gradient") for n in needs)


def _module_seed(seed: int, index: int) -> int:
    from .calibration import mix_seed

    return mix_seed(seed, index)


def _check_not_meta(model: nn.Module) -> None:
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"score(): {len(meta)} parameter(s) are on the meta device ({', '.join(meta[:3])}"
            f"{' ...' if len(meta) > 3 else ''}): the model has no real weights to score. Load "
            "it with real weights first (from_pretrained without device_map='meta' / "
            "init_empty_weights, or model.to_empty(device=...) then load_state_dict).")


def _target_names(model: nn.Module, targets: TargetSpec, exclude: TargetSpec) -> dict[str, str]:
    """``{report name: module name}``. On a model with adapters injected, the frozen base
    layers (``<name>.base_layer``) are the targets, matched and reported as ``<name>``."""
    suffix = ".base_layer"
    wrapped = any(n.endswith(suffix) and is_linear_like(mod) for n, mod in model.named_modules())
    if not wrapped:
        return {n: n for n in find_targets(model, targets, exclude)}
    all_linear = targets is None or targets == "all-linear"
    candidates = find_targets(model, "all-linear" if all_linear else ".*")
    chosen = {}
    for n in candidates:
        base = n.removesuffix(suffix)
        if not all_linear and not name_matches(base, targets):
            continue
        if exclude and name_matches(base, exclude):
            continue
        chosen[base] = n
    if not chosen:
        raise ValueError(f"No Linear/Conv1D module matches targets={targets!r} "
                         f"exclude={exclude!r} (adapted model: base layers are matched by "
                         "their base names, e.g. 'q_proj').")
    return chosen


def _num_classes(model: nn.Module, needs: frozenset[str]) -> int | None:
    if not needs & {"class_grad", "class_grad_sq"}:
        return None
    num_classes = getattr(getattr(model, "config", None), "num_labels", None)
    if not num_classes or not any(k in type(model).__name__ for k in
                                  ("ForSequenceClassification", "ForImageClassification",
                                   "ForAudioClassification")):
        raise ValueError(f"class_taylor needs a classifier with class labels "
                         f"(…ForSequenceClassification); {type(model).__name__} has none. "
                         "Use metric='taylor'.")
    return int(num_classes)


def _collector(model, modules, needs, metric, seed, method, checkpoint, num_classes):
    if method == "naive":
        return NaiveGradientCollector(modules, needs, seed, num_classes=num_classes)
    blocks = find_blocks(model, list(modules)) if checkpoint else []
    zo = metric if "zo_grad" in needs else None
    return StatsCollector(modules, needs, seed=seed, num_classes=num_classes,
                          checkpoint_blocks=blocks, zo=zo)


def _calibrate(model, data, collector, n_samples, device, progress, label) -> None:
    from tqdm.auto import tqdm

    need_labels = _needs_gradients(collector.stats) or "zo" in collector.sources()
    total = n_samples if n_samples is not None else _data_examples(data)
    bar = tqdm(total=total, unit="ex", desc=f"scoring ({label})", disable=not progress,
               leave=False)
    collector.attach()
    try:
        for index, (batch, size) in enumerate(iter_batches(data, n_samples, device, need_labels)):
            collector.run_batch(model, batch, index)
            bar.update(size)
    finally:
        collector.detach()
        bar.close()
    collector.finalize()


def _data_examples(data: Any) -> int | None:
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def preserved_state(model: nn.Module, home: torch.device | None = None,
                    device: torch.device | None = None) -> Iterator[nn.Module]:
    """Inside: the model on ``device``, every parameter frozen. On exit (also on error):
    ``requires_grad``, ``.grad``, train/eval flags restored, hooks added inside removed,
    the model back on ``home``.

    >>> with preserved_state(model): ...
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    hook_counts = [(m, _hook_ids(m)) for m in model.modules()]
    moved = device is not None and home is not None and device != home
    try:
        if moved:
            model.to(device)
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        yield model
    finally:
        if moved:
            model.to(home)
        for p, flag, grad in zip(params, flags, grads):
            p.grad = grad
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
        for m, before in hook_counts:
            _remove_new_hooks(m, before)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")


def _hook_ids(module: nn.Module) -> dict[str, set]:
    return {d: set(getattr(module, d, {}).keys()) for d in _HOOK_DICTS
            if isinstance(getattr(module, d, None), dict)}


def _remove_new_hooks(module: nn.Module, before: dict[str, set]) -> None:
    for d, ids in before.items():
        hooks = getattr(module, d)
        for key in [k for k in hooks if k not in ids]:
            del hooks[key]
