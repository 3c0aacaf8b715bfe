"""FusedRowLinear: the row delta written into the base weight, one ``F.linear`` per forward.

Before every forward the layer writes ``W[rows] = W0[rows] + dW`` into the base weight in
place (r x d_in values: cheap next to the matmul) and runs the frozen layer's own
``F.linear``. Backward: ``grad_x = g @ W`` (exactly
as the frozen layer), ``grad_dW = g[..., rows]^T x``. So the forward sees the deployed
weight: in half precision ``bf16(W0[rows] + dW)`` (what ``merge`` writes), while ``dW``
itself stays a float32 master copy that the optimizer updates, so updates smaller than a
bf16 step still accumulate.

``dW`` stays the parameter (saved, loaded, optimised exactly as on the delta path); the
layer keeps a copy of the original rows ``W0[rows]`` (buffer ``base_rows``, base dtype) so
the base weight can be put back bit-exactly: :meth:`restore_base_weight` (called by
``unload``, ``merge``, ``model_fingerprint``, ``state_dict`` and ``load_state_dict``).
Keeping ``W0[rows] + dW`` itself as the parameter would save that copy, but ``(W0 + dW) - W0``
is not ``dW`` in floating point: saved adapters, merges and resumes would no longer be
bit-exact, and Adam would see different numbers than on the delta path.

``state_dict()`` restores the base rows first (the next forward writes them again), so a
state dict never holds the fused weight as the base; its base tensors alias the live weight
as usual, so copy them before training further. Where fusing is not exact or not safe at
call time (base weight requires grad, hooks on the base layer such as scoring taps, a
weight that is a view or a DTensor as under FSDP) the layer restores the base rows and runs
the delta path of :class:`~rowsft_nb.adapter.layer.RowSparseLinear`.

Usage::

    layer = FusedRowLinear(nn.Linear(64, 32), rows=[3, 7, 11])
    layer(x)                      # == base(x) at init; layer.mode == "fused"
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..targets import Conv1D, embeddings, row_weight
from .layer import RowSparseLinear, _compute_dtype

__all__ = ["FusedRowLinear", "fuse_blocker", "choose_modes", "MODES", "restore_base_weights",
           "RECOMPUTE_ATTR"]

#: inject(mode=...): "auto" = fused wherever exact, delta elsewhere; "fused" = fused
#: everywhere (error naming a module that cannot); "delta" = the delta path everywhere.
MODES = ("auto", "fused", "delta")

#: Attribute a producer module (see :mod:`rowsft_nb.adapter.sharing`) sets on a tensor ``x``
#: it returns: ``(fn, sources, x._version)`` with ``x == fn(*sources)`` bit-exactly. A fused
#: layer then saves ``sources`` (already saved by the frozen graph) instead of ``x``.
RECOMPUTE_ATTR = "_rowsft_recompute"


class _FusedRows(torch.autograd.Function):
    """y = linear(x, W, b) with W[rows] already holding W0[rows] + dW.

    Saves x (or the sources it is recomputed from), the weight (a parameter: no activation
    memory; its version counter catches a rewrite between forward and backward) and the
    index. grad_x = g @ W, grad_dW = g[..., rows]^T x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                delta: torch.Tensor, rows: torch.Tensor, conv1d: bool,
                recompute: Callable[..., torch.Tensor] | None, *sources: torch.Tensor
                ) -> torch.Tensor:
        if conv1d:  # transformers Conv1D.forward, verbatim
            size_out = x.size()[:-1] + (weight.shape[1],)
            y = torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(size_out)
        else:       # nn.Linear.forward
            y = F.linear(x, weight, bias)
        ctx.compute = _compute_dtype(x, delta)
        ctx.conv1d = conv1d
        ctx.recompute = recompute
        ctx.x_dtype = x.dtype
        ctx.delta_dtype = delta.dtype
        if recompute is None:
            ctx.save_for_backward(weight, rows, x)
        else:
            ctx.save_for_backward(weight, rows, *sources)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        weight, rows, *saved = ctx.saved_tensors
        if ctx.recompute is None:
            x = saved[0]
        else:
            with torch.no_grad():
                x = ctx.recompute(*saved)
        grad_x = grad_delta = None
        w = weight.t() if ctx.conv1d else weight     # [d_out, d_in]
        if ctx.needs_input_grad[0]:
            # as the frozen layer: g W (under autocast W in g's dtype, as autocast casts it)
            grad_x = (g @ w.to(g.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            c = ctx.compute
            d_in = w.shape[1]
            g_sel = g.index_select(-1, rows).to(c)   # [..., r]: only the selected channels
            grad_delta = (g_sel.reshape(-1, rows.numel()).t() @ x.reshape(-1, d_in).to(c)
                          ).to(ctx.delta_dtype)
        n_sources = len(saved) if ctx.recompute is not None else 0
        return (grad_x, None, None, grad_delta, None, None, None) + (None,) * n_sources


def _is_plain(t: torch.Tensor) -> bool:
    return type(t.data) is torch.Tensor and not t._is_view() and t.device.type != "meta"


def _fsdp_managed(module: nn.Module) -> bool:
    """FSDP (1 and 2) sets this flag on the instance; read from ``vars`` because a missing
    attribute through ``nn.Module.__getattr__`` raises and catches (~3 us, every forward)."""
    return bool(vars(module).get("_is_fsdp_managed_module", False))


def fuse_blocker(model: nn.Module, name: str, module: nn.Module, *, columns: bool,
                 bias: bool, dropout: float, shared: set[int] | None = None) -> str | None:
    """Why ``module`` (planned as ``name`` in ``model``) cannot use the fused mode, or
    ``None`` when it can. ``shared``: storage pointers held by more than one parameter or
    buffer of ``model`` (computed once by the caller; ``None``: computed here).

    >>> fuse_blocker(model, "model.layers.0.mlp.down_proj", down, columns=False, bias=False, dropout=0)
    """
    kind = type(module)
    if kind is not nn.Linear and not (Conv1D is not None and kind is Conv1D):
        return f"{kind.__name__} is not a plain nn.Linear/Conv1D (quantized or custom base)"
    w = module.weight
    if not w.dtype.is_floating_point or w.dtype.itemsize < 2:
        return f"weight dtype {w.dtype} is not a full-precision float"
    if not _is_plain(w):
        return "weight is a view, a DTensor/tensor subclass or on meta (sharded/offloaded)"
    if _fsdp_managed(module):
        return "managed by FSDP (sharded weights)"
    if "forward" in vars(module) or hasattr(module, "_hf_hook"):
        return "the base layer's forward is replaced (accelerate offload hook?)"
    if columns:
        return "column deltas"
    if bias:
        return "bias deltas"
    if dropout > 0:
        return "dropout on the delta path"
    if shared is None:
        shared = shared_storages(model)
    if w.untyped_storage().data_ptr() in shared:
        return "weight is shared with another module (tied weights)"
    for which in ("input", "output"):
        emb = embeddings(model, which)
        if emb is module or (emb is not None and getattr(emb, "weight", None) is w):
            return f"{which} embedding"
    return None


def shared_storages(model: nn.Module) -> set[int]:
    """Storage pointers of tensors referenced more than once among ``model``'s parameters
    and buffers (tied weights)."""
    seen: dict[int, int] = {}
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    for t in tensors:
        if t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        seen[key] = seen.get(key, 0) + 1
    return {k for k, n in seen.items() if n > 1}


def choose_modes(model: nn.Module, plan: Any, mode: str, *, bias: bool, dropout: float
                 ) -> dict[str, str | None]:
    """``{module name: None (fused) or why it takes the delta path}`` for every module of
    ``plan`` under ``mode`` (one of :data:`MODES`). ``ValueError`` for an unknown mode, or for
    ``mode="fused"`` when a module cannot be fused (naming it and why).

    >>> choose_modes(model, plan, "auto", bias=False, dropout=0.0)
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} ('auto': fused where exact, else the "
                         f"delta path), got {mode!r}")
    modules = dict(model.named_modules())
    shared = shared_storages(model) if mode != "delta" else set()
    out: dict[str, str | None] = {}
    for name in plan.modules:
        if mode == "delta":
            out[name] = "mode='delta'"
            continue
        if name not in plan.rows:
            out[name] = "column deltas only"
        else:
            out[name] = fuse_blocker(model, name, modules[name], columns=name in plan.columns,
                                     bias=bias, dropout=dropout, shared=shared)
        if mode == "fused" and out[name] is not None:
            raise ValueError(f"mode='fused': {name!r} cannot be fused ({out[name]}); use "
                             "mode='auto' (that module then takes the delta path) or "
                             "mode='delta'")
    return out


class FusedRowLinear(RowSparseLinear):
    """A :class:`RowSparseLinear` (rows only, no bias/column deltas, no dropout) whose row
    delta is written into the base weight before the forward: one ``F.linear`` per call.

    >>> layer = FusedRowLinear(nn.Linear(64, 32), rows=[0, 5]); layer.mode   # 'fused'
    """

    mode = "fused"

    def __init__(self, base_layer: nn.Module, rows: Sequence[int] | torch.Tensor | None = None,
                 columns: Sequence[int] | torch.Tensor | None = None, *, bias: bool = False,
                 dropout: float = 0.0, delta_dtype: torch.dtype | None = None,
                 init: str = "zeros", generator: torch.Generator | None = None) -> None:
        if columns is not None and len(columns) or bias or dropout:
            raise ValueError("FusedRowLinear trains rows only (no column or bias deltas, no "
                             "dropout); use RowSparseLinear for those")
        super().__init__(base_layer, rows=rows, delta_dtype=delta_dtype, init=init,
                         generator=generator)
        if self.delta is None:
            raise ValueError("FusedRowLinear: select at least one row")
        w = row_weight(base_layer)
        self.register_buffer("base_rows", w.index_select(0, self.rows).clone(),
                             persistent=False)
        self._fused = False  # True once a forward wrote W0[rows] + dW into the weight
        self.register_state_dict_pre_hook(_state_dict_pre_hook)
        self._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
        self.register_load_state_dict_post_hook(_load_post_hook)

    # ------------------------------------------------------------------ fusing
    @property
    def fused(self) -> bool:
        """True once a forward has written ``W0[rows] + dW`` into the base weight (until
        :meth:`restore_base_weight`)."""
        return self._fused

    def _sync(self) -> None:
        """Write ``W0[rows] + dW`` (in the weight's dtype) into the base weight's rows: r x d_in
        values per forward, no comparison and no host sync. ``dW``'s version counter cannot say
        whether ``dW`` changed: fused optimizer kernels (``adamw_torch_fused``, the Trainer's
        CPU default) update parameters without bumping it. The write goes through ``.data`` so
        the weight's version counter stays put: a graph that saved the weight (a second
        forward before backward, activation checkpointing's recompute) stays valid, the
        values being the same as long as ``dW`` did not change in between; other in-place
        changes of the weight (merge, :meth:`restore_base_weight`) still bump it, so a
        backward over such a change raises instead of using the wrong weight."""
        w = self.base_layer.weight.data
        w = w.t() if self.is_conv1d else w
        delta, base = self.delta.detach(), self.base_rows   # detached: no graph, no no_grad()
        rows = torch.add(base, delta) if base.dtype == delta.dtype else \
            base.to(delta.dtype).add_(delta)
        w.index_copy_(0, self.rows, rows if rows.dtype == w.dtype else rows.to(w.dtype))
        self._fused = True

    # under torch.compile the write stays out of the graph (a graph break); the eager path
    # calls _sync directly (the disable wrapper costs ~8 us per call)
    _sync_uncompiled = torch.compiler.disable(_sync)

    @torch.no_grad()
    def restore_base_weight(self) -> None:
        """Put the original rows ``W0[rows]`` back into the base weight (bit-exact); the
        next forward writes ``W0[rows] + dW`` again. No-op when not fused or merged."""
        if not self._fused or self.merged:
            return
        row_weight(self.base_layer).index_copy_(0, self.rows, self.base_rows)
        self._fused = False

    def fuse_blocked_now(self) -> str | None:
        """Why this call must take the delta path (checked every forward), or ``None``."""
        base, w = self.base_layer, self.base_layer.weight
        if _fsdp_managed(base):
            return "managed by FSDP (sharded weights)"
        if w.requires_grad:
            return "base weight requires grad"
        if base._forward_hooks or base._forward_pre_hooks or "forward" in vars(base):
            return "hooks on the base layer"
        if not _is_plain(w):
            return "weight is a view or a tensor subclass (sharded?)"
        return None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        blocked = self.fuse_blocked_now()
        if args or kwargs or blocked is not None:
            if self._fused and _fsdp_managed(self.base_layer):
                raise RuntimeError(
                    "a fused row layer ran before the model was sharded with FSDP, so the "
                    "shards hold W0[rows] + dW as base weights. Call rowsft_nb.adapter.fused."
                    "restore_base_weights(model) before fully_shard/FSDP(...), or inject "
                    "with mode='delta'")
            self.restore_base_weight()
            return super().forward(x, *args, **kwargs)
        if torch.compiler.is_compiling():
            self._sync_uncompiled()
        else:
            self._sync()
        base = self.base_layer
        recompute, sources = None, ()
        recipe = getattr(x, RECOMPUTE_ATTR, None)
        if recipe is not None and torch.is_grad_enabled():
            fn, srcs, version = recipe
            # only where the frozen graph saves the sources anyway (they require grad) and
            # x was not changed in place since it was computed from them
            if x._version == version and all(s.requires_grad for s in srcs):
                recompute, sources = fn, tuple(srcs)
        return _FusedRows.apply(x, base.weight, base.bias, self.delta, self.rows,
                                self.is_conv1d, recompute, *sources)

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self) -> None:
        """As :meth:`RowSparseLinear.merge` (writes the same ``W0[rows] + dW`` the forward
        uses, so merged outputs equal fused outputs bit for bit)."""
        if self.merged:
            return
        self.restore_base_weight()
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: the base rows are ``W0[rows]`` again."""
        super().unmerge()
        self._fused = False

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fused={self.fused}"


def restore_base_weights(model: nn.Module) -> None:
    """Put ``W0[rows]`` back into every fused layer's base weight (each fuses again on its
    next forward); e.g. before sharding a model that already ran a forward.

    >>> restore_base_weights(model); fully_shard(model)
    """
    for module in model.modules():
        if isinstance(module, FusedRowLinear):
            module.restore_base_weight()


def _state_dict_pre_hook(module: FusedRowLinear, prefix: str, keep_vars: bool) -> None:
    module.restore_base_weight()


def _load_pre_hook(module: FusedRowLinear, state_dict: dict, prefix: str, *args: Any) -> None:
    module.restore_base_weight()


def _load_post_hook(module: FusedRowLinear, incompatible_keys: Any) -> None:
    """The base weight may have been loaded anew: its rows are the new originals."""
    if not module.merged:
        with torch.no_grad():
            module.base_rows.copy_(row_weight(module.base_layer).index_select(0, module.rows))
        module._fused = False
