"""Calibration passes: feed batches through the model and gather the statistics metrics
need (``scoring.statistics``) with hooks, never with weight gradients.

For one layer ``y = x W^T + b`` over the tokens t of a batch, ``G = dL/dW = sum_t dy_t^T x_t``:
every statistic is computed from the layer's input ``x``, its output gradient ``dy`` and ``W``
inside the backward pass, one layer at a time (see ``Statistic.add_call``).

Every parameter is frozen during the pass (``requires_grad=False``); a forward pre-hook
turns a target's input into a leaf that requires grad when nothing upstream does (so the
graph starts at the first target); a forward hook replaces the target's output by a
"gradient tap" (an autograd function returning a copy of the output, so the model may
modify it in place, which saves the input ``x`` and whose backward receives ``dy``). No
``.grad`` buffer is ever allocated. With ``checkpoint_blocks`` (the default in ``score()``),
each transformer block runs under non-reentrant activation checkpointing, so only block
inputs stay alive between forward and backward and a block's activations (including the
tapped ``x``) are recomputed in its backward: about one extra forward pass of time for most
of the activation memory.

Memory beyond activations: the accumulators of the statistics (``grad_sum`` and
``grad_sq_mean``: the size of the target weights in float32; ``wg_*``: vectors; class
statistics: one weight-sized buffer per class) and, transiently, per-example gradients of
one layer in chunks. Per-example statistics treat each call of a module as one term per
example (HF models call each projection once per forward).

The zeroth-order pass runs forward passes only (``torch.no_grad``): per perturbation, a
forward hook adds ``+-eps x z^T`` to each target's output (the output of ``W +- eps z``) with
a Gaussian ``z`` regenerated from a seed, so weights are never written.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..targets import row_weight
from .metrics import ModuleStats
from .statistics import (LayerCall, Statistic, example_scales, example_weights,
                         get_statistics)

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


# ---------------------------------------------------------------------------- accumulators
class Accumulators:
    """The running statistics of every target module, shared by the hook and ``.grad``
    passes: zeros on first use, batch-wise buffers folded at the end of each batch, and the
    finished :class:`ModuleStats` per module (:meth:`module_stats`)."""

    def __init__(self, modules: Mapping[str, nn.Module], needs: Iterable[str], seed: int = 0,
                 num_classes: int | None = None) -> None:
        self.modules = dict(modules)
        self.stats: dict[str, Statistic] = get_statistics(sorted(set(needs)))
        self.seed = seed
        self.num_classes = num_classes
        self.index = {name: i for i, name in enumerate(self.modules)}
        self.acc: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.modules}
        self.batch_acc: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.modules}
        self.touched: set[str] = set()
        self.n_samples = 0
        self.n_tokens = 0
        self.class_counts = torch.zeros(num_classes or 1, dtype=torch.int64)

    def sources(self) -> set[str]:
        return {s.source for s in self.stats.values()}

    @property
    def needs_gradients(self) -> bool:
        return bool(self.sources() & {"gradient", "example_gradient"})

    @property
    def needs_examples(self) -> bool:
        return "example_gradient" in self.sources()

    def _like(self, name: str) -> torch.Tensor:
        w = row_weight(self.modules[name])
        return torch.empty(0, dtype=accumulation_dtype(w), device=w.device)

    def _zero(self, name: str, stat: Statistic) -> torch.Tensor:
        d_out, d_in = row_weight(self.modules[name]).shape
        return stat.zero(d_out, d_in, self.num_classes or 1, self._like(name))

    def target(self, name: str, stat: Statistic) -> torch.Tensor:
        """The tensor a contribution of ``stat`` for ``name`` is added to (batch buffer for
        batch-wise statistics)."""
        self.touched.add(name)
        store = self.batch_acc if stat.batchwise else self.acc
        if stat.name not in store[name]:
            store[name][stat.name] = self._zero(name, stat)
        return store[name][stat.name]

    def end_batch(self) -> None:
        for name, buffers in self.batch_acc.items():
            for stat_name, value in buffers.items():
                stat = self.stats[stat_name]
                total = self.acc[name].get(stat_name)
                if total is None:
                    total = self._zero(name, stat)
                self.acc[name][stat_name] = stat.end_batch(total, value)
            buffers.clear()

    def check_finite(self, index: int) -> None:
        items = [(n, t) for n, d in self.acc.items() for t in d.values()]
        if not items:
            return
        sums = torch.stack([t.sum().to(torch.float64).cpu() for _, t in items])
        bad = ~torch.isfinite(sums)
        if bool(bad.any()):
            name = items[int(torch.nonzero(bad)[0, 0])][0]
            raise FloatingPointError(
                f"Non-finite gradient statistics in {name!r} after batch {index}: the "
                "gradients overflowed or are NaN. Use float32 weights, smaller inputs, or a "
                "forward-only metric such as 'wanda'.")

    def finalize(self) -> None:
        """Warn (once, naming them) about modules the data never reached: scored 0."""
        untouched = [n for n in self.modules if n not in self.touched]
        if untouched and self.stats and self.sources() != {"zo"}:
            warnings.warn(f"{len(untouched)} target module(s) never influenced the loss or "
                          f"were never called (scored 0): {untouched[:4]}"
                          f"{' ...' if len(untouched) > 4 else ''}", stacklevel=3)

    def module_stats(self, name: str) -> ModuleStats:
        """The finished statistics of ``name`` (its accumulators are released)."""
        values = {}
        held = self.acc.pop(name, {})
        for stat_name, stat in self.stats.items():
            acc = held.get(stat_name)
            if acc is None:
                acc = self._zero(name, stat)
            values[stat_name] = stat.finalize(acc, self.n_samples, self.class_counts)
        return ModuleStats(seed=mix_seed(self.seed, self.index[name]), values=values,
                           n_examples=self.n_samples,
                           class_counts=self.class_counts.clone() if self.num_classes else None)


def class_labels(batch: Mapping[str, Any], num_classes: int | None) -> torch.Tensor:
    """One integer class id per example, checked against ``[0, num_classes)``."""
    labels = batch["labels"]
    size = batch_size(batch)
    if labels.ndim != 1 or labels.shape[0] != size or labels.is_floating_point():
        raise ScoringDataError(
            f"class metrics need one integer class id per example (labels of shape "
            f"[{size}]); got labels of shape {list(labels.shape)} and dtype {labels.dtype}. "
            "Token labels mean a language model: use 'taylor' there.")
    n = num_classes
    if n is None or int(labels.max()) >= n or int(labels.min()) < 0:
        raise ScoringDataError(f"class metrics: labels must lie in [0, num_labels={n}); got "
                               f"{int(labels.min())}..{int(labels.max())}")
    return labels


# ---------------------------------------------------------------------------- collector
class StatsCollector(Accumulators):
    """Hooks on the target modules that accumulate the requested statistics.

    Usage (``score()`` does this, inside its model-state guard)::

        c = StatsCollector(modules, needs={"grad_sum"}, seed=0)
        c.attach()
        for i, (batch, n) in enumerate(iter_batches(...)):
            c.run_batch(model, batch, i)
        c.detach(); c.finalize()
        c.module_stats("model.layers.0.mlp.up_proj")["grad_sum"]
    """

    def __init__(self, modules: Mapping[str, nn.Module], needs: Iterable[str], seed: int = 0,
                 num_classes: int | None = None, checkpoint_blocks: Iterable[nn.Module] = (),
                 zo: Any = None) -> None:
        super().__init__(modules, needs, seed, num_classes)
        sources = self.sources()
        if "zo" in sources and len(sources) > 1:
            raise ValueError("zeroth-order statistics cannot be mixed with others in one pass")
        if "zo" in sources and zo is None:
            raise ValueError("the zo_grad statistic needs the ZerothOrderTaylor settings (zo=)")
        self.zo = zo
        # the input statistics of a recomputed (checkpointed) forward would count twice
        self.checkpoint_blocks = ([] if "input" in sources else list(checkpoint_blocks))
        self._saved_forwards: list[tuple[nn.Module, Any]] = []
        self._handles: list[Any] = []
        self._labels: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._n_examples: int | None = None
        self._mask: torch.Tensor | None = None
        self._zo_state: tuple[int, int] | None = None  # (sign, seed) while a ZO forward runs
        self._zo_sums: dict[tuple[int, int], float] = {}
        self._zo_counts: dict[int, int] = {}

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
        self._mask = mask.reshape(-1) if isinstance(mask, torch.Tensor) else None
        self._n_examples = size
        labels = None
        if self.num_classes is not None and {"class_grad", "class_grad_sq"} & set(self.stats):
            labels = self._labels = class_labels(batch, self.num_classes)
        if self.needs_examples:
            self._scale = example_scales(example_weights(model, batch, size))
        try:
            if self.needs_gradients:
                with torch.enable_grad():
                    loss = batch_loss(model, batch, index)
                    loss.backward()
                self.end_batch()
                self.check_finite(index)
            elif self.zo is not None:
                self._zo_batch(model, batch, index)
            else:
                with torch.no_grad():
                    model(**forward_kwargs(model, batch))
        finally:
            self._labels = self._mask = self._scale = None
        if labels is not None:
            self.class_counts += torch.bincount(labels.cpu(), minlength=self.num_classes)
        self.n_samples += size
        self.n_tokens += batch_tokens(batch)

    # ---------------------------------------------------------------- hooks
    def _forward_hook(self, name: str):
        def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            if not args or not isinstance(args[0], torch.Tensor) \
                    or not isinstance(output, torch.Tensor):
                return None
            x = args[0]
            if self._zo_state is not None:
                return self._perturb(name, x, output)
            if "input" in self.sources():
                self._add_input(name, x)
            if self.needs_gradients and output.requires_grad:
                # the tap saves x through autograd (so block checkpointing can drop and
                # recompute it) and receives dy in its backward
                return _GradientTap.apply(output, x.detach(), self, name)
            return None

        return hook

    def _call(self, name: str, x: torch.Tensor, dy: torch.Tensor | None) -> LayerCall:
        w = row_weight(self.modules[name]).detach()
        acc = accumulation_dtype(w)
        d_out, d_in = w.shape
        return LayerCall(
            name=name, x=x.detach().reshape(-1, d_in).to(acc),
            dy=None if dy is None else dy.reshape(-1, d_out).to(acc), weight=w.to(acc),
            n_examples=self._n_examples if _batch_major(x, self._n_examples) else None,
            scale=self._scale, labels=self._labels, n_classes=self.num_classes,
            token_mask=self._mask)

    def _add_input(self, name: str, x: torch.Tensor) -> None:
        with torch.no_grad():
            call = self._call(name, x, None)
            for stat in self.stats.values():
                if stat.source == "input":
                    stat.add_call(self.target(name, stat), call)

    def on_output_grad(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        """Called from the tap's backward with the module input and dL/d(output)."""
        with torch.no_grad():
            call = self._call(name, x, dy)
            for stat in self.stats.values():
                if stat.source in ("gradient", "example_gradient"):
                    stat.add_call(self.target(name, stat), call)

    # ---------------------------------------------------------------- zeroth order
    def _zo_batch(self, model: nn.Module, batch: Mapping[str, Any], index: int) -> None:
        split = index % self.zo.data_split
        with torch.no_grad():
            for estimate in range(self.zo.n_estimate):
                seed = zo_seed(self.seed, estimate, split)
                losses = []
                for sign in (1, -1):
                    self._zo_state = (sign, seed)
                    try:
                        losses.append(float(batch_loss(model, batch, index)))
                    finally:
                        self._zo_state = None
                key = (estimate, split)
                self._zo_sums[key] = self._zo_sums.get(key, 0.0) + (losses[0] - losses[1])
        self._zo_counts[split] = self._zo_counts.get(split, 0) + 1
        self.touched.update(self.modules)

    def zo_direction(self, name: str, seed: int) -> torch.Tensor:
        """The Gaussian direction ``z`` ([d_out, d_in], the weight's dtype) of ``name``."""
        return zo_direction(row_weight(self.modules[name]), seed, self.index[name])

    def _perturb(self, name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        sign, seed = self._zo_state
        z = self.zo_direction(name, seed)
        return output + (sign * self.zo.eps) * (x @ z.t())

    def module_stats(self, name: str) -> ModuleStats:
        if self.zo is None:
            return super().module_stats(name)
        # Ghat = mean over (estimate, slice) of [(L+ - L-) / 2 eps] z, slices that got data
        w = row_weight(self.modules[name])
        ghat = torch.zeros(w.shape, dtype=accumulation_dtype(w), device=w.device)
        terms = 0
        for (estimate, split), diff in sorted(self._zo_sums.items()):
            coeff = diff / (self._zo_counts[split] * 2 * self.zo.eps)
            z = self.zo_direction(name, zo_seed(self.seed, estimate, split))
            ghat.add_(z.to(ghat.dtype), alpha=coeff)
            terms += 1
        ghat /= max(terms, 1)
        return ModuleStats(seed=mix_seed(self.seed, self.index[name]),
                           values={"zo_grad": ghat}, n_examples=self.n_samples)


def _batch_major(x: torch.Tensor, n: int | None) -> bool:
    """True when ``x``'s rows group by example: ``[B, ...]``, or ``[B * T, d]`` flattened
    batch-first (as OPT's MLP does)."""
    if n is None or x.ndim < 2:
        return False
    return x.shape[0] == n if x.ndim > 2 else x.shape[0] % n == 0


def zo_seed(seed: int, estimate: int, split: int) -> int:
    """The seed of perturbation ``(estimate, split)`` of a zeroth-order pass."""
    return mix_seed(seed, estimate, split)


def zo_direction(weight: torch.Tensor, seed: int, module_index: int) -> torch.Tensor:
    """Gaussian ``z`` shaped like ``weight`` ([d_out, d_in]) for a perturbation ``seed`` and
    the module's position among the targets."""
    g = torch.Generator(device=weight.device).manual_seed(mix_seed(seed, module_index))
    return torch.randn(weight.shape, generator=g, device=weight.device, dtype=weight.dtype)


class _GradientTap(torch.autograd.Function):
    """Returns a copy of a target's output (so the model may modify it in place) whose
    backward hands (input, dL/doutput) to the collector. The input is saved with
    ``save_for_backward``, so a checkpointed block recomputes it instead of keeping it."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, x: torch.Tensor, collector: "StatsCollector",
                name: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.collector, ctx.name = collector, name
        return output.clone()

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
