"""Calibration passes: feed batches through the model and gather per-module statistics
(:class:`~rowsft_nb.scoring.metrics.ModuleStats`) with hooks, never with weight gradients.

Gradient statistics use the identity, for one layer ``y = x W^T + b`` over the tokens t of
a batch::

    G = dL/dW = sum_t dy_t^T x_t
    sum_j w_ij G_ij = sum_t dy_ti (y_ti - b_i) = sum_t dy_ti (x_t W^T)_i      (rows)
    sum_i w_ij G_ij = sum_t x_tj (dy_t W)_j                                   (columns)

Every parameter is frozen during the pass (``requires_grad=False``); a forward pre-hook
turns a target's input into a leaf that requires grad when nothing upstream does (so the
graph starts at the first target); a forward hook wraps the target's output in a "gradient
tap" (an identity autograd function that saves the input ``x`` and whose backward receives
``dy``). No ``.grad`` buffer is ever allocated. With ``checkpoint_blocks`` (the default in
``score()``), each transformer block runs under non-reentrant activation checkpointing, so
only block inputs stay alive between forward and backward and a block's activations
(including the tapped ``x``) are recomputed in its backward: about one extra forward pass
of time for most of the activation memory.

Cost per metric, beyond one forward + input-gradient backward:
``taylor``/``fisher``/``class_taylor``: one ``[tokens, d_out]`` and one ``[tokens, d_in]``
temporary per module and two matmuls (``x W^T`` and ``dy W``); ``hessian``: the batch
gradient ``G = dy^T x`` of one module at a time (a transient ``[d_out, d_in]``);
``taylor_abs``: the same plus ``sum_b G`` for every target (float32, the size of the target
weights), since ``|w * sum_b G|`` cannot be reduced per batch. ``hessian`` treats each call
of a module as its own batch term (HF models call each projection once per forward).

``zo_taylor`` runs forward passes only (``torch.no_grad``): per perturbation, a forward
hook adds ``+-eps x Z^T`` to each target's output (the output of ``W +- eps Z``) with a
Gaussian ``Z`` regenerated from a seed, so weights are never written.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..targets import row_weight
from .metrics import GRADIENT_STATS, ModuleStats

BATCH_KEYS = ("input_ids", "pixel_values", "inputs_embeds", "input_values", "labels")


class ScoringDataError(ValueError):
    """The calibration data cannot be used (empty, no labels, non-finite loss...)."""


# ------------------------------------------------------------------------------- batches
def batch_size(batch: Mapping[str, Any]) -> int:
    """Examples in a batch: the leading size of ``input_ids`` (or the first tensor)."""
    for key in (*BATCH_KEYS, *batch.keys()):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise ScoringDataError(f"Batch has no tensor to count examples in (keys: {list(batch)}); "
                           "pass dicts like {'input_ids': ..., 'attention_mask': ..., 'labels': ...}")


def batch_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens in a batch: ``attention_mask.sum()``, else ``input_ids.numel()``, else 0."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def iter_batches(data: Iterable[Mapping[str, Any]], n_samples: int | None,
                 device: torch.device, need_labels: bool
                 ) -> Iterator[tuple[dict[str, Any], int]]:
    """Yield ``(batch on device, examples)`` until ``n_samples`` examples (the last batch
    cut to fit) or the end of ``data``. Raises on empty data or missing labels."""
    if n_samples is not None and n_samples <= 0:
        raise ValueError(f"n_samples must be a positive number of examples, got {n_samples}; "
                         "pass None to use all of the data.")
    if data is None:
        raise ScoringDataError("This metric needs calibration data: pass an iterable of batch "
                               "dicts (a DataLoader or a list), e.g. testing.random_batches(model).")
    if isinstance(data, Mapping):
        raise ScoringDataError("data is a single batch dict; wrap it in a list: data=[batch]")
    seen = 0
    for i, batch in enumerate(data):
        if not isinstance(batch, Mapping):
            raise ScoringDataError(f"Batch {i} is a {type(batch).__name__}, not a dict of "
                                   "tensors; use a collator that returns dicts.")
        if need_labels and batch.get("labels") is None:
            raise ScoringDataError(
                f"Batch {i} has no 'labels' (keys: {list(batch)}), but this metric needs a loss. "
                "Add labels (token ids for a causal LM, class ids for a classifier) or use a "
                "data-free/forward-only metric such as 'l2' or 'wanda'.")
        size = batch_size(batch)
        if n_samples is not None and seen + size > n_samples:
            keep = n_samples - seen
            batch = {k: v[:keep] if isinstance(v, torch.Tensor) and v.ndim > 0
                     and v.shape[0] == size else v for k, v in batch.items()}
            size = keep
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        yield batch, size
        seen += size
        if n_samples is not None and seen >= n_samples:
            return
    if seen == 0:
        raise ScoringDataError("data gave no batches (empty, or an iterator that was already "
                               "consumed); pass a list or a DataLoader with at least one batch.")
    if n_samples is not None and seen < n_samples:
        warnings.warn(f"data ran out after {seen} examples (n_samples={n_samples}); "
                      "scored with what there was.", stacklevel=3)


def forward_kwargs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch plus ``use_cache=False`` where the model's forward takes it."""
    kwargs = dict(batch)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def batch_loss(model: nn.Module, batch: Mapping[str, Any], index: int) -> torch.Tensor:
    """The model's loss on a batch; raises if it is missing or not finite."""
    out = model(**forward_kwargs(model, batch))
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ScoringDataError(f"The model returned no loss for batch {index}: gradient metrics "
                               "need batches with 'labels' the model computes a loss from.")
    if not bool(torch.isfinite(loss.detach()).all()):
        raise FloatingPointError(f"The loss of batch {index} is {float(loss.detach())}: scores would be "
                                 "NaN. Check the labels, the dtype (fp16 overflow?) and the weights.")
    return loss


def accumulation_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (seed, batch, draw, module...)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) % (1 << 64)
    return h % (1 << 63)


# ---------------------------------------------------------------------------- collector
class StatsCollector:
    """Hooks on the target modules that fill one :class:`ModuleStats` per module.

    Usage (``score()`` does this, inside its model-state guard)::

        c = StatsCollector(modules, needs={"taylor"}, seed=0)
        with c.attached():
            for i, (batch, n) in enumerate(iter_batches(...)):
                c.run_batch(model, batch, i)
        c.stats["model.layers.0.mlp.up_proj"].taylor_rows
    """

    def __init__(self, modules: Mapping[str, nn.Module], needs: Iterable[str], seed: int = 0,
                 num_classes: int | None = None, zo_eps: float = 1e-3,
                 zo_perturbations: int = 1, checkpoint_blocks: Iterable[nn.Module] = ()
                 ) -> None:
        self.modules = dict(modules)
        self.checkpoint_blocks = list(checkpoint_blocks)
        self._saved_forwards: list[tuple[nn.Module, Any]] = []
        self.needs = frozenset(needs)
        self.seed = seed
        self.num_classes = num_classes
        self.zo_eps = float(zo_eps)
        self.zo_perturbations = int(zo_perturbations)
        if self.zo_eps <= 0 or self.zo_perturbations <= 0:
            raise ValueError("zo_eps and zo_perturbations must be positive")
        self.index = {name: i for i, name in enumerate(self.modules)}
        self.stats = {name: ModuleStats(seed=mix_seed(seed, i))
                      for name, i in self.index.items()}
        self.n_samples = 0
        self.n_tokens = 0
        self._handles: list[Any] = []
        self._batch_rows: dict[str, torch.Tensor] = {}
        self._batch_cols: dict[str, torch.Tensor] = {}
        self._labels: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._zo: tuple[int, int] | None = None  # (sign, seed) while a ZO forward runs
        self._zo_dirs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.class_counts = torch.zeros(num_classes or 1, dtype=torch.int64)

    @property
    def needs_gradients(self) -> bool:
        return bool(self.needs & GRADIENT_STATS)

    # ---------------------------------------------------------------- hook management
    def attach(self) -> None:
        if self.needs_gradients:
            for block in self.checkpoint_blocks:
                self._saved_forwards.append((block, block.__dict__.get("forward")))
                block.forward = _checkpointed(block.forward)
        for name, module in self.modules.items():
            if self.needs_gradients:
                self._handles.append(module.register_forward_pre_hook(_input_requires_grad))
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block, previous in reversed(self._saved_forwards):
            if previous is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous
        self._saved_forwards.clear()

    # ---------------------------------------------------------------- one batch
    def run_batch(self, model: nn.Module, batch: Mapping[str, Any], index: int) -> None:
        """Run one batch (forward, plus backward or the ZO forwards) and accumulate."""
        size = batch_size(batch)
        mask = batch.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) else None
        if "class" in self.needs:
            self._labels = self._class_labels(batch)
            self.class_counts += torch.bincount(self._labels.cpu(), minlength=self.num_classes)
        if self.needs_gradients:
            with torch.enable_grad():
                loss = batch_loss(model, batch, index)
                loss.backward()
            self._end_gradient_batch(index)
        elif "zo" in self.needs:
            self._zo_batch(model, batch, index)
        else:
            with torch.no_grad():
                model(**forward_kwargs(model, batch))
        for st in self.stats.values():
            st.n_batches += 1
        self.n_samples += size
        self.n_tokens += batch_tokens(batch)
        self._labels = self._mask = None

    def _class_labels(self, batch: Mapping[str, Any]) -> torch.Tensor:
        labels = batch["labels"]
        size = batch_size(batch)
        if labels.ndim != 1 or labels.shape[0] != size or labels.is_floating_point():
            raise ScoringDataError(
                f"class_taylor needs one integer class id per example (labels of shape "
                f"[{size}]); got labels of shape {list(labels.shape)} and dtype {labels.dtype}. "
                "Token labels mean a language model: use 'taylor' there.")
        n = self.num_classes
        if n is None or int(labels.max()) >= n or int(labels.min()) < 0:
            raise ScoringDataError(f"class_taylor: labels must lie in [0, num_labels={n}); got "
                                   f"{int(labels.min())}..{int(labels.max())}")
        return labels

    def _end_gradient_batch(self, index: int) -> None:
        for name, rows in self._batch_rows.items():
            cols = self._batch_cols[name]
            st = self.stats[name]
            if "taylor" in self.needs:
                st.taylor_rows = accumulate(st.taylor_rows, rows)
                st.taylor_cols = accumulate(st.taylor_cols, cols)
                st.taylor_rows_sq = accumulate(st.taylor_rows_sq, rows * rows)
                st.taylor_cols_sq = accumulate(st.taylor_cols_sq, cols * cols)
        self._batch_rows.clear()
        self._batch_cols.clear()
        self._check_finite(index)

    def finalize(self) -> dict[str, ModuleStats]:
        """Zero statistics for modules the data never reached (their gradient is zero), with
        a warning naming them; returns ``self.stats``."""
        untouched = []
        for name, module in self.modules.items():
            st = self.stats[name]
            d_out, d_in = row_weight(module).shape
            w = row_weight(module)
            zeros = lambda *shape: torch.zeros(*shape, dtype=accumulation_dtype(w), device=w.device)
            filled = False
            for field_, size, need in (
                    ("taylor_rows", d_out, "taylor"), ("taylor_cols", d_in, "taylor"),
                    ("taylor_rows_sq", d_out, "taylor"), ("taylor_cols_sq", d_in, "taylor"),
                    ("hessian_rows", d_out, "grad_sq"), ("hessian_cols", d_in, "grad_sq"),
                    ("input_sq", d_in, "input_sq"),
                    ("zo_rows", d_out, "zo"), ("zo_cols", d_in, "zo")):
                if need in self.needs and getattr(st, field_) is None:
                    setattr(st, field_, zeros(size))
                    filled = True
            if "grad_sum" in self.needs and st.grad_sum is None:
                st.grad_sum, filled = zeros(d_out, d_in), True
            if "class" in self.needs and st.class_rows is None:
                c = self.num_classes or 1
                st.class_rows, st.class_cols = zeros(c, d_out), zeros(c, d_in)
                filled = True
            if "class" in self.needs:
                st.class_counts = self.class_counts.clone()
            if filled:
                untouched.append(name)
        if untouched:
            warnings.warn(f"{len(untouched)} target module(s) never influenced the loss or "
                          f"were never called (scored 0): {untouched[:4]}"
                          f"{' ...' if len(untouched) > 4 else ''}", stacklevel=3)
        return self.stats

    def _check_finite(self, index: int) -> None:
        tensors = [(n, t) for n, st in self.stats.items() for t in st.tensors().values()]
        if not tensors:
            return
        sums = torch.stack([t.sum().to(torch.float64).cpu() for _, t in tensors])
        bad = ~torch.isfinite(sums)
        if bool(bad.any()):
            name = tensors[int(torch.nonzero(bad)[0, 0])][0]
            raise FloatingPointError(
                f"Non-finite gradient statistics in {name!r} after batch {index}: the "
                "gradients overflowed or are NaN. Use float32 weights, smaller inputs, or a "
                "forward-only metric such as 'wanda'.")

    # ---------------------------------------------------------------- hooks
    def _forward_hook(self, name: str):
        module = self.modules[name]

        def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            if not args or not isinstance(args[0], torch.Tensor) \
                    or not isinstance(output, torch.Tensor):
                return None
            x = args[0]
            if "input_sq" in self.needs:
                self._accumulate_input_sq(name, x)
            if self._zo is not None:
                return self._perturb(name, module, x, output)
            if self.needs_gradients and output.requires_grad:
                # the tap saves x through autograd (so block checkpointing can drop and
                # recompute it) and receives dy in its backward
                return _GradientTap.apply(output, x.detach(), self, name)
            return None

        return hook

    def _accumulate_input_sq(self, name: str, x: torch.Tensor) -> None:
        with torch.no_grad():
            w = row_weight(self.modules[name])
            xf = x.detach().to(accumulation_dtype(w))
            if self._mask is not None and xf.ndim == 3 and tuple(xf.shape[:2]) == tuple(self._mask.shape):
                xf = xf * self._mask.unsqueeze(-1).to(xf.dtype)
            sq = xf.reshape(-1, xf.shape[-1]).pow(2).sum(0)
            st = self.stats[name]
            st.input_sq = accumulate(st.input_sq, sq)

    def on_output_grad(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        """Called from the tap's backward with the module input and dL/d(output)."""
        with torch.no_grad():
            self._accumulate_gradient(name, self.modules[name], x, dy)

    def _accumulate_gradient(self, name: str, module: nn.Module, x: torch.Tensor,
                             dy: torch.Tensor) -> None:
        w = row_weight(module).detach()
        acc = accumulation_dtype(w)
        wf = w.to(acc)
        d_out, d_in = wf.shape
        x2 = x.detach().reshape(-1, d_in).to(acc)
        dy2 = dy.reshape(-1, d_out).to(acc)
        st = self.stats[name]
        if "grad_sum" in self.needs or "grad_sq" in self.needs:
            g = dy2.t() @ x2  # this module's batch gradient, transient
            if "grad_sum" in self.needs:
                st.grad_sum = accumulate(st.grad_sum, g)
            if "grad_sq" in self.needs:
                h = wf.square() * g.square()
                st.hessian_rows = accumulate(st.hessian_rows, h.sum(1))
                st.hessian_cols = accumulate(st.hessian_cols, h.sum(0))
        if "taylor" in self.needs or "class" in self.needs:
            row_terms = dy2 * (x2 @ wf.t())      # [tokens, d_out]: dy_ti (y_ti - b_i)
            col_terms = x2 * (dy2 @ wf)          # [tokens, d_in]:  x_tj (dy_t W)_j
            if "taylor" in self.needs:
                self._batch_rows[name] = accumulate(self._batch_rows.get(name), row_terms.sum(0))
                self._batch_cols[name] = accumulate(self._batch_cols.get(name), col_terms.sum(0))
            if "class" in self.needs:
                self._accumulate_classes(name, x, row_terms, col_terms)

    def _accumulate_classes(self, name: str, x: torch.Tensor, row_terms: torch.Tensor,
                            col_terms: torch.Tensor) -> None:
        labels = self._labels
        n = labels.shape[0]
        if x.ndim < 2 or x.shape[0] != n:
            raise RuntimeError(f"class_taylor: the input of {name!r} has shape {list(x.shape)}, "
                               f"whose first dimension is not the batch ({n}); exclude it.")
        st = self.stats[name]
        c = self.num_classes
        if st.class_rows is None:
            st.class_rows = row_terms.new_zeros(c, row_terms.shape[1])
            st.class_cols = col_terms.new_zeros(c, col_terms.shape[1])
        lab = labels.to(row_terms.device)
        st.class_rows.index_add_(0, lab, row_terms.reshape(n, -1, row_terms.shape[1]).sum(1))
        st.class_cols.index_add_(0, lab, col_terms.reshape(n, -1, col_terms.shape[1]).sum(1))

    # ---------------------------------------------------------------- zeroth order
    def _zo_batch(self, model: nn.Module, batch: Mapping[str, Any], index: int) -> None:
        with torch.no_grad():
            for draw in range(self.zo_perturbations):
                seed = mix_seed(self.seed, index, draw)
                losses = []
                for sign in (1, -1):
                    self._zo = (sign, seed)
                    try:
                        losses.append(batch_loss(model, batch, index))
                    finally:
                        self._zo = None
                coeff = (losses[0] - losses[1]) / (2 * self.zo_eps)
                for name, (rows, cols) in self._zo_dirs.items():
                    st = self.stats[name]
                    c = coeff.to(rows.device, rows.dtype)
                    st.zo_rows = accumulate(st.zo_rows, c * rows)
                    st.zo_cols = accumulate(st.zo_cols, c * cols)
                self._zo_dirs.clear()
        self._check_finite(index)

    def zo_direction(self, name: str, seed: int) -> torch.Tensor:
        """The Gaussian perturbation ``Z`` ([d_out, d_in]) of module ``name`` for ``seed``."""
        w = row_weight(self.modules[name])
        g = torch.Generator(device=w.device).manual_seed(mix_seed(seed, self.index[name]))
        return torch.randn(w.shape, generator=g, device=w.device, dtype=w.dtype)

    def _perturb(self, name: str, module: nn.Module, x: torch.Tensor, output: torch.Tensor
                 ) -> torch.Tensor:
        sign, seed = self._zo
        z = self.zo_direction(name, seed)
        if sign > 0:
            w = row_weight(module).detach()
            wz = w.to(accumulation_dtype(w)) * z.to(accumulation_dtype(w))
            self._zo_dirs[name] = (wz.sum(1), wz.sum(0))
        return output + (sign * self.zo_eps) * (x @ z.t())


class _GradientTap(torch.autograd.Function):
    """Identity on a target's output whose backward hands (input, dL/doutput) to the
    collector. The input is saved with ``save_for_backward``, so autograd checks it was not
    modified in place, and a checkpointed block recomputes it instead of keeping it."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, x: torch.Tensor, collector: "StatsCollector",
                name: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.collector, ctx.name = collector, name
        return output.view_as(output)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        ctx.collector.on_output_grad(ctx.name, x, dy)
        return dy, None, None, None


def _checkpointed(forward):
    """``forward`` run under non-reentrant activation checkpointing when grad is on: the
    block keeps only its inputs and recomputes the rest during backward."""
    from torch.utils.checkpoint import checkpoint

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def find_blocks(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The repeated blocks (children of the outermost ``nn.ModuleList``s) that hold targets,
    e.g. LLaMA's ``model.layers.N``; used for activation checkpointing while scoring."""
    names = list(names)
    blocks: list[nn.Module] = []
    chosen: list[str] = []
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for list_name, module_list in sorted(lists, key=lambda item: item[0].count(".")):
        if any(list_name.startswith(c + ".") for c in chosen):
            continue
        for i, child in enumerate(module_list):
            prefix = f"{list_name}.{i}." if list_name else f"{i}."
            if any(n.startswith(prefix) for n in names):
                blocks.append(child)
                chosen.append(prefix[:-1])
    return blocks


def _input_requires_grad(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: make the first target's input a leaf that requires grad, so the
    graph exists although every parameter is frozen."""
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    if x.requires_grad or not x.is_floating_point():
        return None
    return (x.detach().requires_grad_(True), *args[1:])


def accumulate(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``acc + value`` in place (a copy of ``value`` when ``acc`` is None)."""
    return value.clone() if acc is None else acc.add_(value)
