"""Dependency groups: rows (and input columns) that belong together, found from module
names and the model config, with no tracing.

* LLaMA-style attention (also OPT, T5 ``q``/``k``/``v``): ``q_proj`` rows grouped by head
  (``head_dim`` rows each); ``k_proj`` and ``v_proj`` rows grouped by KV head, k and v
  together (GQA).
* BERT attention: ``query``/``key``/``value`` row ``i`` form one group (they share indices);
  likewise DistilBERT ``q_lin``/``k_lin``/``v_lin``.
* GPT-2 fused ``c_attn``: q/k/v rows ``i``, ``H+i``, ``2H+i`` form one group.
* Fused ``query_key_value`` (GPT-NeoX: per head [q, k, v]; Falcon: multi-query [q heads, k, v],
  new architecture per KV group [q heads, k, v], classic per head [q, k, v]) and Phi-3
  ``qkv_proj`` ([q heads, k heads, v heads]): the q slice's heads form one group each, the
  k and v slices of one KV head another.
* MLPs: ``gate_proj``/``up_proj`` row ``i`` with ``down_proj`` input column ``i``; likewise
  BERT ``intermediate.dense`` rows with ``output.dense`` columns, GPT-2 ``c_fc`` with ``c_proj``,
  Phi-3 ``gate_up_proj`` rows ``i`` and ``I+i`` with ``down_proj`` column ``i``, and the
  up/down pairs ``dense_h_to_4h``/``dense_4h_to_h``, ``fc1``/``fc2``, ``lin1``/``lin2``,
  ``wi``(``wi_0``, ``wi_1``)/``wo``.

``report.head_dims[name]`` (rows per head) is set for every projection whose rows form heads;
in every layout above a head's rows are ``head_dim`` consecutive rows.

A group's score aggregates its members (``sum``/``mean``/``max``) and replaces every
member's score, so selection keeps or drops a group as one; each member's own score is kept
in ``report.raw_scores`` / ``raw_column_scores`` and breaks ties inside the group.

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
        for key in ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "d_kv"):
            value = getattr(obj, key, None)
            if isinstance(value, int) and value > 0:
                return value
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if hidden and heads:
        return hidden // heads
    return None


def _first_int(objs: Iterable[object], keys: Iterable[str]) -> int | None:
    keys = list(keys)
    for obj in objs:
        for key in keys:
            value = getattr(obj, key, None) if obj is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _blocks(n: int, size: int) -> torch.Tensor:
    return torch.arange(n).view(-1, size)


def fused_qkv_blocks(model: nn.Module, attn: nn.Module | None, name: str, d_out: int
                     ) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(head_dim, q, k, v)`` for a fused q/k/v projection: ``q`` [n_heads] and ``k``, ``v``
    [n_kv_heads] are the indices of each head's block of ``head_dim`` consecutive rows.
    None when the layout is unknown or does not add up to ``d_out``.

    >>> hd, q, k, v = fused_qkv_blocks(model, attn, "layers.0.attention.query_key_value", 96)
    """
    cfg = getattr(model, "config", None)
    hd = _config_head_dim(model, attn)
    n_q = _first_int((attn, cfg), ("num_heads", "num_attention_heads", "n_head"))
    n_kv = _first_int((attn, cfg), ("num_kv_heads", "num_key_value_heads")) or n_q
    if not hd or not n_q or n_q % n_kv or d_out % hd:
        return None
    last = name.rpartition(".")[2]
    multi_query = bool(getattr(attn, "multi_query", False))
    new_arch = bool(getattr(attn, "new_decoder_architecture", False))
    if last == "query_key_value" and not new_arch and multi_query:  # Falcon multi-query
        n_kv = 1
    if d_out != (n_q + 2 * n_kv) * hd:
        return None
    if last == "qkv_proj":  # Phi-3: [q heads | k heads | v heads]
        q = torch.arange(n_q)
        k = n_q + torch.arange(n_kv)
        v = n_q + n_kv + torch.arange(n_kv)
    elif last != "query_key_value":
        return None
    elif new_arch:  # Falcon new architecture: per KV group [q heads of the group, k, v]
        per = n_q // n_kv + 2
        base = torch.arange(n_kv) * per
        q = (base[:, None] + torch.arange(per - 2)).flatten()
        k, v = base + per - 2, base + per - 1
    elif multi_query:  # Falcon multi-query: [q heads | k | v]
        q, k, v = torch.arange(n_q), torch.tensor([n_q]), torch.tensor([n_q + 1])
    else:  # GPT-NeoX and classic Falcon: per head [q, k, v]
        if n_kv != n_q:
            return None
        base = torch.arange(n_q) * 3
        q, k, v = base, base + 1, base + 2
    return hd, q, k, v


def _head_rows(blocks: torch.Tensor, hd: int) -> torch.Tensor:
    """Row indices [len(blocks), hd] of the given head blocks."""
    return blocks[:, None] * hd + torch.arange(hd)


# (up, down) layer pairs of plain MLPs: up row i feeds down input column i
_MLP_PAIRS = (("dense_h_to_4h", "dense_4h_to_h"), ("fc1", "fc2"), ("lin1", "lin2"),
              ("wi", "wo"), ("wi_0", "wo"), ("c_fc", "c_proj"))
# k/v projection -> its q sibling (k/v without a targeted q still form KV heads)
_Q_OF = {"k_proj": "q_proj", "v_proj": "q_proj", "k": "q", "v": "q", "key": "query",
         "value": "query", "k_lin": "q_lin", "v_lin": "q_lin"}
# names of attention projections whose rows should form heads (for head_aligned warnings)
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "q_lin", "k_lin",
                    "v_lin", "q", "k", "v", "c_attn", "query_key_value", "qkv_proj", "Wqkv",
                    "qkv", "in_proj")


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
        if last in ("q_proj", "q") and name not in done:
            hd = _config_head_dim(model, attn)
            kv_names = ("k_proj", "v_proj") if last == "q_proj" else ("k", "v")
            if hd and linear_shape(modules[name])[0] % hd == 0:
                groups.append(DependencyGroup("head", [rows(name, hd)]))
                head_dims[name] = hd
                kv = [prefix + p for p in kv_names if prefix + p in present]
                kv = [n for n in kv if linear_shape(modules[n])[0] % hd == 0]
                if kv:
                    groups.append(DependencyGroup("kv_head", [rows(n, hd) for n in kv]))
                    head_dims.update({n: hd for n in kv})
                    done.update(kv)
            done.add(name)
        elif last in ("query", "q_lin") and name not in done:
            hd = _config_head_dim(model, attn)
            trio = ("query", "key", "value") if last == "query" else ("q_lin", "k_lin", "v_lin")
            qkv = [prefix + p for p in trio if prefix + p in present]
            coupled("qkv", [rows(n) for n in qkv])
            if hd:
                head_dims.update({n: hd for n in qkv if linear_shape(modules[n])[0] % hd == 0})
            done.update(qkv)
        elif last in _Q_OF and name not in done and prefix + _Q_OF[last] not in present:
            # k/v whose q is not a target: still heads (KV heads), grouped on their own
            hd = _config_head_dim(model, attn)
            if hd and linear_shape(modules[name])[0] % hd == 0:
                groups.append(DependencyGroup("kv_head", [rows(name, hd)]))
                head_dims[name] = hd
            done.add(name)
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
        elif last in ("query_key_value", "qkv_proj"):
            layout = fused_qkv_blocks(model, attn, name, linear_shape(modules[name])[0])
            if layout is not None:
                hd, q, k, v = layout
                groups.append(DependencyGroup("head", [(name, "rows", _head_rows(q, hd))]))
                groups.append(DependencyGroup("kv_head", [(name, "rows", _head_rows(k, hd)),
                                                          (name, "rows", _head_rows(v, hd))]))
                head_dims[name] = hd
        elif last == "gate_up_proj":  # Phi-3: [gate | up] halves, then down_proj columns
            d_out = linear_shape(modules[name])[0]
            if d_out % 2 == 0:
                half = torch.arange(d_out // 2).view(-1, 1)
                members = [(name, "rows", half), (name, "rows", half + d_out // 2)]
                if prefix + "down_proj" in present:
                    members.append(cols(prefix + "down_proj"))
                coupled("mlp", members)
        elif last == "gate_proj" or (last == "up_proj" and prefix + "gate_proj" not in present):
            members = [rows(prefix + p) for p in ("gate_proj", "up_proj") if prefix + p in present]
            if prefix + "down_proj" in present:
                members.append(cols(prefix + "down_proj"))
            coupled("mlp", members)
        elif name.endswith("intermediate.dense"):
            down = name[: -len("intermediate.dense")] + "output.dense"
            if down in present:
                coupled("mlp", [rows(name), cols(down)])
        elif last == "wi_1" and prefix + "wi_0" in present:
            continue  # coupled with wi_0 below
        else:
            for up, down in _MLP_PAIRS:
                if last == up and prefix + down in present:
                    members = [rows(name)]
                    if up == "wi_0" and prefix + "wi_1" in present:
                        members.append(rows(prefix + "wi_1"))
                    coupled("mlp", members + [cols(prefix + down)])
                    break
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
    # each member keeps its own score as the tie-break inside its group
    raw = {n: report.raw_scores.get(n, report.scores[n]).clone()
           for n in scores if n in report.raw_scores
           or not torch.equal(scores[n], report.scores[n])}
    raw_cols = {n: report.raw_column_scores.get(n, report.column_scores[n]).clone()
                for n in columns if n in report.raw_column_scores
                or not torch.equal(columns[n], report.column_scores[n])}
    return ImportanceReport(scores=scores, shapes=dict(report.shapes), metric=report.metric,
                            column_scores=columns, head_dims=dict(report.head_dims),
                            meta={**report.meta, "group_reduce": reduce},
                            raw_scores=raw, raw_column_scores=raw_cols)


def group_scores(report: ImportanceReport, name: str, reduce: str = "sum") -> torch.Tensor:
    """Scores of the heads of ``name`` (``report.head_dims[name]`` consecutive rows each).

    >>> group_scores(report, "model.layers.0.self_attn.q_proj")   # [num_heads]
    """
    if name not in report.head_dims:
        raise KeyError(f"{name!r} has no head groups in this report; known: "
                       f"{list(report.head_dims)[:4]}")
    s = report.scores[name].view(-1, report.head_dims[name])
    return {"sum": s.sum(1), "mean": s.mean(1), "max": s.max(1).values}[reduce]
