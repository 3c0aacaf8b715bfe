"""Optional backend on the ``torch-pruning`` package (extra ``prune``): magnitude scores
from Torch-Pruning's ``MagnitudeImportance``, one single-layer group per module, built
by hand so no dependency graph is traced.

Torch-Pruning's ``p``-magnitude is ``sum |w|^p``, the same as the native ``l1``/``l2``
(the authors' p-norm importance, no root).

Usage::

    report = score(model, metric="l2", backend="torch_pruning")
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

TP_METRICS = {"l1": 1, "l2": 2}


def _import_tp():
    try:
        import torch_pruning as tp
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("backend='torch_pruning' needs the torch-pruning package: "
                          "pip install 'rowsft_nb[prune]' (or torch-pruning)") from err
    return tp


def _single_layer_group(tp, module: nn.Module, name: str, pruning_fn, n: int):
    from torch_pruning._helpers import GroupItem
    from torch_pruning.dependency import Dependency, Group, Node

    node = Node(module, None, name)
    dep = Dependency(pruning_fn, pruning_fn, node, node)
    item = GroupItem(dep=dep, idxs=list(range(n)))
    item.root_idxs = list(range(n))
    group = Group()
    group._group.append(item)
    return group


def torch_pruning_scores(modules: Mapping[str, nn.Module], metric: str
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (row scores, column scores)}`` from Torch-Pruning's MagnitudeImportance."""
    if metric not in TP_METRICS:
        raise ValueError(f"backend='torch_pruning' supports metrics {sorted(TP_METRICS)}, "
                         f"not {metric!r}; use the native backend for it.")
    tp = _import_tp()
    p = TP_METRICS[metric]
    imp = tp.importance.MagnitudeImportance(p=p, group_reduction="sum", normalizer=None)
    out = {}
    for name, module in modules.items():
        if type(module) is not nn.Linear:
            raise ValueError(f"backend='torch_pruning' handles nn.Linear only; {name!r} is "
                             f"{type(module).__name__} (GPT-2 Conv1D?). Use the native backend.")
        d_out, d_in = module.weight.shape
        rows = imp(_single_layer_group(tp, module, name, tp.prune_linear_out_channels, d_out))
        cols = imp(_single_layer_group(tp, module, name, tp.prune_linear_in_channels, d_in))
        out[name] = (rows.float(), cols.float())
    return out
