"""Dependency groups: rows (and input columns) that belong together, found from module
names and the model config, with no tracing.

* LLaMA-style attention: ``q_proj`` rows grouped by head (``head_dim`` rows each); ``k_proj``
  and ``v_proj`` rows grouped by KV head, k and v together (GQA).
* BERT attention: ``query``/``key``/``value`` row ``i`` form one group (they share indices).
* GPT-2 fused ``c_attn``: q/k/v rows ``i``, ``H+i``, ``2H+i`` form one group.
* MLPs: ``gate_proj``/``up_proj`` row ``i`` with ``down_proj`` input column ``i``; likewise
  BERT ``intermediate.dense`` rows with ``output.dense`` columns, GPT-2 ``c_fc`` with ``c_proj``.

A group's score aggregates its members (``sum``/``mean``/``max``) and replaces every
member's score, so selection keeps or drops a group as one.

Usage::

    groups, head_dims = find_groups(model, report.modules)
    grouped = apply_groups(report, groups, reduce="sum")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..targets import linear_shape
from .report import ImportanceReport

REDUCTIONS = ("sum", "mean", "max")


@dataclass
class DependencyGroup:
    """``members``: ``(module name, "rows" | "cols", index [n_groups, k])``; group ``g`` is
    made of the ``index[g]`` rows/columns of every member."""

    kind: str
    members: list[tuple[str, str, torch.Tensor]]

    @property
    def n_groups(self) -> int:
        return int(self.members[0][2].shape[0])


def _config_head_dim(model: nn.Module, attn: nn.Module | None) -> int | None:
    for obj in (attn, getattr(model, "config", None)):
        if obj is None:
            continue
        for key in ("head_dim", "attention_head_size"):
            value = getattr(obj, key, None)
            if isinstance(value, int) and value > 0:
                return value
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if hidden and heads:
        return hidden // heads
    return None


def _blocks(n: int, size: int) -> torch.Tensor:
    return torch.arange(n).view(-1, size)


def find_groups(model: nn.Module, names: Iterable[str]
                ) -> tuple[list[DependencyGroup], dict[str, int]]:
    """Dependency groups among the target modules ``names``, and ``{name: rows per head}``
    for attention projections whose rows form heads.

    >>> groups, head_dims = find_groups(model, find_targets(model))
    """
    names = list(names)
    present = set(names)
    modules = dict(model.named_modules())
    groups: list[DependencyGroup] = []
    head_dims: dict[str, int] = {}
    done: set[str] = set()

    def rows(name: str, size: int = 1) -> tuple[str, str, torch.Tensor]:
        return (name, "rows", _blocks(linear_shape(modules[name])[0], size))

    def cols(name: str) -> tuple[str, str, torch.Tensor]:
        return (name, "cols", _blocks(linear_shape(modules[name])[1], 1))

    def coupled(kind: str, members: list[tuple[str, str, torch.Tensor]]) -> None:
        sizes = {m[2].shape[0] for m in members}
        if len(members) >= 2 and len(sizes) == 1:
            groups.append(DependencyGroup(kind, members))

    for name in names:
        parent, _, last = name.rpartition(".")
        prefix = parent + "." if parent else ""
        attn = modules.get(parent)
        if last == "q_proj" and name not in done:
            hd = _config_head_dim(model, attn)
            if hd and linear_shape(modules[name])[0] % hd == 0:
                groups.append(DependencyGroup("head", [rows(name, hd)]))
                head_dims[name] = hd
                kv = [prefix + p for p in ("k_proj", "v_proj") if prefix + p in present]
                kv = [n for n in kv if linear_shape(modules[n])[0] % hd == 0]
                if kv:
                    groups.append(DependencyGroup("kv_head", [rows(n, hd) for n in kv]))
                    head_dims.update({n: hd for n in kv})
            done.add(name)
        elif last == "query" and name not in done:
            hd = _config_head_dim(model, attn)
            qkv = [prefix + p for p in ("query", "key", "value") if prefix + p in present]
            coupled("qkv", [rows(n) for n in qkv])
            if hd:
                head_dims.update({n: hd for n in qkv if linear_shape(modules[n])[0] % hd == 0})
            done.update(qkv)
        elif last == "c_attn":
            d_out = linear_shape(modules[name])[0]
            if d_out % 3 == 0:
                third = d_out // 3
                idx = torch.arange(third).view(-1, 1)
                groups.append(DependencyGroup(
                    "qkv", [(name, "rows", idx), (name, "rows", idx + third),
                            (name, "rows", idx + 2 * third)]))
                hd = _config_head_dim(model, None)
                if hd and third % hd == 0:
                    head_dims[name] = hd
        elif last == "gate_proj" or (last == "up_proj" and prefix + "gate_proj" not in present):
            members = [rows(prefix + p) for p in ("gate_proj", "up_proj") if prefix + p in present]
            if prefix + "down_proj" in present:
                members.append(cols(prefix + "down_proj"))
            coupled("mlp", members)
        elif name.endswith("intermediate.dense"):
            down = name[: -len("intermediate.dense")] + "output.dense"
            if down in present:
                coupled("mlp", [rows(name), cols(down)])
        elif last == "c_fc" and prefix + "c_proj" in present:
            coupled("mlp", [rows(name), cols(prefix + "c_proj")])
    return groups, head_dims


def apply_groups(report: ImportanceReport, groups: Iterable[DependencyGroup],
                 reduce: str = "sum") -> ImportanceReport:
    """A copy of ``report`` where every member of a group carries the group's score
    (``reduce`` of its members' scores). Members whose column scores are missing are
    left out of the group.

    >>> grouped = apply_groups(report, find_groups(model, report.modules)[0], "mean")
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"Unknown group_reduce {reduce!r}; choose one of {REDUCTIONS}")
    scores = {k: v.clone() for k, v in report.scores.items()}
    columns = {k: v.clone() for k, v in report.column_scores.items()}
    for group in groups:
        members = [(n, axis, idx) for n, axis, idx in group.members
                   if n in (scores if axis == "rows" else columns)]
        if not members:
            continue
        values = torch.cat([(scores if axis == "rows" else columns)[n][idx]
                            for n, axis, idx in members], dim=1)
        if reduce == "sum":
            agg = values.sum(1)
        elif reduce == "mean":
            agg = values.mean(1)
        else:
            agg = values.max(1).values
        for n, axis, idx in members:
            target = scores if axis == "rows" else columns
            target[n][idx] = agg[:, None].expand_as(idx).to(target[n].dtype)
    return ImportanceReport(scores=scores, shapes=dict(report.shapes), metric=report.metric,
                            column_scores=columns, groups=dict(report.groups),
                            meta={**report.meta, "group_reduce": reduce})


def group_scores(report: ImportanceReport, name: str, reduce: str = "sum") -> torch.Tensor:
    """Scores of the heads of ``name`` (``report.groups[name]`` consecutive rows each).

    >>> group_scores(report, "model.layers.0.self_attn.q_proj")   # [num_heads]
    """
    if name not in report.groups:
        raise KeyError(f"{name!r} has no row groups in this report; known: {list(report.groups)[:4]}")
    s = report.scores[name].view(-1, report.groups[name])
    return {"sum": s.sum(1), "mean": s.mean(1), "max": s.max(1).values}[reduce]
