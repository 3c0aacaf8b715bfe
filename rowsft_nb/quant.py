"""Quantized (bitsandbytes 4-bit / 8-bit) bases: quantize, dequantize, re-quantize NF4 blocks,
and measure quantization error.

The authors' quantized path (``finetune_LLM_quantization.py``, methods ``ours`` /
``ours_loftq``): the base is NF4 (double quantization, bf16 compute), rows are selected on a
float copy, the trainable rows start from Kaiming noise or from the rows' quantization
residual ``A = (W - deq(NF4(W)))[rows]``, and training ends with a float merge
``deq(Q) + S^T A``. Here also:

* :func:`quantize` - any float model to bitsandbytes ``Linear4bit`` (NF4/FP4) or
  ``Linear8bitLt`` (int8) layers, in place; heads stay float (as QLoRA).
* :func:`dequantize_weight` - one layer's ``[d_out, d_in]`` float weight, decoded on the fly
  (``targets.row_weight`` uses it, so scoring a 4-bit model reads ``deq(Q)`` one layer at a
  time and never dequantizes the whole model).
* :func:`requantize_rows_` - write new values into some rows of an NF4/FP4 layer,
  re-quantizing only the blocks that hold those rows; every other block (packed bytes and
  its absmax / double-quantization code) stays bit-identical. NF4 blocks run along the
  flattened ``[d_out, d_in]`` weight; when ``d_in`` is not a multiple of the block size a block
  straddles two rows and is re-quantized whole (its other row's values re-quantized from
  their current ``deq`` values). Blocks are re-quantized by bitsandbytes' own rule (without
  double quantization the result equals ``quantize_4bit`` of the whole new matrix, bit for
  bit); with double quantization the nested state is kept, so a touched block's absmax can
  only take the values its group of 256 blocks can store (offset +- second-level scale).
* bitsandbytes 0.50.2 on CPU, found here: an eval-mode, no-grad forward on AVX512-BF16 CPUs
  repacks a Linear4bit's weight in place, drops double quantization and rounds absmax to
  bf16 (:func:`standard_layout` turns that off for every layer this module builds or
  touches); and its CPU ``dequantize_4bit`` (used by the forward) decodes layers whose
  ``d_in`` is not a multiple of the block size wrongly (:func:`quantize` warns, naming them).
* merges of a row adapter over a 4-bit base: ``"4bit"`` (the default of
  ``merge_and_unload``: the selected rows' blocks only), ``"float"`` (the authors':
  ``deq(Q) + S^T A``), ``"requantize"`` (QLoRA's: dequantize, merge, quantize every block).
* scoring a quantized model: every metric sees ``W = deq(Q)`` (one layer decoded per call)
  and the 4-bit model's own activations and gradients. ``l1``/``l2`` therefore equal the
  float model's scores of ``deq(Q)``: the float ranking up to the quantization error
  (tests: identical to scoring the dequantized copy; Spearman > 0.9 against the float model
  on a tiny LLaMA). Gradient metrics (``taylor``, ``fisher``, ...) equal those of the
  dequantized float copy, i.e. of the model that actually trains.
* :func:`nuclear_norm_report` (the authors' ``1 - ||W - (Q + S^T A)||_* / ||W - Q||_*``) and
  :func:`output_error` (mean next-token KL and logit MSE against a reference model).

Usage::

    import rowsft_nb as rs
    float_model = rs.testing.tiny_llama(); model = copy.deepcopy(float_model)
    rs.quantize(model, "nf4", blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    rs.inject(model, plan, init="residual", reference=float_model)  # rows start at float values
    ...train...
    rs.merge_and_unload(model, into="4bit")                      # or "float" / "requantize"
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["require_bitsandbytes", "quantize", "dequantize", "dequantize_weight",
           "is_quantized_layer", "quant_settings", "layer_settings", "standard_layout",
           "requantize_rows_", "restore_", "requantize_layer", "merge_rows_into_4bit",
           "restore_merge", "merge_into", "residual_deltas", "nuclear_norm_report",
           "output_error", "quantization_error", "METHODS", "MERGE_MODES", "INSTALL_HINT"]

METHODS = ("nf4", "fp4", "int8")
INSTALL_HINT = 'pip install "rowsft-nb[quant]" (in a checkout: make install)'
MERGE_MODES = ("4bit", "float", "requantize")


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or ``ImportError`` naming the install command.

    >>> bnb = require_bitsandbytes()
    """
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"quantized bases need bitsandbytes (the 'quant' extra): "
                          f"{INSTALL_HINT}") from e
    return bitsandbytes


# ---------------------------------------------------------------------------- detection
def is_quantized_layer(module: nn.Module) -> bool:
    """True for bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (without importing bitsandbytes).

    >>> is_quantized_layer(model.model.layers[0].mlp.up_proj)
    """
    cls = type(module)
    return cls.__module__.startswith("bitsandbytes") and any(
        c.__name__ in ("Linear4bit", "Linear8bitLt") for c in cls.__mro__)


def _is_4bit(module: nn.Module) -> bool:
    return is_quantized_layer(module) and any(c.__name__ == "Linear4bit"
                                              for c in type(module).__mro__)


def standard_layout(module: nn.Module) -> nn.Module:
    """Keep a Linear4bit in bitsandbytes' standard storage layout (the one its
    ``quantize_4bit`` writes and this module decodes): bitsandbytes >= 0.49 on CPUs with
    AVX512-BF16 repacks the weight in place, drops double quantization and rounds absmax to
    bf16 at the first eval-mode forward without gradients; this turns that off (and undoes a
    repack already done, best effort). Returns ``module``.

    >>> standard_layout(layer)
    """
    if not _is_4bit(module):
        return module
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False
    st = getattr(module.weight, "quant_state", None)
    if st is not None and getattr(st, "packing_format_for_cpu", False):
        F = require_bitsandbytes().functional
        module.weight.data, module.weight.quant_state = \
            F._convert_weight_packed_for_cpu_inverse(module.weight.data, st)
    return module


def _state(module: nn.Module):
    standard_layout(module)
    st = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
    if st is None:
        raise ValueError(f"{type(module).__name__} has no quant_state: its weight is not "
                         "quantized yet (move it to a device, or build it with rs.quantize)")
    return st


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def layer_settings(module: nn.Module) -> dict[str, Any]:
    """``{"method", "blocksize", "double_quant", "compute_dtype"}`` of one quantized layer."""
    if _is_4bit(module):
        st = _state(module)
        return {"method": st.quant_type, "blocksize": int(st.blocksize),
                "double_quant": bool(st.nested),
                "compute_dtype": _dtype_name(getattr(module, "compute_dtype", None))}
    return {"method": "int8", "blocksize": None, "double_quant": False,
            "compute_dtype": None}


def quant_settings(model: nn.Module) -> dict[str, Any] | None:
    """The quantization of ``model``'s Linear layers (read from the layers themselves, so
    it works for ``rs.quantize``, ``BitsAndBytesConfig`` and adapted models alike), or
    ``None`` for a float model. ``ValueError`` if layers are quantized differently.

    >>> quant_settings(model)   # {'method': 'nf4', 'blocksize': 64, 'double_quant': True, ...}
    """
    found: dict[str, Any] | None = None
    for name, m in model.named_modules():
        if is_quantized_layer(m):
            s = layer_settings(m)
            if found is None:
                found = s
            elif s != found:
                raise ValueError(f"{name} is quantized as {s} but other layers as {found}: "
                                 "mixed quantization is not supported")
    return found


# ---------------------------------------------------------------------------- NF4 decoding
def _codes(module: nn.Module) -> torch.Tensor:
    """The 4-bit code indices of a Linear4bit, one per weight element (uint8, [n])."""
    st = _state(module)
    packed = module.weight.data.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    out = torch.empty(packed.numel() * 2, dtype=torch.uint8, device=packed.device)
    out[0::2] = packed >> 4
    out[1::2] = packed & 0xF
    return out[:math.prod(st.shape)]


def _pack(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def _absmax(module: nn.Module) -> torch.Tensor:
    """Per-block float32 absmax of a Linear4bit (double quantization decoded)."""
    st = _state(module)
    return _absmax_from(st) if st.nested else st.absmax.float()


def dequantize_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``deq(Q)``: the ``[d_out, d_in]`` weight of a quantized layer as a new float tensor
    (decoded from bitsandbytes' storage layout with its own code table; the weight of a
    float ``nn.Linear`` is returned as is).

    >>> W = dequantize_weight(model.model.layers[0].self_attn.q_proj)
    """
    if not is_quantized_layer(module):
        return module.weight
    if _is_4bit(module):
        st = _state(module)
        n, bs = math.prod(st.shape), int(st.blocksize)
        vals = st.code.float()[_codes(module).long()]
        scale = _absmax(module).repeat_interleave(bs)[:n]
        return (vals * scale).reshape(tuple(st.shape)).to(dtype)
    w = module.weight  # Int8Params: CB int8 [d_out, d_in], SCB row scales
    cb = getattr(w, "CB", None)
    scb = getattr(w, "SCB", None)
    if cb is None or scb is None:
        cb, scb = w.data, getattr(module.state, "SCB", None)
    if scb is None:
        raise ValueError("int8 layer without row scales (SCB): move it to its device first")
    return (cb.float() * (scb.float().unsqueeze(1) / 127.0)).to(dtype)


# ---------------------------------------------------------------------------- quantize
def _check_method(method: Any, blocksize: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "int8" and (isinstance(blocksize, bool) or not isinstance(blocksize, int)
                             or blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096)):
        raise ValueError(f"blocksize must be a power of two in [32, 4096] (bitsandbytes "
                         f"NF4/FP4 block sizes), got {blocksize!r}")


def _quantize_4bit_tensor(w: torch.Tensor, method: str, blocksize: int, double_quant: bool):
    F = require_bitsandbytes().functional
    return F.quantize_4bit(w.detach().float().contiguous(), blocksize=blocksize,
                           compress_statistics=double_quant, quant_type=method)


def _make_4bit(linear: nn.Module, w: torch.Tensor, bias: torch.Tensor | None, method: str,
               blocksize: int, double_quant: bool, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes Linear4bit holding NF4/FP4(``w``) (``w``: [d_out, d_in])."""
    bnb = require_bitsandbytes()
    d_out, d_in = w.shape
    device = w.device
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=method,
                              device="meta")
    packed, st = _quantize_4bit_tensor(w, method, blocksize, double_quant)
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=st,
                                     blocksize=blocksize, compress_statistics=double_quant,
                                     quant_type=method, module=layer, bnb_quantized=True)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone().to(device), requires_grad=False)
    layer.quant_state = st
    layer.train(linear.training)
    return standard_layout(layer)


def _make_int8(w: torch.Tensor, bias: torch.Tensor | None, training: bool) -> nn.Module:
    bnb = require_bitsandbytes()
    d_out, d_in = w.shape
    layer = bnb.nn.Linear8bitLt(d_in, d_out, bias=bias is not None, has_fp16_weights=False,
                                threshold=0.0, device="meta")
    layer.weight = bnb.nn.Int8Params(w.detach().to("cpu", torch.float16).contiguous(),
                                     requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    layer = layer.to(w.device)
    layer.train(training)
    return layer


def quantize(model: nn.Module, method: str = "nf4", *, blocksize: int = 64,
             double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
             targets: Any = "all-linear", exclude: Any = None) -> nn.Module:
    """Replace the target Linear layers of ``model`` (default: every Linear but the heads,
    as QLoRA) by bitsandbytes ``Linear4bit`` (``"nf4"``/``"fp4"``; ``blocksize``,
    ``double_quant`` = nested absmax quantization, ``compute_dtype``) or ``Linear8bitLt``
    (``"int8"``), in place; returns ``model``. Quantize before ``inject`` (rows are then
    scored on ``deq(Q)``; keep a float copy for ``init="residual"``). All layers are built
    before any is swapped in, so a failure leaves the model unchanged.

    >>> quantize(model, "nf4", blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    """
    from .adapter.model import _set_module, adapter_state
    from .targets import find_targets, is_conv1d

    _check_method(method, blocksize)
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a floating torch dtype, got {compute_dtype!r}")
    require_bitsandbytes()
    if adapter_state(model) is not None:
        raise ValueError("the model carries a row adapter: quantize the base before "
                         "rs.inject (or rs.unload(model) first)")
    if quant_settings(model) is not None:
        raise ValueError("the model is already quantized (bitsandbytes layers found); "
                         "quantize a float model (rs.dequantize(model) first to change settings)")
    names = find_targets(model, targets, exclude)
    modules = dict(model.named_modules())
    new: dict[str, nn.Module] = {}
    for name in names:
        m = modules[name]
        if m.weight.device.type == "meta":
            raise ValueError(f"{name} is on the meta device: load real weights first")
        w = m.weight.t() if is_conv1d(m) else m.weight
        if method == "int8":
            new[name] = _make_int8(w, m.bias, m.training)
        else:
            new[name] = _make_4bit(m, w, m.bias, method, blocksize, double_quant, compute_dtype)
    if method != "int8":
        _check_cpu_decoding(new)
    for name, layer in new.items():
        _set_module(model, name, layer)
    return model


def _check_cpu_decoding(layers: Mapping[str, nn.Module]) -> None:
    """Warn about layers that bitsandbytes' own ``dequantize_4bit`` (used by the forward on
    this device) decodes differently from its ``quantize_4bit`` layout. Seen with
    bitsandbytes 0.50.2 on CPU for many ``d_in`` not a multiple of the block size."""
    F = require_bitsandbytes().functional
    bad = []
    for name, layer in layers.items():
        st = _state(layer)
        if int(st.shape[1]) % int(st.blocksize) == 0:
            continue
        theirs = F.dequantize_4bit(layer.weight.data, st).float()
        if not torch.equal(theirs.reshape(-1), dequantize_weight(layer).reshape(-1)):
            bad.append(name)
    if bad:
        import warnings
        warnings.warn(f"bitsandbytes' 4-bit kernel on this device decodes {len(bad)} layer(s) "
                      f"whose d_in is not a multiple of the block size differently from its "
                      f"own quantization layout (e.g. {bad[0]!r}): their forward is wrong. "
                      "Pass exclude=[...] for them, or a blocksize that divides d_in.",
                      stacklevel=3)


def dequantize(model: nn.Module, dtype: torch.dtype = torch.float32,
               names: Iterable[str] | None = None) -> nn.Module:
    """Replace quantized layers (all, or ``names``; base layers inside row adapters included)
    by float ``nn.Linear`` holding ``deq(Q)`` exactly (float32 default); returns ``model``.

    >>> dequantize(model)          # a plain float model with the 4-bit model's outputs
    """
    from .adapter.model import _set_module

    wanted = None if names is None else set(names)
    new: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if is_quantized_layer(m) and (wanted is None or name in wanted):
            new[name] = _float_linear(m, dtype)
    for name, layer in new.items():
        _set_module(model, name, layer)
    return model


def _float_linear(m: nn.Module, dtype: torch.dtype) -> nn.Linear:
    w = dequantize_weight(m, dtype)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    if m.bias is not None:
        lin.bias = nn.Parameter(m.bias.detach().to(dtype).clone(), requires_grad=False)
    lin.train(m.training)
    return lin


# ---------------------------------------------------------------------------- re-quantize
def _blocks_of_rows(rows: torch.Tensor, d_in: int, blocksize: int, n: int) -> torch.Tensor:
    """Sorted indices of every block holding an element of one of ``rows``."""
    rows = rows.long().cpu()
    first = (rows * d_in) // blocksize
    last = ((rows + 1) * d_in - 1) // blocksize
    span = int((last - first).max()) + 1 if rows.numel() else 0
    ids = (first.unsqueeze(1) + torch.arange(span).unsqueeze(0))
    ids = ids[ids <= last.unsqueeze(1)]
    return torch.unique(ids.clamp(max=(n - 1) // blocksize))


def _nearest_codes(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' rounding: bucketize against the midpoints of the sorted code."""
    order = torch.argsort(code)
    mids = (code[order[:-1]] + code[order[1:]]) / 2
    return order[torch.bucketize(scaled, mids)].to(torch.uint8)


def _quantize_blocks(values: torch.Tensor, valid: torch.Tensor, code: torch.Tensor,
                     candidates: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize blocks ``values`` [k, bs] (``valid``: mask of real elements) by bitsandbytes'
    rule: absmax = max |v|, codes = nearest of ``code`` to v / absmax. With ``candidates``
    [k, 256] (the absmax values a double-quantized block can store, its nested state fixed)
    the stored absmax is the candidate nearest to max |v|, as bitsandbytes' nested encoding
    rounds it. Returns (codes [k, bs] uint8, absmax [k] float32 or candidate indices [k]
    uint8). (A least-squares choice of the candidate gives a lower weight error but clips
    outliers and doubled the output error on SmolLM2.)"""
    v = torch.where(valid, values, torch.zeros_like(values))
    am = v.abs().amax(1)
    if candidates is None:
        scaled = torch.clamp(v / am.clamp(min=1e-38).unsqueeze(1), -1, 1)
        return _nearest_codes(scaled, code), am.float()
    best = (candidates - am.unsqueeze(1)).abs().argmin(1)
    chosen = candidates.gather(1, best.unsqueeze(1)).squeeze(1)
    scaled = torch.clamp(v / chosen.clamp(min=1e-38).unsqueeze(1), -1, 1)
    return _nearest_codes(scaled, code), best.to(torch.uint8)


@torch.no_grad()
def requantize_rows_(module: nn.Module, rows: Sequence[int] | torch.Tensor,
                     values: torch.Tensor, *, widen: bool = False) -> dict[str, torch.Tensor]:
    """Set rows ``rows`` of a 4-bit layer to ``values`` ([r, d_in], float) in place,
    re-quantizing only the blocks that hold those rows (a straddling block is re-quantized
    whole: its other row's elements from their current ``deq`` values). Every other block
    keeps its packed bytes and its absmax (or its double-quantization code) bit-identical;
    with double quantization the nested state (offset, second-level absmax) is kept, and
    each touched block stores the absmax code nearest its max |value|. A new row whose
    absmax exceeds the largest absmax its nested group (256 blocks) can store is then clipped
    there (``backup["nested_groups_short"]`` lists such groups);
    ``widen=True`` instead raises that group's second-level scale and re-encodes its blocks'
    8-bit absmax codes (their 4-bit codes kept, values move < 1%; listed in
    ``backup["nested_groups_reencoded"]``). Returns a backup for :func:`restore_`.

    >>> backup = requantize_rows_(layer, [3, 7], new_rows)
    """
    if is_quantized_layer(module) and not _is_4bit(module):
        return _requantize_rows_int8(module, rows, values)
    if not _is_4bit(module):
        raise TypeError(f"requantize_rows_ needs a bitsandbytes Linear4bit or Linear8bitLt, "
                        f"got {type(module).__name__}")
    st = _state(module)
    d_out, d_in = (int(s) for s in st.shape)
    rows = torch.as_tensor(rows, dtype=torch.long).cpu()
    if values.shape != (rows.numel(), d_in):
        raise ValueError(f"values must be [{rows.numel()}, {d_in}], got {tuple(values.shape)}")
    backup = {"packed": module.weight.data.clone(), "absmax": st.absmax.clone()}
    if rows.numel() == 0:
        return backup
    n, bs = d_out * d_in, int(st.blocksize)
    blocks = _blocks_of_rows(rows, d_in, bs, n)
    flat = dequantize_weight(module).reshape(-1)            # a new tensor: one layer, transient
    flat.view(d_out, d_in).index_copy_(0, rows.to(flat.device), values.float().to(flat.device))
    nb = (n + bs - 1) // bs
    padded = torch.zeros(nb * bs, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    vals = padded.view(nb, bs)[blocks]
    mask = (blocks.unsqueeze(1) * bs + torch.arange(bs)).to(flat.device) < n  # real elements
    code = st.code.float()
    candidates = None
    if st.nested:
        s2 = st.state2
        backup["absmax2"] = s2.absmax.clone()
        groups = blocks // s2.blocksize
        needed = torch.where(mask, vals, torch.zeros_like(vals)).abs().amax(1)
        ceiling = s2.absmax.float()[groups] + st.offset     # the largest absmax storable
        grow = torch.unique(groups[needed > ceiling])
        backup["nested_groups_short"] = grow
        backup["nested_groups_reencoded"] = grow[:0]
        if widen and grow.numel():   # a new row's absmax outgrows its group's scale
            _widen_nested_groups(st, grow, blocks, needed)
            backup["nested_groups_reencoded"] = grow
        scale = s2.absmax.float()[groups]                    # [k]
        candidates = s2.code.float().unsqueeze(0) * scale.unsqueeze(1) + st.offset
    new_codes, new_absmax = _quantize_blocks(vals, mask, code, candidates)
    codes = _codes(module).clone()
    padded_codes = torch.zeros(nb * bs, dtype=torch.uint8, device=codes.device)
    padded_codes[:n] = codes
    pc = padded_codes.view(nb, bs)
    pc[blocks] = torch.where(mask, new_codes, pc[blocks])
    packed = _pack(padded_codes[:n])
    stored = module.weight.data
    if stored.dtype != torch.uint8:
        stored = stored.view(torch.uint8)
    stored.copy_(packed.reshape(stored.shape))
    st.absmax[blocks] = new_absmax.to(st.absmax.dtype)
    return backup


def _widen_nested_groups(st: Any, groups: torch.Tensor, blocks: torch.Tensor,
                         needed: torch.Tensor) -> None:
    """Raise the second-level scale of nested groups ``groups`` so that the absmax values
    ``needed`` of the touched ``blocks`` fit, re-encoding the 8-bit absmax codes of the
    group's other blocks to their nearest value (their 4-bit codes are kept). The offset and
    every other group stay bit-identical."""
    s2 = st.state2
    gsize = int(s2.blocksize)
    code2 = s2.code.float()
    current = _absmax_from(st)                               # float absmax of every block
    wanted = current.clone()
    wanted[blocks] = torch.maximum(current[blocks], needed)
    for g in groups.tolist():
        sl = slice(g * gsize, min((g + 1) * gsize, current.numel()))
        centred = wanted[sl] - st.offset
        scale = centred.abs().max().clamp(min=1e-12)
        s2.absmax[g] = scale.to(s2.absmax.dtype)
        st.absmax[sl] = _nearest_codes((current[sl] - st.offset) / scale, code2).to(
            st.absmax.dtype)


def _absmax_from(st: Any) -> torch.Tensor:
    s2 = st.state2
    idx = st.absmax.long()
    scale = s2.absmax.float().repeat_interleave(s2.blocksize)[:idx.numel()]
    return s2.code.float()[idx] * scale + st.offset


def _requantize_rows_int8(module: nn.Module, rows: Sequence[int] | torch.Tensor,
                          values: torch.Tensor) -> dict[str, torch.Tensor]:
    """int8 (LLM.int8 row-wise absmax): each row has its own scale, so only the selected
    rows' int8 values and scales change."""
    w = module.weight
    rows = torch.as_tensor(rows, dtype=torch.long).to(w.device)
    if values.shape != (rows.numel(), w.shape[1]):
        raise ValueError(f"values must be [{rows.numel()}, {w.shape[1]}], "
                         f"got {tuple(values.shape)}")
    backup = {"int8": w.data.clone(), "scb": w.SCB.clone()}
    v = values.float().to(w.device)
    scb = v.abs().amax(1)
    cb = torch.round(v * (127.0 / scb.clamp(min=1e-12)).unsqueeze(1)).clamp(-127, 127)
    w.data.index_copy_(0, rows, cb.to(w.data.dtype))
    w.SCB.index_copy_(0, rows, scb.to(w.SCB.dtype))
    return backup


@torch.no_grad()
def restore_(module: nn.Module, backup: Mapping[str, torch.Tensor]) -> None:
    """Undo :func:`requantize_rows_` bit-exactly (packed bytes and absmax)."""
    if "int8" in backup:
        module.weight.data.copy_(backup["int8"])
        module.weight.SCB.copy_(backup["scb"])
        return
    st = _state(module)
    module.weight.data.copy_(backup["packed"])
    st.absmax.copy_(backup["absmax"])
    if "absmax2" in backup:
        st.state2.absmax.copy_(backup["absmax2"])


def requantize_layer(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new Linear4bit with ``weight`` ([d_out, d_in]) quantized from scratch with
    ``module``'s settings (every block, new double-quantization state: QLoRA's merge).

    >>> new = requantize_layer(layer, dequantize_weight(layer) + delta)
    """
    s = layer_settings(module)
    return _make_4bit(module, weight, module.bias, s["method"], s["blocksize"],
                      s["double_quant"], getattr(module, "compute_dtype", None) or torch.float32)


# ---------------------------------------------------------------------------- row adapters
def merge_rows_into_4bit(layer: nn.Module) -> dict[str, Any]:
    """Merge a RowSparseLinear's row deltas into its 4-bit base in place: rows become
    ``deq(Q)[rows] + delta`` re-quantized block-wise (:func:`requantize_rows_`), bias deltas
    are added to the float bias. Returns the backup ``RowSparseLinear.unmerge`` restores.
    Column deltas touch every row: ``ValueError`` (merge with ``into="float"`` or
    ``"requantize"``)."""
    base = layer.base_layer
    if layer.column_delta is not None:
        raise ValueError("column deltas change every row of a 4-bit layer: merge with "
                         "merge_and_unload(model, into='float') or into='requantize'")
    backup: dict[str, Any] = {"quant": True}
    if layer.delta is not None:
        rows = layer.rows
        new = dequantize_weight(base)[rows.to(base.weight.device)] + layer.delta.float()
        backup["q"] = requantize_rows_(base, rows, new)
    try:
        if layer.delta_bias is not None:
            with torch.no_grad():
                if base.bias is None:
                    base.bias = nn.Parameter(torch.zeros(layer.out_features,
                                                         device=layer.delta_bias.device),
                                             requires_grad=False)
                    layer._created_bias = True
                old_b = base.bias.index_select(0, layer.rows)
                backup["bias"] = old_b.clone()
                base.bias.index_copy_(0, layer.rows, (old_b.to(layer.delta_bias.dtype)
                                                      + layer.delta_bias).to(base.bias.dtype))
    except BaseException:
        restore_merge(layer, backup)
        raise
    return backup


def restore_merge(layer: nn.Module, backup: Mapping[str, Any]) -> None:
    """Undo :func:`merge_rows_into_4bit` bit-exactly."""
    layer._restore_bias(backup)
    if "q" in backup:
        restore_(layer.base_layer, backup["q"])


def merge_into(model: nn.Module, into: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``merge_and_unload`` of a row adapter over a quantized base.

    ``into="4bit"``: the selected rows' blocks re-quantized, everything else bit-identical;
    ``"float"`` (the authors'): every quantized layer dequantized to ``dtype``, then the exact
    float merge ``deq(Q) + S^T A``; ``"requantize"`` (QLoRA's): each adapted layer merged in
    float and quantized again from scratch. On an error the model is left as it was.

    >>> merge_into(model, "float")
    """
    from .adapter.model import _require_state, _set_module, adapted_modules, merge_and_unload

    if into not in MERGE_MODES:
        raise ValueError(f"into must be one of {MERGE_MODES} for a quantized base, got {into!r}")
    inner, state = _require_state(model, "merge_and_unload")
    layers = adapted_modules(inner)
    if into == "4bit":
        return merge_and_unload(model)
    if into == "requantize" and any(not _is_4bit(l.base_layer) for l in layers.values()):
        raise ValueError("into='requantize' needs 4-bit base layers under every adapter")
    originals = {n: l.base_layer for n, l in layers.items()}
    flags = {id(p): f for p, f in state.requires_grad}
    swapped: dict[str, nn.Module] = {}
    try:
        for n, l in layers.items():
            if is_quantized_layer(l.base_layer):
                lin = _float_linear(l.base_layer, dtype)
                l.base_layer = lin
                swapped[n] = lin
                state.requires_grad.append((lin.weight, flags.get(id(originals[n].weight), False)))
        merge_and_unload(model)   # exact float merge: W[rows] += delta
    except BaseException:
        for n in swapped:
            layers[n].base_layer = originals[n]
        raise
    if into == "float":
        return dequantize(inner, dtype)
    for n, lin in swapped.items():  # re-quantize the merged layers, every block
        orig = originals[n]
        _set_module(inner, n, requantize_layer(orig, lin.weight.detach()))
    return inner


def residual_deltas(model: nn.Module, reference: nn.Module | Mapping[str, torch.Tensor],
                    names: Iterable[str], rows: Mapping[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """``{name: (W_ref - deq(Q))[rows]}`` for each module ``name`` of ``model`` (float32):
    the deltas with which the selected rows reproduce the reference (float) weights.
    ``reference``: the float model (same module names) or its ``state_dict``. Raises
    ``ValueError`` naming a module the reference lacks or whose shape differs.

    >>> deltas = residual_deltas(q_model, float_model, plan.modules, plan.rows)
    """
    from .targets import is_conv1d, linear_shape, row_weight

    modules = dict(model.named_modules())
    if isinstance(reference, nn.Module):
        ref_modules = dict(reference.named_modules())
    elif isinstance(reference, Mapping):
        ref_modules = None
    else:
        raise TypeError("reference must be the float model (nn.Module) or its state_dict, "
                        f"got {type(reference).__name__}")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        m = modules[name]
        base = getattr(m, "base_layer", m)
        shape = linear_shape(base)
        if ref_modules is not None:
            ref = ref_modules.get(name)
            ref = getattr(ref, "base_layer", ref)
            if ref is None or not hasattr(ref, "weight"):
                raise ValueError(f"init='residual': the reference model has no module {name!r}")
            w_ref = row_weight(ref)
        else:
            key = f"{name}.weight"
            if key not in reference:
                raise ValueError(f"init='residual': the reference state_dict lacks {key!r}")
            w_ref = reference[key]
            if is_conv1d(base):
                w_ref = w_ref.t()
        if tuple(w_ref.shape) != tuple(shape):
            raise ValueError(f"init='residual': {name} is {tuple(shape)} in the model but "
                             f"{tuple(w_ref.shape)} in the reference (another architecture?)")
        w_q = row_weight(base)
        idx = torch.as_tensor(rows[name]).long().to(w_q.device)
        out[name] = w_ref.detach().float().to(w_q.device)[idx] - w_q.detach().float()[idx]
    return out


# ---------------------------------------------------------------------------- reports
def _nuclear(x: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(x.double()).sum())


@torch.no_grad()
def nuclear_norm_report(model: nn.Module, reference: nn.Module | Mapping[str, torch.Tensor]
                        ) -> dict[str, Any]:
    """The authors' per-module repair ratio for an adapted quantized model:
    ``1 - ||W - (deq(Q) + S^T A)||_* / ||W - deq(Q)||_*`` (nuclear norms; W: the reference
    float weights; A: the current row deltas). 1 = the rows repair all quantization error,
    0 = none. Returns ``{"per_module": {name: ratio}, "overall": 1 - sum num / sum den,
    "mean": mean ratio}``.

    >>> nuclear_norm_report(model, float_model)["overall"]
    """
    from .adapter.model import adapted_modules
    from .targets import row_weight

    per: dict[str, float] = {}
    num = den = 0.0
    layers = adapted_modules(model)
    if not layers:
        raise ValueError("nuclear_norm_report needs an adapted model (rs.inject first)")
    refs = residual_deltas(model, reference, layers,
                           {n: torch.arange(l.out_features) for n, l in layers.items()})
    for name, layer in layers.items():
        resid = refs[name]                              # W - deq(Q), [d_out, d_in]
        after = resid.clone()
        if layer.delta is not None:
            after.index_add_(0, layer.rows.to(after.device), -layer.delta.float())
        if layer.column_delta is not None:
            after.index_add_(1, layer.columns.to(after.device), -layer.column_delta.float())
        d, a = _nuclear(resid), _nuclear(after)
        per[name] = 1.0 - a / d if d > 0 else 0.0
        num += a
        den += d
    return {"per_module": per, "overall": 1.0 - num / den if den > 0 else 0.0,
            "mean": sum(per.values()) / len(per)}


@torch.no_grad()
def quantization_error(model: nn.Module, reference: nn.Module | Mapping[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """Per quantized (base) layer of ``model``, the row-wise squared quantization error
    ``||W_ref[i] - deq(Q)[i]||^2`` ([d_out]): which rows a residual start would repair.

    >>> err = quantization_error(q_model, float_model)["model.layers.0.mlp.up_proj"]
    """
    names = [n.removesuffix(".base_layer") for n, m in model.named_modules()
             if is_quantized_layer(m)]
    modules = dict(model.named_modules())
    rows = {n: torch.arange(getattr(modules[n], "out_features")) for n in names}
    res = residual_deltas(model, reference, names, rows)
    return {n: (r ** 2).sum(1) for n, r in res.items()}


@torch.no_grad()
def output_error(reference: nn.Module, model: nn.Module,
                 batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Output error of ``model`` against ``reference`` on calibration batches: mean over
    (attended) tokens of ``KL(p_ref || p_model)`` of the next-token distributions, and the
    mean squared logit difference. Both models run in eval mode, float32 logits.

    >>> output_error(float_model, q_model, batches)   # {'kl': ..., 'logit_mse': ..., 'tokens': ...}
    """
    kl_sum = mse_sum = 0.0
    tokens = 0
    modes = (reference.training, model.training)
    reference.eval()
    model.eval()
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            a = reference(**inputs).logits.float()
            b = model(**inputs).logits.float()
            mask = inputs.get("attention_mask")
            mask = torch.ones(a.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
            la, lb = a.log_softmax(-1), b.log_softmax(-1)
            kl = (la.exp() * (la - lb)).sum(-1)
            mse = ((a - b) ** 2).mean(-1)
            kl_sum += float(kl[mask].sum())
            mse_sum += float(mse[mask].sum())
            tokens += int(mask.sum())
    finally:
        reference.train(modes[0])
        model.train(modes[1])
    if tokens == 0:
        raise ValueError("output_error: the batches hold no attended tokens")
    return {"kl": kl_sum / tokens, "logit_mse": mse_sum / tokens, "tokens": tokens}
