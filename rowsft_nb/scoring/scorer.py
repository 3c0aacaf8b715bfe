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

from ..targets import TargetSpec, find_targets, linear_shape, model_fingerprint, row_weight
from .calibration import StatsCollector, find_blocks, iter_batches
from .groups import DependencyGroup, apply_groups, find_groups
from .metrics import GRADIENT_STATS, METRICS, FunctionMetric, ModuleStats, get_metric
from .naive import NaiveGradientCollector
from .report import ImportanceReport

METHODS = ("hooks", "naive")
BACKENDS = ("native", "torch_pruning")


def score(model: nn.Module, data: Iterable[Mapping[str, Any]] | None = None,
          metric: str | FunctionMetric = "taylor", n_samples: int | None = None,
          targets: TargetSpec = "all-linear", exclude: TargetSpec = None,
          groups: str | Sequence[DependencyGroup] | None = None, group_reduce: str = "sum",
          seed: int = 0, device: str | torch.device | None = None, progress: bool = True,
          columns: bool = True, method: str = "hooks", backend: str = "native",
          zo_eps: float = 1e-3, zo_perturbations: int = 1, checkpoint: bool = True
          ) -> ImportanceReport:
    """Score every output neuron (row) of the target Linear/Conv1D modules.

    ``data``: iterable of batch dicts (a DataLoader or a list); gradient metrics need
    ``labels``. ``n_samples`` caps the examples used (the last batch is cut to fit).
    ``metric``: a name from ``METRICS`` (l1, l2, taylor, taylor_abs, fisher, hessian, wanda,
    zo_taylor, class_taylor, random) or a metric object. ``groups="auto"``: coupled rows
    (heads, q/k/v, gate/up + down columns) share their aggregated (``group_reduce``) score.
    ``device``: where to score (the model is moved there and back); default: the model's.
    ``method="naive"``: the ``.grad``-based reference for taylor/taylor_abs/fisher/hessian.
    ``backend="torch_pruning"``: Torch-Pruning's magnitude importance for l1/l2.
    ``checkpoint``: on the hook path, recompute each transformer block's activations in
    backward instead of keeping them (less memory, about one extra forward pass).
    The model is left as found (weights, requires_grad, train/eval, hooks, .grad), also
    on error.

    >>> report = score(model, batches, metric="taylor", n_samples=64)
    """
    start = time.perf_counter()
    m = get_metric(metric)
    needs = frozenset(getattr(m, "needs", frozenset()))
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
    names = find_targets(model, targets, exclude)
    named = dict(model.named_modules())
    modules = {n: named[n] for n in names}
    model_device = _model_device(model)
    run_device = torch.device(device) if device is not None else model_device

    n_seen = n_tok = 0
    with preserved_state(model, model_device, run_device):
        model.eval()
        if backend == "torch_pruning":
            from .tp_backend import torch_pruning_scores

            computed = torch_pruning_scores(modules, getattr(m, "name", str(metric)))
        else:
            if needs:
                collector = _collector(model, modules, needs, m, seed, method, zo_eps,
                                       zo_perturbations, checkpoint)
                stats = _calibrate(model, data, collector, n_samples, run_device, needs,
                                   progress, getattr(m, "name", "metric"))
                n_seen, n_tok = collector.n_samples, collector.n_tokens
            else:
                stats = {n: ModuleStats(seed=_module_seed(seed, i)) for i, n in enumerate(names)}
            computed = {}
            with torch.no_grad():
                for name, module in modules.items():
                    rows, cols = m(row_weight(module).detach(), stats[name])
                    computed[name] = (rows, cols)
                    stats[name] = None  # free accumulators as we go
        scores = {n: r for n, (r, _) in computed.items()}
        column_scores = ({n: c for n, (_, c) in computed.items() if c is not None}
                         if columns else {})
        group_list, head_dims = find_groups(model, names)
        fingerprint = model_fingerprint(model)
    if groups is not None and groups != "auto":
        group_list = list(groups)
    report = ImportanceReport(
        scores=scores, shapes={n: linear_shape(modules[n]) for n in names},
        metric=getattr(m, "name", str(metric)), column_scores=column_scores, groups=head_dims,
        meta={"metric": getattr(m, "name", str(metric)), "n_samples": n_seen,
              "n_tokens": n_tok, "seconds": 0.0, "model_class": type(model).__name__,
              "model_hash": fingerprint,
              "model_parameters": sum(p.numel() for p in model.parameters()),
              "seed": seed, "targets": targets if isinstance(targets, str) or targets is None
              else list(targets), "exclude": exclude if isinstance(exclude, str) or exclude is None
              else list(exclude), "method": method if needs else "weights", "backend": backend,
              "checkpoint": bool(checkpoint and method == "hooks" and needs & GRADIENT_STATS),
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


def _module_seed(seed: int, index: int) -> int:
    from .calibration import mix_seed

    return mix_seed(seed, index)


def _collector(model, modules, needs, metric, seed, method, zo_eps, zo_perturbations,
               checkpoint):
    if method == "naive":
        return NaiveGradientCollector(modules, needs, seed)
    num_classes = None
    if "class" in needs:
        num_classes = getattr(getattr(model, "config", None), "num_labels", None)
        if not num_classes or not any(k in type(model).__name__ for k in
                                      ("ForSequenceClassification", "ForImageClassification",
                                       "ForAudioClassification")):
            raise ValueError(f"class_taylor needs a classifier with class labels "
                             f"(…ForSequenceClassification); {type(model).__name__} has none. "
                             "Use metric='taylor'.")
    blocks = find_blocks(model, modules) if checkpoint else []
    return StatsCollector(modules, needs, seed=seed, num_classes=num_classes, zo_eps=zo_eps,
                          zo_perturbations=zo_perturbations, checkpoint_blocks=blocks)


def _calibrate(model, data, collector, n_samples, device, needs, progress, label):
    from tqdm.auto import tqdm

    need_labels = bool(needs & (GRADIENT_STATS | {"zo"}))
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
    return collector.finalize()


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
