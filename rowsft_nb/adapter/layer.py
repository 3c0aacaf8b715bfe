"""RowSparseLinear: a frozen Linear/Conv1D plus trainable deltas for a few rows (and columns).

    y = base(x) + scatter_rows(idx, dW x + db) + dC x[..., cols]

``dW`` is [r, d_in] (one row per selected output neuron), ``dC`` is [d_out, c] (one column
per selected input feature). Both start at zero by default (``init="zeros"``), so the wrapped
layer equals its base exactly until a step is taken; ``init="kaiming"`` starts them as the
authors do (see :data:`INITS`). No dense W0 + dW and no one-hot [r, d_out] matrix is ever
built: the row delta's output is added into the selected output channels with
``index_add``, and the custom autograd functions below save only the layer input (in its
own dtype) that the delta's gradient needs, and gather only the selected columns of the
output gradient in backward.

Usage::

    layer = RowSparseLinear(nn.Linear(64, 32), rows=[3, 7, 11])
    layer.delta.shape            # (3, 64), zeros, trainable
    layer(x)                     # == base(x) at init
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Any, Sequence

import torch
from torch import nn

from ..targets import _is_quantized, is_conv1d, is_linear_like, linear_shape, row_weight

__all__ = ["RowSparseLinear", "row_delta", "column_delta", "resolve_delta_dtype",
           "check_dropout", "check_not_meta", "check_init", "init_generator", "INITS"]

#: Delta initialisations: "zeros" (the layer equals its base until a step is taken) or
#: "kaiming" (the authors' LLM path: U(-1/sqrt(d_in), 1/sqrt(d_in)), torch's nn.Linear default
#: ``kaiming_uniform_(a=sqrt(5))``, for row and column deltas; bias deltas always start at 0)
#: or "residual" (the authors' ``ours_loftq`` on quantized bases: the layer starts at zero and
#: ``inject(..., init="residual", reference=float_model)`` sets the row deltas to
#: ``(W_ref - deq(Q))[rows]``, so the selected rows reproduce the float weights at step 0).
INITS = ("zeros", "kaiming", "residual")


def check_init(init: Any, seed: Any = 0) -> str:
    """``init`` if it is one of :data:`INITS` and ``seed`` an int, else ``ValueError``.

    >>> check_init("kaiming", seed=0)
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS} ('zeros': model unchanged at step 0; "
                         f"'kaiming': the authors' random start; 'residual': rows start at "
                         f"a float reference's values, quantized bases), got {init!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int (seeds init='kaiming'), got {seed!r}")
    return init


def init_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for module ``name``'s kaiming draw: the values depend on ``seed`` and
    the name only (not on the global RNG, the device or the order modules are visited).

    >>> RowSparseLinear(lin, rows=[0], init="kaiming", generator=init_generator(0, "fc"))
    """
    digest = hashlib.blake2b(f"{int(seed)}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))


def resolve_delta_dtype(base_dtype: torch.dtype, delta_dtype: torch.dtype | None) -> torch.dtype:
    """Delta dtype: as asked, else float32 for half-precision bases (as PEFT does for
    adapter weights: bf16/fp16 optimizer updates on tiny deltas round away), else the base's."""
    if delta_dtype is not None:
        if not isinstance(delta_dtype, torch.dtype) or not delta_dtype.is_floating_point:
            raise ValueError(f"delta_dtype must be a floating torch dtype (torch.float32, "
                             f"torch.bfloat16, ...) or None, got {delta_dtype!r}")
        return delta_dtype
    if base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype if base_dtype.is_floating_point else torch.float32


def check_dropout(dropout: Any) -> float:
    """``float(dropout)`` if it is a number in [0, 1), else ``ValueError`` saying so.

    >>> check_dropout(0.1)
    """
    try:
        value = float(dropout)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(dropout, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1) (probability on the delta "
                         f"path), got {dropout!r}")
    return value


def check_not_meta(module: nn.Module, name: str) -> None:
    """``ValueError`` when ``module`` has parameters on the meta device (no real weights).

    >>> check_not_meta(model.model.layers[0].self_attn.q_proj, "q_proj")
    """
    meta = [k for k, p in module.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(f"{name or type(module).__name__} has parameters on the meta device "
                         f"({', '.join(meta[:3])}): the model has no real weights yet. Load it "
                         "with real weights first (from_pretrained(...) without device_map="
                         "'meta'/init_empty_weights, or model.to_empty(device=...) followed by "
                         "load_state_dict) and then inject/score it.")


def _compute_dtype(x: torch.Tensor, delta: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else the delta's dtype."""
    kind = x.device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (RuntimeError, ValueError):  # device types without autocast support
        pass
    return delta.dtype


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    kind = x.device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.autocast(kind, enabled=False)
    except (RuntimeError, ValueError):
        pass
    return contextlib.nullcontext()


class _RowDelta(torch.autograd.Function):
    """out = y.index_add(-1, rows, x @ dW^T + db).

    Saves x (its own dtype: no upcast copy), dW and the index. Backward gathers g[..., rows]
    once: grad_dW = g_sel^T x, grad_db = sum g_sel, grad_x = g_sel @ dW, grad_y = g.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, delta: torch.Tensor,
                bias: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        compute = _compute_dtype(x, delta)
        with _no_autocast(x):
            d = torch.nn.functional.linear(
                x.to(compute), delta.to(compute), None if bias is None else bias.to(compute))
            out = y.index_add(-1, rows, d.to(y.dtype))
        ctx.save_for_backward(x, delta, rows)
        ctx.compute = compute
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        x, delta, rows = ctx.saved_tensors
        c = ctx.compute
        r, d_in = delta.shape
        g_sel = g.index_select(-1, rows).to(c)  # [..., r]: only the selected channels
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_x = (g_sel @ delta.to(c)).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_delta = (g_sel.reshape(-1, r).t() @ x.reshape(-1, d_in).to(c)).to(delta.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = g_sel.reshape(-1, r).sum(0).to(delta.dtype)
        grad_y = g if ctx.needs_input_grad[0] else None
        return grad_y, grad_x, grad_delta, grad_bias, None


class _ColumnDelta(torch.autograd.Function):
    """out = y + x[..., cols] @ dC^T.

    Saves only the gathered columns x[..., cols] (c of d_in features, own dtype), dC and
    the index. grad_dC = g^T x_cols; grad_x is g @ dC scattered into the selected columns.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, delta: torch.Tensor,
                cols: torch.Tensor) -> torch.Tensor:
        compute = _compute_dtype(x, delta)
        xs = x.index_select(-1, cols)
        with _no_autocast(x):
            d = torch.nn.functional.linear(xs.to(compute), delta.to(compute))
            out = y + d.to(y.dtype)
        ctx.save_for_backward(xs, delta, cols)
        ctx.compute = compute
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        xs, delta, cols = ctx.saved_tensors
        c = ctx.compute
        d_out, n_cols = delta.shape
        gc = g.to(c)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[1]:
            part = (gc @ delta.to(c)).to(ctx.x_dtype)  # [..., c]
            grad_x = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=g.device)
            grad_x.index_add_(-1, cols, part)
        if ctx.needs_input_grad[2]:
            grad_delta = (gc.reshape(-1, d_out).t() @ xs.reshape(-1, n_cols).to(c)).to(delta.dtype)
        grad_y = g if ctx.needs_input_grad[0] else None
        return grad_y, grad_x, grad_delta, None


def row_delta(y: torch.Tensor, x: torch.Tensor, delta: torch.Tensor,
              bias: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """``y`` with ``x @ delta^T (+ bias)`` added into channels ``rows`` of its last dim.

    >>> out = row_delta(base(x), x, delta, None, rows)
    """
    return _RowDelta.apply(y, x, delta, bias, rows)


def column_delta(y: torch.Tensor, x: torch.Tensor, delta: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """``y + x[..., cols] @ delta^T`` (delta: [d_out, c]).

    >>> out = column_delta(base(x), x, col_delta, cols)
    """
    return _ColumnDelta.apply(y, x, delta, cols)


def _index(values: Sequence[int] | torch.Tensor | None, size: int, what: str,
           device: torch.device) -> torch.Tensor:
    if values is None:
        return torch.empty(0, dtype=torch.int64, device=device)
    t = torch.as_tensor(values, dtype=torch.int64).flatten().cpu()
    t = torch.unique(t, sorted=True)
    if t.numel() and (int(t[0]) < 0 or int(t[-1]) >= size):
        raise ValueError(f"RowSparseLinear: {what} index out of range [0, {size - 1}]: "
                         f"got [{int(t[0])}, {int(t[-1])}]")
    return t.to(device)


class RowSparseLinear(nn.Module):
    """A frozen ``nn.Linear``/GPT-2 ``Conv1D`` (``.base_layer``) plus trainable deltas on
    selected output rows (``.delta`` [r, d_in], ``.delta_bias`` [r]) and/or selected input
    columns (``.column_delta`` [d_out, c]). ``init="zeros"`` (default: equals the base until a
    step is taken) or ``"kaiming"`` (row/column deltas ~ U(+-1/sqrt(d_in)) drawn with
    ``generator``; bias deltas zero).

    >>> layer = RowSparseLinear(nn.Linear(64, 32), rows=[0, 5], bias=True, dropout=0.1)
    """

    #: "delta": base(x) plus a separate row/column delta path (this class); the fused
    #: subclass (rowsft_nb.adapter.fused.FusedRowLinear) says "fused".
    mode = "delta"

    def __init__(self, base_layer: nn.Module, rows: Sequence[int] | torch.Tensor | None = None,
                 columns: Sequence[int] | torch.Tensor | None = None, *, bias: bool = False,
                 dropout: float = 0.0, delta_dtype: torch.dtype | None = None,
                 init: str = "zeros", generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_init(init)
        if isinstance(base_layer, RowSparseLinear):
            raise ValueError("RowSparseLinear: the layer already has a row-sparse adapter")
        if not is_linear_like(base_layer):
            raise TypeError(f"RowSparseLinear wraps nn.Linear or transformers Conv1D, "
                            f"not {type(base_layer).__name__}")
        check_dropout(dropout)
        check_not_meta(base_layer, type(base_layer).__name__)
        if _is_quantized(base_layer):  # bitsandbytes: keep the standard 4-bit layout
            from ..quant import standard_layout
            standard_layout(base_layer)
        d_out, d_in = linear_shape(base_layer)
        weight = base_layer.weight
        device = weight.device
        dtype = resolve_delta_dtype(weight.dtype, delta_dtype)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = d_in, d_out
        self.is_conv1d = is_conv1d(base_layer)
        self.register_buffer("rows", _index(rows, d_out, "row", device), persistent=False)
        self.register_buffer("columns", _index(columns, d_in, "column", device), persistent=False)
        r, c = self.rows.numel(), self.columns.numel()
        if r == 0 and c == 0:
            raise ValueError("RowSparseLinear: no rows and no columns selected; "
                             "select at least one row or column for this layer")
        self.delta = nn.Parameter(torch.zeros(r, d_in, dtype=dtype, device=device)) if r else None
        self.delta_bias = (nn.Parameter(torch.zeros(r, dtype=dtype, device=device))
                           if (bias and r) else None)
        self.column_delta = (nn.Parameter(torch.zeros(d_out, c, dtype=dtype, device=device))
                             if c else None)
        self.init = init
        if init == "kaiming":  # drawn in float32 on CPU: same values on every device/dtype
            bound = 1.0 / math.sqrt(d_in)
            with torch.no_grad():
                for p in (self.delta, self.column_delta):
                    if p is not None:
                        p.copy_(torch.empty(p.shape, dtype=torch.float32)
                                .uniform_(-bound, bound, generator=generator))
        self.dropout = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        self.merged = False
        self._merge_backup: dict[str, torch.Tensor] | None = None
        self._created_bias = False

    # ------------------------------------------------------------------ base views
    # Read-only views of the frozen base layer's tensors, as PEFT tuner layers expose them:
    # model code reads ``layer.weight.dtype`` (T5's feed-forward) or ``layer.bias``. They are
    # properties, not registered parameters, so parameters()/state_dict() hold them once
    # (under ``base_layer.``).
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (stored layout: [d_out, d_in] Linear, [d_in, d_out] Conv1D)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (``None`` when it has none)."""
        return self.base_layer.bias

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return y
        h = self.dropout(x)
        if self.delta is not None:
            y = _RowDelta.apply(y, h, self.delta, self.delta_bias, self.rows)
        if self.column_delta is not None:
            y = _ColumnDelta.apply(y, h, self.column_delta, self.columns)
        return y

    def restore_base_weight(self) -> None:
        """No-op: the delta path never writes the base weight (the fused layer does)."""

    # ------------------------------------------------------------------ merge
    def delta_parameters(self) -> dict[str, torch.Tensor]:
        """The trainable deltas present: ``delta``, ``delta_bias``, ``column_delta``."""
        out = {}
        for k in ("delta", "delta_bias", "column_delta"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    def check_finite(self, name: str = "") -> None:
        """Raise ``ValueError`` naming the module if any delta holds NaN or inf."""
        for k, v in self.delta_parameters().items():
            if not bool(torch.isfinite(v).all()):
                bad = int((~torch.isfinite(v)).sum())
                raise ValueError(f"refusing to merge: {name or 'layer'}.{k} has {bad} NaN/inf "
                                 "values (training diverged?). Load a good checkpoint or "
                                 "lower the learning rate.")

    @torch.no_grad()
    def merge(self) -> None:
        """Add the deltas into the base weights in place (W0[rows] += dW, W0[:, cols] += dC,
        b0[rows] += db), keeping a copy of the touched entries so :meth:`unmerge` restores
        them bit-exactly. The forward pass then skips the delta path. On an error part-way
        the entries already written are restored, and the layer stays unmerged."""
        if self.merged:
            return
        self.check_finite()
        if _is_quantized(self.base_layer):  # 4-bit base: re-quantize the rows' blocks only
            from ..quant import merge_rows_into_4bit
            self._merge_backup = merge_rows_into_4bit(self)
            self.merged = True
            return
        base = self.base_layer
        w = row_weight(base)  # [d_out, d_in] view of the stored weight
        backup: dict[str, torch.Tensor] = {}
        self._merge_backup = backup
        try:
            if self.delta is not None:
                old = w.index_select(0, self.rows)
                backup["rows"] = old.clone()
                w.index_copy_(0, self.rows, (old.to(self.delta.dtype) + self.delta).to(w.dtype))
            if self.delta_bias is not None:
                if base.bias is None:
                    base.bias = nn.Parameter(torch.zeros(self.out_features, dtype=w.dtype,
                                                         device=w.device), requires_grad=False)
                    self._created_bias = True
                old_b = base.bias.index_select(0, self.rows)
                backup["bias"] = old_b.clone()
                base.bias.index_copy_(0, self.rows,
                                      (old_b.to(self.delta_bias.dtype) + self.delta_bias)
                                      .to(base.bias.dtype))
            if self.column_delta is not None:
                old_c = w.index_select(1, self.columns)
                backup["columns"] = old_c.clone()
                w.index_copy_(1, self.columns,
                              (old_c.to(self.column_delta.dtype) + self.column_delta)
                              .to(w.dtype))
        except BaseException:
            self._restore(backup)
            raise
        self.merged = True

    def _restore(self, backup: dict[str, torch.Tensor]) -> None:
        """Put back the base entries saved in ``backup`` (reverse order of merge, so
        overlapping row/column entries end up original) and drop a bias merge created."""
        if backup.get("quant"):  # a 4-bit merge: packed blocks and absmax back bit-exactly
            from ..quant import restore_merge
            restore_merge(self, backup)
            self._merge_backup = None
            return
        base = self.base_layer
        w = row_weight(base)
        with torch.no_grad():
            if "columns" in backup:
                w.index_copy_(1, self.columns, backup["columns"])
            self._restore_bias(backup)
            if "rows" in backup:
                w.index_copy_(0, self.rows, backup["rows"])
        self._merge_backup = None

    @torch.no_grad()
    def _restore_bias(self, backup: dict[str, torch.Tensor]) -> None:
        """Undo a merge's bias change: drop a bias it created, else put back the saved rows
        (shared by the float and the 4-bit merge)."""
        if self._created_bias:
            self.base_layer.bias = None
            self._created_bias = False
        elif "bias" in backup:
            self.base_layer.bias.index_copy_(0, self.rows, backup["bias"])

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: restore the base entries bit-exactly, re-enable the deltas."""
        if not self.merged:
            return
        self._restore(self._merge_backup or {})
        self.merged = False

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.is_conv1d else "Linear"
        dtype = next(iter(self.delta_parameters().values())).dtype
        return (f"{kind}(d_out={self.out_features}, d_in={self.in_features}), "
                f"rows={self.rows.numel()}, columns={self.columns.numel()}, "
                f"bias={self.delta_bias is not None}, delta_dtype={dtype}, merged={self.merged}, "
                f"mode={self.mode}")
