"""The statistics a calibration pass can gather for one target layer, in one registry.

Each :class:`Statistic` knows its zero (:meth:`~Statistic.zero`) and how to accumulate from
one call of a layer ``y = x W^T + b`` (its input ``x``, the output gradient ``dy`` and the
weight ``W``; :meth:`~Statistic.add_call`, the hook path) or from a weight gradient read off
``.grad`` (:meth:`~Statistic.add_grad`, the ``method="naive"`` reference path). Metrics
(``scoring.metrics``) name the statistics they need; the calibration passes look them up in
:data:`STATISTICS`. Shapes: ``W`` is ``[d_out, d_in]``; ``G = dL/dW = sum_t dy_t^T x_t``.

==================  ==================  =====================================================
name                shape               value after the pass
==================  ==================  =====================================================
grad_sum            [d_out, d_in]       sum over batches of G (batch-mean loss)
wg_rows / wg_cols   [d_out] / [d_in]    sum_b sum_j w_ij G^b_ij  /  sum_b sum_i w_ij G^b_ij
wg_rows_sq / ..cols [d_out] / [d_in]    sum_b (sum_j w_ij G^b_ij)^2  (and columns)
grad_sq_mean        [d_out, d_in]       mean over examples e of (g^e)^2, g^e = dl_e/dW
class_grad          [C, d_out, d_in]    mean over the examples of class c of g^e
class_grad_sq       [C, d_out, d_in]    mean over the examples of class c of (g^e)^2
input_sq            [d_in]              sum over (unmasked) tokens of x_tj^2
zo_grad             [d_out, d_in]       SPSA estimate of sum_b G (filled by the ZO pass)
==================  ==================  =====================================================

``l_e`` is the loss of example ``e`` alone (what the model returns for a batch of one); the
per-example gradient is ``g^e = s_e * dy_e^T x_e`` with ``s_e = 1 / w_e`` and ``w_e`` the
weight of example ``e`` in the batch loss (:func:`example_weights`). The class statistics
hold one ``[d_out, d_in]`` accumulator per class: fine for classifiers with few classes,
``C`` times the target weights in float32 otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

# per-example gradients are formed in chunks of at most this many elements
EXAMPLE_CHUNK_ELEMENTS = 1 << 24


@dataclass
class LayerCall:
    """One call of one target layer in one batch, as the statistics see it.

    ``x`` [T, d_in] and ``dy`` [T, d_out] are flattened over the leading dimensions (float32,
    float64 for float64 models); ``weight`` [d_out, d_in] in the same dtype. For per-example
    statistics the leading dimension of the layer's input is the batch: ``n_examples``
    examples of ``T / n_examples`` rows each; ``scale[e] = s_e`` and ``labels[e]``.
    """

    name: str
    x: torch.Tensor
    dy: torch.Tensor | None
    weight: torch.Tensor
    n_examples: int | None = None
    scale: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    n_classes: int | None = None
    token_mask: torch.Tensor | None = None
    _memo: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def memo(self, key: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``fn()`` computed once per call (shared by statistics that need it)."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def row_terms(self) -> torch.Tensor:
        """[T, d_out]: dy_ti (x_t W^T)_i; their sum over t is sum_j w_ij G_ij."""
        return self.memo("rows", lambda: self.dy * (self.x @ self.weight.t()))

    def col_terms(self) -> torch.Tensor:
        """[T, d_in]: x_tj (dy_t W)_j; their sum over t is sum_i w_ij G_ij."""
        return self.memo("cols", lambda: self.x * (self.dy @ self.weight))

    def per_example(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dy, x)`` as [B, T_e, d] with ``dy`` scaled by ``s_e`` (so that
        ``dy[e]^T x[e] = g^e``). Raises when the input is not batch-first."""
        n = self.n_examples
        if n is None or self.scale is None or self.x.shape[0] % n:
            raise RuntimeError(
                f"Per-example statistics need the batch as the first dimension of the input "
                f"of {self.name!r} (got {self.x.shape[0]} rows for {n} examples); exclude "
                "this module from the targets or use metric='taylor'.")
        dy = self.dy.reshape(n, -1, self.dy.shape[-1]) * self.scale.to(self.dy)[:, None, None]
        return dy, self.x.reshape(n, -1, self.x.shape[-1])

    def example_gradients(self):
        """Yield ``(example indices, g^e [k, d_out, d_in])`` in memory-bounded chunks."""
        dy, x = self.per_example()
        d_out, d_in = self.weight.shape
        step = max(1, EXAMPLE_CHUNK_ELEMENTS // max(1, d_out * d_in))
        for start in range(0, dy.shape[0], step):
            idx = torch.arange(start, min(start + step, dy.shape[0]), device=dy.device)
            yield idx, torch.bmm(dy[idx].transpose(1, 2), x[idx])


class Statistic:
    """One accumulated quantity per target layer (see the module table).

    ``source``: ``"gradient"`` (needs dy), ``"example_gradient"`` (needs per-example
    gradients), ``"input"`` (forward only) or ``"zo"`` (the zeroth-order pass).
    ``batchwise``: accumulated per batch into a fresh zero, then folded into the total by
    :meth:`end_batch` (for values nonlinear in the batch gradient).
    """

    name: str = ""
    source: str = "gradient"
    batchwise: bool = False

    def zero(self, d_out: int, d_in: int, n_classes: int, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_call(self, acc: torch.Tensor, call: LayerCall) -> None:
        """Hook path: add this call's contribution to ``acc`` in place."""
        raise NotImplementedError

    def add_grad(self, acc: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor,
                 label: int | None = None) -> None:
        """``.grad`` path: add a batch gradient (``source="gradient"``) or one example's
        gradient (``source="example_gradient"``, with its ``label``) to ``acc``."""
        raise NotImplementedError(f"statistic {self.name!r} has no .grad path")

    def end_batch(self, total: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return total.add_(batch)

    def finalize(self, acc: torch.Tensor, n_examples: int, class_counts: torch.Tensor
                 ) -> torch.Tensor:
        return acc


class GradSum(Statistic):
    name = "grad_sum"

    def zero(self, d_out, d_in, n_classes, like):
        return like.new_zeros(d_out, d_in)

    def add_call(self, acc, call):
        acc.addmm_(call.dy.t(), call.x)

    def add_grad(self, acc, grad, weight, label=None):
        acc.add_(grad)


class WeightGradRows(Statistic):
    """sum_j w_ij G_ij per batch (``squared``: its square, summed over batches)."""

    def __init__(self, axis: str, squared: bool = False):
        self.axis, self.squared = axis, squared
        self.name = f"wg_{axis}{'_sq' if squared else ''}"
        self.batchwise = squared

    def zero(self, d_out, d_in, n_classes, like):
        return like.new_zeros(d_out if self.axis == "rows" else d_in)

    def add_call(self, acc, call):
        terms = call.row_terms() if self.axis == "rows" else call.col_terms()
        acc.add_(terms.sum(0))

    def add_grad(self, acc, grad, weight, label=None):
        acc.add_((weight * grad).sum(1 if self.axis == "rows" else 0))

    def end_batch(self, total, batch):
        return total.add_(batch * batch if self.squared else batch)


class GradSqMean(Statistic):
    name = "grad_sq_mean"
    source = "example_gradient"

    def zero(self, d_out, d_in, n_classes, like):
        return like.new_zeros(d_out, d_in)

    def add_call(self, acc, call):
        for _, g in call.example_gradients():
            acc.add_(g.square_().sum(0))

    def add_grad(self, acc, grad, weight, label=None):
        acc.add_(grad.square())

    def finalize(self, acc, n_examples, class_counts):
        return acc / max(int(n_examples), 1)


class ClassGrad(Statistic):
    """Per-class mean of the per-example gradient (``squared``: of its square)."""

    source = "example_gradient"

    def __init__(self, squared: bool = False):
        self.squared = squared
        self.name = "class_grad_sq" if squared else "class_grad"

    def zero(self, d_out, d_in, n_classes, like):
        return like.new_zeros(n_classes, d_out, d_in)

    def add_call(self, acc, call):
        labels = call.labels.to(acc.device)
        if self.squared:
            for idx, g in call.example_gradients():
                acc.index_add_(0, labels[idx], g.square_())
            return
        dy, x = call.per_example()               # linear in g: one matmul per class present
        for c in torch.unique(labels).tolist():
            sel = labels == c
            acc[c].addmm_(dy[sel].reshape(-1, dy.shape[-1]).t(), x[sel].reshape(-1, x.shape[-1]))

    def add_grad(self, acc, grad, weight, label=None):
        acc[int(label)].add_(grad.square() if self.squared else grad)

    def finalize(self, acc, n_examples, class_counts):
        counts = class_counts.to(acc.device, acc.dtype).clamp_min(1)
        return acc / counts[:, None, None]


class InputSq(Statistic):
    name = "input_sq"
    source = "input"

    def zero(self, d_out, d_in, n_classes, like):
        return like.new_zeros(d_in)

    def add_call(self, acc, call):
        x = call.x
        if call.token_mask is not None and call.token_mask.numel() == x.shape[0]:
            x = x * call.token_mask.to(x.dtype)[:, None]
        acc.add_(x.square().sum(0))


class ZerothOrderGrad(Statistic):
    """Placeholder for the SPSA gradient estimate, which the ZO pass computes itself."""

    name = "zo_grad"
    source = "zo"

    def zero(self, d_out, d_in, n_classes, like):
        return like.new_zeros(d_out, d_in)


STATISTICS: dict[str, Statistic] = {s.name: s for s in (
    GradSum(), WeightGradRows("rows"), WeightGradRows("cols"),
    WeightGradRows("rows", squared=True), WeightGradRows("cols", squared=True),
    GradSqMean(), ClassGrad(), ClassGrad(squared=True), InputSq(), ZerothOrderGrad())}


def register_statistic(stat: Statistic) -> Statistic:
    """Add a statistic to :data:`STATISTICS` (metrics then name it in ``needs``).

    >>> register_statistic(MyStatistic())
    """
    if not stat.name:
        raise ValueError("a Statistic needs a non-empty name")
    STATISTICS[stat.name] = stat
    return stat


def get_statistics(names) -> dict[str, Statistic]:
    """The registered statistics called ``names`` (raises naming unknown ones)."""
    unknown = sorted(set(names) - set(STATISTICS))
    if unknown:
        raise ValueError(f"Unknown statistics {unknown}; registered: {sorted(STATISTICS)}")
    return {n: STATISTICS[n] for n in names}


# ------------------------------------------------------------------ per-example weights
def shifts_labels(model: nn.Module) -> bool:
    """True for causal LMs, whose loss compares position t with label t+1."""
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def example_weights(model: nn.Module, batch: Mapping[str, Any], n_examples: int) -> torch.Tensor:
    """``w_e``: the weight of example ``e`` in the model's batch-mean loss (sum 1).

    One label per example (classification, regression): ``1 / B``. Token labels (``-100``
    ignored, shifted by one for causal LMs): the example's counted tokens over the batch's,
    since the loss is the mean over all counted tokens of the batch.
    """
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.ndim <= 1 or labels.is_floating_point():
        return torch.full((n_examples,), 1.0 / n_examples, dtype=torch.float64)
    valid = labels != -100
    if shifts_labels(model):
        valid = valid[:, 1:]
    counts = valid.reshape(n_examples, -1).sum(1).to(torch.float64).cpu()
    total = counts.sum()
    if float(total) == 0:
        return torch.zeros(n_examples, dtype=torch.float64)
    return counts / total


def example_scales(weights: torch.Tensor) -> torch.Tensor:
    """``s_e = 1 / w_e`` (0 for examples that do not count in the loss)."""
    return torch.where(weights > 0, 1.0 / weights.clamp_min(1e-300), torch.zeros_like(weights))
