"""Measurements for quantized (4-bit) bases: rows with a residual start vs PEFT QLoRA / LoftQ
at equal trainable parameters (issue 16).

* :func:`loftq_init` - the one-iteration LoftQ start of a PEFT LoRA over a 4-bit base:
  ``scaling * B @ A`` = the best rank-``r`` approximation (SVD) of ``W - deq(Q)`` (PEFT's own
  LoftQ needs CUDA; this is its algorithm with one iteration, on any device).
* :func:`step0_errors` - output error vs the float model at step 0 (mean next-token KL, logit
  MSE), the authors' nuclear-norm repair ratio and trainable counts for plain 4-bit, 4-bit +
  residual rows, QLoRA (zero init) and LoftQ at equal trainable parameters.
* :func:`merge_errors` - merged-vs-unmerged output error and task loss of the row merges
  (``float`` / ``4bit`` / ``requantize``) and of QLoRA's requantized merge
  (:func:`qlora_merge`: PEFT's algorithm, dequantize, add ``scaling * B @ A``, quantize anew).
* :func:`update_survival` - how much of a trained update a 4-bit merge keeps: the merged
  weight change projected on the update, the share of 4-bit codes that changed, and the size
  of the update's entries against the NF4 step of their block.

Usage::

    from rowsft_nb.bench.quant import step0_errors
    table = step0_errors(float_model, rs.quantize(copy.deepcopy(float_model), "nf4"), plan,
                         batches)
    table["loftq"]["kl"], table["residual_rows"]["nuclear_ratio"]
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .. import quant as Q
from ..plan import RowPlan

__all__ = ["loftq_init", "lora_layers", "lora_nuclear_ratio", "step0_errors", "task_loss",
           "qlora_merge", "merge_errors", "row_updates", "lora_updates", "update_survival",
           "blocks_changed_outside"]


def _rank(plan: RowPlan, lora_rank: int | None) -> int:
    k = max(1, round(plan.equivalent_lora_rank())) if lora_rank is None else int(lora_rank)
    if k < 1:
        raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
    return k


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_layers(peft_model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """``{name: PEFT LoRA layer}`` for base-model module names (the layer holds
    ``base_layer``, ``lora_A/B["default"]``, ``scaling["default"]``); ``KeyError`` naming a
    module that PEFT did not wrap. ``>>> lora_layers(peft_model, plan.modules)``"""
    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    out = {}
    for name in names:
        layer = inner.get_submodule(name)
        if not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
            raise KeyError(f"{name} carries no LoRA adapter 'default' (target it first)")
        out[name] = layer
    return out


def _float_weights(float_model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    from ..targets import row_weight

    return {n: row_weight(float_model.get_submodule(n)).detach().float() for n in names}


@torch.no_grad()
def loftq_init(peft_model: nn.Module, float_model: nn.Module, names: Iterable[str],
               rank: int) -> None:
    """LoftQ's start (one iteration) on a PEFT LoRA over a 4-bit base, in place: for each
    module, ``scaling * B @ A`` = the rank-``rank`` truncated SVD of ``W - deq(Q)`` (W: the
    float model's weight), split ``B = U sqrt(S) / sqrt(s)``, ``A = sqrt(S) Vh / sqrt(s)``.
    The 4-bit base is not changed (one iteration: Q = NF4(W) already).

    >>> loftq_init(lora, float_model, plan.modules, rank=16)
    """
    if int(rank) < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    layers = lora_layers(peft_model, names)
    weights = _float_weights(float_model, layers)
    for name, layer in layers.items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if A.shape[0] != int(rank):
            raise ValueError(f"{name}: the LoRA rank is {A.shape[0]}, not {rank}")
        R = weights[name].to(A.device) - Q.dequantize_weight(layer.base_layer).to(A.device)
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        s = S[:rank].sqrt() / float(layer.scaling["default"]) ** 0.5
        B.copy_((U[:, :rank] * s).to(B.dtype))
        A.copy_((s.unsqueeze(1) * Vh[:rank]).to(A.dtype))


@torch.no_grad()
def lora_nuclear_ratio(peft_model: nn.Module, float_model: nn.Module,
                       names: Iterable[str]) -> float:
    """The authors' repair ratio for a LoRA over a 4-bit base, summed over modules:
    ``1 - sum ||W - deq(Q) - scaling B A||_* / sum ||W - deq(Q)||_*`` (0 for a zero start).

    >>> lora_nuclear_ratio(lora, float_model, plan.modules)
    """
    layers = lora_layers(peft_model, names)
    if all(not l.lora_B["default"].weight.any() for l in layers.values()):
        return 0.0   # B = 0 (QLoRA's start): the adapter repairs nothing, no SVD needed
    weights = _float_weights(float_model, layers)
    num = den = 0.0
    for name, layer in layers.items():
        R = (weights[name] - Q.dequantize_weight(layer.base_layer).cpu()).double()
        D = layer.get_delta_weight("default").detach().double().cpu()
        num += Q._nuclear(R - D)
        den += Q._nuclear(R)
    return 1.0 - num / den if den > 0 else 0.0


def _errors(reference: nn.Module, model: nn.Module, batches: Sequence[Mapping]) -> dict:
    e = Q.output_error(reference, model, batches)
    return {"kl": e["kl"], "logit_mse": e["logit_mse"]}


def step0_errors(float_model: nn.Module, quantized_model: nn.Module, plan: RowPlan,
                 batches: Sequence[Mapping[str, torch.Tensor]], *,
                 lora_rank: int | None = None) -> dict[str, dict[str, Any]]:
    """Step-0 output error against ``float_model`` on ``batches`` for ``plain_4bit``,
    ``residual_rows`` (``plan``'s rows, ``init="residual"``), ``qlora`` (PEFT LoRA, B = 0)
    and ``loftq`` (:func:`loftq_init`), LoRA at ``lora_rank`` (default: the plan's equal
    rank, ``round(plan.equivalent_lora_rank())``). Each entry: ``kl`` (mean next-token
    KL(float || model)), ``logit_mse``, ``trainable`` (parameter count), ``nuclear_ratio``
    (the authors' ``1 - ||W - W_model||_* / ||W - deq(Q)||_*`` summed over the plan's
    modules; None for plain 4-bit) and, for the LoRA rows, ``rank``. ``quantized_model`` is
    not changed (each variant adapts a copy). Needs peft.

    >>> step0_errors(float_model, q_model, plan, batches)["loftq"]["kl"]
    """
    from .baselines import apply_lora, require_peft

    require_peft()
    if not isinstance(plan, RowPlan):
        raise TypeError(f"plan must be a RowPlan, got {type(plan).__name__}")
    if Q.quant_settings(quantized_model) is None:
        raise ValueError("quantized_model has no quantized layers: quantize a copy first "
                         "(rs.quantize(copy.deepcopy(model), 'nf4'))")
    k = _rank(plan, lora_rank)
    batches = list(batches)
    names = list(plan.modules)
    out: dict[str, dict[str, Any]] = {}
    out["plain_4bit"] = {**_errors(float_model, quantized_model, batches), "trainable": 0,
                         "nuclear_ratio": None}
    from ..adapter.model import inject

    with warnings.catch_warnings():  # rows ranked on the float copy, as the authors do
        warnings.filterwarnings("ignore", message="the plan was selected on weights")
        rows = inject(copy.deepcopy(quantized_model), plan, init="residual",
                      reference=float_model, modules_to_save=None)
    nn_rep = Q.nuclear_norm_report(rows, float_model)
    out["residual_rows"] = {**_errors(float_model, rows, batches), "trainable": _trainable(rows),
                            "nuclear_ratio": nn_rep["overall"],
                            "nuclear_ratio_mean": nn_rep["mean"]}
    del rows
    lora = apply_lora(copy.deepcopy(quantized_model), plan, rank=k)
    out["qlora"] = {**_errors(float_model, lora, batches), "trainable": _trainable(lora),
                    "nuclear_ratio": lora_nuclear_ratio(lora, float_model, names), "rank": k}
    loftq_init(lora, float_model, names, k)
    out["loftq"] = {**_errors(float_model, lora, batches), "trainable": _trainable(lora),
                    "nuclear_ratio": lora_nuclear_ratio(lora, float_model, names), "rank": k}
    return out


# ---------------------------------------------------------------------------- merges
@torch.no_grad()
def task_loss(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Mean next-token NLL over the labelled tokens (``labels != -100``, shifted by one) of
    ``batches``, eval mode, no grad: the task metric of a causal LM before/after a merge.

    >>> task_loss(merged, eval_batches)
    """
    tot, n = 0.0, 0
    was = model.training
    model.eval()
    try:
        for b in batches:
            if "labels" not in b:
                raise ValueError("task_loss needs batches with 'labels'")
            inputs = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
            logits = model(**inputs).logits[:, :-1].float()
            lab = b["labels"][:, 1:]
            mask = lab != -100
            nll = -logits.log_softmax(-1).gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            tot += float(nll[mask].sum())
            n += int(mask.sum())
    finally:
        model.train(was)
    if n == 0:
        raise ValueError("task_loss: the batches hold no labelled tokens")
    return tot / n


@torch.no_grad()
def qlora_merge(peft_model: nn.Module, into: str = "requantize") -> nn.Module:
    """Merge a PEFT LoRA over 4-bit layers and unload it, in place; returns the plain model.
    ``into="requantize"``: PEFT's bitsandbytes ``Linear4bit.merge`` (dequantize, add
    ``scaling * B @ A``, quantize every block anew with the layer's settings);
    ``into="float"``: the float sum ``deq(Q) + scaling * B @ A`` as ``nn.Linear``.

    >>> merged = qlora_merge(copy.deepcopy(lora))
    """
    if into not in ("requantize", "float"):
        raise ValueError(f"into must be 'requantize' or 'float', got {into!r}")
    inner = peft_model.get_base_model()
    names = [n for n, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    for name, layer in lora_layers(peft_model, names).items():
        base = layer.base_layer
        if not Q.is_quantized_layer(base):
            raise ValueError(f"{name}: the LoRA base is not quantized ({type(base).__name__})")
        W = Q.dequantize_weight(base) + layer.get_delta_weight("default").float()
        if into == "requantize":
            layer.base_layer = Q.requantize_layer(base, W)
        else:
            lin = Q._float_linear(base, torch.float32)
            lin.weight.copy_(W)
            layer.base_layer = lin
    return peft_model.unload()


def _merged_row(reference: nn.Module, merged: nn.Module, batches: Sequence[Mapping]
                ) -> dict[str, float]:
    return {**_errors(reference, merged, batches), "task_loss": task_loss(merged, batches)}


def merge_errors(rows_model: nn.Module | None, lora_model: nn.Module | None,
                 batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """Merged-vs-unmerged output error (``kl``, ``logit_mse`` on ``batches``) and task loss
    (:func:`task_loss`) after each merge, the models themselves left unchanged (each merge
    works on a copy). ``rows_model`` (row adapter over a 4-bit base): merges ``float`` (the
    authors'), ``4bit`` (only the selected rows' blocks), ``requantize`` (QLoRA-style);
    ``lora_model`` (PEFT LoRA over a 4-bit base): ``float`` and ``requantize`` (PEFT's
    algorithm, :func:`qlora_merge`). Either may be None. Each method also has
    ``unmerged_task_loss``.

    >>> merge_errors(rows, lora, eval_batches)["qlora"]["requantize"]["task_loss"]
    """
    from ..adapter.model import merge_and_unload

    batches = list(batches)
    out: dict[str, dict[str, Any]] = {}
    if rows_model is not None:
        res: dict[str, Any] = {"unmerged_task_loss": task_loss(rows_model, batches)}
        for into in Q.MERGE_MODES:
            merged = merge_and_unload(copy.deepcopy(rows_model), into=into)
            res[into] = _merged_row(rows_model, merged, batches)
            del merged
        out["rows"] = res
    if lora_model is not None:
        res = {"unmerged_task_loss": task_loss(lora_model, batches)}
        for into in ("float", "requantize"):
            merged = qlora_merge(copy.deepcopy(lora_model), into)
            res[into] = _merged_row(lora_model, merged, batches)
            del merged
        out["qlora"] = res
    return out


# ---------------------------------------------------------------------------- survival
@torch.no_grad()
def row_updates(model: nn.Module, initial: Mapping[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
    """``{name: [d_out, d_in] float}``: the dense update ``S^T (delta - initial)`` of each
    adapted row layer (``initial``: the deltas at the start, e.g. the residual init's
    :func:`rowsft_nb.quant.residual_deltas`; None: zeros).

    >>> row_updates(rows_model, initial=start_deltas)
    """
    from ..adapter.model import adapted_modules

    out = {}
    for name, layer in adapted_modules(model).items():
        if layer.delta is None:
            continue
        d = layer.delta.detach().float().cpu()
        if initial is not None and name in initial:
            d = d - initial[name].float().cpu()
        U = torch.zeros(layer.out_features, layer.in_features)
        U.index_copy_(0, layer.rows.cpu(), d)
        out[name] = U
    return out


@torch.no_grad()
def lora_updates(peft_model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """``{name: scaling * B @ A}`` (float, [d_out, d_in]) of a PEFT LoRA.
    ``>>> lora_updates(lora, plan.modules)``"""
    return {n: l.get_delta_weight("default").detach().float().cpu()
            for n, l in lora_layers(peft_model, names).items()}


def _base(model: nn.Module, name: str) -> nn.Module:
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    m = model.get_submodule(name)
    return getattr(m, "base_layer", m)


def _half_steps(layer: nn.Module, direction: torch.Tensor) -> torch.Tensor:
    """Per element of a 4-bit layer: half the distance from its code to the next code in
    ``direction`` (sign; the inward neighbour at the ends of the code table), times its
    block's absmax: how far the value must move to round to another code."""
    st = Q._state(layer)
    shape = tuple(int(s) for s in st.shape)
    code = st.code.float().cpu()
    order = torch.argsort(code)
    srt = code[order]
    pos = torch.empty_like(order)
    pos[order] = torch.arange(len(order))
    gaps = srt[1:] - srt[:-1]
    up = torch.cat([gaps, gaps[-1:]])       # gap above sorted position p (inward at the top)
    down = torch.cat([gaps[:1], gaps])      # gap below sorted position p
    p = pos[Q._codes(layer).long().cpu()]
    n, bs = p.numel(), int(st.blocksize)
    am = Q._absmax(layer).float().cpu().repeat_interleave(bs)[:n]
    step = torch.where(direction.reshape(-1) >= 0, up[p], down[p]) * am / 2
    return step.reshape(shape)


@torch.no_grad()
def update_survival(before: nn.Module, after: nn.Module, updates: Mapping[str, torch.Tensor],
                    *, sample: int = 20000, seed: int = 0) -> dict[str, Any]:
    """How much of ``updates`` (``{name: [d_out, d_in]}``, e.g. :func:`row_updates` /
    :func:`lora_updates`) a 4-bit merge kept: ``before`` holds the 4-bit base the adapter
    trained on (Q0; a wrapper's ``base_layer`` is read), ``after`` the merged 4-bit model.
    Per module and overall (sums over modules): ``kept`` = ``<D, U> / <U, U>`` with
    ``D = deq(after) - deq(before)`` (1: the update fully carried, 0: erased), ``rel_error``
    = ``||D - U|| / ||U||``, ``codes_changed`` (share of all 4-bit codes that differ) and
    ``codes_changed_support`` (among the update's nonzero entries), ``step_ratio_median``
    / ``q90`` (|U| over half the NF4 step towards the update's sign at the entry's code and
    block absmax: below 1 an entry starting on its code cannot change it alone; overall from
    a seeded sample of ``sample`` entries per module) and ``above_half_step`` (share of
    support entries with ratio > 1).

    >>> update_survival(q0_model, merged_4bit, lora_updates(lora, plan.modules))["overall"]
    """
    g = torch.Generator().manual_seed(seed)
    per: dict[str, dict[str, float]] = {}
    tot = {"uu": 0.0, "du": 0.0, "dd_err": 0.0, "changed": 0, "n": 0, "sup_changed": 0,
           "sup": 0, "above": 0}
    samples = []
    for name, U in updates.items():
        b, a = _base(before, name), _base(after, name)
        if not (Q._is_4bit(b) and Q._is_4bit(a)):
            raise ValueError(f"{name}: update_survival needs 4-bit layers before and after "
                             f"the merge, got {type(b).__name__} / {type(a).__name__}")
        U = U.float().cpu()
        D = Q.dequantize_weight(a).cpu() - Q.dequantize_weight(b).cpu()
        changed = Q._codes(a).cpu() != Q._codes(b).cpu()
        support = (U != 0).reshape(-1)
        ratio = (U.abs() / _half_steps(b, U).clamp(min=1e-30)).reshape(-1)[support]
        uu, du = float((U * U).sum()), float((D * U).sum())
        err = float(((D - U) ** 2).sum())
        n_sup = int(support.sum())
        above = int((ratio > 1).sum())
        pick = ratio[torch.randperm(ratio.numel(), generator=g)[:sample]]
        samples.append(pick)
        per[name] = {"kept": du / uu if uu > 0 else float("nan"),
                     "rel_error": (err / uu) ** 0.5 if uu > 0 else float("nan"),
                     "codes_changed": float(changed.float().mean()),
                     "codes_changed_support": (float(changed[support].float().mean())
                                               if n_sup else 0.0),
                     "step_ratio_median": float(pick.median()) if n_sup else 0.0,
                     "above_half_step": above / n_sup if n_sup else 0.0}
        tot["uu"] += uu
        tot["du"] += du
        tot["dd_err"] += err
        tot["changed"] += int(changed.sum())
        tot["n"] += changed.numel()
        tot["sup_changed"] += int(changed[support].sum())
        tot["sup"] += n_sup
        tot["above"] += above
    if not per:
        raise ValueError("update_survival: no updates given")
    allr = torch.cat(samples) if samples else torch.zeros(1)
    overall = {"kept": tot["du"] / tot["uu"] if tot["uu"] > 0 else float("nan"),
               "rel_error": (tot["dd_err"] / tot["uu"]) ** 0.5 if tot["uu"] > 0 else float("nan"),
               "codes_changed": tot["changed"] / tot["n"],
               "codes_changed_support": tot["sup_changed"] / max(tot["sup"], 1),
               "support_fraction": tot["sup"] / tot["n"],
               "update_norm": tot["uu"] ** 0.5,
               "step_ratio_median": float(allr.median()) if allr.numel() else 0.0,
               "step_ratio_q90": float(allr.quantile(0.9)) if allr.numel() else 0.0,
               "above_half_step": tot["above"] / max(tot["sup"], 1)}
    return {"per_module": per, "overall": overall}


@torch.no_grad()
def blocks_changed_outside(before: nn.Module, after: nn.Module, plan: RowPlan
                           ) -> dict[str, int]:
    """Count the NF4 blocks whose packed codes or stored absmax differ between two 4-bit
    models with the same module names (``before``: the base, ``after``: merged), split into
    blocks that hold a selected row of ``plan`` (``inside``) and all others (``outside``;
    a 4-bit merge of rows must leave it 0). Layers outside the plan count whole.

    >>> blocks_changed_outside(q0_model, merged, plan)["outside"]
    """
    inside = outside = inside_total = 0
    for name, m in before.named_modules():
        if not Q._is_4bit(m):
            continue
        name = name.removesuffix(".base_layer")
        a = _base(after, name)
        if not Q._is_4bit(a):
            raise ValueError(f"{name} is not 4-bit in the merged model ({type(a).__name__})")
        st_b, st_a = Q._state(m), Q._state(a)
        d_out, d_in = (int(s) for s in st_b.shape)
        n, bs = d_out * d_in, int(st_b.blocksize)
        nb = (n + bs - 1) // bs
        diff = torch.zeros(nb * bs, dtype=torch.bool)
        diff[:n] = Q._codes(m).cpu() != Q._codes(a).cpu()
        blk = diff.view(nb, bs).any(1) | (st_b.absmax.cpu() != st_a.absmax.cpu())[:nb]
        mine = torch.zeros(nb, dtype=torch.bool)
        rows = plan.rows.get(name)
        if rows is not None and rows.numel():
            mine[Q._blocks_of_rows(torch.as_tensor(rows), d_in, bs, n)] = True
        inside += int((blk & mine).sum())
        outside += int((blk & ~mine).sum())
        inside_total += int(mine.sum())
    return {"inside": inside, "outside": outside, "inside_total": inside_total}
