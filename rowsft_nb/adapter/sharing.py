"""Activation sharing: a fused row layer recomputes its input in backward from tensors the
frozen model saves anyway, instead of saving the input itself.

The row delta's gradient ``g[..., rows]^T x`` needs the layer input ``x``. For the MLP's
output projection, ``x`` is computed from tensors the frozen graph already keeps:

* gated MLPs (LLaMA, Mistral, Qwen2/3, Gemma 1-3): ``x = act(gate(h)) * up(h)``; the product's
  backward saves both factors, so the fused ``down_proj`` saves those two (no new memory) and
  recomputes the product in backward;
* BERT/RoBERTa/ELECTRA intermediate and ViT MLP: ``x = GELU(z)``; GELU's backward saves ``z``,
  so the fused ``output.dense`` / ``fc2`` saves ``z`` and recomputes ``GELU(z)``;
* the normalised hidden state feeding q/k/v and gate/up (LLaMA-style RMSNorm and Gemma's
  ``x_hat * (1 + w)``: from the residual stream ``h`` and ``1/rms(h)``, both saved by the
  norm's backward; ``nn.LayerNorm``
  in BERT/ViT/GPT-2...: from its input, saved by ``layer_norm``'s backward).

A producer module's forward is replaced (on the instance) by one doing exactly the same
operations that also tags its output with ``(fn, sources)``
(:data:`~rowsft_nb.adapter.fused.RECOMPUTE_ATTR`). The fused consumer uses the tag only when
every source requires grad (then the frozen graph saves them); otherwise, for other
families, under ``torch.compile`` or when a class's forward is not the known one, ``x`` is
saved as before. :func:`unshare_activations` restores the class forward.

Usage::

    names = share_activations(model, fused={"model.layers.0.mlp.down_proj"})
    unshare_activations(model, names)
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Callable, Iterable

import torch
from torch import nn

from .fused import RECOMPUTE_ATTR

__all__ = ["share_activations", "unshare_activations", "FAMILIES"]


def _tag(x: torch.Tensor, fn: Callable[..., torch.Tensor], *sources: torch.Tensor) -> None:
    """Mark ``x == fn(*sources)`` (valid while ``x._version`` is unchanged: no in-place op)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        setattr(x, RECOMPUTE_ATTR, (fn, sources, x._version))


def _rms_norm(weight: torch.Tensor, dtype: torch.dtype, h: torch.Tensor,
              rstd: torch.Tensor) -> torch.Tensor:
    return weight * (h * rstd).to(dtype)


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    h = hidden_states.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(variance + self.variance_epsilon)
    out = _rms_norm(self.weight, input_dtype, h, rstd)   # the class forward's exact ops
    _tag(out, functools.partial(_rms_norm, self.weight, input_dtype), h, rstd)
    return out


def _gemma_rms_norm(weight: torch.Tensor, dtype: torch.dtype, h: torch.Tensor,
                    rstd: torch.Tensor) -> torch.Tensor:
    return ((h * rstd) * (1.0 + weight.float())).to(dtype)


def _gemma_rms_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma 1-3 RMSNorm: ``(x_hat * (1 + w)).type_as(x)`` in fp32 (the class's exact ops);
    ``x_hat = h * rstd`` saves ``h`` and ``rstd``, the product with the frozen ``1 + w`` saves
    nothing more that requires grad."""
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
    out = _gemma_rms_norm(self.weight, x.dtype, h, rstd)
    _tag(out, functools.partial(_gemma_rms_norm, self.weight, x.dtype), h, rstd)
    return out


def _layer_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = nn.LayerNorm.forward(self, x)
    _tag(out, functools.partial(nn.LayerNorm.forward, self), x)
    return out


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    a = self.act_fn(self.gate_proj(x))
    u = self.up_proj(x)
    h = a * u
    _tag(h, torch.mul, a, u)
    return self.down_proj(h)


def _intermediate_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    z = self.dense(hidden_states)
    x = self.intermediate_act_fn(z)
    _tag(x, self.intermediate_act_fn, z)
    return x


def _vit_mlp_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    z = self.fc1(hidden_states)
    x = self.activation_fn(z)
    _tag(x, self.activation_fn, z)
    return self.fc2(x)


def _consumer_down(name: str) -> str:
    return f"{name}.down_proj"


def _consumer_output(name: str) -> str:
    return f"{name.rpartition('.')[0]}.output.dense".lstrip(".")


def _consumer_fc2(name: str) -> str:
    return f"{name}.fc2"


def _any_consumer(name: str) -> None:
    """Norms feed q/k/v, gate/up, intermediate, c_attn...: shared wherever a fused layer is."""
    return None


#: family -> (producer classes, lines of the class forward that use ``self.``, our forward,
#: name of the fused consumer given the producer's name)
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable, Callable[[str], str]]] = {
    "gated_mlp": (("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP",
                   "Gemma3MLP"),
                  ("down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",),
                  _gated_mlp_forward, _consumer_down),
    "bert_intermediate": (("BertIntermediate", "RobertaIntermediate", "XLMRobertaIntermediate",
                           "ElectraIntermediate"),
                          ("hidden_states = self.dense(hidden_states)",
                           "hidden_states = self.intermediate_act_fn(hidden_states)"),
                          _intermediate_forward, _consumer_output),
    "vit_mlp": (("ViTMLP",),
                ("hidden_states = self.fc1(hidden_states)",
                 "hidden_states = self.activation_fn(hidden_states)",
                 "hidden_states = self.fc2(hidden_states)"),
                _vit_mlp_forward, _consumer_fc2),
    # the normalised hidden state feeding q/k/v, gate/up: recomputed from the residual
    # stream and 1/rms that the norm's backward saves
    "rms_norm": (("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"),
                 ("hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
                  "return self.weight * hidden_states.to(input_dtype)"),
                 _rms_norm_forward, _any_consumer),
    # Gemma 1-3: x_hat * (1 + w) in fp32; the class's _norm is checked too (_EXTRA_LINES)
    "gemma_rms_norm": (("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"),
                       ("output = self._norm(x.float())",
                        "output = output * (1.0 + self.weight.float())"),
                       _gemma_rms_norm_forward, _any_consumer),
    # nn.LayerNorm (BERT, RoBERTa, ViT, GPT-2, ...): recomputed from its input, which
    # layer_norm's backward saves
    "layer_norm": (("LayerNorm",), (), _layer_norm_forward, _any_consumer),
}
#: family -> {other method: its ``self.`` lines}: methods the class forward calls
_EXTRA_LINES = {"gemma_rms_norm": {
    "_norm": ("return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)",)}}
_OURS = {spec[2] for spec in FAMILIES.values()}
_CHECKED: dict[tuple[type, str], bool] = {}


def _known_forward(cls: type, family: str) -> bool:
    """True when ``cls.forward`` does exactly what our replacement does (its ``self.`` lines
    are the known ones): a newer transformers with another MLP keeps the generic path."""
    key = (cls, family)
    if family == "layer_norm":
        return cls is nn.LayerNorm
    if key not in _CHECKED:
        wanted = {"forward": FAMILIES[family][1], **_EXTRA_LINES.get(family, {})}
        _CHECKED[key] = all(_self_lines(getattr(cls, method, None)) == lines
                            for method, lines in wanted.items())
    return _CHECKED[key]


def _self_lines(method: Callable | None) -> tuple[str, ...]:
    """The stripped source lines of ``method`` that use ``self.`` (empty when unreadable)."""
    try:
        lines = inspect.getsource(method).splitlines()
    except (OSError, TypeError):
        lines = []
    return tuple(line.strip() for line in lines if "self." in line)


def share_activations(model: nn.Module, fused: Iterable[str]) -> list[str]:
    """Replace the forward of each known producer module whose consumer (``down_proj``,
    ``output.dense``, ``fc2``) is in ``fused`` (names of fused layers); returns the names of
    the producers changed. Outputs are unchanged bit for bit.

    >>> share_activations(model, [n for n, m in adapted_modules(model).items() if m.mode == "fused"])
    """
    fused = set(fused)
    done: list[str] = []
    for name, module in model.named_modules():
        cls = type(module)
        for family, (classes, _, forward, consumer) in FAMILIES.items():
            wanted = consumer(name)
            if cls.__name__ in classes and (wanted in fused or wanted is None and fused) and \
                    "forward" not in vars(module) and _known_forward(cls, family):
                module.forward = types.MethodType(forward, module)
                done.append(name)
    return done


def unshare_activations(model: nn.Module, names: Iterable[str]) -> None:
    """Give the producers ``names`` their class forward back (undo :func:`share_activations`).

    >>> unshare_activations(model, names)
    """
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        bound = vars(module).get("forward") if module is not None else None
        if bound is not None and getattr(bound, "__func__", None) in _OURS:
            del module.forward
