"""Analytic training-memory estimates for a RowPlan, next to LoRA and full fine-tuning.

Usage::

    est = plan.memory_estimate(batch_size=8, seq_len=512, dtype=torch.bfloat16)
    est.total("rowsft"), est.total("lora"), est.total("full")
    est.to_frame(unit="GiB")

The model (bytes; ``b`` = bytes per element of ``dtype``, ``T`` = tokens = batch x seq_len,
``P`` = the whole model's parameters from ``plan.meta["model_parameters"]``, falling back to
the plan's target modules with a note, ``N`` = ``plan.trainable_parameters()``):

- ``weights``: frozen weights held in memory: ``P * b`` for rowsft and LoRA (the base model
  stays frozen), 0 for full fine-tuning (every weight is trainable, counted below).
- ``trainable``, ``gradients``: ``N * b`` each for rowsft; LoRA at equal parameters uses rank
  ``k = plan.equivalent_lora_rank()`` (``k * sum(d_in + d_out) == N``) so also ``N * b``;
  ``P * b`` each for full fine-tuning.
- ``optimizer``: states per trainable parameter (adamw/adam 2, sgd_momentum 1, sgd 0) x ``b``.
- ``activations``: what training saves for backward *beyond the frozen floor* (what
  propagating gradients through frozen layers needs anyway, the same for every method).
  A frozen Linear needs no saved input; one whose weight trains must keep its input ``x``
  (``T * d_in * b``), once per distinct input: q/k/v (query/key/value) share the attention
  input, gate/up share the MLP input. rowsft saves ``x`` for every module with selected rows
  (a column-only module saves just its ``c`` selected columns, ``T * c * b``); LoRA on the
  plan's modules saves ``x`` likewise plus its rank-``k`` intermediate (``T * k * b`` per
  module); full fine-tuning saves the input of every target module of the plan.
Not modelled: where the earliest trainable layer sits (it moves the frozen floor, see
../shared/TESTING.md), mixed-precision master copies, allocator fragmentation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .plan import RowPlan

COMPONENTS = ("weights", "trainable", "gradients", "optimizer", "activations")
METHODS = ("rowsft", "lora", "full")
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}

# Sibling modules that read the same input tensor (last name component).
_SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv",
                 "query": "qkv", "key": "qkv", "value": "qkv",
                 "gate_proj": "gate_up", "up_proj": "gate_up", "w1": "w13", "w3": "w13"}


@dataclass
class MemoryEstimate:
    """Bytes by component for each method: ``methods[method][component]``.

    Usage: ``est.total("rowsft")``; ``est.to_frame(unit="MiB")``.
    """

    methods: dict[str, dict[str, int]]
    batch_size: int
    seq_len: int
    dtype: str
    optimizer: str
    lora_rank: float
    trainable_parameters: int
    model_parameters: int
    notes: list[str] = field(default_factory=list)

    def total(self, method: str = "rowsft") -> int:
        """Sum of the components of ``method`` (rowsft, lora or full), in bytes."""
        if method not in self.methods:
            raise ValueError(f"unknown method {method!r}; choose one of {list(self.methods)}")
        return sum(self.methods[method].values())

    def to_frame(self, unit: str = "B"):
        """DataFrame: one row per method, one column per component plus ``total``."""
        import pandas as pd

        if unit not in _UNITS:
            raise ValueError(f"unknown unit {unit!r}; choose one of {list(_UNITS)}")
        scale = _UNITS[unit]
        rows = {m: {**{c: v / scale if scale > 1 else v for c, v in comp.items()},
                    "total": self.total(m) / scale if scale > 1 else self.total(m)}
                for m, comp in self.methods.items()}
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index.name = "method"
        return frame

    def to_dict(self) -> dict[str, Any]:
        return {"methods": self.methods, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "dtype": self.dtype, "optimizer": self.optimizer, "lora_rank": self.lora_rank,
                "trainable_parameters": self.trainable_parameters,
                "model_parameters": self.model_parameters, "notes": list(self.notes)}


def input_key(name: str) -> str:
    """Modules with the same key read the same input tensor (``...self_attn.q_proj`` and
    ``...self_attn.v_proj`` -> ``...self_attn:qkv``); other modules are their own key."""
    parent, _, last = name.rpartition(".")
    shared = _SHARED_INPUT.get(last)
    return f"{parent}:{shared}" if shared else name


def estimate_memory(plan: "RowPlan", batch_size: int, seq_len: int,
                    dtype: torch.dtype | str = torch.float32,
                    optimizer: str = "adamw") -> MemoryEstimate:
    """Analytic memory for training ``plan`` vs LoRA at equal parameters vs full fine-tuning.

    Usage: ``estimate_memory(plan, 8, 512, torch.bfloat16).to_frame("GiB")`` (see the module
    docstring for the model).
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype like torch.bfloat16, got {dtype!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of "
                         f"{list(OPTIMIZER_STATES)}")
    for what, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what}={v!r}: expected an int >= 1")
    b = torch.empty(0, dtype=dtype).element_size()
    states = OPTIMIZER_STATES[optimizer]
    tokens = batch_size * seq_len
    notes: list[str] = []

    model_params = plan.meta.get("model_parameters")
    if not model_params:
        model_params = sum(o * i for o, i in plan.shapes.values())
        notes.append("plan.meta has no model_parameters: whole-model weights are the plan's "
                     f"target modules only ({model_params:,} parameters)")
    model_params = int(model_params)
    n = plan.trainable_parameters()
    k = plan.equivalent_lora_rank()

    def saved_inputs(names) -> int:
        widths: dict[str, int] = {}
        for name in names:
            key = input_key(name)
            widths[key] = max(widths.get(key, 0), plan.shapes[name][1])
        return sum(widths.values()) * tokens * b

    row_modules = [m for m, v in plan.rows.items() if v.numel()]
    rows_keys = {input_key(m) for m in row_modules}
    col_only = sum(v.numel() for m, v in plan.columns.items()
                   if v.numel() and input_key(m) not in rows_keys)
    lora_params = round(k * sum(sum(plan.shapes[m]) for m in plan.modules))

    def method(weights: int, trainable: int, activations: int) -> dict[str, int]:
        return {"weights": weights * b, "trainable": trainable * b, "gradients": trainable * b,
                "optimizer": states * trainable * b, "activations": int(round(activations))}

    methods = {
        "rowsft": method(model_params, n, saved_inputs(row_modules) + col_only * tokens * b),
        "lora": method(model_params, lora_params,
                       saved_inputs(plan.modules) + len(plan.modules) * tokens * k * b),
        "full": method(0, model_params, saved_inputs(plan.shapes)),
    }
    return MemoryEstimate(methods=methods, batch_size=batch_size, seq_len=seq_len,
                          dtype=str(dtype).removeprefix("torch."), optimizer=optimizer,
                          lora_rank=k, trainable_parameters=n, model_parameters=model_params,
                          notes=notes)
