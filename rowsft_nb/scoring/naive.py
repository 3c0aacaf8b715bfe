"""The naive ``.grad``-based calibration pass: the reference the hook pass is tested and
benchmarked against (``score(..., method="naive")``). It fills the same statistics
(``scoring.statistics``) through their ``add_grad`` path.

Only the target weights require grad; each batch runs ``loss.backward()``, which fills a
full ``.grad`` buffer for every target weight at once; batch-level statistics are read from
``.grad``. Per-example statistics (``hessian``, class metrics) run every example alone (a
batch of one, its own loss) and read its ``.grad``. Input and zeroth-order statistics are
hook-only.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..targets import is_conv1d, row_weight
from .calibration import (Accumulators, accumulation_dtype, batch_loss, batch_size,
                          batch_tokens, class_labels)


class NaiveGradientCollector(Accumulators):
    """Fills the statistics from ``weight.grad`` (call inside score()'s state guard, which
    restores ``requires_grad`` and ``.grad`` afterwards)."""

    def __init__(self, modules: Mapping[str, nn.Module], needs: Iterable[str], seed: int = 0,
                 num_classes: int | None = None) -> None:
        super().__init__(modules, needs, seed, num_classes)
        unsupported = sorted(n for n, s in self.stats.items()
                             if s.source not in ("gradient", "example_gradient"))
        if unsupported:
            raise ValueError(f"method='naive' computes gradient statistics only ({unsupported} "
                             "are hook-only); use method='hooks'.")

    def attach(self) -> None:
        for module in self.modules.values():
            module.weight.requires_grad_(True)
            module.weight.grad = None

    def detach(self) -> None:
        for module in self.modules.values():
            module.weight.grad = None

    def _grads(self, model: nn.Module, batch: Mapping[str, Any], index: int):
        with torch.enable_grad():
            batch_loss(model, batch, index).backward()
        out = {}
        for name, module in self.modules.items():
            w = row_weight(module).detach()
            acc = accumulation_dtype(w)
            grad = module.weight.grad
            module.weight.grad = None
            if grad is None:
                grad = torch.zeros_like(module.weight)
            out[name] = ((grad.t() if is_conv1d(module) else grad).to(acc), w.to(acc))
        return out

    def run_batch(self, model: nn.Module, batch: Mapping[str, Any], index: int) -> None:
        size = batch_size(batch)
        batch_stats = [s for s in self.stats.values() if s.source == "gradient"]
        example_stats = [s for s in self.stats.values() if s.source == "example_gradient"]
        labels = None
        if {"class_grad", "class_grad_sq"} & set(self.stats):
            labels = class_labels(batch, self.num_classes)
        with torch.no_grad():
            if batch_stats:
                for name, (g, w) in self._grads(model, batch, index).items():
                    for stat in batch_stats:
                        stat.add_grad(self.target(name, stat), g, w)
            for e in range(size if example_stats else 0):
                one = {k: v[e:e + 1] if isinstance(v, torch.Tensor) and v.ndim > 0
                       and v.shape[0] == size else v for k, v in batch.items()}
                label = None if labels is None else int(labels[e])
                for name, (g, w) in self._grads(model, one, index).items():
                    for stat in example_stats:
                        stat.add_grad(self.target(name, stat), g, w, label)
        self.end_batch()
        if labels is not None:
            self.class_counts += torch.bincount(labels.cpu(), minlength=self.num_classes)
        self.n_samples += size
        self.n_tokens += batch_tokens(batch)
