"""Exact memory of one training step, by component (bytes, exact and repeatable on CPU).

``weights`` (frozen parameters + buffers), ``trainable``, ``gradients``, ``optimizer``
(AdamW state), ``saved`` (tensors saved for backward, each storage once, parameters and
buffers skipped) and ``step_peak`` (allocation peak of forward + backward + optimizer step
above what existed before: :func:`rowsft_nb.profiling.measure_peak`, ``max_memory_allocated``
on CUDA). ``total = weights + trainable + optimizer + step_peak``; a benchmark's
``overhead`` is ``total`` minus the frozen floor's total.

Usage::

    mem = measure_memory(inject(model, plan), batch, "rowsft")
    mem.total, mem.saved, mem.to_dict()
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..profiling import measure_peak, saved_tensor_bytes, tensor_bytes
from .baselines import freeze

__all__ = ["MemoryBreakdown", "measure_memory", "make_optimizer", "forward_loss",
           "training_step"]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def forward_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], floor: bool = False
                 ) -> torch.Tensor:
    """The training loss of ``model`` on ``batch``; ``floor=True``: through
    ``inputs_embeds`` that require grad (the frozen floor's backward reaches the embeddings;
    for a vision model without ``input_ids``, the ``pixel_values``).

    >>> forward_loss(model, batch).backward()
    """
    if not floor:
        return model(**batch).loss
    if "input_ids" not in batch and "pixel_values" in batch:  # vision: backward reaches pixels
        pixels = batch["pixel_values"].detach().requires_grad_(True)
        return model(**{**batch, "pixel_values": pixels}).loss
    emb = model.get_input_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "input_ids"}
    inputs["inputs_embeds"] = emb(batch["input_ids"]).detach().requires_grad_(True)
    return model(**inputs).loss


def make_optimizer(model: nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer | None:
    """AdamW (weight_decay 0: masked entries stay put) over the trainable parameters, or
    None when nothing trains (the floor). ``>>> opt = make_optimizer(model)``"""
    params = _trainable(model)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None


def training_step(model: nn.Module, batch: Mapping[str, torch.Tensor],
                  opt: torch.optim.Optimizer | None) -> Callable[[], None]:
    """A callable doing one step: forward + backward + ``opt`` step (``opt=None``: the
    frozen floor, forward + backward through ``inputs_embeds``).

    >>> step = training_step(model, batch, make_optimizer(model)); step()
    """
    floor = opt is None

    def step() -> None:
        loss = forward_loss(model, batch, floor)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


@dataclass
class MemoryBreakdown:
    """Bytes by component of one training step (see the module docstring)."""

    method: str
    weights: int
    trainable: int
    gradients: int
    optimizer: int
    saved: int
    step_peak: int
    trainable_parameters: int
    peak_kind: str = "cpu_profiler"
    cuda_max_allocated: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.optimizer + self.step_peak

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def measure_memory(model: nn.Module, batch: Mapping[str, torch.Tensor], method: str = "",
                   lr: float = 1e-4) -> MemoryBreakdown:
    """Exact memory by component of a training step of ``model`` on ``batch`` (one warm-up
    step first, so AdamW state exists). ``method="floor"`` measures the frozen floor.

    >>> measure_memory(inject(model, plan), batch, "rowsft").total
    """
    floor = method == "floor"
    if not floor and not _trainable(model):
        raise ValueError(f"method {method!r}: the model has no trainable parameters; "
                         "prepare it first (prepare_method) or measure it as 'floor'")
    if floor:
        freeze(model)
    model.train()
    device = _device_of(model)
    opt = make_optimizer(model, lr)
    step = training_step(model, batch, opt)
    step()  # warm-up: optimizer state now exists
    params = _trainable(model)
    trainable = tensor_bytes(params) if params else 0
    trainable_keys = {p.untyped_storage().data_ptr() for p in params}
    frozen = [t for t in [*model.parameters(), *model.buffers()]
              if t.untyped_storage().data_ptr() not in trainable_keys]
    weights = tensor_bytes(frozen) if frozen else 0
    opt_tensors = [v for s in (opt.state.values() if opt else ()) for v in s.values()
                   if isinstance(v, torch.Tensor)]
    optimizer = tensor_bytes(opt_tensors) if opt_tensors else 0
    saved = saved_tensor_bytes(lambda: forward_loss(model, batch, floor),
                               [*model.parameters(), *model.buffers()])
    forward_loss(model, batch, floor).backward()
    grads = [p.grad for p in params if p.grad is not None]
    gradients = tensor_bytes(grads) if grads else 0
    model.zero_grad(set_to_none=True)
    _, peak = measure_peak(step, device)
    kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_profiler"
    n_trainable = sum(p.numel() for p in params)
    return MemoryBreakdown(method=method, weights=weights, trainable=trainable,
                           gradients=gradients, optimizer=optimizer, saved=saved,
                           step_peak=peak, trainable_parameters=n_trainable, peak_kind=kind,
                           cuda_max_allocated=peak if device.type == "cuda" else None)
