"""Exact memory measurement: allocation peaks, bytes saved for backward, tensor bytes.

On CPU the allocation peak comes from ``torch.profiler`` (``profile_memory=True``): the
running sum of its ``[memory]`` events, sorted by start time (``prof.events()``
under-reports on CPU, the raw kineto events do not). On CUDA it comes from the caching
allocator's ``max_memory_allocated``. Both count only allocations made *inside* ``fn``
(memory that already existed, such as parameters, is not part of the peak).

Usage::

    peak = peak_memory(lambda: model(**batch).loss.backward())           # bytes
    saved = saved_tensor_bytes(lambda: model(**batch).loss, model.parameters())
    weights = tensor_bytes(model)                                        # each storage once
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
from torch import nn

# torch 2.13's profiler backend (kineto) prints "USDT: ... profiler_start/stop" to stderr at
# every profiling session, which landed in notebook outputs; level 6 is above all of its
# levels. A user's own KINETO_LOG_LEVEL wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

__all__ = ["peak_memory", "measure_peak", "saved_tensor_bytes", "tensor_bytes"]


def _device_type(device: str | torch.device | None) -> str:
    return torch.device(device).type if device is not None else "cpu"


def measure_peak(fn: Callable[[], Any], device: str | torch.device | None = None
                 ) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(its result, peak bytes allocated above the start)``.

    ``device``: where the allocations to count happen (``"cpu"`` default, or ``"cuda"``).

    >>> result, peak = measure_peak(lambda: torch.ones(1024, 1024))   # peak == 4 MiB
    """
    kind = _device_type(device)
    if kind == "cuda":
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn()
        torch.cuda.synchronize(dev)
        return result, max(0, torch.cuda.max_memory_allocated(dev) - start)
    if kind != "cpu":
        raise ValueError(f"peak_memory measures 'cpu' or 'cuda' allocations, not {kind!r}; "
                         "run the measurement on CPU or CUDA.")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    cpu = torch.autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == cpu]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return result, peak


def peak_memory(fn: Callable[[], Any], device: str | torch.device | None = None) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before it.

    >>> peak_memory(lambda: torch.empty(256, 1024))   # 1 MiB
    1048576
    """
    return measure_peak(fn, device)[1]


def saved_tensor_bytes(fn: Callable[[], Any], params: Iterable[torch.Tensor] | nn.Module = ()
                       ) -> int:
    """Bytes autograd saves for backward while ``fn()`` runs (typically a forward pass).

    Each storage is counted once; storages of ``params`` (tensors, or a module's
    parameters) and of any ``nn.Parameter`` are skipped, since they exist anyway.

    >>> saved_tensor_bytes(lambda: model(**batch).loss, model)
    """
    if isinstance(params, nn.Module):
        params = list(params.parameters())
    skip = {_storage_key(p) for p in params}
    seen: dict[tuple, int] = {}
    keep: list[Any] = []  # hold storages so freed ones cannot be reused at the same address

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter):
            return t
        key = _storage_key(t)
        if key not in skip and key not in seen:
            storage = t.untyped_storage()
            seen[key] = storage.nbytes()
            keep.append(storage)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    total = sum(seen.values())
    keep.clear()
    return total


def tensor_bytes(tensors: torch.Tensor | nn.Module | Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors`` (a tensor, an iterable, or a module's
    parameters and buffers), each storage counted once.

    >>> tensor_bytes([torch.zeros(10), torch.zeros(5)])
    60
    """
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    elif isinstance(tensors, nn.Module):
        tensors = [*tensors.parameters(), *tensors.buffers()]
    seen: dict[tuple, int] = {}
    for t in tensors:
        if t is None:
            continue
        seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())
