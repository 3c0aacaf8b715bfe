"""The naive ``.grad``-based calibration pass: the reference the hook pass is tested and
benchmarked against (``score(..., method="naive")``).

Only the target weights require grad; each batch runs ``loss.backward()``, which fills a
full ``.grad`` buffer for every target weight at once, then the statistics are read from
``.grad`` and the buffers dropped. Supports the gradient statistics ``taylor``,
``grad_sum`` and ``grad_sq`` (``taylor``, ``taylor_abs``, ``fisher``, ``hessian``).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..targets import is_conv1d, row_weight
from .calibration import (accumulate, accumulation_dtype, batch_loss, batch_size,
                          batch_tokens, mix_seed)
from .metrics import ModuleStats

NAIVE_STATS = frozenset({"taylor", "grad_sum", "grad_sq"})


class NaiveGradientCollector:
    """Fills :class:`ModuleStats` from ``weight.grad`` (call inside score()'s state guard,
    which restores ``requires_grad`` and ``.grad`` afterwards)."""

    def __init__(self, modules: Mapping[str, nn.Module], needs: Iterable[str], seed: int = 0):
        self.modules = dict(modules)
        self.needs = frozenset(needs)
        unsupported = self.needs - NAIVE_STATS
        if unsupported:
            raise ValueError(f"method='naive' computes only taylor, taylor_abs, fisher and "
                             f"hessian (needs {sorted(unsupported)} are hook-only); use "
                             "method='hooks'.")
        self.stats = {name: ModuleStats(seed=mix_seed(seed, i))
                      for i, name in enumerate(self.modules)}
        self.n_samples = 0
        self.n_tokens = 0

    def attach(self) -> None:
        for module in self.modules.values():
            module.weight.requires_grad_(True)
            module.weight.grad = None

    def detach(self) -> None:
        for module in self.modules.values():
            module.weight.grad = None

    def run_batch(self, model: nn.Module, batch: Mapping[str, Any], index: int) -> None:
        with torch.enable_grad():
            batch_loss(model, batch, index).backward()
        with torch.no_grad():
            for name, module in self.modules.items():
                st = self.stats[name]
                w = row_weight(module).detach()
                acc = accumulation_dtype(w)
                grad = module.weight.grad
                if grad is None:
                    grad = torch.zeros_like(module.weight)
                g = (grad.t() if is_conv1d(module) else grad).to(acc)
                wf = w.to(acc)
                if "taylor" in self.needs:
                    wg = wf * g
                    rows, cols = wg.sum(1), wg.sum(0)
                    st.taylor_rows = accumulate(st.taylor_rows, rows)
                    st.taylor_cols = accumulate(st.taylor_cols, cols)
                    st.taylor_rows_sq = accumulate(st.taylor_rows_sq, rows * rows)
                    st.taylor_cols_sq = accumulate(st.taylor_cols_sq, cols * cols)
                if "grad_sum" in self.needs:
                    st.grad_sum = accumulate(st.grad_sum, g)
                if "grad_sq" in self.needs:
                    h = wf.square() * g.square()
                    st.hessian_rows = accumulate(st.hessian_rows, h.sum(1))
                    st.hessian_cols = accumulate(st.hessian_cols, h.sum(0))
                st.n_batches += 1
                module.weight.grad = None
        self.n_samples += batch_size(batch)
        self.n_tokens += batch_tokens(batch)

    def finalize(self) -> dict[str, ModuleStats]:
        return self.stats

