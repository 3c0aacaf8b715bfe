"""Which modules are targets, and a uniform row view of Linear-like layers.

A *row* is an output neuron: a row of ``nn.Linear.weight`` ([d_out, d_in]) or a column
of GPT-2's ``Conv1D.weight`` ([d_in, d_out]). Everything else in the library goes
through :func:`row_weight` and :func:`linear_shape` so it never cares which one it has.

Usage::

    names = find_targets(model, "all-linear")            # heads left out
    names = find_targets(model, ["q_proj", "v_proj"])     # name suffixes
    names = find_targets(model, r".*\\.mlp\\..*_proj")      # regex, must fullmatch
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable, Sequence

import torch
from torch import nn

try:  # GPT-2 style layer with weight [in, out]
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers always present in practice
    Conv1D = ()  # type: ignore[assignment,misc]

TargetSpec = str | Sequence[str] | None

# The one list of task-head names: last name components that mark a task head (left out by
# "all-linear"), each with whether ``inject(modules_to_save="auto")`` trains it fully
# (classifier-style heads: yes; lm_head and masked-LM heads: never).
HEADS = {"lm_head": False, "classifier": True, "score": True, "qa_outputs": True,
         "out_proj_head": False, "cls": False}
HEAD_NAMES = tuple(HEADS)
TRAINABLE_HEADS = tuple(k for k, trains in HEADS.items() if trains)

_LAYER_RE = re.compile(r"^(?P<prefix>.*?)\.(?P<idx>\d+)\.(?P<rest>.+)$")


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear-like module (bitsandbytes 4/8-bit layers included)."""
    if _is_quantized(module):
        return (module.out_features, module.in_features)
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])


def row_weight(module: nn.Module) -> torch.Tensor:
    """The weight as a [d_out, d_in] view (no copy), whatever the layer stores. A
    bitsandbytes 4/8-bit layer gives its dequantized weight ``deq(Q)``: a new float32
    tensor decoded for this call only (``rowsft_nb.quant.dequantize_weight``)."""
    if _is_quantized(module):
        from .quant import dequantize_weight
        return dequantize_weight(module)
    return module.weight.t() if is_conv1d(module) else module.weight


def _is_quantized(module: nn.Module) -> bool:
    """bitsandbytes Linear4bit / Linear8bitLt (checked without importing bitsandbytes)."""
    return type(module).__module__.startswith("bitsandbytes")


def embeddings(model: nn.Module, which: str) -> nn.Module | None:
    """``model.get_input_embeddings()`` / ``get_output_embeddings()`` (``which`` = "input" or
    "output"), or None where the model has none or does not implement it."""
    getter = getattr(model, f"get_{which}_embeddings", None)
    try:
        return getter() if getter is not None else None
    except Exception:  # some architectures raise NotImplementedError or worse here
        return None


def head_module_names(model: nn.Module) -> list[str]:
    """Names of Linear-like task heads: the output embedding and classifier-like layers."""
    heads: set[str] = set()
    out = embeddings(model, "output")
    for name, module in model.named_modules():
        if not is_linear_like(module):
            continue
        last = name.rsplit(".", 1)[-1]
        if module is out or last in HEAD_NAMES or name.startswith(("classifier.", "score.")):
            heads.add(name)
    return sorted(heads)


def find_targets(model: nn.Module, targets: TargetSpec = "all-linear",
                 exclude: TargetSpec = None, include_heads: bool = False) -> list[str]:
    """Names of the Linear-like modules selected PEFT-style.

    ``targets``: ``"all-linear"`` (every Linear/Conv1D but the task heads), a regex string
    that must fullmatch the module name, or a list of name suffixes (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``). ``exclude`` takes the same forms (``"all-linear"``
    excepted). Raises ``ValueError`` when nothing matches.
    """
    linear = [n for n, m in model.named_modules() if n and is_linear_like(m)]
    heads = set(head_module_names(model))
    if targets is None or targets == "all-linear":
        chosen = [n for n in linear if include_heads or n not in heads]
    else:
        chosen = [n for n in linear if name_matches(n, targets)]
    if exclude:
        chosen = [n for n in chosen if not name_matches(n, exclude)]
    if not chosen:
        sample = ", ".join(linear[:8]) + (" ..." if len(linear) > 8 else "")
        raise ValueError(
            f"No Linear/Conv1D module matches targets={targets!r} exclude={exclude!r}. "
            f"Linear-like modules in this model: {sample or 'none'}. "
            "Pass 'all-linear', a list of name suffixes, or a regex that fullmatches names.")
    return chosen


def name_matches(name: str, spec: str | Sequence[str]) -> bool:
    """PEFT-style match: a regex string must fullmatch ``name``; a list matches by
    equality or ``.``-suffix (``"q_proj"`` matches ``...self_attn.q_proj``)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def layer_index(name: str) -> int | None:
    """Transformer block index in a module name (``...layers.3.mlp.up_proj`` -> 3)."""
    m = _LAYER_RE.match(name)
    return int(m.group("idx")) if m else None


def module_type(name: str) -> str:
    """The name with its block prefix removed (``...layer.3.attention.self.query`` ->
    ``attention.self.query``); names outside blocks are returned whole."""
    m = _LAYER_RE.match(name)
    return m.group("rest") if m else name


def short_type(name: str) -> str:
    """Last component of :func:`module_type` (``q_proj``, ``query``, ``dense``...)."""
    return module_type(name).rsplit(".", 1)[-1]


def model_fingerprint(model: nn.Module, names: Iterable[str] | None = None) -> str:
    """Hash (blake2b, 16 hex chars) of the weights of ``names`` (default: every
    Linear-like module but the heads). Detects loading onto different base weights."""
    modules = dict(model.named_modules())
    if names is None:
        heads = set(head_module_names(model))
        names = [n for n, m in modules.items() if n and is_linear_like(m) and n not in heads]
        # an adapted layer's frozen original sits at "<name>.base_layer": hash it as "<name>"
        names = [n.removesuffix(".base_layer") for n in names]
    h = hashlib.blake2b(digest_size=8)
    for n in sorted(names):
        m = modules[n]
        base = getattr(m, "base_layer", m)  # an adapted layer hashes its frozen base
        if base is not m and hasattr(m, "restore_base_weight"):
            m.restore_base_weight()  # a fused adapter layer puts W0[rows] back first
        w = base.weight.detach()
        h.update(n.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
